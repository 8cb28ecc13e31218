"""Shared fixtures: the real default model, a real server on a free port."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from fim_model import PSM_ONLY_ID, build_fim_model  # noqa: E402
from helpers import ServerProcess  # noqa: E402
from llama_server import llama_server_bin  # noqa: E402
from nvim_harness import Editor, editors, register_plugin  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data dir for the session: the embedded model is assembled into it once."""
    path = tmp_path_factory.mktemp("ml-offload-data")
    from mloffload.models.catalog import ensure_embedded_model

    ensure_embedded_model(path)
    return path


@pytest.fixture(scope="session")
def model_path(data_dir: Path) -> Path:
    from mloffload.models.catalog import embedded_model_path

    return embedded_model_path(data_dir)


@pytest.fixture(scope="session")
def fim_models(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Path:
    """A models folder: the embedded Gemma, the FIM test model (tests/fim_model.py: nonsense
    text, real protocol) and its variant with FIM prefix, suffix and middle tokens only."""
    folder = tmp_path_factory.mktemp("fim-models")
    os.link(model_path, folder / model_path.name)
    build_fim_model(model_path, folder)
    build_fim_model(model_path, folder, ("fim_pre", "fim_suf", "fim_mid"), PSM_ONLY_ID)
    return folder


@pytest.fixture(scope="session")
def server(data_dir: Path) -> Iterator[ServerProcess]:
    """The default server: in-process llama.cpp on the embedded model, default settings."""
    proc = ServerProcess(data_dir, env={"ML_OFFLOAD_N_CTX": "2048",
                                        "ML_OFFLOAD_DEFAULT_MAX_TOKENS": "48"})
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def managed_server(data_dir: Path) -> Iterator[ServerProcess]:
    """The same, in managed mode: the model runs in its own llama-server process."""
    proc = ServerProcess(data_dir, env={"ML_OFFLOAD_N_CTX": "2048",
                                        "ML_OFFLOAD_DEFAULT_MAX_TOKENS": "48",
                                        "ML_OFFLOAD_BACKEND": "managed",
                                        "ML_OFFLOAD_LLAMA_SERVER_BIN": str(llama_server_bin())})
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def base_url(server: ServerProcess) -> str:
    return server.url


@pytest.fixture(params=["llamacpp", "managed"])
def mode_url(request: pytest.FixtureRequest) -> str:
    """A test using this runs against both backends that run models themselves."""
    name = "server" if request.param == "llamacpp" else "managed_server"
    proc: ServerProcess = request.getfixturevalue(name)
    return proc.url


@pytest.fixture(scope="session")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The remote plugin registered once (:UpdateRemotePlugins) for every editor test."""
    return register_plugin(tmp_path_factory.mktemp("nvim-register"))


@pytest.fixture
def editor(tmp_path: Path, manifest: Path, data_dir: Path) -> Iterator[Callable[..., Editor]]:
    """A factory of headless editors with the plugin, all closed at the end of the test."""
    with editors(tmp_path, manifest, data_dir) as start:
        yield start
