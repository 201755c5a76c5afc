#!/usr/bin/env bash
# The GPU checks of this project in one run, for anyone with an NVIDIA GPU. Each step has its own
# timeout (540 s in all); a step that fails or times out is logged and the next one runs. Run from the
# repository root, after `pip install -e ".[test]"`:
#
#     bash bench/gpu_session.sh                     # results in bench/results/gpu-run/
#     RESULTS=/some/dir bash bench/gpu_session.sh   # or in RESULTS
#
# Steps: the GPU and versions; the package installed editable without a network; the kernels'
# compile check; the kernel tests compiled (no interpreter) against float64 references;
# bench_kernels (Llama-3-8B shapes, M in {16, 8192}, r = 16, bf16); bench_train (llama-1b in bf16 at
# dropout 0 and 0.05, with MFU). Writes run.log (every step's output and exit code),
# kernels.{json,md,png} and train-gpu{,-dropout}.json. Name the device when committing them to
# bench/results/.
set -uo pipefail
RESULTS=${RESULTS:-bench/results/gpu-run}
mkdir -p "$RESULTS"
LOG="$RESULTS/run.log"
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
step 110 "$PY" bench/bench_kernels.py --M 16,8192 --r 16 --out "$RESULTS/kernels.json" --plot
step 90  "$PY" bench/bench_train.py --preset llama-1b --dtype bf16 --device cuda --steps 10 --out "$RESULTS/train-gpu.json"
step 70  "$PY" bench/bench_train.py --preset llama-1b --dtype bf16 --device cuda --steps 10 --dropout 0.05 \
             --out "$RESULTS/train-gpu-dropout.json"
echo "== $(date -u +%T) done; files:" | tee -a "$LOG"
ls -la "$RESULTS" | tee -a "$LOG"
