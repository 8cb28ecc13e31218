"""Context attached to a chat message (issue 16): a selection with its file, filetype and line
range (a charwise one exactly), ``#buffer``, ``#buffers``, ``#file:path`` and ``#diagnostics``,
shown folded in the chat and bounded by the model's context with a note. Checked in the chat
and in the request the real server received."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import ServerProcess
from nvim_harness import Editor, RecordingProxy, chat_params

pytestmark = pytest.mark.timeout(600)

Factory = Callable[..., Editor]
SAMPLE = ["local answer = 42", "print(answer)", "return answer"]


def open_sample(ed: Editor, tmp_path: Path) -> str:
    path = tmp_path / "sample.lua"
    ed.edit_file(path, SAMPLE)
    return str(ed.nvim.funcs.fnamemodify(str(path), ":~:."))


def folded(ed: Editor, win: int, line: int) -> bool:
    return bool(ed.lua("local win, line = ... return vim.api.nvim_win_call(win, function() "
                       "return vim.fn.foldclosed(line) end) ~= -1", win, line))


def test_selection_and_buffer_reach_the_server_folded(editor: Factory, server: ServerProcess,
                                                      tmp_path: Path) -> None:
    proxy = RecordingProxy(server.url)
    try:
        ed = editor(api_url=proxy.url, params=chat_params(4))
        name = open_sample(ed, tmp_path)
        ed.keys("ggjVj<leader>mc")
        chat = ed.wait(lambda: ed.chats(), what="the chat about the selection")[0]
        selection = [f"### Context: selection · {name} (lua, lines 2–3)", "```lua",
                     "print(answer)", "return answer", "```"]
        assert chat["lines"] == ["## You", "", "", "", *selection]
        win = chat["wins"][0]["win"]
        assert folded(ed, win, 5) and not folded(ed, win, 3)
        ed.wait(lambda: ed.nvim.api.get_mode()["mode"] == "i", what="insert mode")
        assert ed.nvim.api.win_get_cursor(win) == [3, 0]  # where the question goes
        ed.keys("What does this do? See #buffer<C-s>")
        data = ed.wait_finished()[0]
        assert data["ok"], data
        (request, _), = proxy.chats()
        content = request["messages"][-1]["content"]
        whole = [f"### Context: #buffer · {name} (lua, lines 1–3)", "```lua", *SAMPLE, "```"]
        assert content == "\n".join(["What does this do? See #buffer", "", *selection, "",
                                     *whole])
        text = ed.chat_text(chat["buf"])
        assert "\n".join(whole) in text
        row = text.split("\n").index(whole[0]) + 1
        assert folded(ed, win, row)
        assert ed.error_lines() == [], ed.messages()
    finally:
        proxy.close()


def test_a_charwise_selection_is_exactly_what_was_selected(editor: Factory,
                                                           tmp_path: Path) -> None:
    ed = editor()
    name = open_sample(ed, tmp_path)
    ed.keys("gg0wve<leader>mc")  # "answer" on line 1
    chat = ed.wait(lambda: ed.chats(), what="the chat")[0]
    assert chat["lines"][4:] == [
        f"### Context: selection · {name} (lua, line 1 column 7 to line 1 column 12)",
        "```lua", "answer", "```"]
    assert ed.error_lines() == [], ed.messages()


def test_file_buffers_diagnostics_and_the_context_bound(editor: Factory, server: ServerProcess,
                                                        tmp_path: Path) -> None:
    proxy = RecordingProxy(server.url)
    try:
        big = tmp_path / "big.txt"
        rows = [f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(3000)]
        big.write_text("\n".join(rows) + "\n")
        other = tmp_path / "other.py"
        other.write_text("print('other')\n")
        ed = editor(api_url=proxy.url, params=chat_params(4))
        ed.nvim.command(f"edit {other}")
        name = open_sample(ed, tmp_path)
        ed.lua("local ns = vim.api.nvim_create_namespace('test') vim.diagnostic.set(ns, 0, "
               "{ { lnum = 0, col = 6, message = 'unused local answer', severity = 2, "
               "source = 'test' } })")
        ed.nvim.command("MLChatNew")
        ed.wait(lambda: ed.chats() and ed.nvim.api.get_mode()["mode"] == "i",
                what="the new chat, in insert mode")
        ed.keys(f"Explain #diagnostics with #buffers and #file:{big}<C-s>")
        ed.wait(lambda: proxy.chats(), timeout=60, what="the request")
        data = ed.wait_finished()[0]
        assert data["ok"], data
        (request, _), = proxy.chats()
        content = request["messages"][-1]["content"]
        assert f"{name}:1:7: WARN: unused local answer [test]" in content
        assert "print('other')" in content and "return answer" in content  # #buffers
        assert "[No Name]" not in content  # the empty start-up buffer is not attached
        assert rows[0] in content and rows[-1] not in content  # cut to fit
        assert len(content) // 3 < 2048  # what the plugin estimates fits
        text = ed.chat_text(ed.chat()["buf"])
        note = next(line for line in text.split("\n") if line.startswith("> ml-offload: "))
        assert f"#file:{big}" in note and "cut to lines 1–" in note
        assert "of 3000 lines" in note and "the model's context is 2048 tokens" in note
        assert note not in content  # our notes are not sent
        assert ed.error_lines() == [], ed.messages()
    finally:
        proxy.close()
