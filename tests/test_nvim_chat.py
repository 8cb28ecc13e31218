"""The chat as a workspace (issue 16), in a real headless Neovim 0.11 through the real
remote-plugin host, against the real server and model: a markdown buffer you type into and
send from, answers streaming below with the window following, layouts, hide and show, keys,
the usage line, queueing, two chats, stopping, and errors that leave a final state.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import ServerProcess, free_port
from llama_server import llama_server_bin
from nvim_harness import Editor, RecordingProxy, ScriptedSSE, StubServer, chat_params

pytestmark = pytest.mark.timeout(600)

Factory = Callable[..., Editor]
USAGE = re.compile(r"^_(\d+) tokens · [\d.]+ tok/s · [\d.]+ s · (\d+) prompt tokens · "
                   r"(finished \(stop\)|truncated: max_tokens reached \(raise "
                   r"params\.max_tokens\)) · server llamacpp_$")


def resolved_id(url: str, name: str = "default") -> str:
    cards = httpx.get(url + "/v1/models", timeout=10).json()["data"]
    return next(c["id"] for c in cards if c["id"] == name or name in c["meta"]["aliases"])


def requests_status(url: str) -> dict[str, Any]:
    return dict(httpx.get(url + "/status", timeout=10).json()["requests"])


def so_far(text: str, model: str) -> str:
    """What has arrived of the last answer by ``model``."""
    if f"## {model} (ml-offload)\n\n" not in text:
        return ""
    return text.split(f"## {model} (ml-offload)\n\n")[-1].split("\n\n## You", 1)[0]


def answer_section(text: str, model: str, index: int = -1) -> tuple[str, str]:
    """(the answer, its status line) of the index-th answer by ``model``."""
    body = text.split(f"## {model} (ml-offload)\n\n")[index]
    body = body.split("\n\n## You", 1)[0]
    answer, status = body.rsplit("\n\n", 1) if "\n\n" in body else ("", body)
    return answer, status


def assert_clean(ed: Editor) -> None:
    assert ed.error_lines() == [], ed.messages()


def win_of(chat: dict[str, Any]) -> dict[str, Any]:
    assert chat["wins"], "the chat is not shown"
    return dict(chat["wins"][0])


def test_type_send_stream_follow_and_follow_up(editor: Factory, server: ServerProcess) -> None:
    proxy = RecordingProxy(server.url)
    try:
        # A small float: the answer is longer than the window, so following matters.
        ed = editor(api_url=proxy.url, params=chat_params(48), window={"height": 0.1})
        model = resolved_id(server.url)
        ed.nvim.command("MLChat")  # no chat yet: a new one, ready to type in
        chat = ed.wait(lambda: ed.chats(), what="the chat")[0]
        buf = chat["buf"]
        assert chat["filetype"] == "markdown" and chat["modifiable"]
        assert ed.lua("return vim.treesitter.highlighter.active[...] ~= nil", buf)
        assert ed.nvim.api.get_mode()["mode"] == "i"
        assert win_of(chat)["float"] and "<CR> send" in win_of(chat)["footer"]
        assert "? keys" in win_of(chat)["footer"]
        ed.keys("Explain what a GGUF file is<C-s>")
        bottoms: list[tuple[int, int]] = []

        def streaming() -> bool:
            c = ed.chat(buf)
            bottoms.append((win_of(c)["bottom"], c["count"]))
            return len(ed.finished()) >= 1

        ed.wait(streaming, timeout=240, interval=0.02, what="the answer")
        (request, streamed), = proxy.chats()
        assert request["messages"] == [{"role": "user", "content": "Explain what a GGUF file is"}]
        text = ed.chat_text(buf)
        assert text.startswith(f"## You\n\nExplain what a GGUF file is\n\n## {model} "
                               "(ml-offload)\n\n")
        answer, status = answer_section(text, model)
        assert answer == streamed.strip() and answer
        m = USAGE.match(status)
        assert m, status
        assert int(m.group(1)) == 48 and "truncated" in m.group(3)  # 48 = max_tokens
        assert text.endswith("\n\n## You\n\n")
        # It followed the stream: the last line was always on screen.
        grown = [b for b in bottoms if b[1] > 12]
        assert grown and all(bottom == count for bottom, count in grown), bottoms
        c = ed.chat(buf)
        assert win_of(c)["cursor"][0] == c["count"] and win_of(c)["height"] < c["count"]
        title = win_of(c)["title"]
        assert model in title and "server llamacpp" in title and "truncated" in title
        data = ed.finished()[0]
        assert data["ok"] and data["truncated"] and data["finish_reason"] == "length"

        # The follow-up: typed under the new "## You", sent with <CR> in normal mode.
        ed.keys("iAnd in Python?<Esc>")
        ed.wait(lambda: ed.nvim.api.get_mode()["mode"] == "n", what="normal mode")
        ed.keys("<CR>")
        ed.wait(lambda: len(proxy.chats()) == 2 and proxy.chats()[1][1], timeout=240,
                what="the second answer to start")
        # The user scrolls up: the window stays where they put it.
        win = win_of(ed.chat(buf))["win"]
        ed.nvim.api.win_set_cursor(win, [1, 0])
        size = ed.chat(buf)["count"]
        ed.wait(lambda: ed.chat(buf)["count"] > size or len(ed.finished()) >= 2,
                timeout=240, interval=0.02, what="more of the answer")
        ed.wait_finished(2)
        after = win_of(ed.chat(buf))
        assert after["cursor"] == [1, 0] and after["top"] == 1
        (_, first), (req2, second) = proxy.chats()
        assert req2["messages"] == [
            {"role": "user", "content": "Explain what a GGUF file is"},
            {"role": "assistant", "content": first.strip()},
            {"role": "user", "content": "And in Python?"},
        ]
        text = ed.chat_text(buf)
        assert text.count("## You") == 3 and text.count(f"## {model} (ml-offload)") == 2
        assert answer_section(text, model)[0] == second.strip()
        assert_clean(ed)
    finally:
        proxy.close()


def test_layouts_hide_show_toggle_keys_and_no_stacking(editor: Factory) -> None:
    """No server needed: nothing is sent."""
    ed = editor(api_url=f"http://127.0.0.1:{free_port()}", chat={"layout": "vsplit"})
    ed.nvim.command("MLChatNew")
    first = ed.wait(lambda: ed.chats(), what="the chat")[0]
    win = win_of(first)
    assert not win["float"] and "<CR> send" in win["winbar"] and "new chat" in win["winbar"]
    assert win["width"] < ed.nvim.options["columns"] - 10  # a split beside the source
    ed.keys("<Esc>q")
    ed.wait(lambda: ed.chat(first["buf"])["wins"] == [], what="q to hide the chat")
    ed.nvim.command("MLChat")  # no argument: the last chat again
    assert win_of(ed.chat(first["buf"]))["winbar"]
    ed.nvim.command("MLChatToggle")
    assert ed.chat(first["buf"])["wins"] == []
    ed.nvim.command("MLChatToggle")
    assert ed.chat(first["buf"])["wins"] and len(ed.chats()) == 1

    # A tab.
    ed.lua("require('ml-offload').setup({ chat = { layout = 'tab' } })")
    ed.nvim.command("MLChatNew")
    ed.wait(lambda: len(ed.chats()) == 2, what="the second chat")
    tab_chat = ed.chat()
    assert ed.nvim.funcs.tabpagenr("$") == 2
    assert win_of(tab_chat)["tab"] == ed.nvim.api.get_current_tabpage().handle
    assert "? keys" in win_of(tab_chat)["winbar"]

    # `?` lists every key.
    ed.keys("<Esc>?")
    help_win = ed.wait(lambda: ed.floats(), what="the keys float")[0]
    listed = "\n".join(help_win["lines"])
    for key in ("<CR>", "<C-s>", "<C-c>", "gy", "gs", "gp", "q", "?"):
        assert key in listed, key
    ed.keys("q")
    ed.wait(lambda: ed.floats() == [], what="q to close the keys")

    # Floats: two chats are two windows, never exactly on top of each other.
    ed.lua("require('ml-offload').setup({})")
    ed.nvim.command("tabclose")
    ed.nvim.command("MLChatNew")
    ed.keys("<Esc>")
    ed.nvim.command("MLChatNew")
    ed.wait(lambda: len([c for c in ed.chats() if c["wins"] and win_of(c)["float"]]) == 2,
            what="two chat floats")
    a, b = (win_of(c) for c in ed.chats() if c["wins"] and win_of(c)["float"])
    assert (a["row"], a["col"]) != (b["row"], b["col"])
    assert_clean(ed)


def test_a_message_sent_while_answering_is_queued_not_lost(editor: Factory,
                                                           server: ServerProcess) -> None:
    proxy = RecordingProxy(server.url)
    try:
        ed = editor(api_url=proxy.url, params=chat_params(40))
        ed.nvim.command("MLChat Count to twenty")
        buf = ed.wait(lambda: ed.chats(), what="the chat")[0]["buf"]
        ed.wait(lambda: proxy.chats() and proxy.chats()[0][1], timeout=240,
                what="the answer to start")
        assert ed.finished() == []
        ed.keys("GiWhat comes after twenty?<Esc>")
        ed.wait(lambda: "What comes after twenty?" in ed.chat_text(buf), what="the typing")
        ed.keys("<CR>")
        ed.wait(lambda: any("queued" in n for n in ed.notifications()), what="queued")
        ed.wait_finished(2)
        (_, first), (second, _) = proxy.chats()
        assert second["messages"][-1] == {"role": "user", "content": "What comes after twenty?"}
        assert second["messages"][1] == {"role": "assistant", "content": first.strip()}
        text = ed.chat_text(buf)
        assert text.count("## You\n\nWhat comes after twenty?\n") == 1
        assert text.count("## You") == 3
        assert_clean(ed)
    finally:
        proxy.close()


def test_editor_answers_while_streaming_and_ctrl_c_stops(editor: Factory,
                                                         server: ServerProcess) -> None:
    ed = editor(api_url=server.url, params=chat_params(1500))
    before = requests_status(server.url)
    ed.nvim.command("MLChat Count from one to one thousand, one number per line")
    buf = ed.wait(lambda: ed.chats(), what="the chat")[0]["buf"]
    model = resolved_id(server.url)
    ed.wait(lambda: len(so_far(ed.chat_text(buf), model)) > 10, timeout=240,
            what="the answer to start")
    assert ed.lua("return require('ml-offload').status()") == "ML chat"
    assert ed.nvim.eval("1 + 1") == 2 and ed.nvim.api.get_mode()["blocking"] is False
    win = win_of(ed.chat(buf))["win"]
    ed.nvim.api.win_set_cursor(win, [1, 0])
    size = len(ed.chat_text(buf))
    ed.wait(lambda: len(ed.chat_text(buf)) > size, what="more text")
    assert ed.nvim.api.win_get_cursor(win) == [1, 0]  # text went to the answer, not the cursor
    assert ed.finished() == []
    ed.keys("<C-c>")
    data = ed.wait_finished()[0]
    assert data["cancelled"] and not data["ok"]
    text = ed.chat_text(buf)
    assert re.search(r"\n\n_cancelled after \d+ tokens · server llamacpp_\n\n## You\n\n$", text)
    assert "cancelled" in win_of(ed.chat(buf))["title"]
    time.sleep(1.0)
    assert ed.chat_text(buf) == text  # nothing more arrives
    ed.wait(lambda: requests_status(server.url)["cancelled"] > before["cancelled"], timeout=30,
            what="the server to record the cancel")
    after = requests_status(server.url)
    assert after["active"] == 0 and after["tokens_generated"] - before["tokens_generated"] < 1500
    assert_clean(ed)


def test_ctrl_c_drops_a_chat_waiting_in_the_server_queue(editor: Factory,
                                                         server: ServerProcess) -> None:
    """<C-c> must reach the server even when no text has arrived yet (request queued)."""
    started, stop = threading.Event(), threading.Event()

    def occupy() -> None:  # another client holds the model meanwhile
        body = {"prompt": "Once upon a time", "max_tokens": 1500, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=300) as r:
            for _ in r.iter_lines():
                started.set()
                if stop.is_set():
                    return

    other = threading.Thread(target=occupy)
    other.start()
    try:
        assert started.wait(120)
        before = requests_status(server.url)
        ed = editor(api_url=server.url, params=chat_params(50), timeout=600_000)
        ed.nvim.command("MLChat hello")
        ed.wait(lambda: requests_status(server.url)["queued"] == 1, timeout=60,
                what="the chat to wait in the server's queue")
        ed.keys("<Esc><C-c>")
        data = ed.wait_finished()[0]
        assert data["cancelled"]
        ed.wait(lambda: requests_status(server.url)["cancelled"] > before["cancelled"],
                timeout=30, what="the server to drop the queued request")
        now = requests_status(server.url)
        assert now["queued"] == 0 and now["active"] == 1  # the other one still runs
        assert "connecting" not in win_of(ed.chat())["title"]
        assert_clean(ed)
    finally:
        stop.set()
        other.join(120)


def test_waiting_in_the_queue_is_shown_and_never_times_out(editor: Factory) -> None:
    """Bug 3. The server's queue comments (``: queued N``, every second) are scripted here;
    the read timeout (0.8 s, shorter than the wait) must apply only to silence."""
    script = ScriptedSSE(queued=[2, 1, 0, 0], answer=["Hello", " there"], every=1.0)
    try:
        ed = editor(api_url=script.url, timeout=1500, params=chat_params(8))
        ed.nvim.command("MLChat first")
        ed.keys("<Esc>")
        ed.nvim.command("MLChat second")
        ed.wait(lambda: len(ed.chats()) == 2, what="two chats")
        titles: set[str] = set()

        def seen() -> bool:
            for c in ed.chats():
                titles.update(w["title"] for w in c["wins"])
            return len(ed.finished()) >= 2

        ed.wait(seen, timeout=60, interval=0.05, what="both answers")
        assert any("waiting: 2 ahead" in t for t in titles), titles
        assert any("waiting: 0 ahead" in t for t in titles), titles
        for data in ed.finished():
            assert data["ok"] and data.get("error") is None, data
        a, b = (win_of(c) for c in ed.chats())
        assert (a["row"], a["col"]) != (b["row"], b["col"])  # never stacked
        for c in ed.chats():
            text = "\n".join(c["lines"])
            assert "## scripted-model (ml-offload)\n\nHello there\n\n_2 tokens" in text, text
        assert_clean(ed)
    finally:
        script.close()


@pytest.fixture(scope="module")
def one_slot(data_dir: Path) -> Iterator[ServerProcess]:
    """The real server in managed mode with one slot: a second request waits its turn and
    is told so (``: queued N``)."""
    proc = ServerProcess(data_dir, env={"ML_OFFLOAD_N_CTX": "2048",
                                        "ML_OFFLOAD_BACKEND": "managed",
                                        "ML_OFFLOAD_PARALLEL": "1",
                                        "ML_OFFLOAD_LLAMA_SERVER_BIN": str(llama_server_bin())})
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def test_two_chats_on_the_real_server_wait_their_turn(editor: Factory,
                                                     one_slot: ServerProcess) -> None:
    """Bug 3 against the real server: the second chat waits in the server's queue, says
    "waiting: 0 ahead", and its read timeout (2 s, far less than the wait) does not fire."""
    server = one_slot
    ed = editor(api_url=server.url, params=chat_params(200), timeout=2000)
    model = resolved_id(server.url)
    ed.nvim.command("MLChat Count from one to one hundred")
    first = ed.wait(lambda: ed.chats(), what="the first chat")[0]["buf"]
    ed.wait(lambda: len(so_far(ed.chat_text(first), model)) > 0, timeout=240,
            what="the first answer to start")
    ed.keys("<Esc>")
    ed.nvim.command("MLChat Name three colours")
    second = ed.wait(lambda: len(ed.chats()) == 2 and ed.chat()["buf"], what="the second")
    titles: list[str] = []

    def both() -> bool:
        titles.extend(w["title"] for w in ed.chat(second)["wins"])
        return len(ed.finished()) >= 2

    ed.wait(both, timeout=300, interval=0.1, what="both answers")
    assert any("waiting: 0 ahead" in t for t in titles), set(titles)
    assert "server managed" in titles[-1], titles[-1]
    for data in ed.finished():
        assert data["ok"] and data.get("error") is None, data
    assert so_far(ed.chat_text(second), model)
    a, b = (win_of(c) for c in ed.chats())
    assert (a["row"], a["col"]) != (b["row"], b["col"])
    assert_clean(ed)


def test_errors_leave_a_final_state(editor: Factory, server: ServerProcess) -> None:
    """Bugs 4 and 5: a refused connection (fallback off), an unknown model (404) and a
    refused key (401) each end with an error in the chat's title and one notification that
    says what to do; never "connecting…"."""
    stub = StubServer(401)
    try:
        ed = editor(api_url=f"http://127.0.0.1:{free_port()}", fallback=False,
                    params=chat_params(4))
        cases = [
            ({}, "fallback = false"),
            ({"api_url": server.url, "model": "no-such-model"},
             "server error 404: The model 'no-such-model' does not exist"),
            ({"api_url": stub.url}, "set api_key in require('ml-offload').setup() or "
                                    "$ML_OFFLOAD_API_KEY"),
        ]
        url = ed.lua("return require('ml-offload.config').get().api_url")
        for i, (opts, said) in enumerate(cases, start=1):
            ed.lua("require('ml-offload').setup(...)", {"api_url": url, "fallback": False,
                                                         "params": chat_params(4), **opts})
            ed.nvim.command(f"MLChat question {i}")
            data = ed.wait_finished(i)[-1]
            assert not data["ok"] and said in data["error"], data
            if "404" in said:
                assert data["error"].endswith(" — :MLModels lists the models")
            chat = ed.chat()
            title = win_of(chat)["title"]
            assert "error" in title and "connecting" not in title, title
            assert "question" in "\n".join(chat["lines"])  # the message stays, to send again
            errors = ed.notifications(4)
            assert len(errors) == i and said in errors[-1], errors
            ed.keys("<Esc>")
        assert ("GET", "/api/health") in stub.requests
        assert "Traceback" not in ed.messages()
    finally:
        stub.close()
