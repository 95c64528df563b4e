"""Activation top-k benchmark: ``distk.nn.TopK`` forward+backward, exact vs bucketed.

Shapes typical of sparse autoencoders' latents: ``rows`` tokens x ``n`` latents (default
4096 x 32768), k in {32, 64, 128, 256}, selection by value (as TopK SAEs do). For each
case it measures the median time (after warm-up) of the layer's forward and of
forward+backward with ``method="exact"`` (``torch.topk``) and ``method="bucketed"``
(bucket parameters from ``distk.choose_buckets`` for ``--recall-target``), the recall of
the bucketed selection against the exact top-k (measured, and the model's expectation),
and an element-wise floor (``relu`` forward+backward on the same tensor: what merely
reading and writing the activations costs).

Target on a CPU: bucketed at least 5x faster than exact at recall >= 0.95.

    python benchmarks/activations.py            # full sweep (minutes; run on a quiet machine)
    python benchmarks/activations.py --quick    # 256 x 4096, k in {32, 128}: seconds

Prints a Markdown table, writes ``benchmarks/results/activations.json`` and ``.png``
(``activations_quick.*`` with ``--quick`` unless ``--name`` is given).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, median_seconds, print_table, write_results  # noqa: E402

import distk  # noqa: E402
from distk.nn.functional import topk_activation  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SPEEDUP_TARGET = 5.0
RECALL_TARGET = 0.95


def measured_recall(x: torch.Tensor, k: int, buckets: int, k_per_bucket: int) -> float:
    """Fraction of the exact top-k (by value) of each row that the bucketed one returns."""
    exact = torch.topk(x, k, dim=-1).indices
    _, approx = distk.topk(x, k, by_magnitude=False, buckets=buckets,
                           k_per_bucket=k_per_bucket)
    hit = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, approx, True)
    return hit.gather(-1, exact).float().mean().item()


def run_case(rows: int, n: int, k: int, dtype: torch.dtype, device: str,
             recall_target: float, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, n, generator=gen).to(dtype).to(device)
    grad_out = torch.randn(rows, n, generator=gen).to(dtype).to(device)
    buckets, k_per_bucket = distk.choose_buckets(n, k, recall_target)
    row = {"rows": rows, "n": n, "k": k, "dtype": str(dtype).replace("torch.", ""),
           "device": device, "buckets": buckets, "k_per_bucket": k_per_bucket,
           "expected_recall": distk.expected_recall(n, k, buckets, k_per_bucket),
           "recall": measured_recall(x, k, buckets, k_per_bucket)}
    leaf = x.clone().requires_grad_(True)

    def forward_backward(fn):
        def call():
            leaf.grad = None
            fn(leaf).backward(grad_out)
        return call

    select = {"exact": {"method": "exact"},
              "bucketed": {"method": "bucketed", "buckets": buckets,
                           "k_per_bucket": k_per_bucket}}
    for name, kwargs in select.items():
        layer = lambda t, kw=kwargs: topk_activation(t, k=k, **kw)  # noqa: E731
        with torch.no_grad():
            row[f"{name}_fwd_s"] = median_seconds(lambda f=layer: f(x), repeats)
        row[f"{name}_s"] = median_seconds(forward_backward(layer), repeats)
    row["floor_s"] = median_seconds(forward_backward(torch.relu), repeats)
    row["speedup"] = row["exact_s"] / row["bucketed_s"]
    row["speedup_fwd"] = row["exact_fwd_s"] / row["bucketed_fwd_s"]
    row["target_met"] = row["speedup"] >= SPEEDUP_TARGET and row["recall"] >= RECALL_TARGET
    for key in ("exact_s", "bucketed_s", "exact_fwd_s", "bucketed_fwd_s", "floor_s"):
        row[key.replace("_s", "_ms")] = row[key] * 1e3
    return row


def _k_axis(ax, ks: list[int]) -> None:
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.xaxis.set_minor_locator(NullLocator())


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["dtype"], r["rows"], r["n"]) for r in rows})
    fig, axes = plt.subplots(2, len(groups), figsize=(5 * len(groups), 7), squeeze=False)
    for col, (dtype, n_rows, n) in enumerate(groups):
        sel = sorted((r for r in rows if (r["dtype"], r["rows"], r["n"]) == (dtype, n_rows, n)),
                     key=lambda r: r["k"])
        ks = [r["k"] for r in sel]
        ax = axes[0][col]
        for key, label in [("exact_ms", "exact (torch.topk) fwd+bwd"),
                           ("bucketed_ms", "bucketed fwd+bwd"),
                           ("floor_ms", "relu fwd+bwd (floor)")]:
            ax.plot(ks, [r[key] for r in sel], marker="o", label=label)
        ax.set(yscale="log", xlabel="k", ylabel="ms", title=f"TopK {n_rows} x {n}, {dtype}")
        _k_axis(ax, ks)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        ax = axes[1][col]
        ax.plot(ks, [r["speedup"] for r in sel], marker="o", color="C1",
                label="speedup (exact / bucketed)")
        ax.axhline(SPEEDUP_TARGET, color="C1", linestyle=":", label=f"{SPEEDUP_TARGET:.0f}x target")
        ax.set(xlabel="k", ylabel="speedup")
        _k_axis(ax, ks)
        twin = ax.twinx()
        twin.plot(ks, [r["recall"] for r in sel], marker="s", color="C2", label="recall")
        twin.axhline(RECALL_TARGET, color="C2", linestyle=":")
        twin.set(ylabel="measured recall", ylim=(min(0.8, *[r["recall"] for r in sel]), 1.0))
        lines = ax.get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096, help="tokens per batch")
    parser.add_argument("--n", type=int, default=32768, help="latents per token")
    parser.add_argument("--k", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    parser.add_argument("--recall-target", type=float, default=RECALL_TARGET,
                        help="recall target of the bucket parameters (default 0.95)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per method")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads (0 = torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true",
                        help="256 x 4096, k in {32, 128}, 3 repeats")
    parser.add_argument("--name", default=None,
                        help="result file stem (default: activations[_quick])")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.n, args.k, args.repeats = 256, 4096, [32, 128], 3
    name = args.name or ("activations_quick" if args.quick else "activations")
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [(k, d) for d in args.dtypes for k in args.k]
    rows = [run_case(args.rows, args.n, k, DTYPES[d], args.device, args.recall_target,
                     args.repeats)
            for k, d in tqdm(cases, desc="TopK sweep", unit="case")]
    table = print_table(rows, [
        ("dtype", "dtype", "s"), ("rows", "rows", "d"), ("n", "n", "d"), ("k", "k", "d"),
        ("buckets", "b", "d"), ("k_per_bucket", "k_b", "d"),
        ("exact_fwd_ms", "exact fwd ms", ".2f"), ("bucketed_fwd_ms", "bucketed fwd ms", ".2f"),
        ("exact_ms", "exact fwd+bwd ms", ".2f"), ("bucketed_ms", "bucketed fwd+bwd ms", ".2f"),
        ("floor_ms", "relu fwd+bwd ms", ".2f"), ("speedup", "speedup", ".2f"),
        ("recall", "recall", ".4f"), ("expected_recall", "model", ".4f"),
    ])
    met = sum(r["target_met"] for r in rows)
    print(f"target (bucketed >= {SPEEDUP_TARGET:.0f}x faster than exact at recall >= "
          f"{RECALL_TARGET}): met in {met}/{len(rows)} cases")
    path = write_results(name, {"args": {k: str(v) for k, v in vars(args).items()},
                                "rows": rows, "table": table,
                                "target": {"speedup": SPEEDUP_TARGET, "recall": RECALL_TARGET}},
                         args.out)
    plot(rows, args.out / f"{name}.png")
    print(f"wrote {path} and {args.out / (name + '.png')}")


if __name__ == "__main__":
    main()
