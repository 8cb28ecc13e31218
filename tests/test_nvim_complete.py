"""Ghost text in a real headless Neovim (issue 14): suggestions from a real server's /infill
on the FIM test model (tests/fim_model.py: its text is nonsense, the protocol real), the keys,
cancelling the request in flight, the context sent, the fallback with the server down, and
the statusline."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fim_model import FIM_ID
from helpers import ServerProcess, free_port, machine_gpu
from nvim_harness import Editor, RecordingProxy

Factory = Callable[..., Editor]
GEMMA = "gemma-3-270m-q4_k_m"
# Greedy, so what the model writes for a context is the same every time.
GREEDY = {"temperature": 0, "samplers": ["temperature"]}


@pytest.fixture(scope="module")
def fim_server(tmp_path_factory: pytest.TempPathFactory, fim_models: Path
               ) -> Iterator[ServerProcess]:
    """In-process: Gemma answers chats, the FIM test model completes (fim_model)."""
    proc = ServerProcess(tmp_path_factory.mktemp("complete-server"), env={
        "ML_OFFLOAD_MODELS_DIR": str(fim_models), "ML_OFFLOAD_N_CTX": "2048",
        "ML_OFFLOAD_DEFAULT_MODEL": GEMMA, "ML_OFFLOAD_FIM_MODEL": FIM_ID,
        "ML_OFFLOAD_MAX_LOADED": "2", "ML_OFFLOAD_THREADS": "1"}).wait_ready()
    yield proc
    proc.stop()


def setup(url: str, **complete: Any) -> dict[str, Any]:
    params = {**GREEDY, **complete.pop("params", {})}
    return {"api_url": url, "complete": {"debounce_ms": 30, "params": params, **complete}}


def current(ed: Editor) -> dict[str, Any] | None:
    value = ed.lua("return require('ml-offload.complete').current()")
    return dict(value) if value else None


def stats(ed: Editor) -> dict[str, Any]:
    return dict(ed.lua("return require('ml-offload.complete').stats()"))


def wait_ghost(ed: Editor, timeout: float = 120.0) -> dict[str, Any]:
    return ed.wait(lambda: current(ed), timeout, what="ghost text")


def ghost_marks(ed: Editor) -> list[Any]:
    """The extmarks the user sees: inline text at the cursor, virtual lines below."""
    return list(ed.lua("return vim.api.nvim_buf_get_extmarks(0, "
                       "require('ml-offload.complete.ghost').ns, 0, -1, { details = true })"))


def server_requests(url: str) -> dict[str, Any]:
    return dict(httpx.get(url + "/status", timeout=30).json()["requests"])


def open_file(ed: Editor, path: Path, lines: list[str]) -> None:
    ed.edit_file(path, lines)
    ed.nvim.command("setlocal noexpandtab")


@pytest.mark.parametrize("transport", ["uv", "curl", "python"])
def test_ghost_text_appears_after_typing_and_tab_inserts_it(
        editor: Factory, fim_server: ServerProcess, tmp_path: Path, transport: str) -> None:
    """Over each transport: the editor's own socket, curl, and the remote plugin."""
    ed = editor(**setup(fim_server.url, transport=transport))
    open_file(ed, tmp_path / "notes.txt", ["", "", ""])
    ed.keys("iHello")
    shown = settled(ed)
    assert shown["row"] == 0 and shown["col"] == len("Hello")
    marks = ghost_marks(ed)
    assert marks, "no extmark drawn"
    details = marks[0][3]
    lines = shown["text"].split("\n")
    drawn = [c[0] for c in (details.get("virt_text") or [])] + \
        [chunk[0][0] for chunk in (details.get("virt_lines") or [])]
    assert drawn == ([lines[0]] if lines[0] else []) + lines[1:]
    assert all(c[1] == "MLOffloadGhost" for c in details.get("virt_text") or [])
    text = shown["text"]
    ed.keys("<Tab>")
    ed.wait(lambda: current(ed) is None or None, 10, what="the suggestion taken")
    buffer = "\n".join(ed.nvim.current.buffer[:])
    assert buffer.startswith("Hello" + text), (buffer, text)
    row, col = ed.nvim.api.win_get_cursor(0)
    last = ("Hello" if "\n" not in text else "") + text.split("\n")[-1]
    assert (row - 1, col) == (text.count("\n"), len(last.encode()))  # col counts bytes
    assert stats(ed)["accepted"] == 1
    assert ed.error_lines() == []


