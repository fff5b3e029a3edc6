#!/usr/bin/env bash
# The executor on a real NVIDIA GPU: the example model v1 → v2 with GPU replicas, history and
# per-step overhead printed. One short script for a machine with one GPU and no internet.
#
#   1. two replicas with num_gpus: 0.3 each share the GPU, surge mode (the overhead numbers);
#   2. one replica with num_gpus: 1 (a whole GPU), unavailable mode: with one GPU there is no
#      room for a surge replica, so the old replica gives its GPU to the new one.
#
# Needs ray[serve], dbos and pydantic; where the image lacks them, the wheels in .whl/ (made by
# benchmarks/gpu_wheels.sh) are installed into /tmp/site first. Writes logs to $OUT (or
# /tmp/rollout-gpu-check). Takes about 2-4 minutes; give it a 420 s limit.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
LOGS=${OUT:-/tmp/rollout-gpu-check}
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
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda available:', torch.cuda.is_available())"
"$PY" -c "import ray, dbos; print('ray', ray.__version__, 'dbos', dbos.__version__ if hasattr(dbos, '__version__') else '')"

echo "== 1. surge=50, 2 replicas x 0.3 GPU on the real GPU =="
timeout 200 "$PY" benchmarks/executor_overhead.py --gpus auto --replicas 2 --gpu-per-replica 0.3 \
  --policy surge=50 --load-delay 2 --stabilization 1 2>&1 | tee "$LOGS/gpu-surge.log"
surge=${PIPESTATUS[0]}

echo "== 2. unavailable=50, 1 replica x 1 GPU (the whole GPU changes hands) =="
timeout 160 "$PY" benchmarks/executor_overhead.py --gpus auto --replicas 1 --gpu-per-replica 1 \
  --policy unavailable=50 --load-delay 2 --stabilization 0 2>&1 | tee "$LOGS/gpu-whole.log"

grep -q '"device":"cuda"' "$LOGS/gpu-surge.log" && echo "replicas ran on CUDA" \
  || echo "WARNING: no replica reported device cuda"
exit "$surge"
