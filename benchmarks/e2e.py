"""End-to-end benchmark: time to quality over a dilated emulated network, distk beside
PyTorch's own communication hooks.

The main training job (``python -m distk.train``) runs once per (optimizer, R, method,
seed), one rank per network namespace (``launchers/netem.sh run``), so every gradient byte
between ranks crosses a rate-limited link. Methods (one loop, data, model, timing and
logging; ``train.comm_hook`` picks the DDP hook):

* ``dense_fp32``: fp32 all-reduce (distk's hook, ``sparsity.method=dense``);
* ``dense_bf16``: PyTorch's ``bf16_compress_hook`` (``train.comm_hook=bf16``);
* ``powersgd_r1``, ``powersgd_r4``: PyTorch's ``powerSGD_hook`` at rank 1 and 4, error
  feedback and warm start on, ``start_powerSGD_iter`` = max(2, warm-up, 10% of steps);
* ``exact``, ``bucketed``: distk's top-k exchange with ``torch.topk`` / bucketed selection.
* ``bucketed_2bit``: bucketed with the compact codec (2-bit values, bit-packed offsets);
* ``outer_h8_2bit``, ``outer_h32_4bit``: outer synchronisation (``distk.outer``, no DDP)
  every 8 / 32 steps of bucketed top-k pseudo-gradients with 2- / 4-bit values
  (``--methods`` only; not in the default set).

Protocol (see docs/netem.md, "Dilated emulation" and "The protocol"):

1. **Calibrate** (per optimizer): ``benchmarks/e2e_compute.py`` times the dense step's
   compute (forward + backward + optimizer under ``no_sync``) on the unshaped network.
2. **Dilate**: for each R in ``--ratios`` the link rate is set so that dense fp32's ring
   all-reduce takes R x that compute: ``rate = bytes_per_rank * 8 / (R * compute)``.
3. **Tune**: every method runs ``--sweep-steps`` steps (own cosine schedule, seed 0,
   unshaped network: the loss per step does not depend on the link) at each learning
   rate of its optimizer's grid; the rate with the lowest final validation loss is kept
   (ties: the smaller rate). A grid of one point skips the sweep.
4. **Measure**: every method, at its rate, ``--steps`` steps, for each R under netem with
   ``--netem-seeds`` (default: the first seed); every other seed once per method on the
   unshaped link, its evaluations placed on the netem run's clock (``compose``: the loss
   per step does not depend on the link, the time per step not on the seed).
   Target = mean over seeds of dense fp32's final validation loss x (1 + slack); time to
   target = training wall time (evaluation excluded) at the first evaluation at or below
   it, per seed; also the final loss (equal steps), the loss at equal wall time (the
   shortest run's wall time in that R), s/step split into compute (the calibration),
   selection and exposed communication (the rest), and bytes sent per step.

Root only. Not a test: the full protocol takes hours on a small CPU machine.

    sudo .venv/bin/python benchmarks/e2e.py --quick        # 2 ranks, tiny model, about a minute
    sudo .venv/bin/python benchmarks/e2e.py                # the full protocol
    sudo .venv/bin/python benchmarks/e2e.py --dry-run      # print the commands
    sudo .venv/bin/python benchmarks/e2e.py --rates 1gbit  # fixed links instead of R

Prints the tables, writes ``benchmarks/results/<out>.json`` and ``<out>.png`` (validation
loss against wall time, mean over seeds with the min-max band, one panel per R and
optimizer). Run directories go under ``runs/e2e/<out>/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, print_table, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NETEM = ROOT / "launchers" / "netem.sh"
CHECK = ROOT / "launchers" / "netem_check.py"
COMPUTE = Path(__file__).resolve().parent / "e2e_compute.py"

METHODS: dict[str, list[str]] = {
    "dense_fp32": ["--mode", "dense"],
    "dense_bf16": ["--mode", "dense", "--set", "train.comm_hook=bf16"],
    "powersgd_r1": ["--mode", "dense", "--set", "train.comm_hook=powersgd",
                    "--set", "train.powersgd_rank=1"],
    "powersgd_r4": ["--mode", "dense", "--set", "train.comm_hook=powersgd",
                    "--set", "train.powersgd_rank=4"],
    "exact": ["--mode", "exact"],
    "bucketed": ["--mode", "bucketed"],
    "bucketed_2bit": ["--mode", "bucketed", "--set", "sparsity.value_bits=2"],
    "outer_h8_2bit": ["--mode", "bucketed", "--set", "sparsity.sync_every=8",
                      "--set", "sparsity.value_bits=2"],
    "outer_h32_4bit": ["--mode", "bucketed", "--set", "sparsity.sync_every=32",
                       "--set", "sparsity.value_bits=4"],
}
"""Methods (``--methods``); the first six run by default (``DEFAULT_METHODS``)."""
DEFAULT_METHODS = ["dense_fp32", "dense_bf16", "powersgd_r1", "powersgd_r4", "exact",
                   "bucketed"]

# Per optimizer: fixed settings and the default 3-point learning-rate grid.
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adamw": {"set": {"train.optimizer": "adamw", "train.weight_decay": 0.1,
                      "train.beta1": 0.9, "train.beta2": 0.95},
              "lrs": [1e-3, 2e-3, 4e-3]},
    "sgd": {"set": {"train.optimizer": "sgd", "train.weight_decay": 0.0, "train.beta1": 0.9},
            "lrs": [0.1, 0.3, 0.9]},
}

# The full protocol's job: the main job's model (configs/default.json: 4 layers, width
# 128, 0.84M parameters), 16 x 128 = 2048 tokens per rank and step, 300 steps, 20-step
# warm-up then cosine decay to 10%.
FULL_CONFIG: dict[str, Any] = {
    "model": {"n_layer": 4, "n_head": 4, "d_model": 128, "context": 128},
    "train": {"batch_size": 16, "lr_warmup_steps": 20, "min_lr_ratio": 0.1,
              "eval_windows": 128, "num_threads": 1},
    "logging": {"progress": False, "histogram_every": 0},
    "sparsity": {"density": 0.01, "recall_interval": 0},
}
FULL = {"world": 2, "ratios": [1.0, 4.0, 16.0], "steps": 300, "eval_every": 25,
        "sweep_steps": 100, "seeds": [0, 1], "optimizers": ["adamw", "sgd"],
        "check_mb": 16.0, "calibrate_steps": 10}

# --quick: the same pipeline on a tiny model and 2 ranks: plumbing, not a measurement.
QUICK_CONFIG: dict[str, Any] = {
    "data": {"max_train_bytes": 200_000, "max_val_bytes": 20_000},
    "model": {"n_layer": 1, "n_head": 2, "d_model": 64, "context": 32},
    # AdamW's dense start and density warm-up scaled to 8 steps (the defaults, 75 and
    # 200, would leave every step of the sparse methods dense).
    "train": {"batch_size": 4, "lr_warmup_steps": 2, "eval_windows": 16, "num_threads": 1,
              "adamw_dense_steps": 1, "adamw_warmup_steps": 2},
    "logging": {"progress": False, "histogram_every": 0},
    "sparsity": {"density": 0.05, "min_numel": 256, "recall_interval": 0,
                 "warmup_steps": 2},
}
QUICK = {"world": 2, "ratios": [4.0], "steps": 8, "eval_every": 4, "sweep_steps": 0,
         "seeds": [0, 1], "optimizers": ["adamw"], "check_mb": 1.0, "calibrate_steps": 3}
QUICK_LRS = {"adamw": [3e-3], "sgd": [0.1]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, 2 ranks, R=4, AdamW, 2 seeds, one lr, 8 steps")
    parser.add_argument("--world", type=int, default=None, help="ranks = namespaces (4; quick 2)")
    parser.add_argument("--ratios", type=float, nargs="+", default=None,
                        help="R: dense fp32 communication / compute (1 4 16; quick 4)")
    parser.add_argument("--rates", nargs="+", default=None,
                        help="fixed link rates (tc syntax, e.g. 1gbit) instead of --ratios: "
                             "no dilation; the table shows the ratio each rate gave")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS),
                        help="methods to run (default: the six per-step methods; also "
                             "bucketed_2bit, outer_h8_2bit, outer_h32_4bit)")
    parser.add_argument("--optimizers", nargs="+", default=None, choices=list(OPTIMIZERS),
                        help="tables to run; the first is the headline (adamw sgd; quick adamw)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="(0 1)")
    parser.add_argument("--netem-seeds", type=int, nargs="+", default=None,
                        help="seeds run under netem at every R (default: the first of "
                             "--seeds; name them all to run every seed under netem); "
                             "the other seeds run once on the unshaped link and take their "
                             "wall time per step from the first netem seed's run")
    parser.add_argument("--steps", type=int, default=None, help="steps of every run (300)")
    parser.add_argument("--eval-every", type=int, default=None, help="(25; quick 4)")
    parser.add_argument("--sweep-steps", type=int, default=None,
                        help="steps of the learning-rate sweep runs (100; quick 0 = no sweep)")
    parser.add_argument("--lrs-adamw", type=float, nargs="+", default=None,
                        help="AdamW learning-rate grid (1e-3 2e-3 4e-3)")
    parser.add_argument("--lrs-sgd", type=float, nargs="+", default=None,
                        help="SGD learning-rate grid (0.1 0.3 0.9)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="distk-train override for every run")
    parser.add_argument("--target-slack", type=float, default=0.01,
                        help="target = dense fp32's mean final val loss x (1 + slack)")
    parser.add_argument("--compute-seconds", type=float, default=None,
                        help="skip the calibration and use this dense compute s/step")
    parser.add_argument("--calibrate-steps", type=int, default=None)
    parser.add_argument("--check-mb", type=float, default=None,
                        help="per-rate all-reduce check in MB (16; quick 1; 0 = skip)")
    parser.add_argument("--timeout", type=int, default=7200, help="seconds per run")
    parser.add_argument("--out", default=None, help="result name (e2e / e2e_quick)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS,
                        help="where <out>.json and <out>.png go (benchmarks/results)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the commands (rates from --compute-seconds or 0.1 s)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key in preset:
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    lrs = QUICK_LRS if args.quick else {k: v["lrs"] for k, v in OPTIMIZERS.items()}
    args.lrs = {"adamw": args.lrs_adamw or lrs["adamw"], "sgd": args.lrs_sgd or lrs["sgd"]}
    args.config = QUICK_CONFIG if args.quick else FULL_CONFIG
    args.out = args.out or ("e2e_quick" if args.quick else "e2e")
    if args.world < 2:
        parser.error(f"--world {args.world} is invalid: allowed an int >= 2")
    if args.steps < 1:
        parser.error(f"--steps {args.steps} is invalid: allowed an int >= 1")
    if not 1 <= args.eval_every <= args.steps:
        parser.error(f"--eval-every {args.eval_every} is invalid: allowed 1..{args.steps}")
    if any(r <= 0 for r in args.ratios):
        parser.error(f"--ratios {args.ratios} is invalid: allowed floats > 0")
    if args.netem_seeds is None:
        args.netem_seeds = list(args.seeds[:1])
    if not args.netem_seeds or not set(args.netem_seeds) <= set(args.seeds):
        parser.error(f"--netem-seeds {args.netem_seeds} is invalid: allowed a non-empty "
                     f"subset of --seeds {args.seeds}")
    if "dense_fp32" not in args.methods:
        parser.error("--methods must include dense_fp32: it sets the target and the rate")
    if args.sweep_steps < 0:
        parser.error(f"--sweep-steps {args.sweep_steps} is invalid: allowed an int >= 0")
    if any(lr <= 0 for grid in args.lrs.values() for lr in grid):
        parser.error(f"learning rates must be > 0, got {args.lrs}")
    if args.compute_seconds is not None and args.compute_seconds <= 0:
        parser.error(f"--compute-seconds {args.compute_seconds} is invalid: allowed > 0")
    return args


# -- commands ------------------------------------------------------------------------------
def netem_prefix(args: argparse.Namespace, rate: str, log_dir: Path | None = None,
                 timeout: int | None = None) -> list[str]:
    cmd = ["bash", str(NETEM), "run", "--timeout", str(timeout or args.timeout)]
    if log_dir is not None:
        cmd += ["--log-dir", str(log_dir)]
    return cmd + [str(args.world), rate, "--"]


def optimizer_sets(opt: str) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in OPTIMIZERS[opt]["set"].items()]


def train_command(args: argparse.Namespace, *, rate: str, method: str, opt: str, lr: float,
                  seed: int, steps: int, run_dir: Path, config_path: Path) -> list[str]:
    """The netem.sh command line of one run (one rank of distk-train per namespace)."""
    eval_every = min(args.eval_every, steps)
    overrides = [f"run_root={json.dumps(str(run_dir.parent))}", f"train.steps={steps}",
                 f"train.eval_every={eval_every}", f"logging.log_every={eval_every}",
                 f"seed={seed}", *optimizer_sets(opt), f"train.lr={lr}", *args.overrides]
    cmd = netem_prefix(args, rate, run_dir / "logs") + [
        sys.executable, "-m", "distk.train", "--config", str(config_path),
        "--name", run_dir.name, *METHODS[method]]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def compute_command(args: argparse.Namespace, opt: str, config_path: Path) -> list[str]:
    cmd = netem_prefix(args, "none", timeout=1800) + [
        sys.executable, str(COMPUTE), "--config", str(config_path),
        "--steps", str(args.calibrate_steps), "--warmup", "2"]
    for item in [*optimizer_sets(opt), f"train.lr={args.lrs[opt][0]}", *args.overrides]:
        cmd += ["--set", item]
    return cmd


def check_command(args: argparse.Namespace, rate: str) -> list[str]:
    return netem_prefix(args, rate, timeout=300) + [
        sys.executable, str(CHECK), "--mb", str(args.check_mb), "--repeats", "2"]


def links(args: argparse.Namespace, bytes_per_rank: int, compute: float
          ) -> list[tuple[str, str, float | None, float | None]]:
    """(key, tc rate, R asked for, bits/s) of every link setting: one per ``--ratios``
    value (key "4"), or one per fixed ``--rates`` rate (key the rate, R not set)."""
    if args.rates:
        return [(rate, rate, None, None) for rate in args.rates]
    return [(f"{ratio:g}", *_rate_of(bytes_per_rank, compute, ratio)) for ratio in args.ratios]


def _rate_of(bytes_per_rank: int, compute: float, ratio: float) -> tuple[str, float, float]:
    rate, bits = dilated_rate(bytes_per_rank, compute, ratio)
    return rate, ratio, bits


def dense_bytes_per_rank(args: argparse.Namespace, config_path: Path) -> int:
    """Bytes one rank transmits in a ring all-reduce of the job's fp32 gradient."""
    import torch

    from distk.comm.exchange import dense_allreduce_bytes
    from distk.train import build_model, load_config

    cfg = load_config(config_path, list(args.overrides))
    numel = sum(p.numel() for p in build_model(cfg, torch.device("cpu")).parameters())
    return dense_allreduce_bytes(numel, args.world, 4)