def test_tab_without_a_suggestion_does_what_tab_does(editor: Factory,
                                                      fim_server: ServerProcess,
                                                      tmp_path: Path) -> None:
    ed = editor(**setup(fim_server.url))
    open_file(ed, tmp_path / "plain.txt", ["alpha alpine", ""])
    ed.nvim.command("let b:mloffload_complete = v:false")  # no suggestion in this buffer
    ed.nvim.api.win_set_cursor(0, [2, 0])
    ed.keys("ix<Tab>y<Esc>")
    ed.wait(lambda: ed.nvim.current.buffer[1] == "x\ty" or None, 10, what="a tab")
    # With the completion menu open, <Tab> moves in it (here: to the second match). The
    # menu needs a UI to be shown at all.
    ed.nvim.ui_attach(80, 24, rgb=True)
    ed.keys("oal<C-n>")
    ed.wait(lambda: ed.nvim.eval("pumvisible()") or None, 10, what="the completion menu")
    ed.keys("<Tab><C-y><Esc>")
    ed.wait(lambda: ed.nvim.current.buffer[2] in ("alpine", "alpha") or None, 10,
            what="the menu's item")
    assert ed.nvim.current.buffer[2] == "alpine"
    assert stats(ed)["requests"] == 0


def settled(ed: Editor, timeout: float = 120.0) -> dict[str, Any]:
    """The suggestion once its answer is complete (it streams in: <Tab> takes what has
    come so far)."""
    wait_ghost(ed, timeout)
    ed.wait(lambda: not stats(ed)["in_flight"] or None, 60, what="the answer complete")
    shown = current(ed)
    assert shown is not None
    return shown


# In a buffer of two empty lines, the model's greedy answer continues this line
# (" = np.array([1, 2, ..."); below more empty lines it writes only blank lines.
SAME_LINE = "import numpy as"


def test_typing_what_it_suggests_keeps_it_without_a_new_request(
        editor: Factory, fim_server: ServerProcess, tmp_path: Path) -> None:
    ed = editor(**setup(fim_server.url))
    open_file(ed, tmp_path / "keep.py", ["", ""])
    ed.keys("i" + SAME_LINE)
    shown = settled(ed)
    first = shown["text"].split("\n")[0]
    assert len(first) >= 3, shown
    requests = stats(ed)["requests"]
    typed = first[:2]
    ed.keys(typed)
    ed.wait(lambda: (current(ed) or {}).get("col") == shown["col"] + len(typed) or None,
            10, what="the rest of the suggestion")
    assert current(ed)["text"] == shown["text"][len(typed):]  # type: ignore[index]
    time.sleep(0.3)  # past the debounce: still no new request
    assert stats(ed)["requests"] == requests and stats(ed)["kept"] >= 1
    ed.keys("?")  # not what it says: the suggestion goes, a new request is made
    ed.wait(lambda: stats(ed)["requests"] > requests or None, 10, what="a new request")


