"""``--compare``: the same training run in every mode, then a table, JSON and a plot.

Modes run one after another inside the same processes, each a full run re-initialised
from the same seed on the same data (model, optimizer, DDP wrapper and distk compressor are
all rebuilt). Outputs in the run directory ``<run_root>/<name>/``:

- ``<mode>/metrics.jsonl``, ``<mode>/result.json`` per mode;
- ``compare.json``: the config and every mode's :class:`~distk.train.loop.RunResult`;
- ``compare.png``: training and validation loss curves of all modes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist

from distk.train import deepspeed_job
from distk.train.config import TrainConfig
from distk.train.data import build_corpus
from distk.train.loop import RunResult, mode_config, train
from distk.train.outer_mode import OUTER_MODE, adamw_outer_notice, runs_adamw_outer

__all__ = ["ALL_MODES", "COMPARE_MODES", "format_table", "plot_curves", "run_compare"]

COMPARE_MODES = ("dense", "exact", "bucketed")
"""Modes of ``--compare`` by default."""

ALL_MODES = (*COMPARE_MODES, OUTER_MODE)
"""Modes ``--compare --modes`` accepts (``outer``: see :mod:`distk.train.outer_mode`)."""


def run_compare(cfg: TrainConfig, *, resume: bool = False,
                modes: tuple[str, ...] = COMPARE_MODES,
                ds_config: str | Path | None = None) -> dict[str, RunResult]:
    """Train ``cfg`` once per mode (every rank calls it); rank 0 prints the table and writes
    ``compare.json`` and ``compare.png`` into ``cfg.run_dir``. With ``resume``, a mode whose
    ``result.json`` says it completed is not re-run, and an interrupted mode continues from
    its checkpoint. With ``ds_config`` every mode trains through DeepSpeed (the JSON's
    ``"distk"`` block with its ``method`` replaced by the mode)."""
    if ds_config is not None and OUTER_MODE in modes:
        raise ValueError(f"mode {OUTER_MODE!r} trains a plain model with local steps; it does "
                         "not run through DeepSpeed (whose engine reduces gradients at every "
                         "step)")
    run_dir = cfg.run_dir
    corpus = build_corpus(cfg)
    results: dict[str, RunResult] = {}
    for mode in modes:
        mode_dir = run_dir / mode
        done = _completed_result(mode_dir, cfg) if resume else None
        if done is not None:
            results[mode] = done
            continue
        if ds_config is not None:
            results[mode] = deepspeed_job.run(cfg, ds_config, resume=resume, method=mode,
                                              run_dir=mode_dir, corpus=corpus,
                                              wandb_group=cfg.name)
        else:
            if mode == OUTER_MODE and runs_adamw_outer(cfg) and dist.get_rank() == 0:
                print(adamw_outer_notice(), flush=True)
            results[mode] = train(mode_config(cfg, mode), mode_dir, resume=resume,
                                  corpus=corpus, wandb_group=cfg.name)
    if dist.get_rank() == 0:
        table = format_table(results)
        print(table, flush=True)
        payload = {"config": cfg.to_dict(), "world_size": dist.get_world_size(),
                   "results": {m: r.to_dict() for m, r in results.items()}}
        (run_dir / "compare.json").write_text(json.dumps(payload, indent=2) + "\n")
        (run_dir / "compare.txt").write_text(table + "\n")
        plot_curves(results, run_dir / "compare.png", title=f"{cfg.name}: loss by mode")
        print(f"[distk-train] wrote {run_dir / 'compare.json'} and {run_dir / 'compare.png'}",
              flush=True)
    dist.barrier()
    return results


def _completed_result(mode_dir: Path, cfg: TrainConfig) -> RunResult | None:
    """The saved result of a mode that finished all ``train.steps``, else None (every rank
    reads the same file, so they agree)."""
    path = mode_dir / "result.json"
    if not path.exists():
        return None
    saved: dict[str, Any] = json.loads(path.read_text())
    if not saved.get("completed") or saved.get("steps") != cfg.train.steps:
        return None
    saved["train_curve"] = [tuple(p) for p in saved["train_curve"]]
    saved["val_curve"] = [tuple(p) for p in saved["val_curve"]]
    return RunResult(**saved)


def format_table(results: dict[str, RunResult]) -> str:
    """Plain-text table of the modes' results."""
    header = (f"{'mode':<9} {'train loss':>10} {'val loss':>9} {'vs dense':>8} {'wall s':>7} "
              f"{'select s':>8} {'comm s':>7} {'MB sent':>8} {'vs dense':>8} {'bits/p/st':>9} "
              f"{'recall':>7} {'g.recall':>8}")
    lines = [header, "-" * len(header)]
    dense = results.get("dense")
    for mode, r in results.items():
        rel_loss = (f"{r.final_val_loss / dense.final_val_loss - 1:+.1%}"
                    if dense is not None else "-")
        rel_bytes = (f"{r.bytes_sent / dense.bytes_sent:.3f}x"
                     if dense is not None and dense.bytes_sent else "-")
        bits = r.bits_per_param_per_step
        bits = f"{bits:.3f}" if bits is not None else "-"
        recall = f"{r.mean_recall:.4f}" if r.mean_recall is not None else "-"
        global_recall = (f"{r.mean_global_recall:.4f}" if r.mean_global_recall is not None
                         else "-")
        lines.append(
            f"{mode:<9} {r.final_train_loss:>10.4f} {r.final_val_loss:>9.4f} {rel_loss:>8} "
            f"{r.wall_seconds:>7.1f} {r.selection_seconds:>8.2f} {r.comm_seconds:>7.2f} "
            f"{r.bytes_sent / 1e6:>8.2f} {rel_bytes:>8} {bits:>9} {recall:>7} {global_recall:>8}"
        )
    return "\n".join(lines)


def plot_curves(results: dict[str, RunResult], path: Path, title: str = "") -> bool:
    """Write a PNG of train (solid) and validation (dashed, markers) loss per mode.

    Returns False (with a message) when matplotlib is missing (``pip install distk[dev]``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[distk-train] matplotlib is not installed; no plot written "
              "(pip install distk[dev])", flush=True)
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for index, (mode, r) in enumerate(results.items()):
        color = f"C{index}"
        if r.train_curve:
            steps, losses = zip(*r.train_curve)
            ax.plot(steps, losses, color=color, label=f"{mode} train")
        if r.val_curve:
            steps, losses = zip(*r.val_curve)
            ax.plot(steps, losses, color=color, linestyle="--", marker="o",
                    label=f"{mode} val ({r.final_val_loss:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
