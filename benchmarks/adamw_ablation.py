"""AdamW ablation of distk-train: run named variants (2 ranks each), several at a time.

Each variant is one ``distk-train`` run of ``configs/default.json`` under AdamW
(``train.optimizer=adamw``, ``train.lr=0.003``, ``train.weight_decay=0.1``) plus the
variant's own ``--set`` overrides. Runs go to ``<root>/<variant>/`` and the summary (final
validation loss, wall seconds, bytes, the exact command) to ``<out>``, rewritten after
every finished run. docs/train.md ("Sparse training with AdamW") reports the results.

    python benchmarks/adamw_ablation.py --jobs 2 --only dense,bucketed_ef,bucketed_local_adam
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
NO_LOCAL_ADAM = ["train.local_adam=false"]
PER_TENSOR = ["train.bucket_cap_mb=0.001"]  # ~one DDP bucket per parameter tensor

VARIANTS: dict[str, list[str]] = {
    # Baselines: dense AdamW, and error feedback on the raw gradient (AdamW after it).
    "dense": ADAMW + ["sparsity.method=dense"],
    "bucketed_ef": ADAMW + NO_LOCAL_ADAM + ["sparsity.method=bucketed"],
    "exact_ef": ADAMW + NO_LOCAL_ADAM + ["sparsity.method=exact"],
    # (a)+(b) per-tensor budgets, small tensors (norms, biases) dense (min_numel=1024).
    "bucketed_ef_per_tensor": ADAMW + NO_LOCAL_ADAM + PER_TENSOR,
    # (c) dense warm-up and a longer density warm-up.
    "bucketed_ef_dense_warmup": ADAMW + NO_LOCAL_ADAM + ["sparsity.dense_steps=30",
                                                         "sparsity.warmup_steps=100"],
    "bucketed_ef_dense_warmup50": ADAMW + NO_LOCAL_ADAM + ["sparsity.dense_steps=50",
                                                           "sparsity.warmup_steps=150"],
    "bucketed_ef_dense_warmup_seed1": ADAMW + NO_LOCAL_ADAM + ["sparsity.dense_steps=30",
                                                               "sparsity.warmup_steps=100",
                                                               "seed=1"],
    "exact_ef_dense_warmup": ADAMW + NO_LOCAL_ADAM + ["sparsity.method=exact",
                                                      "sparsity.dense_steps=30",
                                                      "sparsity.warmup_steps=100"],
    # (d) each rank's local Adam update exchanged with error feedback, SGD applies it.
    "bucketed_adam_update": ADAMW + ["sparsity.local_optimizer=adam_update",
                                     "sparsity.clip_norm=1.0"],
    # (d)/(e) both of Adam's local moments tracked by sparse increments (EF21).
    "bucketed_adam_moments": ADAMW + ["sparsity.local_optimizer=adam_moments",
                                      "sparsity.clip_norm=1.0"],
    # (d) the default under AdamW: gradient with error feedback, Adam's first moment of
    # it, second moment of the local gradients (log-variance tracked by sparse increments)
    "bucketed_adam": ADAMW + ["sparsity.method=bucketed"],
    # (d) the local gradient divided by its own Adam RMS before error feedback; momentum
    # after the exchange (selection by pending Adam-unit displacement)
    "bucketed_adam_precond": ADAMW + ["sparsity.local_optimizer=adam_precond",
                                      "sparsity.clip_norm=1.0"],
    "exact_adam": ADAMW + ["sparsity.method=exact"],
    "bucketed_adam_per_tensor": ADAMW + PER_TENSOR,
    "bucketed_adam_no_warmup": ADAMW + ["sparsity.warmup_steps=0"],
    "bucketed_adam_dense_warmup": ADAMW + ["sparsity.dense_steps=30",
                                           "sparsity.warmup_steps=100"],
    "bucketed_adam_dense_warmup50": ADAMW + ["sparsity.dense_steps=50",
                                             "sparsity.warmup_steps=150"],
    "bucketed_adam_dense_warmup_seed1": ADAMW + ["sparsity.dense_steps=30",
                                                 "sparsity.warmup_steps=100", "seed=1"],
    "exact_adam_dense_warmup": ADAMW + ["sparsity.method=exact", "sparsity.dense_steps=30",
                                        "sparsity.warmup_steps=100"],
    # (d) a longer second-moment memory, so that bursts are averaged over more steps
    "bucketed_ef_beta2_0.99": ADAMW + NO_LOCAL_ADAM + ["train.beta2=0.99"],
    # learning-rate grid (0.0015, 0.003, 0.006)
    "dense_lr0.0015": ADAMW + ["sparsity.method=dense", "train.lr=0.0015"],
    "dense_lr0.006": ADAMW + ["sparsity.method=dense", "train.lr=0.006"],
    "bucketed_adam_lr0.0015": ADAMW + ["train.lr=0.0015"],
    "bucketed_adam_lr0.006": ADAMW + ["train.lr=0.006"],
    # second seed
    "dense_seed1": ADAMW + ["sparsity.method=dense", "seed=1"],
    "bucketed_adam_seed1": ADAMW + ["seed=1"],
    "bucketed_ef_seed1": ADAMW + NO_LOCAL_ADAM + ["seed=1"],
    "bucketed_ef_lr0.006": ADAMW + NO_LOCAL_ADAM + ["train.lr=0.006"],
    "bucketed_ef_lr0.0015": ADAMW + NO_LOCAL_ADAM + ["train.lr=0.0015"],
    # SGD (the default config) must keep its quality
    "sgd_dense": ["sparsity.method=dense"],
    "sgd_bucketed": ["sparsity.method=bucketed"],
}


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
