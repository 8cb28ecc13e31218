"""The llama.cpp build (issue 12): no AMX code in it, a cache keyed by what it was built with,
a smoke test whose failure is one clear line, and recovery from a bad wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from helpers import REPO

BUILD = REPO / "python" / "mloffload" / "engine" / "build.py"
AMX_OPS = ("tilezero", "tileloadd", "tileloaddt1", "tilestored", "tdpbssd", "tdpbsud",
           "tdpbusd", "tdpbuud", "tdpbf16ps", "ldtilecfg", "sttilecfg", "tilerelease")
SIGILL_STANDIN = '''import os, signal
class Llama:
    def __init__(self, *a, **k):
        os.kill(os.getpid(), signal.SIGILL)  # what ggml's AMX kernels do on such a CPU
def llama_supports_gpu_offload(): return False
def llama_supports_mmap(): return True
def llama_print_system_info(): return b"CPU : AMX_INT8 = 1 |"
def llama_log_callback(f): return f
def llama_log_set(*a): pass
__version__ = "0.3.36"
'''


def build_cli(*args: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run([sys.executable, str(BUILD), *args], capture_output=True, text=True,
                         timeout=1800, env={**os.environ, **(env or {})}, check=True)
    return out.stdout.strip()


def amx_instructions(lib: Path) -> int:
    dump = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)],
                          capture_output=True, text=True, check=True).stdout
    return sum(1 for line in dump.splitlines()
               if (parts := line.split("\t")) and len(parts) > 1
               and parts[1].split(" ")[0] in AMX_OPS)


def test_the_build_has_no_amx_code() -> None:
    """Whatever CPU built it, ggml's CPU library holds no AMX instruction (on an AMX CPU,
    -march=native would have put them there without -mno-amx-*)."""
    folder = Path(build_cli("build"))
    libs = sorted((folder / "bin").glob("libggml-cpu.so*"))
    assert libs
    assert amx_instructions(libs[0].resolve()) == 0
    import llama_cpp

    assert "AMX" not in llama_cpp.llama_print_system_info().decode()
    # And the count can be non-zero: the disassembler knows these instructions.
    probe = Path(folder) / "bin" / "llama-server"
    assert amx_instructions(probe) == 0
    info = build_cli("info")
    assert "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in info


def test_amx_instructions_are_recognised(tmp_path: Path) -> None:
    """The check above can fail: an object built with AMX shows its tile instructions."""
    src = tmp_path / "t.c"
    src.write_text("#include <immintrin.h>\nvoid f(void) { _tile_zero(0); _tile_release(); }\n")
    obj = tmp_path / "t.o"
    subprocess.run(["cc", "-O2", "-mamx-tile", "-c", str(src), "-o", str(obj)], check=True)
    assert amx_instructions(obj) >= 2
    subprocess.run(["cc", "-O2", "-march=sapphirerapids", "-mno-amx-tile", "-mno-amx-int8",
                    "-mno-amx-bf16", "-dM", "-E", "-x", "c", "/dev/null", "-o",
                    str(tmp_path / "defs")], check=True)
    assert "__AMX" not in (tmp_path / "defs").read_text()


def test_the_key_covers_flags_cpu_and_cuda() -> None:
    plain = build_cli("key")
    assert plain.startswith("llama.cpp-") and "-cpu-" in plain
    assert build_cli("key", env={"ML_OFFLOAD_CMAKE_ARGS": "-DGGML_BLAS=ON"}) != plain
    cuda = build_cli("key", env={"ML_OFFLOAD_CUDA": "1", "ML_OFFLOAD_CUDA_ARCHS": "90"})
    assert "-cuda-" in cuda and cuda != build_cli(
        "key", env={"ML_OFFLOAD_CUDA": "1", "ML_OFFLOAD_CUDA_ARCHS": "80"})


def standin(tmp_path: Path) -> Path:
    """A llama_cpp package that dies with SIGILL the moment a model is loaded."""
    pkg = tmp_path / "standin" / "llama_cpp"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(SIGILL_STANDIN)
    return pkg.parent


def test_a_sigill_in_the_smoke_test_is_one_clear_line(tmp_path: Path, data_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_OFFLOAD_")}
    env.update({"PYTHONPATH": str(standin(tmp_path)), "ML_OFFLOAD_DATA_DIR": str(data_dir),
                "ML_OFFLOAD_CACHE": str(tmp_path / "cache"), "ML_OFFLOAD_BACKEND": "llamacpp"})
    doctor = subprocess.run([sys.executable, "-m", "mloffload", "doctor"], env=env,
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert doctor.returncode == 1
    lines = [ln for ln in doctor.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, doctor.stderr
    line = lines[0]
    assert "died with SIGILL (illegal instruction) in its CPU kernels" in line
    assert "AMX" in line and "./dev rebuild" in line
    # The server refuses to start with the same line, before it listens.
    env["ML_OFFLOAD_PORT"] = "1"  # never reached
    server = subprocess.run([sys.executable, "-m", "mloffload.server"], env=env,
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert server.returncode == 2
    assert server.stderr.strip().splitlines()[-1] == "ml-offload: " + line.removeprefix(
        "FAILED: ")
    assert "Traceback" not in server.stderr
    # :checkhealth's fallback section (the plugin host's readiness) says the same, with the
    # fix, instead of the host dying the first time the fallback loads a model.
    probe = ("import json; from mloffload.nvim.fallback import Fallback; "
             "print(json.dumps(Fallback().readiness()))")
    ready = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                           text=True, timeout=300, cwd=REPO)
    assert ready.returncode == 0, ready.stderr
    facts = json.loads(ready.stdout.strip().splitlines()[-1])
    assert facts["ok"] is False and facts["engine"] == line.removeprefix("FAILED: ")
    assert "./dev rebuild" in facts["fix"]


def test_a_planted_bad_wheel_is_replaced_by_the_keyed_build(tmp_path: Path) -> None:
    """A venv whose llama-cpp-python came from pip's cache (here: a wheel that dies with
    SIGILL) gets the keyed build back by itself on the next set-up."""
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    bad = wheel_dir / "llama_cpp_python-0.3.36-py3-none-any.whl"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("llama_cpp/__init__.py", SIGILL_STANDIN)
        z.writestr("llama_cpp_python-0.3.36.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: llama-cpp-python\nVersion: 0.3.36\n")
        z.writestr("llama_cpp_python-0.3.36.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("llama_cpp_python-0.3.36.dist-info/RECORD", "")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    # As pip's cache would: the bad wheel is what "pip install llama-cpp-python" gave.
    subprocess.run([py, "-m", "pip", "install", "--quiet", "--no-index", "--find-links",
                    str(wheel_dir), "llama-cpp-python==0.3.36"], check=True, timeout=300)

    def sigill() -> bool:
        out = subprocess.run([py, "-c", "import llama_cpp; llama_cpp.Llama()"], timeout=60,
                             capture_output=True)
        return out.returncode == -4

    assert sigill()
    # The set-up step of ./dev, with pip pointed at the bad wheel as well.
    env = {"PIP_FIND_LINKS": str(wheel_dir)}
    folder = Path(build_cli("install", py, env=env))
    # The real engine, with what it imports, runs in that venv now.
    subprocess.run([py, "-m", "pip", "install", "--quiet", "numpy", "typing-extensions",
                    "diskcache", "jinja2"], check=True, timeout=600)
    assert not sigill()
    works = subprocess.run([py, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                           capture_output=True, text=True, timeout=60)
    assert works.returncode == 0 and works.stdout.strip() == "0.3.36", works.stderr
    probe = subprocess.run([py, "-c", "import importlib.util as u; "
                            "print(u.find_spec('llama_cpp').origin)"],
                           capture_output=True, text=True, check=True).stdout.strip()
    lib = Path(probe).parent / "lib" / "libllama.so"
    assert lib.read_bytes() == (folder / "bin" / "libllama.so").read_bytes()
    stamp = (venv / ".ml-offload-engine").read_text().strip()
    assert stamp == folder.name
    # A second run finds it in place and installs nothing.
    before = lib.stat().st_mtime_ns
    build_cli("install", py, env=env)
    assert lib.stat().st_mtime_ns == before
