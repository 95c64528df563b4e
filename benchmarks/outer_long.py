"""Long runs of outer synchronisation against dense training: run the rows, then print
one table and write ``benchmarks/results/<out>.json`` and ``<out>.png``.

Every row trains the main job's model (``configs/default.json``: 4 layers, width 128,
842,496 parameters, 2048 tokens per rank per step) with AdamW (lr 0.003, weight decay
0.1, no dense start) for ``--steps`` inner steps on ``--nproc`` gloo ranks, through
``launchers/torchrun.sh``; only the row's own options differ:

* ``dense``: DDP, an fp32 all-reduce every step (no ``H``);
* ``outer_dense``: dense outer sync every ``H`` steps, no outer momentum;
* ``diloco``: dense outer sync with DiLoCo's outer Nesterov (lr 0.7, momentum 0.9);
* ``recipe``: SparseLoCo's recipe (``SparsityConfig.sparseloco()`` options: top-64 of
  every 64 x 64 tile, 2-bit values, 12-bit offsets, decayed error feedback, senders
  average, median clip, biases and norms through the codec);
* ``recipe_means``: the recipe with per-cell mean levels (``value_levels="means"``);
* ``recipe_sigma``: the recipe with the field's statistical quantizer (four signed cells
  over 6 standard deviations, cell means, one table per tensor: ``value_levels="sigma"``);
* ``recipe_fp32_small``: the recipe with the small tensors sent dense in fp32;
* ``recipe_low``: the recipe at a quarter of its density (top-16 of every 64 x 64 tile);
* ``per_step``: no outer sync: distk's per-step exchange (``--mode bucketed``) with the
  AdamW default of ``configs/default.json`` (75 dense steps, then a 200-step density
  warm-up to 1%; no ``H``).

A row runs once per ``H`` (``--sync-every``) and seed; a run whose ``result.json``
already exists under ``--run-root`` is read, not rerun (``--collect`` only reads; a
result carried over from an earlier revision's file names it in ``source``).
``--carry FILE...`` reads the rows of earlier results files (``results/<out>.json``)
for the runs whose directory is not under ``--run-root``, so a fresh checkout adds rows
to a table without rerunning the ones it has; each keeps ``source`` = the file. The
table compares each row's final validation loss with the dense row of the same seed and
the ``diloco`` / ``outer_dense`` rows of the same ``H`` and seed, and gives bits per
parameter per sync (bytes rank 0 sent x 8 / syncs / parameters; and of it the entries'
payload alone, without the per-exchange trailers, verification and clip norms) and per
step. The plot:
validation loss against tokens seen by all ranks (one panel per ``H``) and final
validation loss against bits per parameter per step.

    python benchmarks/outer_long.py --rows dense recipe diloco --sync-every 30 100 \\
        --seeds 0 1 --out outer_long3000
    python benchmarks/outer_long.py --collect --rows dense recipe --sync-every 30

Seconds are wall time on whatever machine ran them (rough when cores are shared);
losses and bytes do not depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

COMMON = ["--config", "configs/default.json", "--set", "train.optimizer=adamw",
          "--set", "train.lr=0.003", "--set", "train.weight_decay=0.1",
          "--set", "train.adamw_dense_steps=0", "--set", "train.adamw_warmup_steps=0",
          "--set", "logging.progress=false"]
"""Options every row shares (``--steps`` and ``train.eval_every`` are added)."""

RECIPE = {"warmup_steps": 0, "density": 0.015625, "value_bits": 2, "error_decay": 0.95,
          "bucket_layout": "tile", "outer_average": "senders", "mask": "local",
          "outer_clip": "median", "small_tensors": "codec"}
"""SparseLoCo's recipe as ``sparsity`` options (what ``SparsityConfig.sparseloco()``
sets besides ``sync_every``)."""

ROWS: dict[str, dict[str, Any] | None] = {
    "dense": None,
    "outer_dense": {"method": "dense"},
    "diloco": {"method": "dense", "outer_lr": 0.7, "outer_momentum": 0.9},
    "recipe": RECIPE,
    "recipe_means": {**RECIPE, "value_levels": "means"},
    "recipe_sigma": {**RECIPE, "value_levels": "sigma"},
    "recipe_fp32_small": {**RECIPE, "small_tensors": "dense"},
    "recipe_low": {**RECIPE, "density": 16 / 4096},
    "per_step": None,
}
"""Row -> its ``sparsity`` options with outer sync (``None``: a row without ``H``, whose
options are in :data:`WITHOUT_H`)."""

WITHOUT_H: dict[str, list[str]] = {
    "dense": ["--mode", "dense"],
    "per_step": ["--mode", "bucketed", "--set", "train.adamw_dense_steps=75",
                 "--set", "train.adamw_warmup_steps=200"],
}
"""The options of the rows without ``H``, after :data:`COMMON` (whose ``--set`` they
override)."""


def run_name(row: str, sync_every: int | None, seed: int, steps: int) -> str:
    h = "" if sync_every is None else f"_h{sync_every}"
    return f"outer{steps}_{row}{h}_s{seed}"


def command(row: str, sync_every: int | None, seed: int, steps: int, eval_every: int,
            nproc: int, run_root: str) -> list[str]:
    cmd = ["launchers/torchrun.sh", *COMMON, "--steps", str(steps),
           "--set", f"train.eval_every={eval_every}", "--set", f"seed={seed}",
           "--set", f"run_root={run_root}",
           "--name", run_name(row, sync_every, seed, steps)]
    options = ROWS[row]
    if options is None:
        return [*cmd, *WITHOUT_H[row]]
    cmd += ["--set", f"sparsity.sync_every={sync_every}"]
    for key, value in options.items():
        cmd += ["--set", f"sparsity.{key}={value}"]
    return cmd


def runs(args: argparse.Namespace) -> list[tuple[str, int | None, int]]:
    """(row, H, seed) of every run asked for; dense rows once per seed."""
    out = []
    for seed in args.seeds:
        for row in args.rows:
            for h in ([None] if ROWS[row] is None else args.sync_every):
                out.append((row, h, seed))
    return out


def result_path(run_root: str, name: str) -> Path:
    return ROOT / run_root / name / "result.json"


def load(run_root: str, row: str, h: int | None, seed: int, steps: int,
         tokens_per_step: int) -> dict[str, Any] | None:
    path = result_path(run_root, run_name(row, h, seed, steps))
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    if not result.get("completed"):
        return None
    syncs = steps // h if h else steps
    bits = 8 * result["bytes_sent"] / result["params"]
    payload = None  # the entries alone: no trailers, checks or clip norms
    metrics = path.parent / "metrics.jsonl"
    if metrics.exists():
        last = json.loads(metrics.read_text().strip().splitlines()[-1])
        if "distk/total_payload_bytes" in last:
            payload = 8 * last["distk/total_payload_bytes"] / result["params"] / syncs
    return {"row": row, "sync_every": h, "seed": seed, "run": path.parent.name,
            "final_val_loss": result["final_val_loss"],
            "final_train_loss": result["final_train_loss"],
            "val_curve": result["val_curve"], "bytes_sent": result["bytes_sent"],
            "params": result["params"], "wall_seconds": result["wall_seconds"],
            "bits_per_param_per_sync": bits / syncs, "bits_per_param_per_step": bits / steps,
            "payload_bits_per_param_per_sync": payload,
            "tokens_per_step": tokens_per_step,
            "source": result.get("source", "this run")}


def carried(paths: list[str], steps: int, nproc: int) -> dict[tuple, dict[str, Any]]:
    """(row, H, seed) -> the row recorded in an earlier results file of the same steps and
    ranks, with ``source`` naming the file (its own ``source`` if it was carried there)."""
    out: dict[tuple, dict[str, Any]] = {}
    for name in paths:
        path = Path(name)
        data = json.loads(path.read_text())
        if (data.get("steps"), data.get("nproc")) != (steps, nproc):
            sys.exit(f"--carry {name}: steps={data.get('steps')} nproc={data.get('nproc')}, "
                     f"allowed only files of --steps {steps} --nproc {nproc}")
        for row in data["rows"]:
            source = row.get("source", "this run")
            row = {**row, "source": path.name if source == "this run" else source}
            out.setdefault((row["row"], row["sync_every"], row["seed"]), row)
    return out


def compare(rows: list[dict[str, Any]]) -> None:
    """Add the relative gaps to the same seed's dense row and the same (H, seed) dense
    outer rows."""
    def find(row: str, h: int | None, seed: int) -> dict[str, Any] | None:
        return next((r for r in rows if (r["row"], r["sync_every"], r["seed"]) == (row, h, seed)),
                    None)

    for r in rows:
        for other, h, key in (("dense", None, "vs_dense"),
                              ("diloco", r["sync_every"], "vs_diloco"),
                              ("outer_dense", r["sync_every"], "vs_outer_dense")):
            ref = find(other, h, r["seed"])
            r[key] = (None if ref is None or ref is r
                      else r["final_val_loss"] / ref["final_val_loss"] - 1)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hs = sorted({r["sync_every"] for r in rows if r["sync_every"] is not None}) or [None]
    fig, axes = plt.subplots(1, len(hs) + 1, figsize=(5.2 * (len(hs) + 1), 4.4))
    colors = {row: f"C{i}" for i, row in enumerate(ROWS)}
    for ax, h in zip(axes, hs, strict=False):
        for r in rows:
            if r["sync_every"] not in (h, None):
                continue
            steps, losses = zip(*r["val_curve"], strict=True)
            tokens = [s * r["tokens_per_step"] / 1e6 for s in steps]
            ax.plot(tokens, losses, color=colors[r["row"]], marker="o", ms=3,
                    ls="-" if r["seed"] == 0 else "--",
                    label=f"{r['row']} s{r['seed']}")
        ax.set_title(f"H = {h}" if h else "dense")
        ax.set_xlabel("tokens seen by all ranks (M)")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    ax = axes[-1]
    for r in rows:
        ax.scatter(r["bits_per_param_per_step"], r["final_val_loss"], color=colors[r["row"]],
                   s=20, marker="o" if r["seed"] == 0 else "^")
        label = r["row"] + (f" H{r['sync_every']}" if r["sync_every"] else "")
        ax.annotate(f"{label} s{r['seed']}", (r["bits_per_param_per_step"], r["final_val_loss"]),
                    fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("bits per parameter per step (rank 0 sent)")
    ax.set_ylabel("final validation loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", default=["dense", "diloco", "recipe"],
                        choices=list(ROWS))
    parser.add_argument("--sync-every", nargs="+", type=int, default=[30])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--eval-every", type=int, default=600)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--run-root", default="runs/outer_long")
    parser.add_argument("--collect", action="store_true", help="read finished runs only")
    parser.add_argument("--out", default="outer_long")
    parser.add_argument("--carry", nargs="+", default=[], metavar="FILE",
                        help="earlier results JSON whose rows stand in for runs not under "
                             "--run-root (same --steps and --nproc)")
    args = parser.parse_args(argv)
    for h in args.sync_every:
        if h < 2 or args.steps % h or args.eval_every % h:
            parser.error(f"--sync-every {h}: must be >= 2 and divide --steps {args.steps} "
                         f"and --eval-every {args.eval_every}")
    job = json.loads((ROOT / "configs" / "default.json").read_text())  # COMMON's config
    tokens_per_step = job["train"]["batch_size"] * job["model"]["context"] * args.nproc
    wanted = runs(args)
    earlier = carried(args.carry, args.steps, args.nproc)

    def result(row: str, h: int | None, seed: int) -> dict[str, Any] | None:
        return (load(args.run_root, row, h, seed, args.steps, tokens_per_step)
                or earlier.get((row, h, seed)))

    for i, (row, h, seed) in enumerate(wanted):
        if args.collect or result(row, h, seed):
            continue
        cmd = command(row, h, seed, args.steps, args.eval_every, args.nproc, args.run_root)
        print(f"[outer_long] run {i + 1}/{len(wanted)}: {' '.join(cmd)}", flush=True)
        env = {**os.environ, "NPROC": str(args.nproc), "PYTHONPATH": str(ROOT)}
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    rows = [r for r in (result(*w) for w in wanted) if r is not None]
    missing = len(wanted) - len(rows)
    if not rows:
        sys.exit(f"no finished runs under {args.run_root} for these rows")
    compare(rows)
    print_table(rows, [("row", "row", "s"), ("sync_every", "H", ""), ("seed", "seed", "d"),
                       ("final_val_loss", "val loss", ".4f"), ("vs_dense", "vs dense", "+.2%"),
                       ("vs_diloco", "vs DiLoCo", "+.2%"),
                       ("vs_outer_dense", "vs outer dense", "+.2%"),
                       ("bits_per_param_per_sync", "bits/param/sync", ".4g"),
                       ("payload_bits_per_param_per_sync", "of it payload", ".4g"),
                       ("bits_per_param_per_step", "bits/param/step", ".4g"),
                       ("wall_seconds", "s", ".0f")])
    if missing:
        print(f"({missing} of {len(wanted)} runs not run or not finished)")
    commands = {run_name(r["row"], r["sync_every"], r["seed"], args.steps):
                " ".join(command(r["row"], r["sync_every"], r["seed"], args.steps,
                                 args.eval_every, args.nproc, args.run_root))
                for r in rows}  # the runs in the table only
    path = write_results(args.out, {"steps": args.steps, "nproc": args.nproc,
                                    "tokens_per_step": tokens_per_step, "rows": rows,
                                    "commands": commands})
    plot(rows, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
