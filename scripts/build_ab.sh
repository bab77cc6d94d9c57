#!/usr/bin/env bash
# Build a partial CUDA library (common + the sources in AB_SOURCES, by default both decode-attention
# objects; sm_90 only) from the current tree into ab/<name>/libpa_cuda.so, with extra nvcc flags (e.g.
# -DSOME_SWITCH), for scripts/ab_attention.py (AB_SOURCES=prefill_attention_tc: scripts/ab_prefill.py).
# Carry "ab" to the device with the usual [".whl", "engine/_lib"].
#   [AB_SOURCES="a b"] bash scripts/build_ab.sh NAME [NVCC_FLAGS...]
set -eu
name=$1; shift
root=$(cd "$(dirname "$0")/.." && pwd)
obj=$root/native/build/ab/$name
mkdir -p "$obj" "$root/ab/$name"
F="-O3 -std=c++17 -Xcompiler -fPIC -I$root/native/include --expt-relaxed-constexpr -gencode arch=compute_90,code=sm_90"
rm -f "$obj"/*.o
for src in common ${AB_SOURCES:-decode_attention decode_attention_tc}; do
    nvcc $F "$@" -c "$root/native/cuda/$src.cu" -o "$obj/$src.o" &
done
wait
nvcc -shared $F "$obj"/*.o -o "$root/ab/$name/libpa_cuda.so"
echo "built ab/$name/libpa_cuda.so"
