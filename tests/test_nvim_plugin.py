"""The Neovim plugin against a real headless Neovim 0.11 and a real server (issue 6).

Each test starts its own editor that reads the manifest :UpdateRemotePlugins wrote, and
checks what a user sees: floats, titles, streamed text, notifications, :messages.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import REPO, ServerProcess, free_port
from nvim_harness import (
    Editor,
    RecordingProxy,
    chat_params,
    nvim_binary,
)

pytestmark = pytest.mark.timeout(600)

Factory = Callable[..., Editor]
USAGE = re.compile(r"_(\d+) tokens · [\d.]+ tokens/s · [\d.]+ s · (\d+) prompt tokens · (.+)_$")


def keys(ed: Editor, text: str) -> None:
    """Type as a user would (mappings apply)."""
    ed.nvim.feedkeys(ed.nvim.replace_termcodes(text, True, False, True), "m", False)


def answer_of(text: str) -> tuple[str, str]:
    """The last answer in a chat float and its footer line."""
    body = text.rsplit("### Assistant\n", 1)[1]
    answer, footer = body.rsplit("\n\n", 1)
    return answer, footer


def streamed(ed: Editor, buf: int) -> str:
    """What has arrived so far under the last '### Assistant' heading."""
    return ed.float_text(buf).rsplit("### Assistant\n", 1)[1]


def requests_status(url: str) -> dict[str, Any]:
    return dict(httpx.get(url + "/status", timeout=10).json()["requests"])


def assert_clean(ed: Editor) -> None:
    assert ed.error_lines() == [], ed.messages()


# --- registration, commands, keymaps -----------------------------------------------------


def test_commands_keymaps_and_plug_maps(editor: Factory) -> None:
    ed = editor(keymaps={"models": False, "status": "<leader>xs"})
    commands = ed.nvim.api.get_commands({})
    for name in ("MLChat", "MLStatus", "MLEmbed", "MLModels"):
        assert "remote#define" in commands[name]["definition"], commands[name]
    assert commands["MLChat"]["range"] == "." and commands["MLChat"]["nargs"] == "*"

    def rhs(mode: str, lhs: str) -> str:
        return str(ed.nvim.funcs.maparg(lhs, mode))

    for mode in ("n", "x"):
        assert rhs(mode, "<leader>mc") == "<Plug>(MLChat)"
        assert rhs(mode, "<leader>me") == "<Plug>(MLEmbed)"
        assert rhs(mode, "<leader>xs") == "<Plug>(MLStatus)"
        assert rhs(mode, "<leader>ms") == ""  # remapped
        assert rhs(mode, "<leader>mm") == ""  # disabled with false
        for plug in ("MLChat", "MLStatus", "MLEmbed", "MLModels"):
            assert plug in rhs(mode, f"<Plug>({plug})")
    # In visual mode chat and embed pass the selection as a range (":" inserts '<,'>).
    assert rhs("x", "<Plug>(MLChat)") == ":MLChat<CR>"
    assert rhs("x", "<Plug>(MLEmbed)") == ":MLEmbed<CR>"
    assert rhs("n", "<Plug>(MLChat)") == "<Cmd>MLChat<CR>"
    # Defaults, and setup() again restores them.
    ed.lua("require('ml-offload').setup({})")
    for mode in ("n", "x"):
        for lhs, plug in (("mc", "MLChat"), ("ms", "MLStatus"), ("me", "MLEmbed"),
                          ("mm", "MLModels")):
            assert rhs(mode, f"<leader>{lhs}") == f"<Plug>({plug})"
        assert rhs(mode, "<leader>xs") == ""
    assert ed.lua("return require('ml-offload.config').get().api_url") == "http://127.0.0.1:9000"
    assert ed.lua("return require('ml-offload').status()") == ""
    assert_clean(ed)


def test_the_default_port_is_9000_everywhere() -> None:
    """The seed's port-8000 mistake must not exist in the plugin or its docs."""
    paths = [*REPO.glob("lua/**/*.lua"), *REPO.glob("plugin/*.lua"),
             *REPO.glob("rplugin/**/*.py"), *REPO.glob("python/mloffload/nvim/*.py"),
             REPO / "doc/ml-offload.txt"]
    for path in paths:
        assert not re.search(r"\b8000\b", path.read_text()), path
    assert "http://127.0.0.1:9000" in (REPO / "lua/ml-offload/config.lua").read_text()


