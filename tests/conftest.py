"""Shared fixtures: the real default model, a real server on a free port."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from helpers import ServerProcess  # noqa: E402
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
def server(data_dir: Path) -> Iterator[ServerProcess]:
    """The default server: in-process llama.cpp on the embedded model, default settings."""
    proc = ServerProcess(data_dir, env={"ML_OFFLOAD_N_CTX": "2048"})
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def base_url(server: ServerProcess) -> str:
    return server.url


@pytest.fixture(scope="session")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The remote plugin registered once (:UpdateRemotePlugins) for every editor test."""
    return register_plugin(tmp_path_factory.mktemp("nvim-register"))


@pytest.fixture
def editor(tmp_path: Path, manifest: Path, data_dir: Path) -> Iterator[Callable[..., Editor]]:
    """A factory of headless editors with the plugin, all closed at the end of the test."""
    with editors(tmp_path, manifest, data_dir) as start:
        yield start
