#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` from the same llama-cpp-python sdist the project pins,
# once, into ~/.cache/ml-offload/llama-server-<version>/ (never into the repository).
# Prints the path of the binary. Used by the tests, the benchmarks and users who want the
# llama-server backend without installing llama.cpp separately.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$here/pyproject.toml" | head -n 1)
cache=${ML_OFFLOAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ml-offload}
dest="$cache/llama-server-$version"
bin="$dest/bin/llama-server"

if [ -x "$bin" ] && "$bin" --version >/dev/null 2>&1; then
  echo "$bin"
  exit 0
fi

python=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/llama-server-build.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "building llama-server $version into $dest (about 5 minutes on 2 cores)..." >&2
"$python" -m pip download --quiet --no-deps --no-binary :all: \
  "llama-cpp-python==$version" -d "$work" >&2
tar xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"

cmake_bin=cmake
if ! command -v cmake >/dev/null 2>&1; then
  "$python" -m pip install --quiet --target "$work/cmake" cmake >&2
  cmake_bin="$work/cmake/bin/cmake"
  export PYTHONPATH="$work/cmake${PYTHONPATH:+:$PYTHONPATH}"
fi

"$cmake_bin" -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON \
  -DCMAKE_INSTALL_RPATH='$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON >&2
"$cmake_bin" --build "$work/build" --target llama-server -j "$(nproc)" >&2

mkdir -p "$dest.tmp/bin"
cp -a "$work/build/bin/"llama-server "$work/build/bin/"*.so* "$dest.tmp/bin/" 2>/dev/null \
  || cp -a "$work/build/bin/llama-server" "$dest.tmp/bin/"
find "$work/build" -name '*.so*' -exec cp -a {} "$dest.tmp/bin/" \;
rm -rf "$dest"
mv "$dest.tmp" "$dest"
"$bin" --version >&2
echo "$bin"
