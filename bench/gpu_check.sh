#!/usr/bin/env bash
# The GPU check (issue 3), in one call on a lent H100/H200 that has no network.
#
# Needs, beside the checkout (fill both HERE with bench/prepare_gpu_check.sh, then name them
# in the run's carry: [".gpu", ".whl"]):
#   .gpu/llama_cpp_python-*-cuda*.tar.xz   the CUDA build of llama-cpp-python (../shared/gpu)
#   .gpu/llama-server-overlay.tar.xz       llama-server from this machine's build, run on the
#                                          tarball's CUDA libraries (managed mode)
#   .gpu/gemma3-270m-kit/                  the model kit (bench/gguf_kit.py): the 253 MB
#                                          GGUF cannot travel (64 MiB a call), so a
#                                          shape-faithful copy is rebuilt from it
#   .whl/*.whl                             the server's other dependencies, cp312 manylinux
#
# Then:  bench/gpu_check.sh [gpu_check.py options]     e.g. in the device tool:
#   run(command="bash bench/gpu_check.sh", carry=[".gpu", ".whl"], timeout_s=420)
# It unpacks llama-cpp-python and the wheels into /tmp/site, finds libcudart/libcublas,
# rebuilds the model, and runs bench/gpu_check.py: the plan, VRAM before load / after
# load / during generation / after unload, decode tokens/s GPU vs CPU vs raw. Everything it
# prints also lands in $OUT (gpu_check.log, .json, .md, the servers' logs).
#
# Environment (all optional):
#   PYTHON=python3            the interpreter (the device's is 3.12 with numpy and jinja2)
#   GPU_CHECK_SITE=/tmp/site  where packages are unpacked
#   GPU_CHECK_LLAMA_CPP=DIR   use the llama_cpp package in DIR instead of the CUDA tarball
#                             (how this script is tested on a CPU-only machine)
#   GPU_CHECK_MODEL=FILE      serve this GGUF instead of rebuilding the kit (e.g. a real
#                             model found on the device); a .gguf in .gpu/ is used too
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
repo=$(pwd)
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"

main() {  # the whole check; its output also goes to $OUT/gpu_check.log
py=${PYTHON:-python3}
site=${GPU_CHECK_SITE:-/tmp/site}
work=/tmp/gpu-check-work
mkdir -p "$site" "$work"
t0=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - t0 ))s] $*"; }

step "machine"
"$py" -c 'import sys, platform; print("python", sys.version.split()[0], sys.executable, platform.machine())'
nproc
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,memory.total,memory.used,driver_version --format=csv
else
  echo "nvidia-smi: not found (no GPU here: the check runs its flow on the CPU)"
fi
du -sh .gpu .whl 2>/dev/null

step "llama-cpp-python"
if [ -n "${GPU_CHECK_LLAMA_CPP:-}" ]; then
  rm -rf "$site/llama_cpp" "$site/diskcache"
  ln -s "$GPU_CHECK_LLAMA_CPP/llama_cpp" "$site/llama_cpp"
  [ -d "$GPU_CHECK_LLAMA_CPP/diskcache" ] && ln -s "$GPU_CHECK_LLAMA_CPP/diskcache" "$site/diskcache"
  echo "using llama_cpp from $GPU_CHECK_LLAMA_CPP"
else
  tarball=$(ls .gpu/llama_cpp_python-*.tar.xz 2>/dev/null | head -n 1)
  if [ -z "$tarball" ]; then
    echo "no .gpu/llama_cpp_python-*.tar.xz: run bench/prepare_gpu_check.sh here and carry .gpu" >&2
    return 2
  fi
  # Symlinked shared libraries inside: unpack with tar, never with pip.
  tar xJf "$tarball" -C "$site" 2>/dev/null ||
    "$py" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
      "$tarball" "$site" || return 2
  echo "unpacked $tarball"
fi

step "wheels"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl || return 2
  ls .whl | sed 's/-py[23].*//; s/-cp3.*//' | tr '\n' ' '; echo
else
  echo "no .whl/*.whl: relying on what $py already has"
fi
export PYTHONPATH="$site:$repo/python:$repo/bench${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

