#!/usr/bin/env bash
# The memorising-regime accuracy grid (bench/accuracy.py --regime memorising) on one GPU.
#
# Same cells, params and code as on a CPU; what changes is where it runs: every stage finds CUDA and
# trains there, the source images are copied to the GPU once per stage and batches are cut there
# (DSINK_DATA_ON_DEVICE=1, see dsink/runs.py), and several experiments share the GPU at once (JOBS queue
# workers; an mlp run needs well under 1 GiB of GPU memory). bf16 / channels_last stay "auto": the
# engine times both ways on the device before the first epoch and keeps the faster.
#
#   bench/gpu_grid.sh                       # the whole grid (ratio 100 x 3 seeds, ratio 10 x 1 seed)
#   JOBS=8 bench/gpu_grid.sh --seeds 0      # any `accuracy.py queue` option passes through
#   REGIME=memorising_cnn bench/gpu_grid.sh # the convolutional long-schedule cells (small_cnn)
#
# Runs `bench/accuracy.py grid` (queue, workers, table). Writes bench/results/accuracy_<prefix>_gpu.json
# (the table; accuracy_mem_gpu.json by default) and bench/results/grid_wall_<prefix>_gpu.json (wall time).
# Needs the project's environment (`make setup`) and Fashion-MNIST under data/raw (`make data`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
JOBS=${JOBS:-6}
REGIME=${REGIME:-memorising}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible')"
export DSINK_DATA_ON_DEVICE=1
PREFIX=$("$PY" -c "import sys; sys.path.insert(0, 'bench'); import accuracy; print(accuracy.REGIMES['$REGIME'].prefix)")
"$PY" bench/accuracy.py grid --regime "$REGIME" --jobs "$JOBS" "$@" \
    --out "bench/results/accuracy_${PREFIX}_gpu.json" --wall-out "bench/results/grid_wall_${PREFIX}_gpu.json"
