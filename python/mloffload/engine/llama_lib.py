"""The llama-cpp-python library itself, before any model: importing it (with its log lines
routed to Python logging), what the build can do, the load options, and the abort hook
that stops a decode within a batch."""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import threading
from typing import Any

from .base import EngineError
from .build import pinned


class LlamaCppUnavailable(EngineError):
    """llama-cpp-python cannot be imported in this Python."""


_llama_log = logging.getLogger("mloffload.llama_cpp")
GGML_LOG_LEVEL_ERROR = 4  # ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_log_callback: Any = None
# Set on a thread whose decode we aborted: llama.cpp then logs its "failed to decode"
# errors, which are no errors of ours (a client left), so they go to debug.
_aborting = threading.local()


def _route_llama_logs(llama_cpp: Any) -> None:
    """Send llama.cpp's own log lines to Python logging: errors stay visible, the rest
    (tensor tables, cache notes) only at debug level."""
    global _log_callback
    if _log_callback is not None:
        return

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def callback(level: int, text: bytes, _user: Any) -> None:
        line = text.decode("utf-8", "replace").rstrip()
        if not line:
            return
        if level == GGML_LOG_LEVEL_ERROR and not getattr(_aborting, "active", False):
            _llama_log.error("%s", line)
        else:
            _llama_log.debug("%s", line)

    _log_callback = callback  # keep a reference: llama.cpp holds only the pointer
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except Exception as exc:  # ImportError, or OSError from a broken shared library
        raise LlamaCppUnavailable(
            "llama-cpp-python is not importable in this Python "
            f"({exc}); install it with: pip install {pinned('llama-cpp-python')}"
        ) from exc
    _route_llama_logs(llama_cpp)
    return llama_cpp


def engine_facts() -> dict[str, Any]:
    """What the installed llama.cpp can do, without loading a model."""
    try:
        llama_cpp = import_llama_cpp()
    except LlamaCppUnavailable as exc:
        return {"available": False, "reason": str(exc)}
    return {
        "available": True,
        "llama_cpp_python": getattr(llama_cpp, "__version__", "unknown"),
        "supports_gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        "supports_mmap": bool(llama_cpp.llama_supports_mmap()),
        "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
    }


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    n_ctx: int = 4096
    n_threads: int = 0
    n_gpu_layers: int = 0
    main_gpu: int = 0
    # Flash attention: +7% decode on the CPU here, less memory for attention on the GPU.
    flash_attn: bool = True
    embedding_memory: int = 128 * 1024**2  # see embedding_batch


class AbortHook:
    """llama.cpp's abort callback on one context: a decode stops within a graph node once
    ``cancel`` is set, instead of after the whole batch (seconds for a long prompt).

    Armed only while a prompt or an embedding is evaluated: llama.cpp calls it once per
    graph node, which costs about a tenth of the decode speed while a reply is generated.
    """

    def __init__(self, lib: Any, ctx: Any) -> None:
        self._lib = lib
        self._ctx = ctx
        self._cancel: threading.Event | None = None
        self._callback = lib.ggml_abort_callback(self._check)  # kept: llama.cpp holds a pointer
        self._none = lib.ggml_abort_callback()
        self.armed = False

    def _check(self, _data: Any) -> bool:
        if self._cancel is not None and self._cancel.is_set():
            _aborting.active = True
            return True
        return False

    def arm(self, cancel: threading.Event) -> None:
        self._cancel = cancel
        self._lib.llama_set_abort_callback(self._ctx, self._callback, None)
        self.armed = True

    def disarm(self) -> None:
        if self.armed:
            self._lib.llama_set_abort_callback(self._ctx, self._none, None)
            self.armed = False
            self._cancel = None
        _aborting.active = False
