#!/usr/bin/env bash
# Does leaving the AMX kernels out (issue 12) cost speed on a CPU without AMX?
#
# Compiles ggml's CPU kernels from the pinned sources twice, as GGML_NATIVE does
# (-O3 -march=native), without and with -mno-amx-tile -mno-amx-int8 -mno-amx-bf16, and
# compares the machine code: identical code runs at identical speed. Then the same for
# -march=sapphirerapids (an Intel CPU with AMX): there the flags must remove every AMX
# instruction. Writes bench/results/amx_codegen.md.
#
#   bash bench/amx_codegen.sh [path/to/llama.cpp]   (default: the sdist's vendor/llama.cpp)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
src=${1:-}
if [ -z "$src" ]; then # the pinned sdist, as the engine build fetches it
  pin=$("$here/.venv/bin/python" -c 'from mloffload.engine.build import pinned; print(pinned("llama-cpp-python"))')
  "$here/.venv/bin/python" -m pip download --quiet --no-deps --no-binary :all: -d "$out" "$pin"
  tar xzf "$out"/llama_cpp_python-*.tar.gz -C "$out"
  src=$(echo "$out"/llama_cpp_python-*/vendor/llama.cpp)
fi
[ -d "$src/ggml/src/ggml-cpu" ] || { echo "no llama.cpp sources at '$src'" >&2; exit 2; }
noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
inc="-I$src/ggml/include -I$src/ggml/src -I$src/ggml/src/ggml-cpu -DNDEBUG -D_GNU_SOURCE -fopenmp"
files="arch/x86/quants.c quants.c ggml-cpu.c ops.cpp vec.cpp repack.cpp arch/x86/repack.cpp
       amx/mmq.cpp amx/amx.cpp llamafile/sgemm.cpp"
amx_re='\s(tilezero|tileloadd|tileloaddt1|tilestored|tdpbssd|tdpbsud|tdpbusd|tdpbuud|tdpbf16ps|ldtilecfg|sttilecfg|tilerelease)\b'

compile() { # file march extra-flags output
  local cc=cc std=-std=gnu11
  case $1 in *.cpp) cc=c++ std=-std=gnu++17 ;; esac
  # shellcheck disable=SC2086
  $cc $std -O3 "-march=$2" $3 $inc -c "$src/ggml/src/ggml-cpu/$1" -o "$4"
}
disasm() { objdump -d --no-show-raw-insn "$1" | tail -n +3; }

report="$here/bench/results/amx_codegen.md"
{
  echo "# AMX kernels left out: machine code compared (issue 12)"
  echo
  echo "$(date -u +%FT%TZ) · \`bash bench/amx_codegen.sh\` · $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" \
       "· AMX on this CPU: $(grep -qw amx_tile /proc/cpuinfo && echo yes || echo no) · $(cc --version | head -1)"
  echo
  echo "| kernel file | -march=native: with the flags | -march=sapphirerapids: AMX instructions without → with the flags |"
  echo "| --- | --- | ---: |"
  for f in $files; do
    n=${f//\//_}
    compile "$f" native "" "$out/$n.a.o"
    compile "$f" native "$noamx" "$out/$n.b.o"
    if cmp -s <(disasm "$out/$n.a.o") <(disasm "$out/$n.b.o"); then same="identical code"; else same="DIFFERENT code"; fi
    compile "$f" sapphirerapids "" "$out/$n.c.o"
    compile "$f" sapphirerapids "$noamx" "$out/$n.d.o"
    before=$(disasm "$out/$n.c.o" | grep -cE "$amx_re" || true)
    after=$(disasm "$out/$n.d.o" | grep -cE "$amx_re" || true)
    echo "| \`ggml-cpu/$f\` | $same | $before → $after |"
  done
  echo
  echo "Identical code on this CPU means the build runs at the speed it ran before the flags;"
  echo "on an AMX CPU the same flags leave no AMX instruction in any kernel."
} | tee "$report"