def dilated_rate(bytes_per_rank: int, compute_seconds: float, ratio: float) -> tuple[str, float]:
    """(tc rate, bits/s) at which one rank's ring all-reduce of ``bytes_per_rank`` takes
    ``ratio`` x ``compute_seconds``."""
    bits = bytes_per_rank * 8 / (ratio * compute_seconds)
    return f"{max(1, int(round(bits / 1e3)))}kbit", bits


# -- running -------------------------------------------------------------------------------
def _tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return f"({path} missing)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_json(cmd: list[str], env: dict[str, str], what: str) -> dict[str, Any]:
    """Rank 0's last stdout line (JSON) of a netem.sh run."""
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_training(cmd: list[str], run_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run one training job; its result.json plus the (step, wall seconds, loss) curves."""
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        logs = "\n".join(f"--- {p.name} ---\n{_tail(p)}"
                         for p in sorted((run_dir / "logs").glob("h*.log")))
        raise RuntimeError(f"run {run_dir} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-2000:]}\n{logs}")
    result = json.loads((run_dir / "result.json").read_text())
    val_curve, train_curve = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        wall = record.get("train/wall_seconds")
        if wall is None:
            continue
        if "val/loss" in record:
            val_curve.append((record["step"], wall, record["val/loss"]))
        if "train/loss" in record:
            train_curve.append((record["step"], wall, record["train/loss"]))
    result["val_vs_wall"] = val_curve
    result["train_vs_wall"] = train_curve
    return result


def select_lr(sweep: dict[float, dict[str, Any]]) -> float:
    """The rule: lowest final validation loss of the sweep (non-finite losses lose); ties
    go to the smaller learning rate."""
    def key(lr: float) -> tuple[float, float]:
        loss = sweep[lr]["final_val_loss"]
        return (loss if math.isfinite(loss) else math.inf, lr)
    return min(sweep, key=key)


# -- summarising ---------------------------------------------------------------------------
def time_to_target(val_vs_wall: list[list[float]], target: float
                   ) -> tuple[float | None, int | None]:
    """(wall seconds, step) of the first evaluation at or below ``target``, or (None, None)."""
    for step, wall, loss in val_vs_wall:
        if loss <= target:
            return wall, step
    return None, None


def loss_at_wall(val_vs_wall: list[list[float]], budget: float) -> float | None:
    """Validation loss of the last evaluation at or before ``budget`` wall seconds."""
    last = None
    for _, wall, loss in val_vs_wall:
        if wall <= budget * (1 + 1e-9):
            last = loss
    return last


def compose(loss_run: dict[str, Any], timing_run: dict[str, Any], timing_seed: int
            ) -> dict[str, Any]:
    """A run on the unshaped link (``loss_run``) placed on the clock of the same method's
    netem run of another seed (``timing_run``): the loss after a step does not depend on
    the link and the time of a step does not depend on the seed, so each evaluation keeps
    its loss and takes the wall time the netem run had at that step (linear between logged
    steps). Timing totals (wall, selection, hook seconds) come from the netem run."""
    clock = sorted({(0, 0.0)} | {(step, wall) for step, wall, _ in
                                 timing_run["train_vs_wall"] + timing_run["val_vs_wall"]})
    total_steps, total_wall = timing_run["steps"], timing_run["wall_seconds"]
    if clock[-1][0] < total_steps:
        clock.append((total_steps, total_wall))

    def wall_at(step: int) -> float:
        for (s0, w0), (s1, w1) in zip(clock, clock[1:]):
            if s0 <= step <= s1:
                return w0 if s1 == s0 else w0 + (w1 - w0) * (step - s0) / (s1 - s0)
        return total_wall * step / total_steps

    out = dict(loss_run)
    for key in ("wall_seconds", "selection_seconds", "comm_seconds"):
        out[key] = timing_run[key]
    out["val_vs_wall"] = [(step, wall_at(step), loss) for step, _, loss in loss_run["val_vs_wall"]]
    out["train_vs_wall"] = [(step, wall_at(step), loss)
                            for step, _, loss in loss_run["train_vs_wall"]]
    out["timing_from_seed"] = timing_seed
    return out


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if len(vals) == len(values) and vals else None


def _spread(values: list[float | None]) -> float | None:
    """Half the max-min range over seeds (None if any is missing or there is one seed)."""
    vals = [v for v in values if v is not None]
    if len(vals) != len(values) or len(vals) < 2:
        return None
    return (max(vals) - min(vals)) / 2


def summarise(runs: dict[str, dict[str, Any]], compute: float, slack: float,
              lrs: dict[str, float]) -> tuple[float, float, list[dict[str, Any]]]:
    """(target, equal-wall budget, one row per method) of one (optimizer, R); ``runs`` maps
    method -> seed -> result."""
    target = _mean([r["final_val_loss"] for r in runs["dense_fp32"].values()]) * (1 + slack)
    budget = min(statistics.fmean(r["wall_seconds"] for r in seeds.values())
                 for seeds in runs.values())
    base_tt = None
    rows = []
    for method, seeds in runs.items():
        res = list(seeds.values())
        tts = [time_to_target(r["val_vs_wall"], target)[0] for r in res]
        per_step = [r["wall_seconds"] / r["steps"] for r in res]
        sel = [r["selection_seconds"] / r["steps"] for r in res]
        tt = _mean(tts)
        if method == "dense_fp32":
            base_tt = tt
        mean_step, mean_sel = statistics.fmean(per_step), statistics.fmean(sel)
        rows.append({
            "method": method, "lr": lrs[method], "seeds": len(res),
            "time_to_target_s": tt, "time_to_target_spread": _spread(tts),
            "reached": sum(t is not None for t in tts),
            "final_val_loss": _mean([r["final_val_loss"] for r in res]),
            "final_val_spread": _spread([r["final_val_loss"] for r in res]),
            "val_at_equal_wall": _mean([loss_at_wall(r["val_vs_wall"], budget) for r in res]),
            "s_per_step": mean_step, "compute_s_per_step": compute,
            "selection_s_per_step": mean_sel,
            "exposed_comm_s_per_step": max(0.0, mean_step - compute - mean_sel),
            "hook_comm_s_per_step": statistics.fmean(r["comm_seconds"] / r["steps"]
                                                     for r in res),
            "mb_per_step": statistics.fmean(r["bytes_sent"] / r["steps"] for r in res) / 1e6,
        })
    for row in rows:
        tt = row["time_to_target_s"]
        row["speedup_vs_dense"] = base_tt / tt if base_tt and tt else None
    return target, budget, rows


COLUMNS = [
    ("method", "method", "s"), ("lr", "lr", "g"),
    ("reached", "seeds at target", "d"),
    ("time_to_target_s", "time to target s", ".1f"), ("time_to_target_spread", "+-", ".1f"),
    ("speedup_vs_dense", "vs dense fp32", ".2f"),
    ("final_val_loss", "val @ end", ".4f"), ("final_val_spread", "+-", ".4f"),
    ("val_at_equal_wall", "val @ equal wall", ".4f"),
    ("s_per_step", "s/step", ".3f"), ("compute_s_per_step", "compute", ".3f"),
    ("selection_s_per_step", "selection", ".3f"),
    ("exposed_comm_s_per_step", "exposed comm", ".3f"), ("mb_per_step", "MB/step", ".3f"),
]


def plot(results: dict[str, Any], path: Path) -> None:
    """Validation loss against wall time: mean over seeds, min-max band; one panel per
    (optimizer, R)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(t["ratios"]) for t in results.values())
    fig, axes = plt.subplots(len(results), cols, figsize=(6 * cols, 4.3 * len(results)),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for row, opt in enumerate(results):
        for col, (key, block) in enumerate(results[opt]["ratios"].items()):
            ax = axes[row][col]
            ax.set_visible(True)
            for i, (method, seeds) in enumerate(block["runs"].items()):
                curves = [r["val_vs_wall"] for r in seeds.values()]
                n = min(len(c) for c in curves)
                if not n:
                    continue
                wall = [statistics.fmean(c[j][1] for c in curves) for j in range(n)]
                loss = [[c[j][2] for c in curves] for j in range(n)]
                ax.plot(wall, [statistics.fmean(v) for v in loss], "o-", color=f"C{i}",
                        markersize=3, label=method)
                if len(curves) > 1:
                    ax.fill_between(wall, [min(v) for v in loss], [max(v) for v in loss],
                                    color=f"C{i}", alpha=0.2)
            ax.axhline(block["target"], color="grey", linestyle="--", linewidth=1,
                       label=f"target {block['target']:.3f}")
            label = f"R={key}" if block["ratio"] is not None else "fixed rate"
            ax.set_title(f"{opt}, {label} ({block['rate']}, all-reduce check "
                         f"{block['check_gbit_per_s'] or float('nan'):.3f} Gbit/s)", fontsize=9)
            ax.set_xlabel("training wall time (s)")
            ax.set_ylabel("validation loss (nats/byte)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("validation loss vs training wall time, dilated emulation\n"
                 "(mean over seeds, band = min..max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Entry point; see the module docstring."""
    args = parse_args(argv)
    root = ROOT / "runs" / "e2e" / args.out
    config_path = root / "config.json"
    if args.dry_run:
        root.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps(args.config, indent=2) + "\n")
        compute = args.compute_seconds or 0.1
        nbytes = dense_bytes_per_rank(args, config_path)
        print(f"# dense all-reduce: {nbytes / 1e6:.3f} MB per rank; rates below assume "
              f"compute = {compute} s/step (--compute-seconds)")
        for opt in args.optimizers:
            if args.compute_seconds is None:
                print(" ".join(compute_command(args, opt, config_path)))
            if args.sweep_steps and len(args.lrs[opt]) > 1:
                for method in args.methods:
                    for lr in args.lrs[opt]:
                        print(" ".join(train_command(
                            args, rate="none", method=method, opt=opt, lr=lr, seed=0,
                            steps=args.sweep_steps, config_path=config_path,
                            run_dir=root / opt / "sweep" / f"{method}-lr{lr:g}")))
            for key, rate, ratio, _ in links(args, nbytes, compute):
                if ratio is not None:
                    print(f"# R={key}: rate = bytes_per_rank * 8 / ({key} x compute)")
                if args.sweep_steps and len(args.lrs[opt]) > 1:
                    print("# train.lr below: each method's rate chosen by the sweep (shown: "
                          "the grid's first point)")
                for method in args.methods:
                    for seed in args.netem_seeds:
                        print(" ".join(train_command(
                            args, rate=rate, method=method, opt=opt, lr=args.lrs[opt][0],
                            seed=seed, steps=args.steps, config_path=config_path,
                            run_dir=root / opt / f"R{key}" / f"{method}-s{seed}")))
            unshaped_seeds = [s for s in args.seeds if s not in args.netem_seeds]
            if unshaped_seeds:
                print(f"# seeds {unshaped_seeds}: once per method on the unshaped link, "
                      f"placed on seed {args.netem_seeds[0]}'s netem clock at each R")
            for method in args.methods:
                for seed in unshaped_seeds:
                    print(" ".join(train_command(
                        args, rate="none", method=method, opt=opt, lr=args.lrs[opt][0],
                        seed=seed, steps=args.steps, config_path=config_path,
                        run_dir=root / opt / "unshaped" / f"{method}-s{seed}")))
        return 0
    if os.geteuid() != 0:
        print("e2e.py: must run as root: it builds network namespaces with "
              "launchers/netem.sh (try: sudo .venv/bin/python benchmarks/e2e.py ...)",
              file=sys.stderr)
        return 1
    root.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(args.config, indent=2) + "\n")
    # A prefix of its own (unless DISTK_NETEM_PREFIX says otherwise): never collides with
    # a netem.sh run started by hand.
    env = {**os.environ, "DISTK_NETEM_PREFIX": os.environ.get("DISTK_NETEM_PREFIX",
                                                              "distk-e2e"),
           "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    sweeping = args.sweep_steps > 0
    total = sum((len(args.methods) * len(args.lrs[o]) if sweeping and len(args.lrs[o]) > 1
                 else 0) + len(args.methods) * (len(args.ratios) * len(args.netem_seeds)
                                                 + len(args.seeds) - len(args.netem_seeds))
                for o in args.optimizers)
    bar = tqdm(total=total, desc="e2e", unit="run")
    results: dict[str, Any] = {}
    for opt in args.optimizers:
        table: dict[str, Any] = {"ratios": {}, "sweep": {}}
        results[opt] = table
        # 1. calibrate
        if args.compute_seconds is not None:
            calib = {"compute_seconds": args.compute_seconds, "given": True,
                     "dense_bytes_per_rank": dense_bytes_per_rank(args, config_path)}
        else:
            bar.set_postfix_str(f"{opt} calibrate")
            calib = run_json(compute_command(args, opt, config_path), env, "calibration")
        table["calibration"] = calib
        compute = calib["compute_seconds"]
        # 2. sweep
        chosen: dict[str, float] = {}
        for method in args.methods:
            grid = args.lrs[opt]
            if not sweeping or len(grid) == 1:
                chosen[method] = grid[len(grid) // 2]
                continue
            sweep = {}
            for lr in grid:
                bar.set_postfix_str(f"{opt} sweep {method} lr={lr:g}")
                run_dir = root / opt / "sweep" / f"{method}-lr{lr:g}"
                sweep[lr] = run_training(train_command(
                    args, rate="none", method=method, opt=opt, lr=lr, seed=0,
                    steps=args.sweep_steps, run_dir=run_dir, config_path=config_path),
                    run_dir, env)
                bar.update()
            chosen[method] = select_lr(sweep)
            table["sweep"][method] = {
                f"{lr:g}": {"final_val_loss": r["final_val_loss"],
                            "edge": lr in (min(grid), max(grid))} for lr, r in sweep.items()}
        table["lr"] = chosen
        unshaped_seeds = [s for s in args.seeds if s not in args.netem_seeds]
        unshaped: dict[tuple[str, int], dict[str, Any]] = {}
        table["netem_seeds"], table["unshaped_seeds"] = list(args.netem_seeds), unshaped_seeds
        # 3. measure at each R (or each fixed --rates rate)
        for key, rate, ratio, bits in links(args, calib["dense_bytes_per_rank"], compute):
            check = None
            if args.check_mb:
                bar.set_postfix_str(f"{opt} R={key} check")
                check = run_json(check_command(args, rate), env, "all-reduce check")
            runs: dict[str, dict[str, Any]] = {}
            for method in args.methods:
                runs[method] = {}
                for seed in args.netem_seeds:
                    bar.set_postfix_str(f"{opt} R={key} {method} seed {seed}")
                    run_dir = root / opt / f"R{key}" / f"{method}-s{seed}"
                    runs[method][str(seed)] = run_training(train_command(
                        args, rate=rate, method=method, opt=opt, lr=chosen[method],
                        seed=seed, steps=args.steps, run_dir=run_dir,
                        config_path=config_path), run_dir, env)
                    bar.update()
                clock_seed = args.netem_seeds[0]
                for seed in unshaped_seeds:
                    if (method, seed) not in unshaped:
                        bar.set_postfix_str(f"{opt} unshaped {method} seed {seed}")
                        run_dir = root / opt / "unshaped" / f"{method}-s{seed}"
                        unshaped[method, seed] = run_training(train_command(
                            args, rate="none", method=method, opt=opt, lr=chosen[method],
                            seed=seed, steps=args.steps, run_dir=run_dir,
                            config_path=config_path), run_dir, env)
                        bar.update()
                    runs[method][str(seed)] = compose(unshaped[method, seed],
                                                      runs[method][str(clock_seed)], clock_seed)
            target, budget, rows = summarise(runs, compute, args.target_slack, chosen)
            dense = next(r for r in rows if r["method"] == "dense_fp32")
            table["ratios"][key] = {
                "ratio": ratio, "rate": rate, "rate_bits_per_s": bits,
                "check": check,
                "check_gbit_per_s": check["achieved_gbit_per_s"] if check else None,
                "measured_ratio": (dense["s_per_step"] - compute) / compute,
                "target": target, "equal_wall_budget_s": budget, "rows": rows, "runs": runs}
    bar.close()

    for opt, table in results.items():
        c = table["calibration"]
        print(f"\n## {opt}: dense compute {c['compute_seconds']:.4f} s/step, "
              f"{c['dense_bytes_per_rank'] / 1e6:.3f} MB per rank per dense all-reduce; "
              f"lr {table['lr']}; seeds under netem {table['netem_seeds']}, on the "
              f"unshaped link with the netem clock {table['unshaped_seeds'] or '-'}")
        for key, block in table["ratios"].items():
            print(f"\n### {opt} R={key}: rate {block['rate']}, all-reduce check "
                  f"{block['check_gbit_per_s'] or float('nan'):.3f} Gbit/s, dense fp32 "
                  f"measured (s/step - compute) / compute = {block['measured_ratio']:.2f}, "
                  f"target {block['target']:.4f}, equal wall {block['equal_wall_budget_s']:.1f} s")
            print_table(block["rows"], COLUMNS)
    payload = {"args": {k: str(v) if isinstance(v, Path) else v
                        for k, v in vars(args).items() if k != "config"},
               "train_config": args.config, "results": results,
               "total_seconds": time.perf_counter() - started}
    path = write_results(args.out, payload, args.results_dir)
    print(f"wrote {path}")
    if not args.no_plot:
        png = args.results_dir / f"{args.out}.png"
        plot(results, png)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
