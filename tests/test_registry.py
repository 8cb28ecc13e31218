"""The GGUF registry, the embedded default, and the `models`/`plan` commands."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helpers import ServerProcess, free_port, machine_gpu, stop_process, wait_for
from mloffload.config import settings_from
from mloffload.models.catalog import CatalogError, open_registry
from mloffload.models.gguf_info import GGUFError, read_gguf_info
from mloffload.models.registry import Registry


def test_header_matches_gguf_package(model_path: Path) -> None:
    """Our fast header walk agrees with the gguf package's own reader."""
    import gguf

    ours = read_gguf_info(model_path)
    reader = gguf.GGUFReader(model_path)

    def field(key: str) -> object:
        return reader.fields[key].contents()

    assert ours.architecture == field("general.architecture")
    assert ours.context_length == field("gemma3.context_length")
    assert ours.embedding_length == field("gemma3.embedding_length")
    assert ours.block_count == field("gemma3.block_count")
    assert ours.vocab_size == len(reader.fields["tokenizer.ggml.tokens"].data)
    assert ours.tensor_bytes_total == sum(int(t.n_bytes) for t in reader.tensors)
    assert ours.file_type == "Q4_K_M"
    assert ours.size_label == "270M"
    assert not ours.has_chat_template


def test_scan_ids_aliases_and_unusable_files(tmp_path: Path, model_path: Path) -> None:
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    os.link(model_path, models / "Tiny-Model.gguf")
    (models / "sub" / "notes.gguf").write_text("this is not a model")
    with model_path.open("rb") as src:
        (models / "truncated.gguf").write_bytes(src.read(5_000_000))
    reg = Registry(tmp_path / "data" / "registry.sqlite3")
    counts = reg.scan([models])
    assert counts == {"found": 3, "read": 3, "unchanged": 0, "removed": 0, "unusable": 2}
    ids = {e.id: e for e in reg.list()}
    assert set(ids) == {"tiny-model", "notes", "truncated"}
    assert ids["tiny-model"].usable and ids["tiny-model"].info is not None
    assert "gemma-3-270m" in ids["tiny-model"].aliases  # from general.name
    assert not ids["notes"].usable and "GGUF" in ids["notes"].reason
    assert not ids["truncated"].usable and "truncated" in ids["truncated"].reason

    # Unchanged files are not read again; a changed one is.
    assert reg.scan([models])["unchanged"] == 3
    (models / "sub" / "notes.gguf").write_text("still not a model, but longer now")
    assert reg.scan([models])["read"] == 1

    # Ids are stable across restarts; removed files leave the registry.
    reg.close()
    reg = Registry(tmp_path / "data" / "registry.sqlite3")
    assert {e.id for e in reg.list()} == set(ids)
    (models / "truncated.gguf").unlink()
    assert reg.scan([models])["removed"] == 1
    assert reg.resolve("truncated") is None
    reg.close()


def test_names_resolve_only_through_the_registry(tmp_path: Path, model_path: Path) -> None:
    reg = Registry(tmp_path / "r.sqlite3")
    entry = reg.register_file(model_path, "embedded")
    reg.set_default(entry.id)
    assert reg.resolve("default") == reg.resolve(entry.id)
    for name in (str(model_path), "../" + model_path.name, model_path.name, "default/..", ""):
        assert reg.resolve(name) is None, name
    reg.close()


def test_embedded_default_is_assembled_once_and_checked(tmp_path: Path) -> None:
    settings = settings_from({"data_dir": tmp_path})
    reg = open_registry(settings)
    default = reg.resolve("default")
    assert default is not None and default.source == "embedded"
    path = Path(default.path)
    assert path.parent == tmp_path / "models" and path.stat().st_size == 253113024
    mtime = path.stat().st_mtime_ns
    reg.close()
    reg = open_registry(settings)  # second start: the stamp avoids re-hashing, no rewrite
    assert path.stat().st_mtime_ns == mtime
    reg.close()
    # A damaged copy is noticed and replaced.
    with path.open("r+b") as fh:
        fh.seek(10_000_000)
        fh.write(b"\0" * 16)
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    reg = open_registry(settings)
    assert read_gguf_info(path).architecture == "gemma3"
    assert (tmp_path / "models" / "gemma-3-270m-q4_k_m.sha256").read_text().startswith("a5fd3b")
    reg.close()


