#!/usr/bin/env python3
"""Build llama.cpp once per version, flags and CPU, into ~/.cache/ml-offload/engine/<key>/.

One CMake build of the pinned llama-cpp-python sdist's ``vendor/llama.cpp`` gives both
engines the project uses: ``bin/llama-server`` (the engine processes) and the shared
libraries that the llama-cpp-python wheel in ``wheel/`` carries (the in-process engine and the
Neovim fallback). Both therefore run the very same native code, and the smoke test of one
speaks for the other.

Why not ``pip install llama-cpp-python``: pip's wheel cache is keyed by the sdist, not by
``CMAKE_ARGS``, so a wheel once built with the wrong flags keeps coming back. Here the cache
key covers the version, every CMake argument, the compiler and, because the build is tuned
with ``-march=native``, the CPU's model and flags: a cache carried to another CPU is rebuilt.

Why ``-mno-amx-*``: ggml's AMX kernels in the pinned llama.cpp trap with SIGILL on Intel CPUs
with AMX (Sapphire Rapids and later), because the thread that runs them never asked the
kernel for the XTILEDATA permission (llama.cpp pull request 26954, "ggml-cpu/amx: request
XFD XTILEDATA permission per thread", open at the pin). Native tuning stays (AVX2, AVX-512,
VNNI where the CPU has them); only the AMX code paths are compiled out, so no CPU loses speed
it had before, and ``llama_print_system_info`` shows no ``AMX_INT8``. GCC and Clang let an
explicit ``-mno-`` win over ``-march=native`` whatever their order.

    engine_build.py key                  the cache key for this machine and settings
    engine_build.py build                build (if needed); print the build folder
    engine_build.py llama-server         build (if needed); print the llama-server path
    engine_build.py install PYTHON       put the wheel into PYTHON's environment if it
                                         holds another build (pip's cache never used)
    engine_build.py quarantine           move this key's build aside (it failed its smoke test)
    engine_build.py info                 the CPU, its flags, the key, what is built

Environment: ML_OFFLOAD_CUDA=1 builds with CUDA (GGML_CUDA=on) for ML_OFFLOAD_CUDA_ARCHS
(default "native"); ML_OFFLOAD_CMAKE_ARGS adds CMake arguments (they are part of the key);
ML_OFFLOAD_CACHE moves the cache. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import io
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]  # the checkout, when run from one
NO_AMX = ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")
STAMP = ".ml-offload-engine"  # in the target environment's prefix: the key it holds


def log(msg: str) -> None:
    print(f"engine: {msg}", file=sys.stderr, flush=True)


def pinned(dist: str) -> str:
    """``dist``'s requirement as pyproject.toml pins it (e.g. ``llama-cpp-python==0.3.36``):
    read from the checkout's pyproject.toml, else from the installed package's metadata,
    which carries the same lines. The pins live only there."""
    text = ""
    with contextlib.suppress(OSError):
        candidate = (REPO / "pyproject.toml").read_text()
        if 'name = "ml-offload"' in candidate:
            text = candidate
    if not text:
        from importlib.metadata import PackageNotFoundError, requires

        with contextlib.suppress(PackageNotFoundError):
            text = "\n".join(f'"{r}"' for r in requires("ml-offload") or [])
    m = re.search(rf'"({re.escape(dist)}==[0-9][0-9A-Za-z.]*)', text)
    if m is None:
        raise RuntimeError(f"no pinned {dist} version found in pyproject.toml or metadata")
    return m.group(1)


def pinned_version() -> str:
    """The pinned llama-cpp-python version."""
    return pinned("llama-cpp-python").partition("==")[2]


def cache_root() -> Path:
    base = os.environ.get("ML_OFFLOAD_CACHE")
    if base:
        return Path(base).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "ml-offload"


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def cpu_signature() -> dict[str, str]:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("", platform.machine(), platform.processor()):
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = " ".join(sorted(value.split()))
    return {"machine": platform.machine(), "model": model, "flags": flags}


def compiler() -> str:
    cc = os.environ.get("CC") or "cc"
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        return (out.stdout.splitlines() or [cc])[0].strip()
    except (OSError, subprocess.SubprocessError):
        return cc


def cuda_wanted() -> bool:
    return truthy(os.environ.get("ML_OFFLOAD_CUDA"))


def cmake_args() -> list[str]:
    flags = " ".join(NO_AMX) if platform.machine() in ("x86_64", "AMD64", "i686") else ""
    args = [
        "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=ON",
        "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
        f"-DCMAKE_C_FLAGS={flags}", f"-DCMAKE_CXX_FLAGS={flags}",
        "-DCMAKE_INSTALL_RPATH=$ORIGIN", "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
    ]
    if cuda_wanted():
        archs = os.environ.get("ML_OFFLOAD_CUDA_ARCHS") or "native"
        args += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={archs}"]
    args += shlex.split(os.environ.get("ML_OFFLOAD_CMAKE_ARGS", ""))
    return args


def recipe() -> dict[str, object]:
    """Everything the build depends on; the key is its hash."""
    return {"version": pinned_version(), "cmake_args": cmake_args(), "compiler": compiler(),
            "cpu": cpu_signature(), "cuda": cuda_wanted()}


def build_key(r: dict[str, object] | None = None) -> str:
    r = r or recipe()
    digest = hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest()[:12]
    kind = "cuda" if r["cuda"] else "cpu"
    return f"llama.cpp-{r['version']}-{kind}-{digest}"


def build_dir(key: str | None = None) -> Path:
    return cache_root() / "engine" / (key or build_key())


def is_built(folder: Path) -> bool:
    return (folder / "build.json").is_file() and (folder / "bin" / "llama-server").is_file() \
        and any((folder / "wheel").glob("*.whl"))


def _run(cmd: list[str], **kw: object) -> None:
    log("$ " + " ".join(shlex.quote(c) for c in cmd))
    subprocess.run(cmd, check=True, stdout=sys.stderr, **kw)  # type: ignore[call-overload]


def _cmake(python: str, work: Path) -> str:
    found = shutil.which("cmake")
    if found:
        return found
    _run([python, "-m", "pip", "install", "--quiet", "--target", str(work / "cmake"), "cmake"])
    os.environ["PYTHONPATH"] = str(work / "cmake") + os.pathsep + os.environ.get("PYTHONPATH", "")
    return str(work / "cmake" / "bin" / "cmake")


def build(python: str = sys.executable) -> Path:
    """Build llama-server and the wheel for this key, unless the cache has them."""
    r = recipe()
    key = build_key(r)
    dest = build_dir(key)
    if is_built(dest):
        return dest
    version = str(r["version"])
    started = time.monotonic()
    log(f"building llama.cpp {version} as {key} (8 to 16 minutes on 2 cores; once per "
        "machine and flags)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ml-offload-engine-") as tmp:
        work = Path(tmp)
        _run([python, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={version}", "-d", str(work)])
        sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
        _run(["tar", "xzf", str(sdist), "-C", str(work)])
        src = next(p for p in work.iterdir() if p.is_dir() and p.name.startswith("llama_cpp_"))
        cmake = _cmake(python, work)
        _run([cmake, "-S", str(src / "vendor" / "llama.cpp"), "-B", str(work / "build"),
              *cmake_args()])
        _run([cmake, "--build", str(work / "build"), "--target", "llama-server", "-j",
              str(os.cpu_count() or 2)])
        tmp_dest = dest.with_name(dest.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp_dest, ignore_errors=True)
        (tmp_dest / "bin").mkdir(parents=True)
        shutil.copy2(work / "build" / "bin" / "llama-server", tmp_dest / "bin")
        for lib in (work / "build").rglob("*.so*"):  # symlinks stay symlinks
            if not (tmp_dest / "bin" / lib.name).exists():
                shutil.copy2(lib, tmp_dest / "bin" / lib.name, follow_symlinks=False)
        _wheel(python, src, tmp_dest)
        info = {**r, "key": key, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "build_seconds": round(time.monotonic() - started, 1)}
        (tmp_dest / "build.json").write_text(json.dumps(info, indent=2) + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        tmp_dest.rename(dest)
    log(f"built {key} in {time.monotonic() - started:.0f}s")
    return dest


def _wheel(python: str, src: Path, dest: Path) -> None:
    """llama-cpp-python's own wheel without its native build, then our libraries added.

    ``LLAMA_BUILD=OFF`` makes scikit-build-core compile nothing (seconds, not minutes); the
    libraries from the llama-server build go into ``llama_cpp/lib``, where the bindings
    load them from, and RECORD is written anew.
    """
    out = dest / "wheel.tmp"
    env = {**os.environ, "CMAKE_ARGS": "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"}
    _run([python, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-cache-dir",
          str(src), "-w", str(out)], env=env)
    plain = next(out.glob("llama_cpp_python-*.whl"))
    name = plain.name.split("-")
    tag = f"{name[0]}-{name[1]}-py3-none-{_platform_tag()}.whl"
    (dest / "wheel").mkdir()
    target = dest / "wheel" / tag
    libs = sorted(p for p in (dest / "bin").iterdir() if _for_wheel(p.name))
    with zipfile.ZipFile(plain) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zout:
        record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        rows: list[list[str]] = []
        for item in zin.infolist():
            if item.filename == record_name:
                continue
            data = zin.read(item)
            if item.filename.endswith(".dist-info/WHEEL"):
                data = re.sub(rb"Root-Is-Purelib: true", b"Root-Is-Purelib: false", data)
                data = re.sub(rb"Tag: py3-none-\S+", f"Tag: py3-none-{_platform_tag()}".encode(),
                              data)
            zout.writestr(item, data)
            rows.append(_record_row(item.filename, data))
        for lib in libs:
            arcname = f"llama_cpp/lib/{lib.name}"
            data = lib.read_bytes()
            info = zipfile.ZipInfo(arcname, date_time=time.localtime()[:6])
            info.external_attr = 0o755 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(info, data)
            rows.append(_record_row(arcname, data))
        rows.append([record_name, "", ""])
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        zout.writestr(record_name, buf.getvalue())
    shutil.rmtree(out)


def _for_wheel(name: str) -> bool:
    """The libraries the bindings load (``libllama.so``, ``libggml*.so``, ``libmtmd.so``) and
    the sonames they link to (``libllama.so.0``); not llama-server's own, nor the fully
    versioned file the sonames point at (a wheel cannot hold symlinks)."""
    m = re.fullmatch(r"lib(.+?)\.so(\.\d+)?", name)
    return m is not None and not m.group(1).startswith(("llama-common", "llama-server"))


def _record_row(name: str, data: bytes) -> list[str]:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [name, f"sha256={digest}", str(len(data))]


def _platform_tag() -> str:
    return "linux_" + platform.machine() if sys.platform.startswith("linux") else "any"


def wheel_path(folder: Path) -> Path:
    return next((folder / "wheel").glob("*.whl"))


def _prefix(python: str) -> Path:
    out = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True,
                         text=True, check=True)
    return Path(out.stdout.strip())


def installed_key(python: str) -> str | None:
    """The build this environment's llama_cpp came from, or None (another origin, or none)."""
    stamp = _prefix(python) / STAMP
    probe = subprocess.run(
        [python, "-c", "import importlib.util as u, pathlib; s = u.find_spec('llama_cpp'); "
         "print(pathlib.Path(s.origin).parent if s and s.origin else '')"],
        capture_output=True, text=True)
    where = probe.stdout.strip()
    if not where or not (Path(where) / "lib" / "libllama.so").exists():
        return None
    try:
        return stamp.read_text().strip() or None
    except OSError:
        return None


