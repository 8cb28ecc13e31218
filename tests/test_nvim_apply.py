"""Applying answers (issue 16): a code block in a chat yanked, or proposed in place of the
chat's selection or at the source window's cursor, always as Neovim's diff mode first;
:MLAccept applies it in one undo step, :MLReject / q / <C-c> leave the buffer as it was.
And :MLEdit, streaming the model's rewrite into such a proposal, against the real server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import ServerProcess
from mloffload.nvim.edit import extract_code
from nvim_harness import Editor, RecordingProxy, chat_params

pytestmark = pytest.mark.timeout(600)

Factory = Callable[..., Editor]
SOURCE = ["def f(x):", "    return x+1", "", "print(f(1))"]
BLOCK = ["def f(x):", "    return x + 1"]
ANSWER = ["", "## some-model (ml-offload)", "", "Like this:", "", "```python", *BLOCK, "```", "",
          "_9 tokens · 1.0 tok/s · 1.0 s · finished (stop) · server llamacpp_", "", "## You",
          "", ""]


def open_source(ed: Editor, tmp_path: Path) -> int:
    return ed.edit_file(tmp_path / "sample.py", SOURCE)


def lines(ed: Editor, buf: int) -> list[str]:
    return list(ed.nvim.api.buf_get_lines(buf, 0, -1, False))


def chat_with_answer(ed: Editor, visual_keys: str) -> dict[str, Any]:
    """A chat about a selection, with an answer holding a code block (written into the
    buffer, as a pasted or resumed answer is); the cursor on the block."""
    ed.keys(visual_keys + "<leader>mc")
    chat = ed.wait(lambda: [c for c in ed.chats() if c["wins"]], what="the chat")[-1]
    ed.keys("<Esc>")
    ed.nvim.api.buf_set_lines(chat["buf"], -1, -1, False, ANSWER)
    row = ed.chat(chat["buf"])["lines"].index("    return x + 1") + 1
    ed.nvim.api.set_current_win(chat["wins"][0]["win"])
    ed.nvim.api.win_set_cursor(0, [row, 0])
    return chat


def test_code_blocks_yank_replace_insert_through_a_diff(editor: Factory,
                                                        tmp_path: Path) -> None:
    ed = editor()
    src = open_source(ed, tmp_path)
    chat = chat_with_answer(ed, "ggVj")
    ed.keys("gy")
    ed.wait(lambda: ed.nvim.funcs.getreg('"') == "\n".join(BLOCK) + "\n", what="the yank")
    assert ed.nvim.funcs.getregtype('"') == "V"

    # Replace the selection: a diff first, the source untouched until :MLAccept.
    ed.keys("gs")
    (p,) = ed.wait(lambda: ed.proposals(), what="the proposal")
    assert p["diff"] and p["same_tab"] and p["lines"] == BLOCK + SOURCE[2:]
    assert ed.chat(chat["buf"])["wins"] == []  # the chat float moved out of the way
    assert lines(ed, src) == SOURCE
    ticks = ed.nvim.api.buf_get_changedtick(src)
    ed.nvim.command("MLAccept")
    assert ed.proposals() == [] and lines(ed, src) == BLOCK + SOURCE[2:]
    assert not ed.lua("return vim.wo[vim.fn.bufwinid(...)].diff", src)
    assert ed.nvim.api.buf_get_changedtick(src) == ticks + 1
    ed.nvim.command("undo")
    assert lines(ed, src) == SOURCE  # one undo step

    # Insert below the source window's cursor; rejected, nothing changes.
    ed.nvim.api.win_set_cursor(ed.lua("return vim.fn.bufwinid(...)", src), [4, 0])
    ed.nvim.command("MLChat")
    ed.nvim.api.win_set_cursor(0, [ed.chat(chat["buf"])["lines"].index(BLOCK[1]) + 1, 0])
    ed.keys("gp")
    (p,) = ed.wait(lambda: ed.proposals(), what="the insert proposal")
    assert p["diff"] and p["lines"] == SOURCE + BLOCK
    ed.nvim.command("MLReject")
    assert ed.proposals() == [] and lines(ed, src) == SOURCE
    # q in the proposal rejects it too.
    ed.nvim.command("MLChat")
    ed.nvim.api.win_set_cursor(0, [ed.chat(chat["buf"])["lines"].index(BLOCK[1]) + 1, 0])
    ed.keys("gp")
    ed.wait(lambda: ed.proposals(), what="another proposal")
    ed.keys("q")
    ed.wait(lambda: ed.proposals() == [], what="q to reject")
    assert lines(ed, src) == SOURCE

    # A charwise selection: only the selected characters are replaced.
    ed.nvim.api.set_current_win(ed.lua("return vim.fn.bufwinid(...)", src))
    chat_with_answer(ed, "2G0fxvll")  # "x+1"
    ed.nvim.api.buf_set_lines(0, -1, -1, False, ["", "```", "x + 2", "```"])
    ed.nvim.api.win_set_cursor(0, [ed.nvim.api.buf_line_count(0) - 1, 0])
    ed.keys("gs")
    (p,) = ed.wait(lambda: ed.proposals(), what="the charwise proposal")
    assert p["lines"][1] == "    return x + 2" and p["lines"][2:] == SOURCE[2:]
    ed.nvim.command("MLAccept")
    assert lines(ed, src) == [SOURCE[0], "    return x + 2", *SOURCE[2:]]
    assert ed.error_lines() == [], ed.messages()


def test_mledit_reject_then_accept(editor: Factory, server: ServerProcess,
                                   tmp_path: Path) -> None:
    proxy = RecordingProxy(server.url)
    try:
        ed = editor(api_url=proxy.url, params=chat_params(24))
        src = open_source(ed, tmp_path)
        ed.keys("ggVj<leader>mi")
        ed.wait(lambda: ed.nvim.api.get_mode()["mode"] == "c", what="the instruction prompt")
        ed.keys("Add a comment<CR>")
        data = ed.wait_finished()[0]
        assert data["ok"] and data["kind"] == "edit" and data["backend"] == "server", data
        (request, answer), = proxy.chats()
        assert "no markdown fences" in request["messages"][0]["content"]
        user = request["messages"][1]["content"]
        assert "Instruction: Add a comment" in user and "def f(x):\n    return x+1\n" in user
        (p,) = ed.proposals()
        rewrite = extract_code(answer)
        assert p["state"] == "ready" and p["diff"] and p["same_tab"]
        assert p["lines"] == rewrite + SOURCE[2:]
        assert "ga :MLAccept" in p["winbar"] and "gr/q/<C-c> :MLReject" in p["winbar"]
        ed.nvim.command("MLReject")
        assert ed.proposals() == [] and lines(ed, src) == SOURCE

        ed.nvim.command("1,2MLEdit Add a comment")
        ed.wait_finished(2)
        (p,) = ed.proposals()
        assert p["lines"] == extract_code(proxy.chats()[1][1]) + SOURCE[2:]
        ed.nvim.command("MLAccept")
        assert lines(ed, src) == p["lines"]
        ed.nvim.command("undo")
        assert lines(ed, src) == SOURCE
        assert ed.error_lines() == [], ed.messages()
    finally:
        proxy.close()


def test_mledit_ctrl_c_stops_the_generation(editor: Factory, server: ServerProcess,
                                            tmp_path: Path) -> None:
    ed = editor(api_url=server.url, params=chat_params(1500))
    src = open_source(ed, tmp_path)
    before = httpx.get(server.url + "/status", timeout=10).json()["requests"]
    ed.nvim.command("1,2MLEdit Rewrite this as a very long program with many comments")
    ed.wait(lambda: ed.proposals() and len(ed.proposals()[0]["lines"]) > len(SOURCE) - 2,
            timeout=240, what="the rewrite to start")
    (p,) = ed.proposals()
    assert p["state"] == "streaming"
    ed.lua("vim.api.nvim_set_current_win(vim.fn.bufwinid(...))", p["id"])
    ed.keys("<C-c>")
    data = ed.wait_finished()[0]
    assert data["cancelled"] and not data["ok"]
    assert ed.proposals() == [] and lines(ed, src) == SOURCE
    ed.wait(lambda: httpx.get(server.url + "/status", timeout=10).json()["requests"][
        "cancelled"] > before["cancelled"], timeout=30, what="the server to stop")
    assert ed.error_lines() == [], ed.messages()