def test_entry_file_is_thin_and_finds_the_checkout(tmp_path: Path) -> None:
    """Importing the rplugin file (what :UpdateRemotePlugins does) loads no implementation,
    and in a host where mloffload is not installed it uses the checkout's python/."""
    import pynvim

    site = Path(pynvim.__file__).parent.parent
    entry = str(REPO / "rplugin/python3/ml_offload.py")
    code = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('mloffload') is None, 'mloffload is installed'\n"
        f"spec = importlib.util.spec_from_file_location('e', {entry!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "heavy = [m for m in ('mloffload.nvim', 'httpx', 'llama_cpp') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "import mloffload.nvim.app\n"
        "print(mloffload.nvim.app.__file__)\n"
    )
    # -S: no site, so the editable install's .pth is not read; pynvim still importable.
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(site)}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(REPO / "python"))


def test_helptags_run_clean(tmp_path: Path) -> None:
    doc = tmp_path / "doc"
    doc.mkdir()
    (doc / "ml-offload.txt").write_text((REPO / "doc/ml-offload.txt").read_text())
    out = subprocess.run([nvim_binary(), "--headless", "-u", "NONE", "-i", "NONE", "-c",
                          f"try | helptags {doc} | catch | cquit 3 | endtry", "-c", "qall"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "E" not in out.stderr, out.stderr
    tags = (doc / "tags").read_text()
    for tag in ("ml-offload", "ml-offload-install", "ml-offload-deploy", ":MLChat",
                ":checkhealth-ml-offload", "ml-offload-fallback", "ml-offload-troubleshooting"):
        assert f"{tag}\t" in tags, tag


# --- chat ----------------------------------------------------------------------------------


def test_chat_streams_into_a_float_and_matches_the_server(editor: Factory, server: ServerProcess
                                                           ) -> None:
    proxy = RecordingProxy(server.url)
    try:
        ed = editor(api_url=proxy.url, params=chat_params(32))
        ed.nvim.command("MLChat Explain what a GGUF file is")
        chat = ed.wait_float(what="the chat float")
        buf = chat["buf"]
        assert chat["filetype"] == "markdown"
        lengths: list[int] = []
        finished: list[Any] = []

        def poll() -> bool:
            text = ed.float_text(buf)
            body = text.split("### Assistant\n", 1)[1]
            if body and (not lengths or lengths[-1] != len(body)):
                lengths.append(len(body))
            finished.extend(e for e in ed.lua("return _G.ml_test_events") if
                            e[0] == "MLOffloadRequestFinished")
            return bool(finished)

        ed.wait(poll, timeout=240, interval=0.02, what="the answer")
        text = ed.float_text(buf)
        answer, footer = answer_of(text)
        (request, streamed), = proxy.chats()
        assert answer == streamed and answer.strip()
        # It grew while streaming: several partial lengths before the footer arrived.
        assert len([n for n in lengths if n < len(answer)]) >= 2, lengths
        m = USAGE.match(footer)
        assert m, footer
        assert int(m.group(1)) == 32 and m.group(3) == "llamacpp"
        title = ed.floats()[0]["title"]
        assert "default" in title and "llamacpp" in title, title
        assert request["messages"] == [{"role": "user",
                                        "content": "Explain what a GGUF file is"}]
        assert request["stream"] is True and request["model"] == "default"
        data = finished[0][1]
        assert data["ok"] and data["backend"] == "server" and data["completion_tokens"] == 32
        assert_clean(ed)
    finally:
        proxy.close()


def test_visual_selection_and_followup_carry_context_and_history(
        editor: Factory, server: ServerProcess) -> None:
    proxy = RecordingProxy(server.url)
    try:
        ed = editor(api_url=proxy.url, params=chat_params(12), system_prompt="Answer briefly.")
        ed.nvim.command("setfiletype lua")
        ed.nvim.current.buffer[:] = ["local answer = 42", "print(answer)", "return answer"]
        keys(ed, "ggVj<leader>mc")
        ed.wait(lambda: ed.nvim.api.get_mode()["mode"] == "c", what="the question prompt")
        ed.nvim.input("What does this do?<CR>")
        chat = ed.wait_float(what="the chat float")
        ed.wait_event("finished")
        text = ed.float_text(chat["buf"])
        assert "local answer = 42\nprint(answer)\n```" in text and "return answer" not in text
        assert "```lua\n" in text
        first_answer, _ = answer_of(text)
        # The follow-up key asks for the next question in the same float.
        ed.nvim.input("<CR>")
        ed.wait(lambda: ed.nvim.api.get_mode()["mode"] == "c", what="the follow-up prompt")
        ed.nvim.input("And in Python?<CR>")
        ed.wait_event("finished", 2)
        (req1, ans1), (req2, ans2) = proxy.chats()
        system = {"role": "system", "content": "Answer briefly."}
        assert req1["messages"][0] == system
        assert "local answer = 42\nprint(answer)" in req1["messages"][1]["content"]
        assert req2["messages"] == [
            system,
            req1["messages"][1],
            {"role": "assistant", "content": ans1},
            {"role": "user", "content": "And in Python?"},
        ]
        assert ans1 == first_answer
        text = ed.float_text(chat["buf"])
        assert text.count("### You") == 2 and "And in Python?" in text
        assert answer_of(text)[0] == ans2
        assert_clean(ed)
    finally:
        proxy.close()


def test_chat_without_prompt_asks_for_it(editor: Factory, server: ServerProcess) -> None:
    ed = editor(api_url=server.url, params=chat_params(4))
    ed.nvim.command("MLChat")
    ed.wait(lambda: ed.nvim.api.get_mode()["mode"] == "c", what="the prompt")
    assert ed.floats() == []
    ed.nvim.input("hello<CR>")
    chat = ed.wait_float(what="the chat float")
    ed.wait_event("finished")
    assert ed.float_text(chat["buf"]).startswith("### You\nhello\n\n### Assistant\n")
    assert_clean(ed)


def test_editor_answers_while_streaming_and_ctrl_c_cancels(editor: Factory,
                                                           server: ServerProcess) -> None:
    ed = editor(api_url=server.url, params=chat_params(1500))
    before = requests_status(server.url)
    ed.nvim.command("MLChat Count from one to one thousand, one number per line")
    buf = ed.wait_float(what="the chat float")["buf"]
    ed.wait(lambda: len(streamed(ed, buf)) > 10, timeout=240,
            what="the answer to start")
    # While it streams: the editor answers RPC requests, and the user can move around.
    assert ed.lua("return require('ml-offload').status()") == "ML chat"
    assert ed.nvim.eval("1 + 1") == 2
    assert ed.nvim.api.get_mode()["blocking"] is False
    ed.nvim.api.win_set_cursor(0, [1, 0])
    size = len(ed.float_text(buf))
    ed.wait(lambda: len(ed.float_text(buf)) > size, what="more text")
    assert ed.nvim.api.win_get_cursor(0) == [1, 0]  # text went to the end, not the cursor
    assert ed.lua("return #vim.tbl_filter(function(e) return e[1] == "
                  "'MLOffloadRequestFinished' end, _G.ml_test_events)") == 0
    ed.nvim.input("<C-c>")
    data = ed.wait_event("finished")[0]
    assert data["cancelled"] and not data["ok"]
    text = ed.float_text(buf)
    assert text.endswith("_cancelled · llamacpp_")
    time.sleep(1.0)
    assert ed.float_text(buf) == text  # nothing more arrives
    ed.wait(lambda: requests_status(server.url)["cancelled"] > before["cancelled"], timeout=30,
            what="the server to record the cancel")
    after = requests_status(server.url)
    assert after["active"] == 0
    assert after["tokens_generated"] - before["tokens_generated"] < 1500
    assert_clean(ed)


def test_ctrl_c_drops_a_chat_waiting_in_the_server_queue(editor: Factory,
                                                         server: ServerProcess) -> None:
    """<C-c> must reach the server even when no text has arrived yet (request queued)."""
    started = threading.Event()
    stop = threading.Event()

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
        # A long read timeout: only the cancel itself can end the wait.
        ed = editor(api_url=server.url, params=chat_params(50), timeout=600_000)
        ed.nvim.command("MLChat hello")
        ed.wait(lambda: requests_status(server.url)["queued"] == 1, timeout=60,
                what="the chat to wait in the server's queue")
        ed.nvim.input("<C-c>")
        data = ed.wait_event("finished")[0]
        assert data["cancelled"]
        ed.wait(lambda: requests_status(server.url)["cancelled"] > before["cancelled"],
                timeout=30, what="the server to drop the queued request")
        now = requests_status(server.url)
        assert now["queued"] == 0 and now["active"] == 1  # the other one still runs
        assert_clean(ed)
    finally:
        stop.set()
        other.join(120)


def test_http_error_is_one_clear_notification(editor: Factory, server: ServerProcess) -> None:
    ed = editor(api_url=server.url, model="no-such-model", params=chat_params(4))
    ed.nvim.command("MLChat hi")
    data = ed.wait_event("finished")[0]
    assert not data["ok"] and data["backend"] == "server"
    errors = ed.error_lines()
    assert len(errors) == 1, ed.messages()
    assert "ml-offload: server error 404: The model 'no-such-model' does not exist" in errors[0]
    assert "Traceback" not in ed.messages()
    assert "(local fallback)" not in ed.floats()[0]["title"]  # a live server's answer stands


# --- status, models, embed -----------------------------------------------------------------


def test_status_float(editor: Factory, server: ServerProcess) -> None:
    httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    ed = editor(api_url=server.url)
    ed.nvim.command("MLStatus")
    ed.wait_event("finished")
    status = httpx.get(server.url + "/status", timeout=10).json()
    vram = httpx.get(server.url + "/vram", timeout=10).json()
    win = ed.floats()[0]
    text = "\n".join(win["lines"])
    assert "status" in win["title"]
    assert f"Server    {server.url}: healthy" in text
    assert "Backend   llamacpp: ready" in text
    model = status["loaded_models"][0]
    assert (f"Model     {model['id']}: {model['n_gpu_layers']}/{model['max_layers']} layers "
            "on GPU") in text
    if vram["available"]:
        for gpu in vram["gpus"]:
            assert f"GPU {gpu['index']}" in text
        assert "█" in text or "░" in text
    else:
        assert f"VRAM      no GPU: {vram['reason']}" in text
    keys(ed, "q")
    ed.wait(lambda: ed.floats() == [], what="q to close the float")
    assert_clean(ed)


def test_models_float_and_select(editor: Factory, server: ServerProcess) -> None:
    ed = editor(api_url=server.url)
    ed.nvim.command("MLModels")
    ed.wait_event("finished")
    cards = httpx.get(server.url + "/v1/models", timeout=10).json()["data"]
    win = ed.floats()[0]
    assert "models" in win["title"] and "llamacpp" in win["title"]
    lines = win["lines"]
    for card in cards:
        meta = card["meta"]
        row = next(i for i, line in enumerate(lines) if f" {card['id']} " in line)
        line = lines[row]
        assert meta["quantization"] in line and str(meta["context_length"]) in line
        assert f"{meta['file_size'] / 1024**2:.0f} MiB" in line
        assert ("loaded" in line) == meta["loaded"]
    target = cards[0]["id"]
    row = next(i for i, line in enumerate(lines) if f" {target} " in line)
    ed.nvim.api.win_set_cursor(win["win"], [row + 1, 0])
    keys(ed, "<CR>")
    ed.wait(lambda: ed.lua("return require('ml-offload.config').get().model") == target,
            what="the model to be selected")
    ed.wait(lambda: f"model set to {target} for later requests" in ed.messages(),
            what="the notification")
    assert ed.floats() == []
    assert_clean(ed)


def test_embed_selection_notifies_dimensions(editor: Factory, server: ServerProcess) -> None:
    dims = httpx.post(server.url + "/v1/embeddings", timeout=60,
                      json={"model": "default", "input": "x"}).json()["data"][0]["embedding"]
    ed = editor(api_url=server.url, embed_register="e")
    ed.nvim.current.buffer[:] = ["alpha", "beta", "gamma"]
    keys(ed, "jVj<leader>me")
    ed.wait_event("finished")
    assert f"ml-offload: embedding: {len(dims)} dimensions (default)" in ed.messages()
    vector = json.loads(ed.nvim.funcs.getreg("e"))
    direct = httpx.post(server.url + "/v1/embeddings", timeout=60, json={
        "model": "default", "input": "beta\ngamma"}).json()["data"][0]["embedding"]
    assert len(vector) == len(dims)
    assert max(abs(a - b) for a, b in zip(vector, direct, strict=True)) < 1e-4
    assert_clean(ed)


# --- health --------------------------------------------------------------------------------


def checkhealth(ed: Editor) -> str:
    ed.nvim.command("checkhealth ml-offload")
    return "\n".join(ed.nvim.current.buffer[:])


def test_checkhealth_with_the_server_up(editor: Factory, server: ServerProcess) -> None:
    ed = editor(api_url=server.url)
    report = checkhealth(ed)
    assert "ERROR" not in report, report
    assert f"OK {server.url}: healthy (backend llamacpp)" in report
    assert "OK remote plugin commands in the manifest" in report
    assert "OK httpx" in report and "OK pynvim" in report
    assert "OK engine: llama-cpp-python" in report  # fallback readiness
    assert re.search(r"OK plan: \d+/\d+ layers on GPU", report)
    assert "GPU" in report


def test_checkhealth_names_the_problem_when_the_server_is_down(editor: Factory) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    ed = editor(api_url=url, fallback=False)
    report = checkhealth(ed)
    assert re.search(rf"ERROR server not reachable: .*{re.escape(url)} \(connection refused\)",
                     report), report
    assert "python -m mloffload.server" in report
    assert "off (fallback = false)" in report