def test_partial_accept_and_dismiss(editor: Factory, fim_server: ServerProcess,
                                    tmp_path: Path) -> None:
    ed = editor(**setup(fim_server.url))
    open_file(ed, tmp_path / "partial.py", ["", ""])
    ed.keys("i" + SAME_LINE)
    full = settled(ed)["text"]
    ed.keys("<C-Right>")  # a word: " =" (punctuation counts as one)
    ed.wait(lambda: stats(ed)["accepted"] == 1 or None, 10, what="a word taken")
    line = ed.nvim.current.buffer[0]
    assert line.startswith(SAME_LINE) and full.startswith(line[len(SAME_LINE):])
    taken = line[len(SAME_LINE):]
    assert 0 < len(taken) < len(full.split("\n")[0])
    rest = current(ed)
    assert rest is not None and rest["text"] == full[len(taken):]
    ed.keys("<S-Tab>")  # the rest of the line
    ed.wait(lambda: stats(ed)["accepted"] == 2 or None, 10, what="a line taken")
    assert ed.nvim.current.buffer[0] == SAME_LINE + full.split("\n")[0]
    # Leaving insert mode hides whatever is shown; moving the cursor does too.
    ed.keys("<Esc>")
    ed.wait(lambda: (current(ed) is None and ghost_marks(ed) == []) or None, 10,
            what="no ghost text in normal mode")
    ed.nvim.current.buffer[:] = ["", ""]
    ed.nvim.command("normal! gg")
    ed.keys("i" + SAME_LINE)
    settled(ed)
    ed.keys("<Left>")
    ed.wait(lambda: ghost_marks(ed) == [] or current(ed) is None or None, 10,
            what="the suggestion hidden after the cursor moved")


def test_a_keystroke_cancels_the_request_and_the_server_stops(
        editor: Factory, fim_server: ServerProcess, tmp_path: Path) -> None:
    url = fim_server.url
    ed = editor(**setup(url, n_predict=400, t_max_predict_ms=0))
    open_file(ed, tmp_path / "cancel.txt", ["", "", ""])
    before = server_requests(url)
    ed.keys("iHello")
    wait_ghost(ed)  # streaming: its first tokens show while the rest is generated
    assert stats(ed)["in_flight"]
    ed.keys("!<Esc>")  # a keystroke (no match), then leave: both cancel, none waits
    ed.wait(lambda: not stats(ed)["in_flight"] or None, 10, what="no request in flight")
    assert stats(ed)["cancelled"] >= 1
    deadline = time.monotonic() + 60
    while (after := server_requests(url))["cancelled"] == before["cancelled"] \
            or after["active"]:
        assert time.monotonic() < deadline, after
        time.sleep(0.2)
    assert after["cancelled"] - before["cancelled"] >= 1
    # It stopped at once: far fewer tokens than the 400 asked for.
    assert after["tokens_generated"] - before["tokens_generated"] < 200
    assert current(ed) is None


def test_mlcomplete_filetypes_and_the_buffer_switch(editor: Factory, fim_server: ServerProcess,
                                                    tmp_path: Path) -> None:
    ed = editor(**setup(fim_server.url, filetypes={"*": True, "markdown": False}))
    open_file(ed, tmp_path / "a.md", ["", ""])
    ed.keys("iHello")
    time.sleep(0.5)
    ed.keys("<Esc>")
    assert stats(ed)["requests"] == 0  # markdown is off
    open_file(ed, tmp_path / "b.txt", ["", ""])
    ed.nvim.command("MLComplete off")
    ed.keys("iHello")
    time.sleep(0.5)
    ed.keys("<Esc>")
    assert stats(ed)["requests"] == 0
    assert "○" in ed.lua("return require('ml-offload').statusline()")
    ed.nvim.command("MLComplete toggle")
    ed.keys("A there")
    ed.wait(lambda: stats(ed)["requests"] >= 1 or None, 10, what="a request")
    ed.keys("<Esc>")
    ed.lua("pcall(vim.cmd, 'MLComplete bogus')")
    assert any("on, off or toggle" in n for n in ed.notifications(4))