def test_configured_default_model(tmp_path: Path, model_path: Path) -> None:
    models = tmp_path / "m"
    models.mkdir()
    os.link(model_path, models / "mine.gguf")
    reg = open_registry(settings_from({"data_dir": tmp_path / "d", "models_dir": [str(models)],
                                       "default_model": "mine"}))
    assert reg.default_id() == "mine"
    assert not (tmp_path / "d" / "models").exists()  # the embedded one was not needed
    reg.close()
    with pytest.raises(CatalogError, match="nope"):
        open_registry(settings_from({"data_dir": tmp_path / "d", "default_model": "nope"}))


def test_not_gguf_error(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 40)
    with pytest.raises(GGUFError):
        read_gguf_info(bad)


def _cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_OFFLOAD_")}
    env["ML_OFFLOAD_DATA_DIR"] = str(data_dir)
    return subprocess.run([sys.executable, "-m", "mloffload", *args], env=env, text=True,
                          capture_output=True, timeout=120)


def test_models_command(tmp_path: Path, data_dir: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(data_dir / "models", data / "models")
    models = tmp_path / "models"
    models.mkdir()
    (models / "broken.gguf").write_text("nope")
    table = _cli("models", "--models-dir", str(models), data_dir=data)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "ALIASES", "ARCH", "SIZE"]
    assert any(line.startswith("gemma-3-270m-q4_k_m") and "Q4_K_M" in line for line in lines)
    assert any(line.startswith("broken") and "unusable" in line for line in lines)
    listed = json.loads(_cli("models", "--json", data_dir=data).stdout)
    assert [m["id"] for m in listed] == ["gemma-3-270m-q4_k_m"]
    assert listed[0]["aliases"] == ["default", "gemma-3-270m"]


def test_plan_command(tmp_path: Path, data_dir: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(data_dir / "models", data / "models")
    out = _cli("plan", "default", "--free-vram", "64GiB", "--n-ctx", "8192", data_dir=data)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["n_gpu_layers"] == 19 and plan["fits_all"] is True
    assert plan["n_ctx"] == 8192
    assert plan["kv_bytes_total"] == 18 * 8192 * 512 * 2
    small = json.loads(_cli("plan", "default", "--free-vram", "700MiB", data_dir=data).stdout)
    assert 0 < small["n_gpu_layers"] < 19
    # Without --free-vram it asks the GPU: with none, the CPU plan and the reason; with one
    # (and a llama.cpp that can offload), all 19 layers of this small model.
    here = json.loads(_cli("plan", "default", data_dir=data).stdout)
    offload, _ = machine_gpu()
    assert here["n_gpu_layers"] == (19 if offload else 0) and here["reason"]
    missing = _cli("plan", "nope", data_dir=data)
    assert missing.returncode == 1 and "unknown model" in missing.stderr


# --- a broken disk: the registry is only a cache of what is on disk --------------------------


def prepared_data(tmp_path: Path, data_dir: Path) -> Path:
    """A data folder holding the embedded model (a hard link) and its checksum stamp."""
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    for src in (data_dir / "models").iterdir():
        if src.suffix in (".gguf", ".sha256"):
            os.link(src, data / "models" / src.name)
    return data


def corrupt(kind: str, path: Path) -> None:
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    if kind == "text":
        path.write_text("hello\n")
    elif kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2 + 100])
    elif kind == "zero pages":
        path.write_bytes(b"\0" * path.stat().st_size)
    elif kind == "directory":
        path.unlink()
        path.mkdir()
        (path / "something").write_text("x")


