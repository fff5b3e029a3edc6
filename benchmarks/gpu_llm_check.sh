#!/usr/bin/env bash
# The LLM example's torch backend on a real NVIDIA GPU: engine figures, then a real rollout.
#
#   1. benchmarks/llm_engine.py: replica start (weights written, then loaded onto the GPU), time
#      per output token at batch sizes 1, 8, 32, 64, time to first token at prompts 128 / 2,048;
#   2. benchmarks/llm_rollout.py --backend torch: v1 → v2, two replicas of 0.3 GPU each sharing
#      the one GPU (surge 50 %: three replicas at most), under `rollout load` replaying the
#      Azure code trace 2x; prints TTFT per version and the controller's added time per step.
#
# Needs torch with CUDA (the GPU image has it) and ray[serve], dbos, pydantic: where the image
# lacks those, the wheels in .whl/ (benchmarks/gpu_wheels.sh) go to /tmp/site first. Logs go to
# $OUT (or /tmp/rollout-gpu-llm). About 4-6 minutes; give it a 540 s limit.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
LOGS=${OUT:-/tmp/rollout-gpu-llm}
mkdir -p "$LOGS"
if ! "$PY" -c "import ray.serve, dbos, pydantic" 2>/dev/null; then
  [ -d .whl ] || { echo "ray/dbos/pydantic missing and no .whl/ folder"; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
echo "== 1. engine figures =="
timeout 200 "$PY" benchmarks/llm_engine.py 2>&1 | tee "$LOGS/llm-engine.log"
engine=${PIPESTATUS[0]}
echo "== 2. rollout v1 -> v2 under trace replay, torch backend on the GPU =="
timeout 320 "$PY" benchmarks/llm_rollout.py --backend torch --gpus auto --gpu-per-replica 0.3 \
  --time-scale 2 --duration-s 120 2>&1 | tee "$LOGS/llm-rollout.log"
rollout=${PIPESTATUS[0]}
exit $(( engine || rollout ))
