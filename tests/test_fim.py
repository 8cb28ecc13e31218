"""Fill in the middle on the server (issue 14): llama-server's /infill, a suffix on
/v1/completions, the FIM model, refusals, and cancel on disconnect.

Every test runs on the FIM test model (tests/fim_model.py): the embedded Gemma with five
unused tokens named as FIM tokens. Its completions are nonsense, since Gemma was never
trained for this; the protocol, the prompt layout and every code path are real, and each
answer is compared with a real llama-server's answer to the same request.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from fim_model import FIM_ID, PSM_ONLY_ID
from helpers import ServerProcess, assert_openai_error, free_port, sse_events
from llama_server import LlamaServer, llama_server_bin, proxy_env
from mloffload.engine.fim import FimTokens, InfillInput, InfillLimits, infill_prompt, sampler_names
from mloffload.server.fim import pick_fields

GEMMA = "gemma-3-270m-q4_k_m"
N_CTX = 2048
# As managed mode runs its engines (server/engines/process.py), so n_batch is 512 there too.
ENGINE_ARGS = ["--embeddings", "--pooling", "mean", "--parallel", "1", "-t", "1"]

CODE = {"input_prefix": "def add(a, b):\n", "input_suffix": "\n\nprint(add(1, 2))\n",
        "prompt": "    return"}
EXTRA = [{"filename": "util.py", "text": "def sub(a, b):\n    return a - b\n"},
         {"text": "x = 1\n"}]  # no filename: llama-server names it "tmp"
# Greedy, fresh prompt evaluation, a fixed seed: both sides compute the same tokens.
SAME = {"n_predict": 8, "temperature": 0, "cache_prompt": False, "seed": 42}
REQUESTS = {
    "plain": {**CODE, **SAME},
    "extra": {**CODE, "input_extra": EXTRA, **SAME},
    "mixed": {"input_prefix": ["def f(x):\n", 236743, "x"], "input_suffix": ["\n"], **SAME},
    "stop": {**CODE, "input_extra": EXTRA, **SAME, "stop": ["(", "\n\n"]},
    "indent": {**CODE, **SAME, "n_indent": 4},  # its greedy text starts "\nprint": cut
    "n_predict_0": {**CODE, "n_predict": 0, "temperature": 0, "cache_prompt": False},
    "samplers": {**CODE, **SAME, "samplers": ["top_k", "top_p", "infill"], "top_p": 0.99},
    "tokens": {**CODE, **SAME, "return_tokens": True},
}


# --- servers --------------------------------------------------------------------------


def start_server(tmp: Path, models: Path, **env: str) -> ServerProcess:
    base = {"ML_OFFLOAD_MODELS_DIR": str(models), "ML_OFFLOAD_N_CTX": str(N_CTX),
            "ML_OFFLOAD_THREADS": "1", "ML_OFFLOAD_PARALLEL": "1"}
    return ServerProcess(tmp, env={**base, **env}).wait_ready()


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory, fim_models: Path) -> Iterator[ServerProcess]:
    """In-process; Gemma answers chats, the fim_model setting names the FIM model."""
    proc = start_server(tmp_path_factory.mktemp("fim-local"), fim_models,
                        ML_OFFLOAD_BACKEND="llamacpp", ML_OFFLOAD_DEFAULT_MODEL=GEMMA,
                        ML_OFFLOAD_FIM_MODEL=FIM_ID, ML_OFFLOAD_MAX_LOADED="2")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def managed(tmp_path_factory: pytest.TempPathFactory, fim_models: Path
            ) -> Iterator[ServerProcess]:
    """Managed mode; the FIM model is the default model, and no fim_model is set."""
    proc = start_server(tmp_path_factory.mktemp("fim-managed"), fim_models,
                        ML_OFFLOAD_BACKEND="managed", ML_OFFLOAD_DEFAULT_MODEL=FIM_ID,
                        ML_OFFLOAD_LLAMA_SERVER_BIN=str(llama_server_bin()),
                        ML_OFFLOAD_MAX_LOADED="2")
    yield proc
    proc.stop()


@pytest.fixture(params=["llamacpp", "managed"])
def fim_url(request: pytest.FixtureRequest) -> str:
    proc: ServerProcess = request.getfixturevalue("local" if request.param == "llamacpp"
                                                  else "managed")
    return proc.url


def reference(tmp: Path, models: Path, model_id: str) -> LlamaServer:
    return LlamaServer(models / f"{model_id}.gguf", tmp, free_port(), ENGINE_ARGS,
                       n_ctx=N_CTX).start().wait_ready()


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory, fim_models: Path) -> Iterator[LlamaServer]:
    """llama-server itself on the FIM model: the answers ours must match."""
    server = reference(tmp_path_factory.mktemp("fim-llama"), fim_models, FIM_ID)
    yield server
    server.stop()


def post(url: str, path: str, body: Any, **kw: Any) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=180, **kw)


def status(url: str) -> dict[str, Any]:
    return dict(httpx.get(url + "/status", timeout=30).json())


@pytest.fixture(scope="module")
def proxy(data_dir: Path, llama: LlamaServer) -> Iterator[ServerProcess]:
    """The llama-server backend, in front of the reference llama-server."""
    with ServerProcess(data_dir, env=proxy_env(llama.url)) as proc:
        yield proc.wait_ready()


# --- the prompt layout and the stop rules, unit by unit ----------------------------------


def fake_tokenize(text: str, parse_special: bool) -> list[int]:
    """One token per character (its code point + 1000); "<S>" as 5 when parse_special."""
    out: list[int] = []
    while text:
        if parse_special and text.startswith("<S>"):
            out.append(5)
            text = text[3:]
            continue
        out.append(1000 + ord(text[0]))
        text = text[1:]
    return out


def chars(tokens: list[int]) -> str:
    names = {1: "<BOS>", 5: "<S>", 6: "<PRE>", 7: "<SUF>", 8: "<MID>", 9: "<SEP>", 10: "<REP>"}
    return "".join(names.get(t) or chr(t - 1000) for t in tokens)


def test_layout_repo_pattern_and_trimming() -> None:
    fim = FimTokens(6, 7, 8, rep=10, sep=9)
    inp = InfillInput("p" * 500, "s" * 200, (("a.py", "A"), ("b.py", "B")), prompt="<S>x")
    # n_batch 64: prefix keeps its last 48, suffix its first 16 - 2 - 2 = 12; n_ctx 90 leaves
    # 90 - 64 + 2 = 28 tokens for the extra chunks, taken from their end.
    tokens = infill_prompt(fake_tokenize, fim, 1, inp, n_ctx=90, n_batch=64)
    extra = "<REP>myproject\n<SEP>a.py\nA<SEP>b.py\nB<SEP>filename\n"  # 35 tokens
    assert chars(tokens[:28]) == "ect\n<SEP>a.py\nA<SEP>b.py\nB<SEP>filename\n"
    assert chars(tokens[:28]) == extra[-len(chars(tokens[:28])):]
    assert tokens[28] == 1  # BOS after the extra context
    assert chars(tokens[29:]) == "<PRE>" + "p" * 48 + "<S>x<SUF>" + "s" * 12 + "<MID>"


def test_layout_without_repo_tokens_joins_chunks_with_a_snippet_line() -> None:
    fim = FimTokens(6, 7, 8)
    inp = InfillInput("ab", "cd", (("a.py", "A"),))
    text = chars(infill_prompt(fake_tokenize, fim, None, inp, n_ctx=2048, n_batch=512))
    assert text == "\n\n--- snippet ---\n\nA<PRE>ab<SUF>cd<MID>"
    # With no room for extra context (n_ctx - n_batch - 2 * n_predict ≤ 0) none is sent.
    text = chars(infill_prompt(fake_tokenize, fim, None, inp, n_ctx=512, n_batch=512,
                               n_predict=1))
    assert text == "<PRE>ab<SUF>cd<MID>"


def test_n_indent_cuts_the_first_line_that_is_indented_less() -> None:
    limits = InfillLimits(n_indent=4, t_max_predict_ms=-1)
    pieces = ["x = 1", "\n", "    y", " = 2\n", "  z", "= 3"]
    stopped_at = next(i for i, p in enumerate(pieces) if limits.feed(p, None))
    assert stopped_at == 4
    assert limits.text == "x = 1\n    y = 2\n  "  # the short line's text is cut, not its indent


def test_t_max_predict_ms_stops_at_a_newline_once_past_the_limit() -> None:
    limits = InfillLimits(n_indent=0, t_max_predict_ms=50)
    long_ago = time.monotonic() - 1.0
    assert limits.feed("abc", long_ago) is False  # no newline yet: keeps going
    assert limits.feed("d\n", long_ago) is True
    assert InfillLimits(0, 50).feed("d\n", time.monotonic() + 10) is False


def test_response_fields_and_samplers_as_llama_server_reads_them() -> None:
    body = {"content": "x", "timings": {"prompt_n": 3}, "tokens": []}
    assert pick_fields(["content", "timings/prompt_n", "nope", "timings/nope"], body) == \
        {"content": "x", "timings/prompt_n": 3}
    assert pick_fields([""], body) == {}
    assert sampler_names(["top-k", "topp", "infill", "bogus", "temp"]) == \
        ("top_k", "top_p", "infill", "temperature")
    assert sampler_names("kpt") == ("top_k", "top_p", "temperature")


# --- /infill, field by field against llama-server -----------------------------------------


def compare(ours: dict[str, Any], theirs: dict[str, Any], name: str) -> None:
    assert list(ours) == list(theirs), name  # the same fields, in the same order
    for key, value in theirs.items():
        if key in ("timings", "model"):
            continue
        assert ours[key] == value, (name, key, ours[key], value)
    assert list(ours["timings"]) == list(theirs["timings"])
    for key in ("cache_n", "prompt_n", "predicted_n"):
        assert ours["timings"][key] == theirs["timings"][key], (name, key)


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_infill_answers_as_llama_server_does(fim_url: str, llama: LlamaServer, name: str
                                             ) -> None:
    req = REQUESTS[name]
    theirs = post(llama.url, "/infill", req)
    ours = post(fim_url, "/infill", req)
    assert theirs.status_code == 200, theirs.text
    assert ours.status_code == 200, ours.text
    assert ours.content == orjson.dumps(ours.json())  # compact JSON, as llama-server writes
    compare(ours.json(), theirs.json(), name)
    assert ours.json()["model"] == FIM_ID


@pytest.mark.parametrize("name", ["plain", "extra"])
def test_the_evaluated_prompt_is_llama_servers_token_for_token(fim_url: str,
                                                              llama: LlamaServer,
                                                              name: str) -> None:
    fields = {"response_fields": ["prompt", "tokens_evaluated"]}
    theirs = post(llama.url, "/infill", {**REQUESTS[name], **fields}).json()
    ours = post(fim_url, "/infill", {**REQUESTS[name], **fields}).json()
    assert ours == theirs
    # The detokenised prompt, tokenized again by each side, is that many tokens, the same.
    tok = {"content": theirs["prompt"], "parse_special": True}
    their_ids = post(llama.url, "/tokenize", tok).json()["tokens"]
    our_ids = post(fim_url, "/tokenize", {**tok, "model": FIM_ID}).json()["tokens"]
    assert our_ids == their_ids and len(our_ids) == theirs["tokens_evaluated"]
    assert our_ids.count(8) == 1 and our_ids[-1] == 8  # FIM_MID last
    if name == "extra":
        assert "<unused3>util.py\ndef sub" in ours["prompt"]  # FIM_SEP, the repo layout
        assert "<unused3>tmp\nx = 1\n" in ours["prompt"]


def test_layout_without_repo_tokens_matches_llama_server(
        tmp_path: Path, fim_models: Path, local: ServerProcess) -> None:
    with reference(tmp_path, fim_models, PSM_ONLY_ID) as psm:
        req = {**REQUESTS["extra"], "response_fields": ["prompt", "tokens_evaluated",
                                                        "content"]}
        theirs = post(psm.url, "/infill", req).json()
        ours = post(local.url, "/infill", {**req, "model": PSM_ONLY_ID}).json()
    assert ours == theirs
    assert "--- snippet ---" in ours["prompt"] and "<unused3>" not in ours["prompt"]


def test_response_fields_pick_and_flatten(fim_url: str, llama: LlamaServer) -> None:
    for fields in (["content", "timings/prompt_n", "truncated", "nope",
                    "generation_settings/n_predict"], [""]):
        req = {**REQUESTS["extra"], "response_fields": fields}
        theirs = post(llama.url, "/infill", req).json()
        ours = post(fim_url, "/infill", req).json()
        assert list(ours) == list(theirs)
        assert {k: v for k, v in ours.items() if k != "timings/prompt_n"} == \
            {k: v for k, v in theirs.items() if k != "timings/prompt_n"}


def test_infill_stream_is_llama_servers(fim_url: str, llama: LlamaServer) -> None:
    req = {**REQUESTS["plain"], "stream": True}

    def events(url: str) -> list[Any]:
        with httpx.stream("POST", url + "/infill", json=req, timeout=180) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            return list(sse_events(r))

    theirs, ours = events(llama.url), events(fim_url)
    assert "[DONE]" not in ours  # llama-server's own streams end with "stop": true
    assert [list(e) for e in ours[:-1]] == [list(e) for e in theirs[:-1]]
    assert [e["content"] for e in ours] == [e["content"] for e in theirs]
    assert [e["tokens"] for e in ours[:-1]] == [e["tokens"] for e in theirs[:-1]]
    assert ours[-1]["stop"] is True and ours[-1]["content"] == ""
    compare(ours[-1], theirs[-1], "stream")


def test_t_max_predict_ms_stops_after_a_newline(fim_url: str) -> None:
    # The "extra" request's greedy text is newlines and indents; past 1 ms, the first
    # newline after the first token ends it.
    req = {**REQUESTS["extra"], "n_predict": 64, "t_max_predict_ms": 1}
    body = post(fim_url, "/infill", req).json()
    assert body["stop_type"] == "limit" and body["tokens_predicted"] < 64
    assert "\n" in body["content"]


def test_bad_infill_requests_get_clear_errors(fim_url: str) -> None:
    cases = [({"input_suffix": ""}, "input_prefix"),
             ({"input_prefix": "", "input_suffix": "", "input_extra": {"text": "x"}},
              "input_extra"),
             ({"input_prefix": "", "input_suffix": "", "input_extra": [{"filename": "a"}]},
              "input_extra[0].text"),
             ({"input_prefix": "", "input_suffix": "", "prompt": 5}, "prompt"),
             ({"input_prefix": "", "input_suffix": "", "n_indent": -1}, "n_indent"),
             ({"input_prefix": "", "input_suffix": "", "samplers": 3}, "samplers"),
             ({"input_prefix": "", "input_suffix": "", "model": "../../etc/passwd"}, None)]
    for body, param in cases:
        r = post(fim_url, "/infill", body)
        if param is None:
            assert_openai_error(r, 404, "model_not_found")
        else:
            assert_openai_error(r, 400, param=param)
    bad = httpx.post(fim_url + "/infill", content=b"{not json", timeout=30)
    assert_openai_error(bad, 400, "invalid_json")
    # llama-server reads a body as JSON whatever its Content-Type says (curl -d): so do we.
    form = httpx.post(fim_url + "/infill", timeout=180, content=orjson.dumps(
        {**REQUESTS["plain"], "n_predict": 1}),
        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 200 and "content" in form.json()


def test_token_ids_past_the_vocabulary_are_refused(fim_url: str) -> None:
    """In-process, llama.cpp would read out of bounds with them (the fuzz test found the
    server dead); llama-server answers a 500. Both are a 400 naming the field."""
    huge, past = 2**40, 262144  # the vocabulary has 262,144 tokens
    for path, body, param in [
            ("/tokenize", {"content": ["x", past], "with_pieces": True}, "content"),
            ("/detokenize", {"tokens": [1, past]}, "tokens"),
            ("/detokenize", {"tokens": [huge]}, "tokens[0]"),
            ("/infill", {"input_prefix": ["def f(", past], "input_suffix": "",
                         "n_predict": 1}, "input_prefix")]:
        r = post(fim_url, path, {"model": FIM_ID, **body})
        err = assert_openai_error(r, 400, param=param)
        assert "vocabulary" in err["message"] or "less than" in err["message"], (path, err)
    ok = post(fim_url, "/detokenize", {"model": FIM_ID, "tokens": [past - 1]})
    assert ok.status_code == 200 and isinstance(ok.json()["content"], str)


def test_the_llama_server_backend_relays_infill_and_serves_suffix(proxy: ServerProcess,
                                                                  llama: LlamaServer) -> None:
    req = REQUESTS["extra"]
    theirs = post(llama.url, "/infill", req).json()
    ours = post(proxy.url, "/infill", req)
    assert ours.status_code == 200, ours.text
    compare(ours.json(), theirs, "proxy")
    with httpx.stream("POST", proxy.url + "/infill", json={**req, "stream": True},
                      timeout=180) as r:
        events = list(sse_events(r))
    assert events[-1]["stop"] is True and "[DONE]" not in events
    assert "".join(e["content"] for e in events) == theirs["content"]
    # llama-server's own /v1/completions ignores a suffix; through us it is its /infill.
    plain = {"prompt": "def add(a, b):\n", "suffix": "\n", "max_tokens": 6,
             "temperature": 0, "seed": 42}
    fill = post(llama.url, "/infill", {"input_prefix": plain["prompt"], "input_suffix": "\n",
                                       "n_predict": 6, "temperature": 0, "seed": 42,
                                       "cache_prompt": False}).json()
    r = post(proxy.url, "/v1/completions", plain)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == fill["content"]
    tok = post(proxy.url, "/tokenize", {"content": "hello <unused0>"}).json()
    assert tok == post(llama.url, "/tokenize", {"content": "hello <unused0>"}).json()


# --- which model answers -----------------------------------------------------------------


def test_the_registry_shows_which_models_can_fill_in_the_middle(fim_url: str) -> None:
    cards = {m["id"]: m["meta"] for m in httpx.get(fim_url + "/v1/models").json()["data"]}
    assert cards[FIM_ID]["fim"] is True and cards[PSM_ONLY_ID]["fim"] is True
    assert cards[GEMMA]["fim"] is False


def test_a_model_without_fim_tokens_is_refused(fim_url: str, base_url: str) -> None:
    for url, body in ((fim_url, {"model": GEMMA}), (base_url, {})):  # named; the default
        r = post(url, "/infill", {**CODE, **body})
        err = assert_openai_error(r, 400, "fim_unsupported", "invalid_request_error",
                                  "model")
        assert "cannot fill in the middle" in err["message"] and "fim_model" in err["message"]
        r = post(url, "/v1/completions", {"prompt": "a", "suffix": "b", **body})
        assert_openai_error(r, 400, "fim_unsupported")
    assert post(fim_url, "/infill", {**REQUESTS["plain"], "n_predict": 1}).status_code == 200


def test_fim_model_and_chat_model_stay_loaded_together(local: ServerProcess) -> None:
    """max_loaded 2: once both are loaded, chats (the default model) and completions (the
    fim_model) take turns without swapping either out."""
    def turn() -> None:
        chat = post(local.url, "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        fill = post(local.url, "/infill", {**CODE, "n_predict": 2})
        assert chat.status_code == 200 and fill.status_code == 200
        assert chat.json()["model"] == "default" and fill.json()["model"] == FIM_ID

    def loaded() -> dict[str, float]:
        return {m["id"]: m["loaded_at"] for m in status(local.url)["loaded_models"]}

    turn()
    first = loaded()
    assert set(first) == {GEMMA, FIM_ID}
    for _ in range(2):
        turn()
    assert loaded() == first


# --- a suffix on /v1/completions ---------------------------------------------------------


def test_suffix_on_completions_is_the_infill_of_prefix_and_suffix(fim_url: str) -> None:
    common = {"temperature": 0, "seed": 42}
    infill = post(fim_url, "/infill", {"input_prefix": "def add(a, b):\n",
                                       "input_suffix": "\n", "n_predict": 6,
                                       **common}).json()
    r = post(fim_url, "/v1/completions", {"prompt": "def add(a, b):\n", "suffix": "\n",
                                          "max_tokens": 6, **common})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "default"
    assert body["choices"][0]["text"] == infill["content"]
    assert body["usage"]["prompt_tokens"] == infill["tokens_evaluated"]
    with httpx.stream("POST", fim_url + "/v1/completions", timeout=180, json={
            "prompt": "def add(a, b):\n", "suffix": "\n", "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}, **common}) as s:
        events = list(sse_events(s))
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
    assert text == infill["content"]
    assert events[-2]["usage"]["prompt_tokens"] == infill["tokens_evaluated"]
    # The official client sends it too.
    from openai import OpenAI

    client = OpenAI(base_url=fim_url + "/v1", api_key="unused")
    out = client.completions.create(model="default", prompt="def add(a, b):\n", suffix="\n",
                                    max_tokens=6, temperature=0, seed=42)
    assert out.choices[0].text == infill["content"]


def test_ollama_generate_with_a_suffix_fills_in_the_middle(fim_url: str) -> None:
    """Ollama's /api/generate ``suffix`` through the official client: the same tokens as
    /infill, and ``insert`` among the FIM model's capabilities only."""
    import ollama

    infill = post(fim_url, "/infill", {"model": FIM_ID, "input_prefix": "def add(a, b):\n",
                                       "input_suffix": "\n", "n_predict": 6,
                                       "temperature": 0, "seed": 42}).json()
    client = ollama.Client(host=fim_url)
    out = client.generate(model=FIM_ID, prompt="def add(a, b):\n", suffix="\n",
                          options={"num_predict": 6, "temperature": 0, "seed": 42})
    assert out.response == infill["content"] and out.done is True
    assert out.prompt_eval_count == infill["tokens_evaluated"]
    streamed = client.generate(model=FIM_ID, prompt="def add(a, b):\n", suffix="\n",
                               stream=True,
                               options={"num_predict": 6, "temperature": 0, "seed": 42})
    assert "".join(part.response for part in streamed) == infill["content"]
    assert "insert" in (client.show(FIM_ID).capabilities or [])
    plain = [m.model for m in client.list().models
             if m.model and not m.model.startswith("gemma-fim") and m.model != "default"]
    assert plain and "insert" not in (client.show(plain[0]).capabilities or [])
    with pytest.raises(ollama.ResponseError) as refused:
        client.generate(model=plain[0], prompt="def f(", suffix="  return")
    assert refused.value.status_code == 400 and "fill in the middle" in str(refused.value)