@pytest.mark.parametrize("kind", ["text", "truncated", "zero pages", "directory"])
def test_a_corrupt_registry_is_moved_aside_and_rebuilt(
        tmp_path: Path, data_dir: Path, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    data = prepared_data(tmp_path, data_dir)
    settings = settings_from({"data_dir": data})
    open_registry(settings).close()
    corrupt(kind, settings.registry_path)
    with caplog.at_level(logging.WARNING, "mloffload"):
        reg = open_registry(settings)
    try:
        assert reg.resolve("default") is not None
        assert reg.resolve("default").usable  # type: ignore[union-attr]
    finally:
        reg.close()
    kept = sorted(data.glob("registry.sqlite3.corrupt-*"))
    assert kept and (kept[0].is_dir() if kind == "directory" else kept[0].is_file()), kept
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(kept[0]) in warnings[0].getMessage(), caplog.text
    reg = open_registry(settings)  # the rebuilt one is a good registry: no warning again
    reg.close()
    assert len(sorted(data.glob("registry.sqlite3.corrupt-*"))) == 1


def test_the_server_starts_over_a_corrupt_registry(tmp_path: Path, data_dir: Path) -> None:
    data = prepared_data(tmp_path, data_dir)
    (data / "registry.sqlite3").write_text("hello\n")
    with ServerProcess(data, env={"ML_OFFLOAD_N_CTX": "512"}) as proc:
        proc.wait_ready()
        log = proc.log()
    assert "moved it to" in log and "Traceback" not in log


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A scratch folder that nobody can reach (pytest's own are private to their user)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="ml-offload-ro-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for p in [path, *path.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)
        shutil.rmtree(path)


def unprivileged(command: list[str]) -> list[str]:
    """``command`` in a child that file modes bind: root may write anywhere, so the tests
    run it as nobody when they run as root."""
    if os.geteuid() != 0:
        return command
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]


def server_command(data: Path, port: int) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_OFFLOAD_")}
    env.update({"ML_OFFLOAD_DATA_DIR": str(data), "ML_OFFLOAD_PORT": str(port),
                "ML_OFFLOAD_BACKEND": "llamacpp", "ML_OFFLOAD_N_CTX": "512",
                "XDG_CACHE_HOME": str(data.parent / "cache"), "PYTHONUNBUFFERED": "1"})
    return [sys.executable, "-m", "mloffload.server"], env


def read_only(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)


def test_a_read_only_data_folder_is_served_read_only(public_tmp: Path, data_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from mloffload.engine import doctor

    data = prepared_data(public_tmp, data_dir)
    open_registry(settings_from({"data_dir": data})).close()
    # The service user's engine check passed before, as it would have on a first start.
    monkeypatch.setenv("XDG_CACHE_HOME", str(public_tmp / "cache"))
    assert doctor.check_inprocess(doctor.smoke_model(data)).ok
    read_only(data)
    port = free_port()
    command, env = server_command(data, port)
    log = public_tmp / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(unprivileged(command), env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd="/")
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_ready(proc, url, log)
            r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert r.status_code == 200, r.text
        finally:
            stop_process(proc, grace=15)
    text = log.read_text()
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if "not writable" in line]
    assert len(lines) == 1 and str(data) in lines[0], text


def wait_until_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    def ready() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout=120, what="the read-only server", details=log.read_text)


@pytest.mark.parametrize("what", ["models", "data"])
def test_an_unwritable_folder_on_first_start_is_one_clear_line(public_tmp: Path,
                                                               what: str) -> None:
    data = public_tmp / "data"
    (data / "models").mkdir(parents=True)
    data.chmod(0o777)
    read_only(data / "models" if what == "models" else data)
    command, env = server_command(data, free_port())
    out = subprocess.run(unprivileged(command), env=env, capture_output=True, text=True,
                         timeout=120, cwd="/")
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert str(data / "models") in lines[0] and "writable" in lines[0], lines


def test_stale_partial_files_are_removed_at_start(tmp_path: Path, data_dir: Path) -> None:
    from mloffload.models.catalog import ensure_embedded_model

    data = prepared_data(tmp_path, data_dir)
    target = next((data / "models").glob("*.gguf"))
    dead = target.with_name(f"{target.name}.partial-{2**22 + 12345}")  # above pid_max
    alive = target.with_name(f"{target.name}.partial-{os.getpid()}")  # still assembling
    for partial in (dead, alive):
        partial.write_bytes(b"\0" * 1024)
    assert ensure_embedded_model(data) == target
    assert not dead.exists() and alive.exists()
