#!/usr/bin/env bash
# The GPU checks of issue 14 in one command (for a lent GPU machine; see README "GPU check"): CUDA exactness and CUDA-graph replays,
# CIM layer speed (eager and compiled), whole-network speed (eager, compiled and graphed), and CIMQ PTQ at a larger budget.
#   DATA=path/to/cifar10_lossless WEIGHTS=path/to/resnet20-12fca82f.th OUT=results_dir bash benchmarks/gpu_suite.sh
# Each step has its own time limit (seconds, env LIMIT_*), so that one slow step leaves the others their time.
# Needs only torch, lightning, timm, torchmetrics and pytest (no W&B, no jsonargparse).
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$(pwd)
step() {  # step NAME LIMIT COMMAND...: run, log to $OUT/NAME.log, report its exit status
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout -s KILL "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "[gpu_suite] $name: exit $? in $((SECONDS - start)) s"
    tail -n 30 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch, lightning, timm; print('torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__)"
step cuda_tests "${LIMIT_TESTS:-90}" python -m pytest -q -p no:cacheprovider tests/quant/test_cuda.py
step layer_speed "${LIMIT_LAYER:-150}" python benchmarks/cim_layer_speed.py --device cuda --repeats 20 --out-dir "$OUT"
step network_speed "${LIMIT_NETWORK:-200}" python benchmarks/network_speed.py --device cuda --repeats 10 --out-dir "$OUT"
step ptq "${LIMIT_PTQ:-200}" python benchmarks/gpu_ptq.py --data "$DATA" --weights "$WEIGHTS" --simulation compiled \
    --iters "${PTQ_ITERS:-1000}" --lr-scales ${PTQ_LR_SCALES:-1 10} --adc-bits 4
