#!/usr/bin/env bash
# One device-machine session for the CUDA backend: install the carried wheels, then run the stages named
# on the command line, each logged under $OUT (what comes back from the lent GPU).
#   stages: info tests kernels model attention e2e e2e-compile ncu
# Run by the device tool from the repo root, with carry [".whl", "engine/_lib"]:
#   bash scripts/gpu_session.sh info tests attention
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
PYTEST="python3 -m pytest -q -p no:cacheprovider -o addopts= --timeout=900 -rs"
t_start=$(date +%s)
stamp() { echo "=== $1 at +$(( $(date +%s) - t_start )) s"; }

for stage in "$@"; do
    stamp "$stage"
    case "$stage" in
    info)
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw \
            --format=csv 2>&1 | tee "$OUT/info.txt"
        python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
              torch.cuda.get_device_name(0)); from engine import native; print(native.available('cuda'))" 2>&1 | tee -a "$OUT/info.txt"
        ;;
    tests)
        $PYTEST tests/test_cuda_kernels.py tests/test_cuda_model.py -s 2>&1 | tee "$OUT/tests.log" | grep -v "^$" | tail -60
        ;;
    kernels)
        $PYTEST tests/test_cuda_kernels.py 2>&1 | tee "$OUT/tests_kernels.log" | tail -30
        ;;
    model)
        $PYTEST tests/test_cuda_model.py -s 2>&1 | tee "$OUT/tests_model.log" | tail -40
        ;;
    attention)
        python3 benchmarks/gpu_attention.py --out "$OUT/attention.md" 2>&1 | tee "$OUT/attention.log" | tail -40
        ;;
    e2e)
        python3 benchmarks/gpu_e2e.py --profile --out "$OUT/e2e.md" 2>&1 | tee "$OUT/e2e.log" | tail -30
        ;;
    ncu)
        ncu --clock-control none --section SpeedOfLight --section Occupancy --section WarpStateStats \
            --section MemoryWorkloadAnalysis -k 'regex:decode_kernel|cudnn|sdpa|fmha|flash' --launch-count 4 \
            python3 benchmarks/gpu_attention.py --probe --batches 64 --contexts 4096 2>&1 | tee "$OUT/ncu.txt" \
            | grep -E "^  [a-z_]|decode_kernel|cudnn|Duration|Throughput|Occupancy|Issue|Eligible|Stall|Warp Cycles|probe" \
            | head -60
        ;;
    e2e-compile)
        timeout 200 python3 benchmarks/gpu_e2e.py --models llama1b --batches 1 --hf-compile --out "$OUT/e2e_compile.md" 2>&1 \
            | tee "$OUT/e2e_compile.log" | tail -12
        ;;
    *)
        echo "unknown stage $stage"
        ;;
    esac
done
stamp done
