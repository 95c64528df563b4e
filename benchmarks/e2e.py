"""End-to-end benchmark: time to a target validation loss over an emulated slow network.

The main training job (``python -m distk.train``) runs once per (link rate, method), with
one rank per network namespace (``launchers/netem.sh run``), so every gradient byte between
ranks crosses a rate-limited link. Methods:

* ``dense_fp32``: plain all-reduce of fp32 gradients (``sparsity.method=dense``);
* ``dense_bf16``: the same all-reduce with bf16 values on the wire
  (``sparsity.value_dtype=bfloat16``; the rounding error stays in the error-feedback
  residual);
* ``exact``: top-k sparse exchange with ``torch.topk`` selection;
* ``bucketed``: top-k sparse exchange with bucketed approximate selection;
* ``bucketed_2bit``: the same with the compact codec (2-bit values, bit-packed offsets);
* ``outer_h8_2bit``, ``outer_h32_4bit``: outer synchronisation (``distk.outer``, no DDP)
  every 8 / 32 steps of bucketed top-k pseudo-gradients with 2- / 4-bit values
  (``--methods`` only; not in the default set).

Each run evaluates the validation loss every ``--eval-every`` steps. The target loss of a
rate is the final validation loss of that rate's ``dense_fp32`` run, times
``1 + --target-slack`` (or ``--target-loss``); a method's time to target is the training
wall time (``train/wall_seconds``: steps only, evaluation excluded) at its first evaluation
at or below the target (an upper bound: evaluations are ``--eval-every`` steps apart).

Before each rate's runs, a 64 MB gloo all-reduce measures what the emulated link really
delivers (on a small CPU machine a high rate such as 10gbit is capped by the CPU).

Root only (network namespaces). Not a test: each rate takes several minutes on 2 cores.

    sudo .venv/bin/python benchmarks/e2e.py --quick      # 2 ranks, tiny model, 1 rate
    sudo .venv/bin/python benchmarks/e2e.py              # 4 ranks, 25.5M params, 1 and 10 Gbit/s
    sudo .venv/bin/python benchmarks/e2e.py --rates 1gbit --methods dense_fp32 bucketed

Prints a table, writes ``benchmarks/results/<out>.json`` and ``<out>.png`` (validation
loss against wall time, one panel per rate). Run directories (logs, metrics.jsonl,
result.json of every run) go under ``runs/e2e/<out>/``. See docs/netem.md.
"""

from __future__ import annotations

import argparse
import json
import os
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

METHODS: dict[str, list[str]] = {
    "dense_fp32": ["--mode", "dense"],
    "dense_bf16": ["--mode", "dense", "--set", "sparsity.value_dtype=bfloat16"],
    "exact": ["--mode", "exact"],
    "bucketed": ["--mode", "bucketed"],
    "bucketed_2bit": ["--mode", "bucketed", "--set", "sparsity.value_bits=2"],
    "outer_h8_2bit": ["--mode", "bucketed", "--set", "sparsity.sync_every=8",
                      "--set", "sparsity.value_bits=2"],
    "outer_h32_4bit": ["--mode", "bucketed", "--set", "sparsity.sync_every=32",
                       "--set", "sparsity.value_bits=4"],
}
"""Methods (``--methods``); the first four run by default (``DEFAULT_METHODS``)."""
DEFAULT_METHODS = ["dense_fp32", "dense_bf16", "exact", "bucketed"]

# The training job's config for the full run: a byte-level GPT of 25.5M parameters whose
# per-step compute is kept small (1 x 32 bytes per rank) so that, as on a GPU cluster,
# moving 100 MB of fp32 gradients over a 1 Gbit/s link costs more than computing them.
FULL_CONFIG: dict[str, Any] = {
    # 25.5M parameters, 32 tokens per rank and step: on a GPU this forward/backward takes
    # milliseconds while 1 Gbit/s moves the 100 MB of fp32 gradients in about a second;
    # the small batch keeps it below the communication on this CPU too, as on a cluster
    # whose network is the bottleneck.
    "model": {"n_layer": 2, "n_head": 8, "d_model": 1024, "context": 32},
    # The training job's optimizer (SGD with momentum; momentum correction in the sparse
    # modes) at lr 0.1: at the job's default 0.3 dense training of this model spikes. A
    # short warm-up, then a constant rate (min_lr_ratio 1): a longer run's curve extends
    # a shorter one, so methods may run different step counts (--steps-factor).
    "train": {"batch_size": 1, "lr": 0.1, "lr_warmup_steps": 10, "min_lr_ratio": 1.0,
              "eval_windows": 64, "num_threads": 1},
    "logging": {"progress": False, "histogram_every": 0},
    "sparsity": {"density": 0.01, "recall_interval": 0},
}
FULL = {"world": 4, "rates": ["1gbit", "10gbit"], "steps": 40, "eval_every": 5,
        "check_mb": 64.0, "steps_factor": 2.0}