def test_suffix_is_in_the_openapi_document(fim_url: str) -> None:
    doc = httpx.get(fim_url + "/openapi.json").json()
    props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert "suffix" in props and "fim_model" in props["suffix"]["description"]
    assert "/infill" in doc["paths"] and "InfillRequest" in doc["components"]["schemas"]
    r = post(fim_url, "/v1/completions", {"prompt": "a", "suffix": "b", "echo": True})
    assert_openai_error(r, 400)


# --- cancel on disconnect ------------------------------------------------------------------

LONG = 400


def engine_log(data_dir: Path) -> str:
    return (data_dir / "engines" / f"{FIM_ID}.log").read_text(errors="replace")


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("mode", ["llamacpp", "managed"])
def test_a_client_that_leaves_stops_the_generation(mode: str, stream: bool,
                                                   request: pytest.FixtureRequest) -> None:
    proc: ServerProcess = request.getfixturevalue("local" if mode == "llamacpp" else "managed")
    url = proc.url
    post(url, "/infill", {**CODE, "n_predict": 1})  # loaded
    data = proc.log_path.parent
    seen = len(engine_log(data)) if mode == "managed" else 0
    before = status(url)["requests"]
    body = {**REQUESTS["extra"], "n_predict": LONG, "stream": stream}
    if stream:
        with httpx.stream("POST", url + "/infill", json=body, timeout=180) as r:
            events = sse_events(r)
            for _ in range(3):
                assert next(events)["stop"] is False
    else:
        raw = orjson.dumps(body)
        sock = socket.create_connection(("127.0.0.1", proc.port), timeout=30)
        sock.sendall(b"POST /infill HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(raw), raw))
        time.sleep(2.0)  # it is generating
        sock.close()
    deadline = time.monotonic() + 60
    while (after := status(url)["requests"])["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, after
        time.sleep(0.2)
    assert after["cancelled"] == before["cancelled"] + 1 and after["active"] == 0
    if mode == "managed":
        # The engine's own log: it cancelled the task, which held the prompt (~50 tokens)
        # and the few tokens made before the client left.
        deadline = time.monotonic() + 30
        while not re.search(r"stop processing: n_tokens = \d+", new := engine_log(data)[seen:]):
            assert time.monotonic() < deadline, new
            time.sleep(0.2)
        assert "cancel task" in new
        held = int(re.findall(r"stop processing: n_tokens = (\d+)", new)[-1])
        assert held < 64 + LONG // 2, held
    else:
        assert after["tokens_generated"] - before["tokens_generated"] < LONG // 2


# --- settings and model files -----------------------------------------------------------


def test_fim_model_setting_from_flag_env_and_toml(tmp_path: Path) -> None:
    from mloffload.config import load_settings

    toml = tmp_path / "c.toml"
    toml.write_text('fim_model = "from-file"\n')
    assert load_settings([]).fim_model == ""
    assert load_settings(["--config", str(toml)]).fim_model == "from-file"
    env = {"ML_OFFLOAD_FIM_MODEL": "from-env"}
    assert load_settings(["--config", str(toml)], env).fim_model == "from-env"
    assert load_settings(["--fim-model", "from-flag"], env).fim_model == "from-flag"


def test_fim_tokens_are_found_by_name_as_llama_cpp_does(tmp_path: Path) -> None:
    """No header ids, but Qwen2.5-Coder's token texts: llama.cpp finds its FIM tokens by
    name (src/llama-vocab.cpp), and so does the registry."""
    import gguf

    from mloffload.models.gguf_info import read_gguf_info

    def write(name: str, tokens: list[str]) -> Path:
        path = tmp_path / f"{name}.gguf"
        w = gguf.GGUFWriter(str(path), "qwen2")
        w.add_token_list(tokens)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    qwen = write("coder", ["a", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>",
                           "<|repo_name|>", "<|file_sep|>"] + [f"t{i}" for i in range(100)])
    assert read_gguf_info(qwen).fim_tokens == ("pre", "suf", "mid", "rep", "sep")
    assert read_gguf_info(qwen).can_fim
    plain = write("plain", ["a", "<|fim_prefix|>x", "prefix"] + [f"t{i}" for i in range(100)])
    assert read_gguf_info(plain).fim_tokens == () and not read_gguf_info(plain).can_fim
