#!/usr/bin/env bash
# One device-machine session for the CUDA backend: install the carried wheels, then run the stages named
# on the command line, each logged under $OUT (what comes back from the lent GPU).
#   stages: info tests kernels layers model attention sampler e2e prefill ttft serve ncu   (each stage under its own time limit, so a
#   stage that hangs cannot eat the later ones; limits in seconds: STAGE_LIMIT_<stage>; extra arguments:
#   MODEL_ARGS (pytest, e.g. "-x"; split on spaces), MODEL_K (the model stage's -k expression, spaces kept:
#   MODEL_K="sample_step or sampled_requests"), ATTN_ARGS, SAMPLER_ARGS, E2E_ARGS, TTFT_ARGS, SERVE_ARGS, NCU_ARGS (the probe's batch and context))
# Exits non-zero when a stage's test run or benchmark did (the logs say which).
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
failed=0                     # a stage whose first command (pytest, a benchmark) exited non-zero
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
        $PYTEST tests/test_cuda_kernels.py tests/test_cuda_prefill.py tests/test_cuda_layers.py tests/test_cuda_model.py tests/test_cuda_sampler.py -s 2>&1 | tee "$OUT/tests.log" | grep -v "^$" | tail -60
        ;;
    kernels)
        timeout "${STAGE_LIMIT_kernels:-150}" $PYTEST tests/test_cuda_kernels.py tests/test_cuda_prefill.py 2>&1 | tee "$OUT/tests_kernels.log" \
            | grep -E "passed|failed|FAILED|Error|error" | tail -25
        st=${PIPESTATUS[0]}; [ "$st" = 0 ] || { echo "stage $stage exited with $st"; failed=1; }
        ;;
    layers)
        timeout "${STAGE_LIMIT_layers:-150}" $PYTEST tests/test_cuda_layers.py -s 2>&1 | tee "$OUT/tests_layers.log" \
            | grep -E "passed|failed|FAILED|Error|error|vs chain" | tail -30
        st=${PIPESTATUS[0]}; [ "$st" = 0 ] || { echo "stage $stage exited with $st"; failed=1; }
        ;;
    model)
        timeout "${STAGE_LIMIT_model:-150}" $PYTEST tests/test_cuda_model.py tests/test_cuda_sampler.py -s ${MODEL_ARGS:-} ${MODEL_K:+-k "$MODEL_K"} 2>&1 | tee "$OUT/tests_model.log" \
            | grep -E "passed|failed|FAILED|Error|rel err|identical|graphs" | tail -40
        st=${PIPESTATUS[0]}; [ "$st" = 0 ] || { echo "stage $stage exited with $st"; failed=1; }
        ;;
    attention)
        timeout "${STAGE_LIMIT_attention:-240}" python3 benchmarks/gpu_attention.py ${ATTN_ARGS:---flex some} \
            --out "$OUT/attention.md" 2>&1 \
            | tee "$OUT/attention.log" | grep -v "^B=\|^  " | tail -30
        st=${PIPESTATUS[0]}; [ "$st" = 0 ] || { echo "stage $stage exited with $st"; failed=1; }
        ;;
    sampler)
        timeout "${STAGE_LIMIT_sampler:-120}" python3 benchmarks/gpu_sampler.py ${SAMPLER_ARGS:-} --out "$OUT/sampler.md" 2>&1 \
            | tee "$OUT/sampler.log" | tail -16
        st=${PIPESTATUS[0]}; [ "$st" = 0 ] || { echo "stage $stage exited with $st"; failed=1; }
        ;;
    e2e)
        timeout "${STAGE_LIMIT_e2e:-300}" python3 benchmarks/gpu_e2e.py ${E2E_ARGS:---variants default --gemv} \
            --out "$OUT/e2e.md" 2>&1 \
            | tee "$OUT/e2e.log" | grep -v "pdl=" | tail -30
        st=${PIPESTATUS[0]}; [ "$st" = 0 ] || { echo "stage $stage exited with $st"; failed=1; }
        ;;
    prefill)
        timeout "${STAGE_LIMIT_prefill:-120}" python3 benchmarks/gpu_prefill.py --out "$OUT/prefill.md" 2>&1 \
            | tee "$OUT/prefill.log" | tail -25
        st=${PIPESTATUS[0]}; [ "$st" = 0 ] || { echo "stage $stage exited with $st"; failed=1; }
        ;;
    ttft)
        timeout "${STAGE_LIMIT_ttft:-200}" python3 benchmarks/gpu_ttft.py ${TTFT_ARGS:-} --out "$OUT/ttft.md" 2>&1 \
            | tee "$OUT/ttft.log" | tail -20
        st=${PIPESTATUS[0]}; [ "$st" = 0 ] || { echo "stage $stage exited with $st"; failed=1; }
        ;;
    serve)
        timeout "${STAGE_LIMIT_serve:-300}" python3 benchmarks/gpu_serve.py ${SERVE_ARGS:-} --out "$OUT/serve.md" 2>&1 \
            | tee "$OUT/serve.log" | grep "^|" | tail -12
        st=${PIPESTATUS[0]}; [ "$st" = 0 ] || { echo "stage $stage exited with $st"; failed=1; }
        ;;
    ncu)
        timeout "${STAGE_LIMIT_ncu:-90}" ncu --clock-control none --section SpeedOfLight --section Occupancy --section WarpStateStats \
            --section MemoryWorkloadAnalysis -k 'regex:decode_|cudnn|sdpa|fmha|flash' --launch-count 6 \
            python3 benchmarks/gpu_attention.py --probe ${NCU_ARGS:---batches 64 --contexts 4096} 2>&1 | tee "$OUT/ncu.txt" \
            | grep -E "^  [a-z_]|decode_|cudnn|Duration|Throughput|Occupancy|Issue|Eligible|Stall|Warp Cycles|probe" \
            | head -60
        ;;
    *)
        echo "unknown stage $stage"
        ;;
    esac
done
stamp done
exit $failed
