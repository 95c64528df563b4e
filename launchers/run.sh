#!/usr/bin/env bash
# The README's first command: set up (.venv with torch==2.13.0 and distk[all]), then train
# the default config in all three modes (dense, exact top-k, bucketed top-k) on 2 ranks and
# print the comparison table. Results: runs/default/compare.{json,png,txt}.
# Extra arguments go to distk-train, e.g. `launchers/run.sh --wandb`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launchers/setup.sh"
exec bash "$root/launchers/torchrun.sh" --config "$root/configs/default.json" --compare "$@"
