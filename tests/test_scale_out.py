"""Scaling out: one ml-offload in front of several real llama-servers it does not run.

Three llama-servers, started here, each with its own ``--alias``: ``alpha`` (started with
``--api-key``; our server reads the key from a file and also calls it ``coder``) and two
replicas of ``twin``. Our server (TOML ``[[upstreams]]``) serves them next to its own
in-process default model. The tests kill and restart them under it, count what each replica
served (llama-server's own metrics), give it a wrong key, and read every response and log
line for the key.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from fim_model import FIM_ID
from helpers import ServerProcess, assert_openai_error, free_port, sse_events
from llama_server import LlamaServer

KEY = "alpha-key-7d2e91"
CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Hello"}]
LLAMA_ARGS = ["-t", "1", "-tb", "1", "-np", "2", "--chat-template", "gemma", "--no-jinja",
              "--no-webui"]


def wait_for(check: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def llama(model: Path, log_dir: Path, *args: str) -> LlamaServer:
    return LlamaServer(model, log_dir, free_port(), [*LLAMA_ARGS, *args], n_ctx=1024)


@pytest.fixture(scope="module")
def servers(model_path: Path, fim_models: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, LlamaServer]]:
    """``twin`` is the FIM test model (the embedded Gemma with FIM tokens in its header:
    the same answers to chats, nonsense for FIM), so /infill can be routed to it too."""
    logs = tmp_path_factory.mktemp("scale-out-llama")
    fim = fim_models / f"{FIM_ID}.gguf"
    started = {"alpha": llama(model_path, logs, "--alias", "alpha", "--api-key", KEY),
               "twin_a": llama(fim, logs, "--alias", "twin,twin-2"),
               "twin_b": llama(fim, logs, "--alias", "twin,twin-2")}
    try:
        for server in started.values():
            server.start()
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def ours(data_dir: Path, servers: dict[str, LlamaServer],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    conf = tmp_path_factory.mktemp("scale-out-conf")
    (conf / "alpha.key").write_text(KEY + "\n")
    (conf / "ml.toml").write_text(f"""
[[upstreams]]
url = "{servers['alpha'].url}"
models = [{{ id = "alpha", aliases = ["coder"] }}]
api_key_file = "{conf / 'alpha.key'}"
max_in_flight = 1

[[upstreams]]
url = "{servers['twin_a'].url}"

