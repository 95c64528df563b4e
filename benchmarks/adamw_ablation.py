"""AdamW ablation of distk-train: run named variants (2 ranks each), several at a time.

Each variant is one ``distk-train`` run of ``configs/default.json`` under AdamW
(``train.optimizer=adamw``, ``train.lr=0.003``, ``train.weight_decay=0.1``) plus the
variant's own ``--set`` overrides. Runs go to ``<root>/<variant>/`` and the summary (final
validation loss, wall seconds, bytes, the exact command) to ``<out>``, rewritten after
every finished run. docs/train.md ("Sparse training with AdamW") reports the results.

    python benchmarks/adamw_ablation.py --only dense,bucketed_ef,bucketed
    python benchmarks/adamw_ablation.py --list
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ADAMW = ["train.optimizer=adamw", "train.lr=0.003", "train.weight_decay=0.1"]
# Rows 1-16 of the ablation (docs/train.md) were measured with fp32 values on the wire;
# AdamW's default now sends bf16 (sparsity.adam_value_dtype), so those variants pin fp32.
FP32 = ["sparsity.adam_value_dtype=null"]
# The SGD-tuned schedule (sparsity.warmup_steps 50 from configs/default.json, no dense
# steps) instead of AdamW's default (train.adamw_dense_steps / adamw_warmup_steps).
SGD_SCHEDULE = ["train.adamw_dense_steps=0", "train.adamw_warmup_steps=0", *FP32]


def _schedule(dense: int, warmup: int) -> list[str]:
    return [f"train.adamw_dense_steps={dense}", f"train.adamw_warmup_steps={warmup}", *FP32]


VARIANTS: dict[str, list[str]] = {
    # dense AdamW, the reference
    "dense": ADAMW + ["sparsity.method=dense"],
    "dense_seed1": ADAMW + ["sparsity.method=dense", "seed=1"],
    "dense_seed2": ADAMW + ["sparsity.method=dense", "seed=2"],
    # error feedback on the gradient, AdamW after the exchange, SGD's schedule (before)
    "bucketed_ef": ADAMW + SGD_SCHEDULE,
    "bucketed_ef_lr0.006": ADAMW + SGD_SCHEDULE + ["train.lr=0.006"],
    # dense start and longer density warm-up, fp32 values
    "bucketed_dense30_warmup100": ADAMW + _schedule(30, 100),
    "bucketed_dense50_warmup150": ADAMW + _schedule(50, 150),
    "bucketed_dense50_warmup150_seed1": ADAMW + _schedule(50, 150) + ["seed=1"],
    "exact_dense50_warmup150": ADAMW + _schedule(50, 150) + ["sparsity.method=exact"],
    "bucketed_dense75_warmup200": ADAMW + _schedule(75, 200),
    "bucketed_dense75_warmup200_seed1": ADAMW + _schedule(75, 200) + ["seed=1"],
    "bucketed_dense75_warmup200_seed2": ADAMW + _schedule(75, 200) + ["seed=2"],
    # the AdamW default: 75 dense steps, a 200-step warm-up, bf16 values
    "bucketed": ADAMW,
    "bucketed_seed1": ADAMW + ["seed=1"],
    "bucketed_seed2": ADAMW + ["seed=2"],
    "exact": ADAMW + ["sparsity.method=exact"],
    # SGD (configs/default.json as is) must keep its quality
    "sgd_dense": ["sparsity.method=dense"],
    "sgd_bucketed": ["sparsity.method=bucketed"],
}
# Shared masks (docs/comm-and-compressor.md, "Shared masks"): each policy against local
# masks, under SGD and AdamW, seeds 0 and 1.
for _seed in (0, 1):
    _tail = [] if _seed == 0 else [f"seed={_seed}"]
    _suffix = "" if _seed == 0 else f"_seed{_seed}"
    for _mask in ("local", "leader", "moment", "sketch"):
        _sets = (["sparsity.mask=local"] if _mask == "local"
                 else ["sparsity.mask=shared", f"sparsity.mask_policy={_mask}"])
        VARIANTS[f"sgd_mask_{_mask}{_suffix}"] = [*_sets, *_tail]
        VARIANTS[f"adamw_mask_{_mask}{_suffix}"] = [*ADAMW, *_sets, *_tail]
    VARIANTS[f"sgd_dense{_suffix}"] = ["sparsity.method=dense", *_tail]
    for _mask in ("predicted", "oracle", "union"):
        _sets = ["sparsity.mask=shared", f"sparsity.mask_policy={_mask}"]
        VARIANTS[f"sgd_mask_{_mask}{_suffix}"] = [*_sets, *_tail]
        VARIANTS[f"adamw_mask_{_mask}{_suffix}"] = [*ADAMW, *_sets, *_tail]
    for _mask in ("union", "leader"):
        _sets = ["sparsity.mask=shared", f"sparsity.mask_policy={_mask}",
                 "sparsity.mask_ahead=true"]
        VARIANTS[f"sgd_mask_{_mask}_ahead{_suffix}"] = [*_sets, *_tail]
        VARIANTS[f"adamw_mask_{_mask}_ahead{_suffix}"] = [*ADAMW, *_sets, *_tail]
    # AdamW at a true 1%: no dense start, SGD's 50-step warm-up (configs/default.json),
    # bf16 values; residual error feedback against EF21's estimates, local and shared.
    _true = [*ADAMW, "train.adamw_dense_steps=0", "train.adamw_warmup_steps=0"]
    for _name, _sets in (("res_local", ["sparsity.mask=local"]),
                         ("res_shared", ["sparsity.mask=shared"]),
                         ("ef21_local", ["sparsity.mask=local", "sparsity.feedback=estimate"]),
                         ("ef21_shared", ["sparsity.mask=shared", "sparsity.feedback=estimate"]),
                         ("ef21m_shared", ["sparsity.mask=shared", "sparsity.feedback=estimate",
                                           "sparsity.feedback_beta=0.9"])):
        VARIANTS[f"adamw_t1_{_name}{_suffix}"] = [*_true, *_sets, *_tail]
        VARIANTS[f"sgd_t1_{_name}{_suffix}"] = [*_sets, *_tail]
    # Short dense starts within a 5% byte budget.
    for _dense, _warm in ((10, 50), (20, 100)):
        for _name, _sets in (("res_local", ["sparsity.mask=local"]),
                             ("ef21_shared", ["sparsity.mask=shared",
                                              "sparsity.feedback=estimate"]),
                             ("res_shared", ["sparsity.mask=shared"])):
            VARIANTS[f"adamw_d{_dense}w{_warm}_{_name}{_suffix}"] = [
                *ADAMW, f"train.adamw_dense_steps={_dense}",
                f"train.adamw_warmup_steps={_warm}", *_sets, *_tail]
    VARIANTS[f"sgd_mask_local_d0.005{_suffix}"] = ["sparsity.mask=local",
                                                   "sparsity.density=0.005", *_tail]
    VARIANTS[f"sgd_mask_leader_d0.02{_suffix}"] = [
        "sparsity.mask=shared", "sparsity.mask_policy=leader", "sparsity.density=0.02", *_tail]
"""Variants runnable on this revision. The exchange variants of the ablation
(``sparsity.local_optimizer=adam|adam_moments|adam_update|adam_precond``) exist at commit
be5c0eb only; docs/train.md gives their commands."""


def command(name: str, root: str, extra: list[str], python: str) -> list[str]:
    sets = [*VARIANTS[name], f"run_root={root}", f"name={name}", "logging.progress=false",
            *extra]
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "distk.train", "--config", "configs/default.json",
            *[a for s in sets for a in ("--set", s)]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated variant names (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (2 ranks each)")
    parser.add_argument("--root", default="runs/adamw", help="run_root of the runs")
    parser.add_argument("--out", default="runs/adamw/summary.json")
    parser.add_argument("--set", dest="extra", action="append", default=[],
                        help="extra override for every variant (e.g. data.root=...)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--skip-done", action="store_true",
                        help="skip variants whose result.json is there (summarised as is)")
    args = parser.parse_args()
    if args.list:
        for name, sets in VARIANTS.items():
            print(name, " ".join(sets))
        return
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary: dict[str, dict] = json.loads(out.read_text()) if out.exists() else {}
    lock = threading.Lock()

    def run(name: str) -> None:
        cmd = command(name, args.root, args.extra, sys.executable)
        started = time.time()
        log = Path(args.root) / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        if args.skip_done and (Path(args.root) / name / "result.json").exists():
            rc = 0
        else:
            with open(log, "w") as handle:
                rc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
        entry = {"overrides": VARIANTS[name], "rc": rc, "seconds": time.time() - started,
                 "command": "python -m distk.train --config configs/default.json "
                            + " ".join(f"--set {shlex.quote(s)}" for s in VARIANTS[name])}
        result = Path(args.root) / name / "result.json"
        if rc == 0 and result.exists():
            res = json.loads(result.read_text())
            entry.update({k: res[k] for k in ("mode", "final_val_loss", "final_train_loss",
                                              "wall_seconds", "bytes_sent", "dense_bytes",
                                              "val_curve")})
        with lock:
            summary[name] = entry
            out.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"{name}: rc={rc} val={entry.get('final_val_loss')} "
              f"({entry['seconds']:.0f}s)", flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(run, names))


if __name__ == "__main__":
    main()
