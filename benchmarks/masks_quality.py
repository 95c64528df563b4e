"""Gather the shared-mask quality runs of ``benchmarks/adamw_ablation.py`` into one table,
JSON and plot.

The variants (``sgd_mask_*``, ``adamw_mask_*``, ``adamw_t1_*``, ``adamw_d*``, dense) run
the main job (``configs/default.json``, 2 ranks, 300 steps, density 1%) with one setting
changed each; their summaries (``<root>/summary.json``) hold the final validation loss
and the bytes rank 0 sent. This script reads several summaries (later files win for a
variant run twice), prints the table, and writes ``benchmarks/results/<out>.json`` and
``<out>.png`` (final validation loss against the run's bytes, per optimizer).

    python benchmarks/adamw_ablation.py --root runs/masks --only sgd_mask_union,...
    python benchmarks/masks_quality.py runs/masks/summary.json runs/t1/summary.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def gather(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """Variant -> its summary entry (final loss, bytes, command), later files first."""
    rows: dict[str, dict[str, Any]] = {}
    for path in paths:
        for name, entry in json.loads(path.read_text()).items():
            if "final_val_loss" in entry:
                rows[name] = {"variant": name, "final_val_loss": entry["final_val_loss"],
                              "bytes_sent": entry["bytes_sent"],
                              "dense_bytes": entry["dense_bytes"],
                              "bytes_fraction": entry["bytes_sent"] / entry["dense_bytes"],
                              "overrides": entry["overrides"], "summary": str(path)}
    return rows


def optimizer_of(name: str) -> str:
    return "sgd" if name.startswith("sgd") else "adamw"


def plot(rows: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, optimizer in zip(axes, ("sgd", "adamw")):
        mine = [r for r in rows.values() if optimizer_of(r["variant"]) == optimizer]
        for row in mine:
            shared = "mask=shared" in " ".join(row["overrides"])
            ax.scatter(100 * row["bytes_fraction"], row["final_val_loss"],
                       color="C1" if shared else "C0", s=18)
            ax.annotate(row["variant"].replace(f"{optimizer}_", ""),
                        (100 * row["bytes_fraction"], row["final_val_loss"]), fontsize=6,
                        xytext=(3, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("bytes over the run, % of dense fp32's")
        ax.set_ylabel("final validation loss (nats per byte)")
        ax.set_title(f"{optimizer.upper()}: shared masks (orange), local (blue)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summaries", nargs="+", type=Path)
    parser.add_argument("--out", default="masks_quality")
    args = parser.parse_args(argv)
    rows = gather(args.summaries)
    print(f"{'variant':<32} {'val loss':>9} {'MB sent':>9} {'x dense':>8}")
    for name in sorted(rows, key=lambda n: (optimizer_of(n), n)):
        row = rows[name]
        print(f"{name:<32} {row['final_val_loss']:>9.4f} {row['bytes_sent'] / 1e6:>9.2f} "
              f"{row['bytes_fraction']:>8.4f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.out}.json"
    out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    plot(rows, RESULTS / f"{args.out}.png")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