# --quick: the same pipeline on a tiny model, 2 ranks and one slow rate; about a minute.
QUICK_CONFIG: dict[str, Any] = {
    "data": {"max_train_bytes": 200_000, "max_val_bytes": 20_000},
    "model": {"n_layer": 1, "n_head": 2, "d_model": 64, "context": 32},
    "train": {"batch_size": 4, "lr": 1e-2, "lr_warmup_steps": 2, "eval_windows": 16,
              "num_threads": 1},
    "logging": {"progress": False, "histogram_every": 0},
    "sparsity": {"density": 0.05, "min_numel": 256, "recall_interval": 0},
}
QUICK = {"world": 2, "rates": ["20mbit"], "steps": 12, "eval_every": 4, "check_mb": 2.0,
         "steps_factor": 1.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, 2 ranks, one 20mbit rate, 12 steps (about a minute)")
    parser.add_argument("--world", type=int, default=None,
                        help="ranks = network namespaces (default 4; --quick 2)")
    parser.add_argument("--rates", nargs="+", default=None,
                        help="link rates, tc syntax (default 1gbit 10gbit; --quick 20mbit)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS),
                        help="methods to run (default: dense_fp32 dense_bf16 exact bucketed; "
                             "also bucketed_2bit, outer_h8_2bit, outer_h32_4bit); dense_fp32 "
                             "is needed for the target unless --target-loss is given")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps of the dense_fp32 run, which sets the target "
                             "(default 40; --quick 12)")
    parser.add_argument("--steps-factor", type=float, default=None,
                        help="steps of every other method as a multiple of --steps (default "
                             "2; --quick 1): room to reach dense_fp32's final loss for a "
                             "method that converges more slowly per step")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="validation every N steps (default 5; --quick 4)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="extra distk-train config override for every run (repeatable), "
                             "e.g. --set sparsity.density=0.001 --set model.n_layer=4")
    parser.add_argument("--target-loss", type=float, default=None,
                        help="fixed target validation loss (default: dense_fp32's final val "
                             "loss at the same rate x (1 + --target-slack))")
    parser.add_argument("--target-slack", type=float, default=0.01,
                        help="relative slack on dense_fp32's final val loss (default 0.01)")
    parser.add_argument("--check-mb", type=float, default=None,
                        help="size of the per-rate all-reduce throughput check in MB "
                             "(default 64; --quick 2; 0 = skip)")
    parser.add_argument("--timeout", type=int, default=3600,
                        help="seconds before a single run is stopped and counted failed")
    parser.add_argument("--out", default=None, help="result name (default e2e / e2e_quick)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the commands of every run and exit (no root needed)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key in ("world", "rates", "steps", "eval_every", "check_mb", "steps_factor"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.config = QUICK_CONFIG if args.quick else FULL_CONFIG
    args.out = args.out or ("e2e_quick" if args.quick else "e2e")
    if args.world < 2:
        parser.error(f"--world {args.world} is invalid: allowed an int >= 2")
    if args.steps < 1:
        parser.error(f"--steps {args.steps} is invalid: allowed an int >= 1")
    if args.steps_factor < 1:
        parser.error(f"--steps-factor {args.steps_factor} is invalid: allowed a float >= 1")
    if not 1 <= args.eval_every <= args.steps:
        parser.error(f"--eval-every {args.eval_every} is invalid: allowed 1..{args.steps}")
    if args.target_loss is None and "dense_fp32" not in args.methods:
        parser.error("without dense_fp32 in --methods, give --target-loss")
    if args.target_slack < 0:
        parser.error(f"--target-slack {args.target_slack} is invalid: allowed a float >= 0")
    return args


def train_command(args: argparse.Namespace, rate: str, method: str, run_root: Path,
                  config_path: Path) -> list[str]:
    """The netem.sh command line of one run (one rank of distk-train per namespace)."""
    name = f"{rate}-{method}"
    steps = method_steps(args, method)
    # log_every = eval_every: every validation record then carries train/wall_seconds.
    overrides = [f"run_root={json.dumps(str(run_root))}", f"train.steps={steps}",
                 f"train.eval_every={args.eval_every}",
                 f"logging.log_every={args.eval_every}", *args.overrides]
    cmd = ["bash", str(NETEM), "run", "--timeout", str(args.timeout),
           "--log-dir", str(run_root / name / "logs"), str(args.world), rate, "--",
           sys.executable, "-m", "distk.train", "--config", str(config_path),
           "--name", name, *METHODS[method]]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def method_steps(args: argparse.Namespace, method: str) -> int:
    """Training steps of one method's run: ``--steps`` for dense_fp32 (the target),
    ``--steps`` x ``--steps-factor`` for the others."""
    if method == "dense_fp32":
        return args.steps
    return int(round(args.steps * args.steps_factor))


def check_command(args: argparse.Namespace, rate: str) -> list[str]:
    """The netem.sh command line of the all-reduce throughput check of one rate."""
    return ["bash", str(NETEM), "run", "--timeout", "300", str(args.world), rate, "--",
            sys.executable, str(CHECK), "--mb", str(args.check_mb), "--repeats", "2"]


def _tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return f"({path} missing)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_training(cmd: list[str], run_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run one training job; its result.json plus the (wall seconds, val loss) curve."""
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        logs = "\n".join(f"--- {p.name} ---\n{_tail(p)}"
                         for p in sorted((run_dir / "logs").glob("h*.log")))
        raise RuntimeError(f"run {run_dir.name} failed (exit {proc.returncode}):\n"
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


def run_check(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """The throughput check's JSON report (rank 0's last stdout line)."""
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"throughput check failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_to_target(val_vs_wall: list[tuple[int, float, float]], target: float
                   ) -> tuple[float | None, int | None]:
    """(wall seconds, step) of the first evaluation at or below ``target``; (None, None)
    when never reached."""
    for step, wall, loss in val_vs_wall:
        if loss <= target:
            return wall, step
    return None, None


def summarise(rate: str, runs: dict[str, dict[str, Any]], args: argparse.Namespace
              ) -> tuple[float | None, list[dict[str, Any]]]:
    """Target loss of a rate and one table row per method."""
    if args.target_loss is not None:
        target = args.target_loss
    elif "dense_fp32" in runs:
        target = runs["dense_fp32"]["final_val_loss"] * (1 + args.target_slack)
    else:
        target = None
    rows = []
    base_time = base_step = None
    if target is not None and "dense_fp32" in runs:
        base_time, _ = time_to_target(runs["dense_fp32"]["val_vs_wall"], target)
        base_step = runs["dense_fp32"]["wall_seconds"] / runs["dense_fp32"]["steps"]
    for method, r in runs.items():
        reached, step = (time_to_target(r["val_vs_wall"], target) if target is not None
                         else (None, None))
        per_step = r["wall_seconds"] / r["steps"]
        rows.append({
            "rate": rate, "method": method, "steps": r["steps"],
            "final_val_loss": r["final_val_loss"], "target_loss": target,
            "time_to_target_s": reached, "step_at_target": step,
            "speedup_to_target": (base_time / reached if base_time and reached else None),
            "seconds_per_step": per_step,
            "step_speedup": base_step / per_step if base_step else None,
            "comm_s_per_step": r["comm_seconds"] / r["steps"],
            "selection_s_per_step": r["selection_seconds"] / r["steps"],
            "mb_sent_per_step": r["bytes_sent"] / r["steps"] / 1e6,
            "wall_seconds": r["wall_seconds"],
        })
    return target, rows


def _format_rate(gbit_per_s: float) -> str:
    if gbit_per_s >= 1:
        return f"{gbit_per_s:.2f} Gbit/s"
    return f"{gbit_per_s * 1e3:.1f} Mbit/s"


def plot(runs: dict[str, dict[str, dict[str, Any]]], targets: dict[str, float | None],
         checks: dict[str, Any], path: Path) -> None:
    """Validation loss (markers) and training loss (thin) against wall time, per rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(runs)
    fig, axes = plt.subplots(1, len(rates), figsize=(6.5 * len(rates), 4.5), squeeze=False)
    for ax, rate in zip(axes[0], rates):
        for i, (method, r) in enumerate(runs[rate].items()):
            color = f"C{i}"
            if r["train_vs_wall"]:
                _, wall, loss = zip(*r["train_vs_wall"])
                ax.plot(wall, loss, color=color, alpha=0.35, linewidth=1)
            if r["val_vs_wall"]:
                _, wall, loss = zip(*r["val_vs_wall"])
                ax.plot(wall, loss, "o-", color=color, markersize=3, label=f"{method} (val)")
        if targets.get(rate) is not None:
            ax.axhline(targets[rate], color="grey", linestyle="--", linewidth=1,
                       label=f"target {targets[rate]:.3f}")
        measured = checks.get(rate, {}).get("achieved_gbit_per_s")
        suffix = f" (all-reduce measured {_format_rate(measured)})" if measured else ""
        ax.set_title(f"{rate}{suffix}", fontsize=10)
        ax.set_xlabel("training wall time (s)")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("loss vs training wall time over an emulated network\n"
                 "(thin: train loss, markers: validation loss)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Entry point; see the module docstring."""
    args = parse_args(argv)
    run_root = ROOT / "runs" / "e2e" / args.out
    config_path = run_root / "config.json"
    jobs = [(rate, method) for rate in args.rates for method in args.methods]
    if args.dry_run:
        for rate in args.rates:
            if args.check_mb:
                print(" ".join(check_command(args, rate)))
            for method in args.methods:
                print(" ".join(train_command(args, rate, method, run_root, config_path)))
        return 0
    if os.geteuid() != 0:
        print("e2e.py: must run as root: it builds network namespaces with "
              "launchers/netem.sh (try: sudo .venv/bin/python benchmarks/e2e.py ...)",
              file=sys.stderr)
        return 1
    run_root.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(args.config, indent=2) + "\n")
    # A prefix of its own: never collides with a netem.sh run started by hand.
    env = {**os.environ, "DISTK_NETEM_PREFIX": "distk-e2e", "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    checks: dict[str, Any] = {}
    runs: dict[str, dict[str, dict[str, Any]]] = {rate: {} for rate in args.rates}
    started = time.perf_counter()
    bar = tqdm(total=len(jobs) + (len(args.rates) if args.check_mb else 0), desc="e2e",
               unit="run")
    for rate in args.rates:
        if args.check_mb:
            bar.set_postfix_str(f"{rate} all-reduce check")
            checks[rate] = run_check(check_command(args, rate), env)
            bar.update()
        for method in args.methods:
            bar.set_postfix_str(f"{rate} {method}")
            cmd = train_command(args, rate, method, run_root, config_path)
            runs[rate][method] = run_training(cmd, run_root / f"{rate}-{method}", env)
            bar.update()
    bar.close()

    targets: dict[str, float | None] = {}
    rows: list[dict[str, Any]] = []
    for rate in args.rates:
        targets[rate], rate_rows = summarise(rate, runs[rate], args)
        rows += rate_rows
    print()
    for rate in args.rates:
        if rate in checks:
            c = checks[rate]
            print(f"{rate}: {c['bytes'] / 1e6:.0f} MB all-reduce over {c['world_size']} ranks "
                  f"took {c['seconds_median']:.3f}s (link model {c['predicted_seconds']}s): "
                  f"{_format_rate(c['achieved_gbit_per_s'])} per rank")
    print_table(rows, [
        ("rate", "rate", "s"), ("method", "method", "s"),
        ("final_val_loss", "final val loss", ".4f"), ("target_loss", "target", ".4f"),
        ("time_to_target_s", "time to target s", ".1f"),
        ("speedup_to_target", "vs dense fp32", ".2f"),
        ("seconds_per_step", "s/step", ".3f"), ("step_speedup", "step vs dense", ".2f"),
        ("comm_s_per_step", "comm s/step", ".3f"),
        ("selection_s_per_step", "select s/step", ".3f"),
        ("mb_sent_per_step", "MB sent/step", ".2f"),
    ])
    bf16 = [r for r in rows if r["method"] == "dense_bf16"]
    fp32 = {r["rate"]: r for r in rows if r["method"] == "dense_fp32"}
    for r in bf16:
        if r["rate"] in fp32 and fp32[r["rate"]]["mb_sent_per_step"]:
            ratio = r["mb_sent_per_step"] / fp32[r["rate"]]["mb_sent_per_step"]
            print(f"{r['rate']}: dense_bf16 sends {ratio:.2f}x the bytes of dense_fp32")

    payload = {
        "args": {k: v for k, v in vars(args).items() if k != "config"},
        "train_config": args.config, "checks": checks, "targets": targets, "rows": rows,
        "runs": runs, "total_seconds": time.perf_counter() - started,
    }
    path = write_results(args.out, payload)
    print(f"wrote {path}")
    if not args.no_plot:
        png = RESULTS / f"{args.out}.png"
        plot(runs, targets, checks, png)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