def test_context_and_extra_chunks_reach_the_server(editor: Factory, fim_server: ServerProcess,
                                                   tmp_path: Path) -> None:
    proxy = RecordingProxy(fim_server.url)
    try:
        ed = editor(**setup(proxy.url))
        ed.nvim.command(f"cd {tmp_path}")  # chunks are named relative to it
        helper = [f"def helper_{i}(x):" if i % 2 == 0 else "    return x" for i in range(20)]
        ed.edit_file(tmp_path / "util.py", helper)
        ed.nvim.command("normal! 5Gyj")  # yank 2 lines: too short to be a chunk
        ed.nvim.command("normal! 1Gy8j")  # 9 lines: a chunk
        main = [f"line {i}" for i in range(300)]
        ed.edit_file(tmp_path / "main.py", main)
        ed.nvim.api.win_set_cursor(0, [250, 5])  # line 249, before "249"
        ed.keys("imore ")
        wait_ghost(ed)
        ed.keys("<Esc>")
        bodies = [json.loads(ex["request"]) for ex in proxy.exchanges if ex["path"] == "/infill"]
        assert bodies, [ex["path"] for ex in proxy.exchanges]
        body = bodies[-1]
        assert body["cache_prompt"] is True and body["stream"] is True
        # The cursor line goes as the prompt, its rest first in the suffix.
        assert body["prompt"] == "line more "
        assert body["input_suffix"].startswith("249\nline 250\n")
        # The lines above the cursor, whole, within the budget (not the whole file).
        assert body["input_prefix"].endswith(main[248] + "\n")
        assert 0 < len(body["input_prefix"]) < len("\n".join(main[:249]))
        files = [c["filename"] for c in body["input_extra"]]
        assert "util.py" in files  # the yank, and the chunk around the cursor on leaving
        assert any("def helper_0(x):" in c["text"] for c in body["input_extra"])
        assert all(c["text"] != "def helper_2(x):\n    return x\n" for c in body["input_extra"])
        assert "main.py" in files  # far from the cursor: a chunk of the rest of the file
    finally:
        proxy.close()


def test_fallback_completes_with_the_server_down(editor: Factory, fim_models: Path,
                                                 tmp_path: Path) -> None:
    fim = fim_models / f"{FIM_ID}.gguf"
    dead = f"http://127.0.0.1:{free_port()}"
    env = {"ML_OFFLOAD_DATA_DIR": str(tmp_path / "fallback-data"),
           "ML_OFFLOAD_DEFAULT_MODEL": str(fim), "ML_OFFLOAD_THREADS": "1"}
    ed = editor(env=env, fallback_model=str(fim), **setup(dead))
    open_file(ed, tmp_path / "offline.txt", ["", "", ""])
    ed.keys("iHello")
    shown = settled(ed, timeout=180)  # the first one loads the model in the host
    assert shown["text"]
    assert stats(ed)["fallback"] >= 1
    line = ed.lua("return require('ml-offload').statusline()")
    assert "◆ local" in line, line
    ed.keys("<Tab>")
    ed.wait(lambda: "\n".join(ed.nvim.current.buffer[:]).startswith("Hello" + shown["text"])
            or None, 10, what="the fallback's suggestion taken")
    assert ed.error_lines() == []


def test_statusline_follows_a_chat_and_the_server(editor: Factory, fim_server: ServerProcess
                                                  ) -> None:
    ed = editor(**setup(fim_server.url, enabled=False), params={"max_tokens": 24,
                                                                "temperature": 0})
    ed.lua("""_G.ml_status_events = 0
      vim.api.nvim_create_autocmd('User', { pattern = 'MLOffloadStatus',
        callback = function() _G.ml_status_events = _G.ml_status_events + 1 end })""")
    first = ed.lua("return require('ml-offload').statusline()")
    seen = {first}
    ed.nvim.command("MLChat Say hello")
    deadline = time.monotonic() + 180
    while not ed.finished():
        seen.add(ed.lua("return require('ml-offload').statusline()"))
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ed.wait(lambda: "tok/s" in ed.lua("return require('ml-offload').statusline()") or None,
            30, what="the chat's rate in the statusline")
    line = ed.lua("return require('ml-offload').statusline()")
    seen.add(line)
    assert len(seen) >= 3, seen  # before, while it ran ("◐"), after (its rate)
    assert any("◐" in s for s in seen), seen
    # The /status poll brings the model and where its layers are.
    ed.wait(lambda: GEMMA.split("-q")[0] in ed.lua("return require('ml-offload').statusline()")
            or None, 30, what="the model in the statusline")
    line = ed.lua("return require('ml-offload').statusline()")
    gpu, _ = machine_gpu()
    assert ("GPU" in line and "GiB" in line) if gpu else (" · CPU · " in line), line
    assert ed.lua("return _G.ml_status_events") >= 2
