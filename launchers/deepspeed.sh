#!/usr/bin/env bash
# Launch distk-train through DeepSpeed on this node: NUM_GPUS ranks (default 2; on a CPU-only
# machine DeepSpeed starts that many CPU ranks on gloo). The first argument is the DeepSpeed
# JSON (its "distk" block configures the compression); the rest go to distk-train, e.g.
#   launchers/deepspeed.sh configs/deepspeed/bucketed_zero2.json --steps 100
#   NUM_GPUS=8 launchers/deepspeed.sh configs/deepspeed/exact_zero1.json --wandb
# MASTER_PORT (default 29500) picks the rendezvous port. See docs/deepspeed.md.
set -euo pipefail
if [ $# -lt 1 ] || [ ! -f "$1" ]; then
    echo "usage: $0 DS_CONFIG.json [distk-train args...]  (configs: configs/deepspeed/*.json)" >&2
    exit 2
fi
config="$1"
shift
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DISTK_VENV:-$root/.venv}"
launcher="$venv/bin/deepspeed"
if [ ! -x "$launcher" ]; then
    launcher="$(command -v deepspeed)" || {
        echo "deepspeed not found: run launchers/setup.sh first (installs distk[deepspeed])" >&2
        exit 1
    }
fi
cd "$root"
# --no_local_rank: distk-train reads LOCAL_RANK from the environment, not from argv.
exec "$launcher" --num_gpus "${NUM_GPUS:-2}" --master_port "${MASTER_PORT:-29500}" \
    --no_local_rank --module distk.train --deepspeed "$config" "$@"
