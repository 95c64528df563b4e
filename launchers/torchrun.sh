#!/usr/bin/env bash
# Launch distk-train on this node: NPROC ranks (default 2), one process per rank, joined by
# torchrun's standalone rendezvous (gloo on CPU, nccl on CUDA). Arguments go to distk-train,
# e.g. `launchers/torchrun.sh --compare` or `NPROC=4 launchers/torchrun.sh --mode bucketed`.
# For several nodes see docs/train.md (torchrun --nnodes N --rdzv-endpoint HOST:PORT).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DISTK_VENV:-$root/.venv}"
torchrun="$venv/bin/torchrun"
if [ ! -x "$torchrun" ]; then
    torchrun="$(command -v torchrun)" || {
        echo "torchrun not found: run launchers/setup.sh first (creates $venv)" >&2
        exit 1
    }
fi
# torch 2.13: without this, ranks restarted by --max-restarts reuse the previous attempt's
# gloo addresses from the shared rendezvous store and fail or hang (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
exec "$torchrun" --standalone --nproc_per_node "${NPROC:-2}" -m distk.train "$@"
