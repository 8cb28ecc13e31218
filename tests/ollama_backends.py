"""Our server on each backend, for the Ollama tests that send the same requests to all of
them: in-process llama.cpp, managed mode (the model in its own llama-server process), and a
real llama-server behind the proxy. Another mode is one more entry in ``BACKENDS``."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from helpers import ServerProcess, free_port
from llama_server import llama_server_bin, proxy_env, running

N_CTX = 2048
# As in test_upstream: embeddings need both flags; --no-jinja so "gemma" names the template.
LLAMA_SERVER_ARGS = ("--embeddings", "--pooling", "mean", "--no-jinja", "--chat-template", "gemma")

Start = Callable[[Path, Path, Path, Mapping[str, str]], contextlib.AbstractContextManager[
    ServerProcess]]


@contextlib.contextmanager
def in_process(data_dir: Path, model_path: Path, tmp: Path, env: Mapping[str, str]
               ) -> Iterator[ServerProcess]:
    with ServerProcess(data_dir, env={"ML_OFFLOAD_N_CTX": str(N_CTX), **env}) as proc:
        yield proc.wait_ready()


@contextlib.contextmanager
def managed(data_dir: Path, model_path: Path, tmp: Path, env: Mapping[str, str]
            ) -> Iterator[ServerProcess]:
    with ServerProcess(data_dir, env={"ML_OFFLOAD_BACKEND": "managed",
                                      "ML_OFFLOAD_LLAMA_SERVER_BIN": str(llama_server_bin()),
                                      "ML_OFFLOAD_N_CTX": str(N_CTX), **env}) as proc:
        yield proc.wait_ready()


@contextlib.contextmanager
def behind_proxy(data_dir: Path, model_path: Path, tmp: Path, env: Mapping[str, str]
                 ) -> Iterator[ServerProcess]:
    with running(model_path, tmp, free_port(), LLAMA_SERVER_ARGS) as upstream, \
            ServerProcess(data_dir, env={**proxy_env(upstream.url), **env}) as proc:
        yield proc.wait_ready()


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    start: Start
    unloads: bool  # can free a model on request (llama-server keeps its own loaded)
    json_format: bool  # can constrain output to JSON (llama-server's grammars)


BACKENDS = {m.name: m for m in (
    Mode("llamacpp", in_process, unloads=True, json_format=False),
    Mode("managed", managed, unloads=True, json_format=True),
    Mode("llama-server", behind_proxy, unloads=False, json_format=True),
)}


@dataclasses.dataclass
class Served:
    mode: Mode
    proc: ServerProcess
    http: httpx.Client
    client: ollama.Client

    @property
    def url(self) -> str:
        return self.proc.url


@contextlib.contextmanager
def serve(name: str, data_dir: Path, model_path: Path, tmp: Path,
          env: Mapping[str, str] | None = None) -> Iterator[Served]:
    mode = BACKENDS[name]
    with mode.start(data_dir, model_path, tmp, env or {}) as proc, \
            httpx.Client(base_url=proc.url, timeout=120) as http:
        yield Served(mode, proc, http, ollama.Client(host=proc.url, timeout=120))


def each_backend(request: pytest.FixtureRequest, data_dir: Path, model_path: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The body of a test module's fixture with ``params=list(BACKENDS)``."""
    name = str(request.param)
    with serve(name, data_dir, model_path, tmp_path_factory.mktemp(f"ollama-{name}")) as served:
        yield served


def ndjson(response: httpx.Response) -> list[Any]:
    """The lines of an NDJSON body, each checked to be one JSON object ending in a newline."""
    import json

    text = response.text
    assert text.endswith("\n"), repr(text[-80:])
    lines = text.split("\n")[:-1]
    out = []
    for line in lines:
        obj = json.loads(line)
        assert isinstance(obj, dict), line
        out.append(obj)
    return out
