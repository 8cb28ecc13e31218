"""GPU memory through NVML (``nvidia-ml-py``). No GPU is an answer, never an exception."""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

GB = 1024**3


@dataclasses.dataclass(frozen=True)
class GPUProcess:
    pid: int
    used_bytes: int | None
    ours: bool


@dataclasses.dataclass(frozen=True)
class GPUInfo:
    index: int
    name: str
    uuid: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    utilization_percent: int | None
    temperature_c: int | None
    processes: tuple[GPUProcess, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "uuid": self.uuid,
            "total_bytes": self.total_bytes,
            "used_bytes": self.used_bytes,
            "free_bytes": self.free_bytes,
            "total_gb": round(self.total_bytes / GB, 2),
            "used_gb": round(self.used_bytes / GB, 2),
            "free_gb": round(self.free_bytes / GB, 2),
            "utilization_percent": self.utilization_percent,
            "temperature_c": self.temperature_c,
            "processes": [dataclasses.asdict(p) for p in self.processes],
        }


@dataclasses.dataclass(frozen=True)
class GPUSnapshot:
    available: bool
    reason: str = ""
    driver_version: str = ""
    cuda_version: str = ""
    gpus: tuple[GPUInfo, ...] = ()

    def gpu(self, index: int) -> GPUInfo | None:
        return next((g for g in self.gpus if g.index == index), None)

    def to_dict(self) -> dict[str, Any]:
        """The `/vram` shape: the seed's totals in GB plus per-GPU detail."""
        if not self.available:
            return {"available": False, "reason": self.reason, "gpus": []}
        total = sum(g.total_bytes for g in self.gpus)
        used = sum(g.used_bytes for g in self.gpus)
        free = sum(g.free_bytes for g in self.gpus)
        return {
            "available": True,
            "driver_version": self.driver_version,
            "cuda_version": self.cuda_version,
            "total_gb": round(total / GB, 2),
            "used_gb": round(used / GB, 2),
            "free_gb": round(free / GB, 2),
            "total_bytes": total,
            "used_bytes": used,
            "free_bytes": free,
            "gpus": [g.to_dict() for g in self.gpus],
        }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class GPUProbe:
    """Initialises NVML once, lazily; every call returns a fresh snapshot."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._init_error = ""

    def _init(self) -> Any:
        if self._nvml is not None or self._init_error:
            return self._nvml
        try:
            import pynvml
        except ImportError:
            self._init_error = "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
            return None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self._init_error = f"NVML could not start: {exc} (no NVIDIA GPU or driver here)"
            return None
        except OSError as exc:
            self._init_error = f"NVML library not loadable: {exc}"
            return None
        self._nvml = pynvml
        return pynvml

    def snapshot(self) -> GPUSnapshot:
        with self._lock:
            nvml = self._init()
            if nvml is None:
                return GPUSnapshot(False, self._init_error)
            try:
                return self._read(nvml)
            except nvml.NVMLError as exc:
                return GPUSnapshot(False, f"NVML error: {exc}")

    @staticmethod
    def _read(nvml: Any) -> GPUSnapshot:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        try:
            cuda = nvml.nvmlSystemGetCudaDriverVersion_v2()
            cuda_version = f"{cuda // 1000}.{cuda % 1000 // 10}"
        except nvml.NVMLError:
            cuda_version = ""
        me = os.getpid()
        gpus = []
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            try:
                util: int | None = int(nvml.nvmlDeviceGetUtilizationRates(h).gpu)
            except nvml.NVMLError:
                util = None
            try:
                temp: int | None = int(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))
            except nvml.NVMLError:
                temp = None
            procs: list[GPUProcess] = []
            for getter in ("nvmlDeviceGetComputeRunningProcesses",
                           "nvmlDeviceGetGraphicsRunningProcesses"):
                try:
                    for p in getattr(nvml, getter)(h):
                        used = getattr(p, "usedGpuMemory", None)
                        procs.append(GPUProcess(int(p.pid), used if isinstance(used, int) else None,
                                                int(p.pid) == me))
                except nvml.NVMLError:
                    pass
            gpus.append(GPUInfo(
                index=i,
                name=_text(nvml.nvmlDeviceGetName(h)),
                uuid=_text(nvml.nvmlDeviceGetUUID(h)),
                total_bytes=int(mem.total),
                used_bytes=int(mem.used),
                free_bytes=int(mem.free),
                utilization_percent=util,
                temperature_c=temp,
                processes=tuple(procs),
            ))
        return GPUSnapshot(True, "", driver, cuda_version, tuple(gpus))
