#!/usr/bin/env bash
# The README's first command: set up (.venv with torch==2.13.0 and distk[all]), then train
# the default config in all three modes (dense, exact top-k, bucketed top-k) on 2 ranks,
# once with SGD (the config's optimizer) and once with AdamW (lr 3e-3, weight decay 0.1;
# distk's AdamW defaults: dense start, density warm-up; plus outer synchronisation), and
# print both tables.
# Results: runs/default/compare.{json,png,txt} (SGD), runs/default_adamw/... (AdamW).
# Extra arguments go to both distk-train runs, e.g. `launchers/run.sh --wandb`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launchers/setup.sh"
config="$root/configs/default.json"
bash "$root/launchers/torchrun.sh" --config "$config" --compare "$@"
# AdamW adds outer synchronisation at the setting that matched dense AdamW
# (distk.config.ADAMW_OUTER: SparseLoCo's recipe every 5 steps, 50 dense bf16 steps first).
bash "$root/launchers/torchrun.sh" --config "$config" --compare --name default_adamw \
    --modes dense,exact,bucketed,outer \
    --set train.optimizer=adamw --set train.lr=0.003 --set train.weight_decay=0.1 "$@"
run_root="$("${DISTK_VENV:-$root/.venv}/bin/python" -c "import json,sys; print(json.load(open(sys.argv[1]))['run_root'])" "$config")"
case "$run_root" in /*) ;; *) run_root="$PWD/$run_root" ;; esac
for name in default default_adamw; do
    table="$run_root/$name/compare.txt"
    if [ -f "$table" ]; then
        if [ "$name" = default ]; then echo; echo "== SGD (runs/default)"; else echo; echo "== AdamW (runs/default_adamw)"; fi
        cat "$table"
    fi
done