[[upstreams]]
url = "{servers['twin_b'].url}/v1"
""")
    env = {"ML_OFFLOAD_CONFIG": str(conf / "ml.toml"), "ML_OFFLOAD_N_CTX": "1024",
           "ML_OFFLOAD_UPSTREAM_HEALTH_INTERVAL": "0.5s", "ML_OFFLOAD_MAX_QUEUE": "1"}
    with ServerProcess(data_dir, env=env) as proc:
        yield proc.wait_ready()
        assert KEY not in proc.log()


@pytest.fixture
def api(ours: ServerProcess, servers: dict[str, LlamaServer]) -> Iterator[httpx.Client]:
    for server in servers.values():
        server.ensure_running()
    with httpx.Client(base_url=ours.url, timeout=120) as client:
        wait_for(lambda: all(u["ready"] for u in client.get("/status").json()["upstreams"]),
                 what="every upstream up")
        yield client


def chat(api: httpx.Client, model: str, max_tokens: int = 3) -> httpx.Response:
    return api.post(CHAT, json={"model": model, "messages": HELLO, "max_tokens": max_tokens})


def predicted(server: LlamaServer) -> float:
    return server.metrics()["tokens_predicted_total"]


def upstream_entry(api: httpx.Client, server: LlamaServer) -> dict[str, Any]:
    entry: dict[str, Any] = api.get("/api/health").json()["backends"][server.url]
    return entry


# --- listing and routing ------------------------------------------------------------------


def test_upstream_models_are_listed_and_routed_next_to_the_local_default(
        api: httpx.Client, ours: ServerProcess, servers: dict[str, LlamaServer]) -> None:
    client = openai.OpenAI(base_url=ours.url + "/v1", api_key="unused", max_retries=0)
    cards = {m.id: m for m in client.models.list()}
    local = [mid for mid, m in cards.items() if "default" in (m.meta or {})["aliases"]]  # type: ignore[attr-defined]
    assert len(local) == 1 and "upstream" not in cards[local[0]].meta  # type: ignore[attr-defined]
    alpha, twin = cards["alpha"].meta, cards["twin"].meta  # type: ignore[attr-defined]
    assert alpha["upstream"] == {"url": servers["alpha"].url, "state": "up", "available": True}
    assert alpha["aliases"] == ["coder"] and alpha["available"] is True
    assert [r["url"] for r in twin["replicas"]] == [servers["twin_a"].url, servers["twin_b"].url]
    assert twin["aliases"] == ["twin-2"]  # llama-server's own --alias list
    assert twin["context_length"] and twin["file_size"]  # llama-server's own meta
    for model in ("alpha", "coder", "twin", "twin-2", "default"):
        answer = client.chat.completions.create(
            model=model, messages=HELLO, max_tokens=3)  # type: ignore[arg-type]
        assert answer.model == model and answer.choices[0].message.content, model
    stream = client.chat.completions.create(model="coder", messages=HELLO,  # type: ignore[arg-type]
                                            max_tokens=4, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    one = api.get("/v1/models/coder").json()
    assert one["id"] == "alpha" and one["meta"]["upstream"]["url"] == servers["alpha"].url
    upstreams = {u["url"]: u for u in api.get("/status").json()["upstreams"]}
    assert upstreams[servers["alpha"].url]["max_in_flight"] == 1  # as configured
    assert upstreams[servers["twin_a"].url]["max_in_flight"] == 2  # its slots (-np 2)
    assert upstreams[servers["alpha"].url]["requests"] >= 3
    assert_openai_error(chat(api, "no-such-model"), 404, "model_not_found")
    # The upstream's own errors keep their status, in our shape (no --embeddings there).
    assert_openai_error(api.post("/v1/embeddings", json={"model": "twin", "input": "x"}), 501)
    assert_openai_error(api.post("/api/models/alpha/load"), 400, "unsupported_backend")
    # Ollama's listing has them too, and routes its chat by the same names.
    tags = {m["name"] for m in api.get("/api/tags").json()["models"]}
    assert {"alpha", "coder", "twin", "twin-2", "default"} <= tags
    said = api.post("/api/chat", json={"model": "coder", "messages": HELLO, "stream": False,
                                       "options": {"num_predict": 2}})
    assert said.status_code == 200 and said.json()["model"] == "coder", said.text


def test_infill_and_tokenize_are_routed_to_the_upstream_serving_the_model(
        api: httpx.Client, servers: dict[str, LlamaServer]) -> None:
    body = {"input_prefix": "def add(a, b):\n    return ",
            "input_suffix": "\n\nprint(add(1, 2))\n",
            "input_extra": [{"filename": "util.py",
                             "text": "def sub(a, b):\n    return a - b\n"}],
            "n_predict": 8, "temperature": 0, "seed": 42, "cache_prompt": False}
    direct = httpx.post(servers["twin_a"].url + "/infill", json=body, timeout=120).json()
    routed = api.post("/infill", json={**body, "model": "twin"})
    assert routed.status_code == 200, routed.text
    assert routed.json()["content"] == direct["content"]
    assert routed.json()["tokens_evaluated"] == direct["tokens_evaluated"]
    with api.stream("POST", "/infill", json={**body, "model": "twin", "stream": True}) as r:
        events = list(sse_events(r))
    assert events[-1]["stop"] is True
    assert "".join(e["content"] for e in events) == direct["content"]
    # alpha's model has no FIM tokens: llama-server's refusal, in our shape.
    assert_openai_error(api.post("/infill", json={**body, "model": "coder"}), 400,
                        "fim_unsupported", "invalid_request_error")
    text = {"content": "hello <unused0> world", "parse_special": True}
    assert api.post("/tokenize", json={**text, "model": "twin"}).json() == \
        httpx.post(servers["twin_a"].url + "/tokenize", json=text, timeout=30).json()


# --- one upstream down: only its models fail, and it comes back ------------------------------


def test_a_dead_upstream_costs_only_its_models_and_comes_back(
        api: httpx.Client, ours: ServerProcess, servers: dict[str, LlamaServer]) -> None:
    alpha = servers["alpha"]
    pid = ours.proc.pid
    alpha.kill()
    err = assert_openai_error(chat(api, "coder"), 503, "backend_unavailable")
    assert alpha.url in err["message"]
    assert chat(api, "twin").status_code == 200
    assert chat(api, "default").status_code == 200
    assert api.get("/health").status_code == 200
    health = api.get("/api/health").json()
    assert health["status"] == "degraded"
    assert health["backends"][alpha.url]["ready"] is False
    assert health["backends"][alpha.url]["state"] == "down"
    assert health["backends"]["llamacpp"]["ready"] is True
    assert all(health["backends"][servers[n].url]["ready"] for n in ("twin_a", "twin_b"))
    card = api.get("/v1/models/alpha").json()
    assert card["meta"]["available"] is False and card["meta"]["upstream"]["state"] == "down"
    assert_openai_error(chat(api, "alpha"), 503, "backend_unavailable")

    alpha.start().wait_ready()
    wait_for(lambda: chat(api, "alpha").status_code == 200, what="alpha answering again")
    assert ours.proc.pid == pid and ours.proc.poll() is None  # no restart of ours
    assert upstream_entry(api, alpha)["ready"] is True
    assert api.get("/api/health").json()["status"] == "healthy"
    log = ours.wait_log(f"upstream {alpha.url} is up")
    assert f"upstream {alpha.url} is down" in log


# --- replicas ---------------------------------------------------------------------------


def test_requests_spread_across_replicas(api: httpx.Client,
                                         servers: dict[str, LlamaServer]) -> None:
    a, b = servers["twin_a"], servers["twin_b"]
    before = predicted(a), predicted(b)
    body = {"model": "twin", "prompt": "Once upon a time", "max_tokens": 3,
            "ignore_eos": True}
    for _ in range(8):
        r = api.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    served = (predicted(a) - before[0]) / 3, (predicted(b) - before[1]) / 3
    # One at a time, both idle: round-robin, so each got half.
    assert served == (4, 4), served


def test_a_replica_dying_mid_run_costs_no_request_that_had_not_started(
        api: httpx.Client, ours: ServerProcess, servers: dict[str, LlamaServer]) -> None:
    a, b = servers["twin_a"], servers["twin_b"]
    results: list[tuple[float, bool, str]] = []  # (started, streamed, how it ended)
    stop = threading.Event()
    killed_at: list[float] = []

    def one(client: httpx.Client, streamed: bool) -> str:
        body = {"model": "twin", "prompt": "Once upon a time", "max_tokens": 12,
                "ignore_eos": True, "stream": streamed}
        try:
            with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return f"HTTP {r.status_code}: {r.read().decode()}"
                if not streamed:
                    r.read()
                    return "ok" if r.json()["usage"]["completion_tokens"] == 12 else r.text
                events = list(sse_events(r))
        except httpx.HTTPError as exc:
            return f"transport: {exc!r}"
        errors = [e for e in events if isinstance(e, dict) and "error" in e]
        if events[-1] != "[DONE]":
            return "no [DONE]"
        return f"error event: {errors[0]['error']['code']}" if errors else "ok"

    def worker(i: int) -> None:
        with httpx.Client(base_url=ours.url, timeout=120) as client:
            n = 0
            while not stop.is_set():
                streamed = (i + n) % 2 == 0
                n += 1
                started = time.monotonic()
                results.append((started, streamed, one(client, streamed)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(results) >= 6 and b.decoding() > 0, what="load on both replicas")
        killed_at.append(time.monotonic())
        b.kill()
        wait_for(lambda: sum(1 for s, _, _ in results if s > killed_at[0]) >= 9,
                 what="requests after the kill")
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    after = [how for started, _, how in results if started > killed_at[0]]
    assert after and all(how == "ok" for how in after), after
    # Not even those that had started: a non-streamed answer's headers come only when it is
    # done, so a connection lost under it is retried on the other replica. A stream that was
    # under way ends with the error event and [DONE].
    assert all(how == "ok" for _, streamed, how in results if not streamed), results
    assert all(how in ("ok", "error event: upstream_disconnected")
               for _, streamed, how in results if streamed), results
    assert upstream_entry(api, b)["ready"] is False and upstream_entry(api, a)["ready"] is True


def test_a_client_leaving_a_stream_stops_the_replica(api: httpx.Client,
                                                     servers: dict[str, LlamaServer]) -> None:
    replicas = servers["twin_a"], servers["twin_b"]
    before = [s.wait_idle()["tokens_predicted_total"] for s in replicas]
    long = 400
    body = {"model": "twin", "prompt": "Once upon a time", "max_tokens": long,
            "ignore_eos": True, "stream": True}
    with api.stream("POST", "/v1/completions", json=body) as r:
        events = sse_events(r)
        for _ in range(3):
            assert next(events)["choices"][0]["text"] is not None
    after = [s.wait_idle()["tokens_predicted_total"] for s in replicas]
    made = sum(after) - sum(before)
    assert 3 <= made < long / 2, made
    wait_for(lambda: all(u["in_flight"] == 0 for u in api.get("/status").json()["upstreams"]),
             what="nothing left in flight")


# --- limits -----------------------------------------------------------------------------


def test_max_in_flight_and_queue_then_429(api: httpx.Client, ours: ServerProcess,
                                          servers: dict[str, LlamaServer]) -> None:
    """alpha has max_in_flight 1 and our max_queue is 1. With alpha frozen (SIGSTOP: its
    kernel still accepts the connection, it answers nothing), one request is at it, the next
    waits here, the third gets 429; thawed, both answer in full."""
    alpha = servers["alpha"]
    assert alpha.proc is not None
    body = {"model": "alpha", "prompt": "Once upon a time", "max_tokens": 8,
            "ignore_eos": True, "stream": True}
    done: list[list[Any]] = []

    def stream() -> None:
        with httpx.Client(base_url=ours.url, timeout=120) as client, \
                client.stream("POST", "/v1/completions", json=body) as r:
            done.append(list(sse_events(r)))

    def entry() -> dict[str, Any]:
        return next(u for u in api.get("/status").json()["upstreams"] if u["url"] == alpha.url)

    threads = [threading.Thread(target=stream) for _ in range(2)]
    os.kill(alpha.proc.pid, signal.SIGSTOP)
    try:
        for t in threads:
            t.start()
        wait_for(lambda: (entry()["in_flight"], entry()["waiting"]) == (1, 1),
                 what="one request at alpha and one waiting here")
        err = assert_openai_error(chat(api, "alpha"), 429, "rate_limit_exceeded")
        assert alpha.url in err["message"] and "max_in_flight 1" in err["message"]
    finally:
        os.kill(alpha.proc.pid, signal.SIGCONT)
    for t in threads:
        t.join(120)
    assert len(done) == 2 and all(events[-1] == "[DONE]" for events in done), done
    assert all(sum(1 for e in events if isinstance(e, dict) and e.get("choices")) >= 8
               for events in done)


# --- keys -------------------------------------------------------------------------------


def test_a_wrong_key_is_a_clear_502_naming_the_upstream(
        data_dir: Path, servers: dict[str, LlamaServer], tmp_path: Path) -> None:
    alpha = servers["alpha"].ensure_running()
    wrong = "wrong-key-5b8c"
    host = alpha.url.removeprefix("http://")
    # The simple form (a key in the URL of ML_OFFLOAD_UPSTREAMS): its models are unknown.
    with ServerProcess(data_dir, env={"ML_OFFLOAD_UPSTREAMS": f"http://{wrong}@{host}"}) as p:
        p.wait_ready()
        r = httpx.post(p.url + CHAT, json={"model": "alpha", "messages": HELLO})
        err = assert_openai_error(r, 502, "upstream_auth_failed")
        assert f"upstream {alpha.url}" in err["message"] and "refused the key" in err["message"]
        assert "the key in its URL" in err["message"]
        entry = httpx.get(p.url + "/api/health").json()["backends"][alpha.url]
        assert (entry["state"], entry["available"], entry["ready"]) == ("refused", True, False)
        assert httpx.get(p.url + "/health").status_code == 200  # the local model still serves
        assert wrong not in r.text and wrong not in p.log()
    # A TOML entry with its models named: routed, and the message names the key file.
    key_file = tmp_path / "alpha.key"
    key_file.write_text(wrong)
    toml = tmp_path / "ml.toml"
    toml.write_text(f'[[upstreams]]\nurl = "{alpha.url}"\nmodels = ["alpha"]\n'
                    f'api_key_file = "{key_file}"\n')
    with ServerProcess(data_dir, env={"ML_OFFLOAD_CONFIG": str(toml)}) as p:
        p.wait_ready()
        r = httpx.post(p.url + CHAT, json={"model": "alpha", "messages": HELLO})
        err = assert_openai_error(r, 502, "upstream_auth_failed")
        assert f"upstream {alpha.url}" in err["message"] and str(key_file) in err["message"]
        assert wrong not in r.text and wrong not in p.log()


def test_the_key_and_the_url_with_it_never_reach_a_response_or_a_log(
        data_dir: Path, servers: dict[str, LlamaServer]) -> None:
    alpha = servers["alpha"].ensure_running()
    twin = servers["twin_a"].ensure_running()
    secret_url = f"http://someone:{KEY}@{alpha.url.removeprefix('http://')}"
    args = ["--upstream", secret_url, "--upstream", twin.url, "--log-level", "debug"]
    with ServerProcess(data_dir, args=args) as p:
        p.wait_ready()
        with httpx.Client(base_url=p.url, timeout=120) as client:
            texts = [client.post(CHAT, json={"model": "alpha", "messages": HELLO,
                                             "max_tokens": 2}).text]
            assert '"choices"' in texts[0]
            with client.stream("POST", CHAT, json={"model": "alpha", "messages": HELLO,
                                                   "max_tokens": 2, "stream": True}) as r:
                texts.append(r.read().decode())
            for path in ("/v1/models", "/api/health", "/status", "/api/backend/info",
                         "/metrics", "/", "/v1/models/alpha"):
                texts.append(client.get(path).text)
            texts.append(client.post("/api/models/alpha/load").text)
            alpha.kill()
            texts.append(client.post(CHAT, json={"model": "alpha", "messages": HELLO}).text)
            texts.append(client.get("/api/health").text)
            assert alpha.url in texts[-1]  # named, without credentials
        p.wait_log(f"upstream {alpha.url} is down")
        log = p.log()
    alpha.start().wait_ready()
    for text in [*texts, log]:
        assert KEY not in text and "someone" not in text


# --- the rules, on the real classes without a network ------------------------------------------


def test_least_busy_replica_then_round_robin() -> None:
    from mloffload.config import Settings, UpstreamConfig
    from mloffload.hardware.gpu import GPUProbe
    from mloffload.server.stats import Stats
    from mloffload.server.upstream.remote import Remote, State
    from mloffload.server.upstream.router import Balancer, Replica, unavailable

    settings, stats = Settings(), Stats(GPUProbe().snapshot)
    big, small, third = (Remote(UpstreamConfig(f"http://{n}:1", max_in_flight=k), settings,
                                stats) for n, k in (("big", 4), ("small", 1), ("third", 4)))
    for r in (big, small, third):
        r.state = State.UP
    balancer = Balancer()
    replicas = [Replica(r, "m") for r in (big, small, third)]

    def pick(tried: list[Remote] | None = None) -> str:
        chosen = balancer.pick("m", replicas, tried or [])
        return chosen.remote.url if chosen else "none"

    assert [pick() for _ in range(6)] == ["http://big:1", "http://small:1", "http://third:1"] * 2
    big.admission.in_flight = 2  # 2 of 4 slots: 0.5
    small.admission.in_flight = 1  # 1 of 1: full
    third.admission.in_flight = 1  # 1 of 4: least busy for its size
    assert pick() == "http://third:1"
    third.admission.in_flight = 2  # big and third tie at 0.5: they take turns
    assert {pick(), pick()} == {"http://big:1", "http://third:1"}
    big.state = State.DOWN
    big.reason = "upstream http://big:1 is not reachable (refused)."
    assert pick() == "http://third:1" and pick([third]) == "http://small:1"
    assert pick([third, small]) == "none"
    err = unavailable("m", [Replica(big, "m")])
    assert err.status == 503 and err.code == "backend_unavailable" and "big:1" in err.message
    small.state, small.reason = State.REFUSED, "upstream http://small:1 refused our key"
    err = unavailable("m", [Replica(big, "m"), Replica(small, "m")])
    assert err.status == 503 and "big:1" in err.message and "small:1" in err.message