def install(python: str) -> Path:
    """Give PYTHON's environment this key's wheel, replacing any other llama_cpp."""
    folder = build(python)
    key = folder.name
    if installed_key(python) == key:
        return folder
    log(f"installing {key} into {_prefix(python)}")
    _run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall",
          "--no-cache-dir", str(wheel_path(folder))])
    (_prefix(python) / STAMP).write_text(key + "\n")
    return folder


def quarantine() -> Path | None:
    """Move this key's build aside (kept for a post-mortem) so the next build is fresh."""
    folder = build_dir()
    if not folder.exists():
        return None
    aside = folder.with_name(folder.name + time.strftime(".failed-%Y%m%dT%H%M%S"))
    folder.rename(aside)
    log(f"moved the failing build aside to {aside}")
    return aside


def find_llama_server(explicit: Path | None = None) -> tuple[Path | None, str]:
    """The llama-server to run engines with, and where it was found: the setting, this
    machine's build in the cache, or ``llama-server`` on PATH (e.g. NixOS' llama-cpp)."""
    if explicit is not None:
        return explicit, "llama_server_bin setting"
    built = build_dir() / "bin" / "llama-server"
    if built.is_file() and os.access(built, os.X_OK):
        return built, f"the build cache ({built.parent.parent.name})"
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path), "PATH"
    return None, "no llama-server: not set (llama_server_bin), not built (./dev build), " \
        "not on PATH"


def info() -> dict[str, object]:
    r = recipe()
    key = build_key(r)
    folder = build_dir(key)
    cpu = r["cpu"]
    assert isinstance(cpu, dict)
    amx = sorted(f for f in str(cpu["flags"]).split() if f.startswith("amx"))
    return {"key": key, "cpu_model": cpu["model"], "machine": cpu["machine"],
            "amx": amx, "cpu_flags": cpu["flags"], "compiler": r["compiler"],
            "cmake_args": r["cmake_args"], "built": is_built(folder), "folder": str(folder)}


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "help"
    if cmd == "key":
        print(build_key())
    elif cmd == "build":
        print(build())
    elif cmd == "llama-server":
        print(build() / "bin" / "llama-server")
    elif cmd == "install" and len(argv) == 2:
        print(install(argv[1]))
    elif cmd == "quarantine":
        print(quarantine() or "")
    elif cmd == "info":
        for k, v in info().items():
            print(f"{k}: {' '.join(v) if isinstance(v, list) else v}")
    else:
        print(__doc__.split("\n\n    ")[0].strip() if cmd != "help" else __doc__,
              file=sys.stderr)
        return 0 if cmd == "help" else 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
