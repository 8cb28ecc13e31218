"""The NVML probe. The real answer is checked as this machine gives it (no GPU and the reason,
or the GPU's real numbers), and a fake `pynvml` checks how a present GPU is read and reported
on machines that have none."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
from typing import Any

import pytest

from mloffload.hardware.gpu import GB, GPUProbe


def test_the_real_answer_for_this_machine() -> None:
    snap = GPUProbe().snapshot()
    data = snap.to_dict()
    if not snap.available:
        assert snap.reason  # e.g. "NVML could not start: NVML Shared Library Not Found ..."
        assert data == {"available": False, "reason": snap.reason, "gpus": []}
        return
    assert snap.gpus and snap.driver_version
    for g in snap.gpus:
        assert g.name and g.total_bytes > 0
        assert 0 <= g.used_bytes <= g.total_bytes and 0 <= g.free_bytes <= g.total_bytes
    assert data["total_bytes"] == sum(g.total_bytes for g in snap.gpus)
    smi = shutil.which("nvidia-smi")
    if smi:  # the driver's own tool must agree on each card's size (MiB)
        out = subprocess.run([smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=True).stdout.split()
        assert [int(x) for x in out] == [g.total_bytes // 1024**2 for g in snap.gpus]


class _NVMLError(Exception):
    pass


def fake_nvml(fail_util: bool = False) -> types.ModuleType:
    m = types.ModuleType("pynvml")
    m.NVMLError = _NVMLError  # type: ignore[attr-defined]
    m.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]
    proc = types.SimpleNamespace
    calls: dict[str, Any] = {
        "nvmlInit": lambda: None,
        "nvmlSystemGetDriverVersion": lambda: b"580.82",
        "nvmlSystemGetCudaDriverVersion_v2": lambda: 13000,
        "nvmlDeviceGetCount": lambda: 2,
        "nvmlDeviceGetHandleByIndex": lambda i: i,
        "nvmlDeviceGetMemoryInfo": lambda h: proc(total=80 * GB, used=(10 + h) * GB,
                                                  free=(70 - h) * GB),
        "nvmlDeviceGetName": lambda h: f"NVIDIA H100 #{h}",
        "nvmlDeviceGetUUID": lambda h: f"GPU-{h}",
        "nvmlDeviceGetTemperature": lambda h, kind: 40 + h,
        "nvmlDeviceGetComputeRunningProcesses": lambda h: [
            proc(pid=os.getpid(), usedGpuMemory=2 * GB), proc(pid=1, usedGpuMemory=None)],
        "nvmlDeviceGetGraphicsRunningProcesses": lambda h: [],
    }

    def util(h: int) -> Any:
        if fail_util:
            raise _NVMLError("Not Supported")
        return proc(gpu=55)

    calls["nvmlDeviceGetUtilizationRates"] = util
    for name, fn in calls.items():
        setattr(m, name, fn)
    return m


def test_present_gpus_are_read_and_totalled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(fail_util=True))
    snap = GPUProbe().snapshot()
    assert snap.available and snap.driver_version == "580.82" and snap.cuda_version == "13.0"
    data = snap.to_dict()
    assert (data["total_gb"], data["used_gb"], data["free_gb"]) == (160.0, 21.0, 139.0)
    first = data["gpus"][0]
    assert first["name"] == "NVIDIA H100 #0" and first["free_gb"] == 70.0
    assert first["utilization_percent"] is None  # unsupported field: None, not a crash
    assert first["temperature_c"] == 40
    assert first["processes"] == [{"pid": os.getpid(), "used_bytes": 2 * GB, "ours": True},
                                  {"pid": 1, "used_bytes": None, "ours": False}]
    assert snap.gpu(1) is not None and snap.gpu(1).free_bytes == 69 * GB  # type: ignore[union-attr]


def test_nvml_error_during_read_is_an_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_nvml()

    def broken() -> int:
        raise _NVMLError("GPU is lost")

    nvml.nvmlDeviceGetCount = broken  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    snap = GPUProbe().snapshot()
    assert snap.available is False and snap.reason == "NVML error: GPU is lost"
