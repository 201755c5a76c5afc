#!/usr/bin/env bash
# Every GPU check of issues 8 and 9 in one call on a lent GPU (the `device` tool's `run`), inside its
# 10-minute limit: each step has its own timeout, and they add up to 540 s. Run from the repository
# root:
#
#     bash bench/gpu_session.sh            # with the device tool: run(command="bash bench/gpu_session.sh", timeout_s=580)
#
# Writes to $OUT (the folder the device tool brings back; bench/results/gpu-session here otherwise),
# at most 8 files: session.log (every step's output and exit code), kernels.{json,md,png}
# (bench_kernels: Llama-3-8B shapes, M ∈ {16, 8192}, r = 16, bf16) and train-gpu{,-dropout}.json
# (bench_train: llama-1b in bf16, dropout 0 and 0.05, with MFU). A step that fails or times out is
# logged and the next one runs. Copy what comes back into bench/results/ and name the device.
set -uo pipefail
OUT=${OUT:-bench/results/gpu-session}
mkdir -p "$OUT"
LOG="$OUT/session.log"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

step() {   # step SECONDS command...: run it under a timeout, log its output and exit code
    local limit=$1; shift
    echo "== $(date -u +%T) [${limit}s] $*" | tee -a "$LOG"
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "== rc=${PIPESTATUS[0]}" | tee -a "$LOG"
}

step 20  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
step 30  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
# the package as train.py would see it installed (kernels/ becomes lora.kernels); nothing can be fetched there
step 60  "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e .
step 40  "$PY" -m lora.kernels.compile_check
# compiled kernels against float64 references, each M bucket's first config (no autotune timing)
step 120 env LORA_KERNELS_AUTOTUNE=0 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_kernels.py
step 110 "$PY" bench/bench_kernels.py --M 16,8192 --r 16 --out "$OUT/kernels.json" --plot
step 90  "$PY" bench/bench_train.py --preset llama-1b --dtype bf16 --device cuda --steps 10 --out "$OUT/train-gpu.json"
step 70  "$PY" bench/bench_train.py --preset llama-1b --dtype bf16 --device cuda --steps 10 --dropout 0.05 \
             --out "$OUT/train-gpu-dropout.json"
echo "== $(date -u +%T) done; files:" | tee -a "$LOG"
ls -la "$OUT" | tee -a "$LOG"
