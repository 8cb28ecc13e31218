"""Issue 19's floods and abandoned work, at full size, against a real server.

- **Idle flood**: 1,100 TCP connections that send nothing, the server under
  ``prlimit --nofile=1024:1024`` (systemd's default soft limit): how many it holds, whether
  ``/health`` and a chat still answer, and that the silent ones are closed.
- **Pipelining**: 200,000 ``GET /v1/models`` on one connection that never reads an answer,
  then 8 such connections: the server's RSS before, during and after.
- **Huge head**: one 64 MiB header.
- **Abandoned work**: a 10 × 380-word embedding whose client gives up after 2 s, and a
  3,900-token prompt whose client gives up after 1 s: how long the next 4-token chat waits.

    .venv/bin/python bench/hardening.py [--note TEXT]

Results: ``bench/results/hardening.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import select
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    RESULTS_DIR,
    ManagedProcess,
    command_line,
    free_port,
    git_commit,
    machine_info,
    md_table,
    now_iso,
    write_json,
)

CHAT4 = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4,
         "temperature": 0}


@contextlib.contextmanager
def server(name: str, log_dir: Path, env: dict[str, str], prefix: Sequence[str] = ()
           ) -> Iterator[ManagedProcess]:
    port = free_port()
    full = {"ML_OFFLOAD_PORT": str(port), "ML_OFFLOAD_BACKEND": "llamacpp", **env}
    proc = ManagedProcess(name, [*prefix, sys.executable, "-m", "mloffload.server"],
                          url=f"http://127.0.0.1:{port}", log_dir=log_dir, env=full)
    try:
        proc.wait_ready("/health")
        yield proc
    finally:
        proc.stop()


def rss_mib(proc: ManagedProcess) -> float:
    import psutil

    return round(psutil.Process(proc.proc.pid).memory_info().rss / 2**20, 1)


def port_of(proc: ManagedProcess) -> int:
    return int(proc.url.rsplit(":", 1)[1])


def timed(fn: Any) -> tuple[Any, float]:
    start = time.monotonic()
    out = fn()
    return out, round(time.monotonic() - start, 3)


def open_count(socks: list[socket.socket]) -> int:
    """Sockets the server has not closed (a closed one polls readable and reads b"")."""
    alive = 0
    for sock in socks:
        poller = select.poll()  # select() cannot watch descriptors past 1023
        poller.register(sock, select.POLLIN)
        if not poller.poll(0):
            alive += 1
            continue
        try:
            if sock.recv(1, socket.MSG_PEEK):
                alive += 1
        except OSError:
            pass
    return alive


def idle_flood(log_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    with server("idle-flood", log_dir, env, ["prlimit", "--nofile=1024:1024"]) as proc:
        socks = [socket.create_connection(("127.0.0.1", port_of(proc)), timeout=30)
                 for _ in range(1100)]
        time.sleep(1.0)
        held = open_count(socks)
        health, health_s = timed(lambda: httpx.get(proc.url + "/health", timeout=60))
        chat, chat_s = timed(lambda: httpx.post(proc.url + "/v1/chat/completions",
                                                json=CHAT4, timeout=120))
        time.sleep(11.0)  # past first_request_timeout (10 s)
        after = open_count(socks)
        for sock in socks:
            sock.close()
        log = proc.log_path.read_text()
    return {"connections": 1100, "nofile": 1024, "held": held,
            "health_status": health.status_code, "health_seconds": health_s,
            "chat_status": chat.status_code, "chat_seconds": chat_s,
            "open_after_11s": after,
            "cap_logged": "connection limit" in log,
            "budget_line": next((ln for ln in log.splitlines() if "open-file limit" in ln), "")}


def flood_send(sock: socket.socket, data: bytes, seconds: float) -> int:
    """Send what the server takes within ``seconds``; returns the bytes it took."""
    sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + seconds
    view = memoryview(data)
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    while sent < len(data) and time.monotonic() < deadline:
        if not poller.poll(100):
            continue
        try:
            sent += sock.send(view[sent:sent + (1 << 20)])
        except BlockingIOError:
            continue
        except OSError:
            break
    return sent


def pipelining(log_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    request = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    flood = request * 200_000
    with server("pipelining", log_dir, env) as proc:
        before = rss_mib(proc)
        one = socket.create_connection(("127.0.0.1", port_of(proc)))
        taken_one = flood_send(one, flood, 10.0)
        during_one = rss_mib(proc)
        more = [socket.create_connection(("127.0.0.1", port_of(proc))) for _ in range(7)]
        taken_more = [flood_send(s, flood, 5.0) for s in more]
        during_eight = rss_mib(proc)
        health = httpx.get(proc.url + "/health", timeout=60).status_code
        for sock in [one, *more]:
            sock.close()
        time.sleep(2.0)
        after = rss_mib(proc)
        big = socket.create_connection(("127.0.0.1", port_of(proc)))
        head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (64 << 20)
        taken_big = flood_send(big, head + b"\r\n\r\n", 10.0)
        big.setblocking(True)
        big.settimeout(10)
        try:
            answer = big.recv(200)
        except OSError as exc:
            answer = repr(exc).encode()
        big.close()
        after_big = rss_mib(proc)
    return {"rss_mib_before": before, "one_connection_bytes_taken": taken_one,
            "rss_mib_one_connection": during_one,
            "eight_connections_bytes_taken": [taken_one, *taken_more],
            "rss_mib_eight_connections": during_eight, "health_meanwhile": health,
            "rss_mib_after_close": after, "header_64mib_bytes_taken": taken_big,
            "header_64mib_answer": answer.split(b"\r\n", 1)[0].decode("latin-1"),
            "rss_mib_after_64mib_header": after_big}


def abandoned(log_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with server("abandoned", log_dir, {**env, "ML_OFFLOAD_N_CTX": "4096"}) as proc:
        with httpx.Client(base_url=proc.url, timeout=300) as client:
            client.post("/v1/chat/completions", json=CHAT4)  # warm
            _, out["chat_alone_seconds"] = timed(
                lambda: client.post("/v1/chat/completions", json=CHAT4))
            words = " ".join(["word"] * 380)
            with contextlib.suppress(httpx.TimeoutException):
                httpx.post(proc.url + "/v1/embeddings", json={"input": [words] * 10},
                           timeout=2)
            r, out["chat_after_abandoned_embedding_seconds"] = timed(
                lambda: client.post("/v1/chat/completions", json=CHAT4))
            out["chat_after_abandoned_embedding_status"] = r.status_code
            prompt = "word " * 3890
            with contextlib.suppress(httpx.TimeoutException):
                httpx.post(proc.url + "/v1/completions", timeout=1,
                           json={"prompt": prompt, "max_tokens": 4})
            r, out["chat_after_abandoned_prefill_seconds"] = timed(
                lambda: client.post("/v1/chat/completions", json=CHAT4))
            out["chat_after_abandoned_prefill_status"] = r.status_code
            status = client.get("/status").json()["requests"]
            out["counters"] = {k: status[k] for k in ("active", "completed", "cancelled",
                                                      "failed")}
            before = rss_mib(proc)
            client.post("/v1/embeddings", json={"input": "word " * 2000})
            out["rss_mib_before_2000_token_embedding"] = before
            out["rss_mib_after_2000_token_embedding"] = rss_mib(proc)
        log = proc.log_path.read_text()
    out["queue_ms_in_access_lines"] = [
        ln.rsplit("queue_ms=", 1)[1].split()[0] for ln in log.splitlines()
        if "POST /v1/chat/completions 200" in ln and "queue_ms=" in ln][-2:]
    return out


def render(data: dict[str, Any]) -> str:
    idle, pipe, ab = data["idle_flood"], data["pipelining"], data["abandoned"]
    rows = [
        ["idle connections held (1,100 opened, nofile 1024)", str(idle["held"])],
        ["/health during the idle flood", f"{idle['health_status']} in "
         f"{idle['health_seconds']} s"],
        ["4-token chat during the idle flood", f"{idle['chat_status']} in "
         f"{idle['chat_seconds']} s"],
        ["silent connections still open 11 s later", str(idle["open_after_11s"])],
        ["RSS before pipelining", f"{pipe['rss_mib_before']} MiB"],
        ["RSS, 200,000 pipelined GETs on 1 connection, unread",
         f"{pipe['rss_mib_one_connection']} MiB"],
        ["RSS, the same on 8 connections", f"{pipe['rss_mib_eight_connections']} MiB"],
        ["RSS after those connections close", f"{pipe['rss_mib_after_close']} MiB"],
        ["64 MiB header", f"{pipe['header_64mib_answer']}; RSS "
         f"{pipe['rss_mib_after_64mib_header']} MiB"],
        ["4-token chat, idle server", f"{ab['chat_alone_seconds']} s"],
        ["next chat after an abandoned 10 x 380-word embedding",
         f"{ab['chat_after_abandoned_embedding_seconds']} s"],
        ["next chat after an abandoned 3,900-token prefill",
         f"{ab['chat_after_abandoned_prefill_seconds']} s"],
        ["RSS around a 2,000-token embedding", f"{ab['rss_mib_before_2000_token_embedding']}"
         f" -> {ab['rss_mib_after_2000_token_embedding']} MiB"],
    ]
    return (f"# Hardening (issue 19)\n\n{data['date']}, commit {data.get('commit')}"
            f", `{data['command']}`\n\n{data.get('note') or ''}\n\n"
            + md_table(["what", "measured"], rows) + "\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--note", default="")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/ml-offload-bench-hardening"))
    args = parser.parse_args(argv)
    env = {"ML_OFFLOAD_N_CTX": "1024"}
    data: dict[str, Any] = {"date": now_iso(), "command": command_line(), "note": args.note,
                            "machine": machine_info(), "commit": git_commit()}
    data["idle_flood"] = idle_flood(args.log_dir, env)
    data["pipelining"] = pipelining(args.log_dir, env)
    data["abandoned"] = abandoned(args.log_dir, env)
    write_json(RESULTS_DIR / "hardening.json", data)
    (RESULTS_DIR / "hardening.md").write_text(render(data))
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
