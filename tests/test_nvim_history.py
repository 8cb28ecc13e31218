"""Chats saved as they go and resumed (issue 16): the markdown file with its metadata under
``stdpath("data")/ml-offload/chats``, :MLChatHistory through ``vim.ui.select`` after a
restart, the whole history sent with the next message, and :MLChatDelete."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from helpers import ServerProcess
from nvim_harness import Editor, RecordingProxy, chat_params

pytestmark = pytest.mark.timeout(600)

Factory = Callable[..., Editor]

# vim.ui.select, as a picker plugin would replace it: records what it was offered and
# picks the first item.
PICK_FIRST = """
    _G.ml_test_picked = {}
    vim.ui.select = function(items, opts, on_choice)
      table.insert(_G.ml_test_picked, { prompt = opts.prompt, kind = opts.kind,
        labels = vim.tbl_map(opts.format_item, items) })
      on_choice(items[1], 1)
    end
"""


def front_matter(path: Path) -> tuple[dict[str, object], str]:
    head, body = path.read_text().split("\n---\n", 1)
    assert head.startswith("---\n")
    meta = {}
    for line in head.splitlines()[1:]:
        key, _, value = line.partition(": ")
        meta[key] = json.loads(value)
    return meta, body


def test_saved_reopened_after_a_restart_continued_and_deleted(
        editor: Factory, server: ServerProcess) -> None:
    proxy = RecordingProxy(server.url)
    try:
        ed = editor(api_url=proxy.url, params=chat_params(12), home_name="user")
        ed.nvim.command("MLChat Name a colour")
        buf = ed.wait(lambda: ed.chats(), what="the chat")[0]["buf"]
        ed.wait_finished()
        folder = Path(ed.nvim.funcs.stdpath("data")) / "ml-offload" / "chats"
        (path,) = folder.glob("*.md")
        assert path.name.endswith("-name-a-colour.md")
        meta, body = front_matter(path)
        cards = httpx.get(server.url + "/v1/models", timeout=10).json()["data"]
        model = next(c["id"] for c in cards if "default" in c["meta"]["aliases"])
        assert meta["title"] == "Name a colour" and meta["model"] == model
        assert meta["requested_model"] == "default" and meta["where"] == "server llamacpp"
        assert meta["params"] == chat_params(12) and meta["created"] and meta["updated"]
        text = ed.chat_text(buf)
        assert body.strip() == text.strip()
        ed.close()

        # A restart: the same user (home), a new editor.
        ed = editor(api_url=proxy.url, params=chat_params(12), home_name="user")
        ed.lua(PICK_FIRST)
        ed.nvim.command("MLChatHistory")
        chat = ed.wait(lambda: ed.chats(), what="the reopened chat")[0]
        (picked,) = ed.lua("return _G.ml_test_picked")
        assert picked["kind"] == "ml-offload.chat" and len(picked["labels"]) == 1
        assert picked["labels"][0].startswith("Name a colour  ·  ") and model in picked["labels"][0]
        assert "\n".join(chat["lines"]).strip() == text.strip()
        assert chat["lines"][-3:] == ["## You", "", ""]  # ready for the next message
        ed.keys("GiAnd another one?<C-s>")
        ed.wait_finished()
        (_, first), (request, _) = proxy.chats()
        assert request["messages"] == [
            {"role": "user", "content": "Name a colour"},
            {"role": "assistant", "content": first.strip()},
            {"role": "user", "content": "And another one?"},
        ]
        assert list(folder.glob("*.md")) == [path]  # the same file, updated
        meta2, body2 = front_matter(path)
        assert meta2["created"] == meta["created"] and meta2["updated"] >= meta["updated"]
        assert "And another one?" in body2 and body2.count(f"## {model} (ml-offload)") == 2

        # Deleted from the picker: the file goes, and so does its open chat.
        ed.nvim.command("MLChatDelete")
        ed.wait(lambda: not path.exists(), what="the file to be deleted")
        ed.wait(lambda: ed.chats() == [], what="its chat to close")
        assert ed.lua("return _G.ml_test_picked[2].prompt") == "ml-offload: delete a chat"
        assert any('deleted the chat "Name a colour"' in n for n in ed.notifications())
        ed.nvim.command("MLChatHistory")
        ed.wait(lambda: any("no saved chats yet" in n for n in ed.notifications()),
                what="the empty history")
        assert ed.error_lines() == [], ed.messages()
    finally:
        proxy.close()