step "CUDA libraries"
# libggml-cuda needs libcudart.so.13 and libcublas(.Lt).so.13; the image has them in
# /usr/local/cuda and in PyTorch's nvidia-* packages.
libdirs=""
for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13; do
  found=""
  for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib \
           /usr/lib/x86_64-linux-gnu; do
    [ -e "$d/$lib" ] && { found=$d; break; }
  done
  if [ -z "$found" ]; then
    hit=$("$py" - "$lib" <<'EOF'
import glob, site, sys
roots = set(site.getsitepackages() + [site.getusersitepackages()] + sys.path)
for root in sorted(r for r in roots if r):
    for pat in (f"{root}/nvidia/*/lib/{sys.argv[1]}", f"{root}/nvidia/cu*/lib/{sys.argv[1]}"):
        for path in glob.glob(pat):
            print(path.rsplit("/", 1)[0])
            raise SystemExit
EOF
)
    found=$hit
  fi
  if [ -z "$found" ]; then
    found=$(find / -xdev \( -path /proc -o -path /sys \) -prune -o -name "$lib" -print 2>/dev/null \
            | head -n 1 | xargs -r dirname)
  fi
  echo "$lib: ${found:-not found}"
  [ -n "$found" ] && case ":$libdirs:" in *":$found:"*) ;; *) libdirs="$libdirs:$found" ;; esac
done
# The driver's own libcuda.so.1 and libnvidia-ml.so.1 (NVML, for /vram) are normally on
# the loader's path; add their folder if they are only under /usr/local/nvidia.
for lib in libcuda.so.1 libnvidia-ml.so.1; do
  if ! ldconfig -p 2>/dev/null | grep -q "$lib"; then
    for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
      if [ -e "$d/$lib" ]; then
        echo "$lib: $d"
        case ":$libdirs:" in *":$d:"*) ;; *) libdirs="$libdirs:$d" ;; esac
        break
      fi
    done
  fi
done
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
"$py" - <<'EOF' || { echo "llama_cpp does not import: see above" >&2; return 2; }
import llama_cpp
print("llama_cpp", llama_cpp.__version__, "from", llama_cpp.__file__)
print("llama_supports_gpu_offload:", bool(llama_cpp.llama_supports_gpu_offload()))
print(llama_cpp.llama_print_system_info().decode(errors="replace").strip())
EOF
"$py" -c 'import fastapi, uvicorn, pydantic, orjson, gguf, pynvml, prometheus_client, httpx, mloffload.server.app; print("server imports: ok")' || return 2

step "llama-server (managed mode)"
server_bin=""
if [ -f .gpu/llama-server-overlay.tar.xz ]; then
  dir=$site/llama-server-cuda
  rm -rf "$dir" && mkdir -p "$dir"
  tar xJf .gpu/llama-server-overlay.tar.xz -C "$dir"
  ln -sf libllama-common.so.0 "$dir/libllama-common.so"
  for lib in "$site"/llama_cpp/lib/*.so*; do ln -sf "$lib" "$dir/"; done
  if "$dir/llama-server" --list-devices 2>&1 | tee "$out/llama-server-devices.txt"; then
    server_bin=$dir/llama-server
  fi
else
  echo "no .gpu/llama-server-overlay.tar.xz: managed mode is not checked"
fi

smoke_args=""
[ -n "$server_bin" ] && smoke_args="--llama-server-bin $server_bin"

step "model"
model=${GPU_CHECK_MODEL:-}
note=""
if [ -z "$model" ]; then
  model=$(ls .gpu/*.gguf 2>/dev/null | head -n 1)
  [ -n "$model" ] && note="carried in .gpu/"
fi
if [ -z "$model" ] && [ -f .gpu/gemma3-270m-kit/manifest.json ]; then
  model=$work/gemma-3-270m-q4_k_m.shape-copy.gguf
  "$py" bench/gguf_kit.py build .gpu/gemma3-270m-kit "$model" || return 2
  note="shape-faithful copy of gemma-3-270m-q4_k_m.gguf rebuilt from the kit: real sizes, types and layout, repeated weights, meaningless text"
fi
if [ -z "$model" ]; then
  echo "no model: carry .gpu/gemma3-270m-kit (bench/prepare_gpu_check.sh) or set GPU_CHECK_MODEL" >&2
  find / -xdev -name '*.gguf' -size +1M 2>/dev/null | head -n 5
  return 2
fi
[ -n "$note" ] || note="given by GPU_CHECK_MODEL"
ls -la "$model"; echo "$note"

step "smoke test"
# shellcheck disable=SC2086
ML_OFFLOAD_CACHE=$work/cache "$py" -m mloffload doctor --fresh --model "$model" \
  --data-dir "$work/doctor" $smoke_args || echo "(the smoke test failed: see above)"

step "check"
managed_args=()
[ -n "$server_bin" ] && managed_args=(--llama-server-bin "$server_bin")
"$py" bench/gpu_check.py --model "$model" --model-note "$note" --out "$out" \
  "${managed_args[@]}" "$@"
rc=$?
step "done (exit $rc)"
return $rc
}

main "$@" 2>&1 | tee -a "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
