#!/usr/bin/env bash
# One node, N processes: launch/torchrun.sh NPROC CONFIG [section.key=value ...]
# Data parallelism takes the ranks beyond parallel.tensor_model_parallel_size. On a CPU-only
# machine the ranks use gloo; set OMP_NUM_THREADS to cores / NPROC (default 1). SIGTERM (which
# torchrun forwards) or SIGUSR1 to a rank checkpoints every rank and stops; see docs/launch.md.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 NPROC CONFIG [section.key=value ...]" >&2
    exit 2
fi
nproc=$1; config=$2; shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cd "$root"
exec "$python" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$nproc" \
    train.py --config "$config" "$@"
