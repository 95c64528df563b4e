"""Selection benchmark: exact top-k vs bucketed top-k (reference, CPU kernel, Triton).

For n in {2^20, 2^22, 2^24, 2^26}, k in {n/100, n/1000}, fp32 and bf16, it measures
the median time (after warm-up) and the recall against the exact top-k of:
``torch.topk(x.abs(), k)``, the plain-PyTorch reference, the CPU kernel (CPU tensors),
the Triton kernel (CUDA tensors, when a GPU is present), next to a one-read floor
(``x.sum()``). Bucket parameters come from ``distk.choose_buckets`` for
``--recall-target`` (default 0.95).

    python benchmarks/topk.py            # full sweep (a few minutes on 2 cores)
    python benchmarks/topk.py --quick    # small sizes, seconds

Prints a Markdown table, writes ``benchmarks/results/topk.json`` and ``topk.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, median_seconds, print_table, write_results  # noqa: E402

import distk  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def recall_of(indices: torch.Tensor, exact: torch.Tensor) -> float:
    return torch.isin(indices.flatten(), exact.flatten()).float().mean().item()


def run_case(n: int, k: int, dtype: torch.dtype, device: str, recall_target: float,
             repeats: int, with_reference: bool) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, generator=gen).to(dtype).to(device)
    buckets, k_per_bucket = distk.choose_buckets(n, k, recall_target)
    exact = torch.topk(x.abs(), k).indices
    row = {"n": n, "k": k, "dtype": str(dtype).replace("torch.", ""), "device": device,
           "buckets": buckets, "k_per_bucket": k_per_bucket,
           "expected_recall": distk.expected_recall(n, k, buckets, k_per_bucket),
           "bytes": x.numel() * x.element_size()}
    row["floor_s"] = median_seconds(lambda: x.sum(), repeats)
    row["exact_s"] = median_seconds(lambda: torch.topk(x.abs(), k), max(3, repeats // 3))

    def bucketed(backend: str):
        os.environ["DISTK_TOPK_BACKEND"] = backend
        return lambda: distk.topk(x, k, buckets=buckets, k_per_bucket=k_per_bucket)

    fast = "triton" if device == "cuda" else "cpu"
    row[f"{fast}_s"] = median_seconds(bucketed(fast), repeats)
    row["recall"] = recall_of(bucketed(fast)()[1], exact)
    if with_reference:
        row["reference_s"] = median_seconds(bucketed("reference"), max(3, repeats // 3))
        assert torch.equal(bucketed("reference")()[1], bucketed(fast)()[1])
    os.environ["DISTK_TOPK_BACKEND"] = "auto"
    row["speedup_vs_exact"] = row["exact_s"] / row[f"{fast}_s"]
    row["x_floor"] = row[f"{fast}_s"] / row["floor_s"]
    row["fast_GBps"] = row["bytes"] / row[f"{fast}_s"] / 1e9
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["dtype"], r["n"] // r["k"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (dtype, ratio) in zip(axes[0], panels):
        sel = sorted((r for r in rows if r["dtype"] == dtype and r["n"] // r["k"] == ratio),
                     key=lambda r: r["n"])
        ns = [r["n"] for r in sel]
        for key, label in [("exact_s", "torch.topk(|x|)"), ("reference_s", "reference"),
                           ("cpu_s", "distk CPU kernel"), ("triton_s", "distk Triton"),
                           ("floor_s", "one read (x.sum())")]:
            if all(key in r for r in sel):
                ax.plot(ns, [r[key] * 1e3 for r in sel], marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="n", ylabel="ms",
               title=f"{dtype}, k = n/{ratio}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log2n", type=int, nargs="+", default=[20, 22, 24, 26],
                        help="sizes as powers of two (default: 20 22 24 26)")
    parser.add_argument("--k-fractions", type=int, nargs="+", default=[100, 1000],
                        help="k = n / F for each F (default: 100 1000)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--recall-target", type=float, default=0.95)
    parser.add_argument("--repeats", type=int, default=11, help="timed calls per method")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the (slow) plain-PyTorch reference")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="n = 2^16, 2^18; 3 repeats")
    parser.add_argument("--name", default="topk", help="result file stem")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.log2n, args.repeats = [16, 18], 3
    cases = [(1 << p, f, d) for d in args.dtypes for f in args.k_fractions for p in args.log2n]
    rows = []
    for n, fraction, dtype in tqdm(cases, desc="topk sweep", unit="case"):
        rows.append(run_case(n, max(1, n // fraction), DTYPES[dtype], args.device,
                             args.recall_target, args.repeats, not args.no_reference))
    fast = "triton_s" if args.device == "cuda" else "cpu_s"
    for row in rows:
        for key in ("floor_s", "exact_s", "reference_s", fast):
            if key in row:
                row[key.replace("_s", "_ms")] = row[key] * 1e3
    table = print_table(rows, [
        ("dtype", "dtype", "s"), ("n", "n", "d"), ("k", "k", "d"), ("buckets", "b", "d"),
        ("k_per_bucket", "k_b", "d"), ("floor_ms", "x.sum() ms", ".2f"),
        ("exact_ms", "torch.topk ms", ".1f"), ("reference_ms", "reference ms", ".1f"),
        (fast.replace("_s", "_ms"), f"distk {fast[:-2]} ms", ".2f"),
        ("speedup_vs_exact", "vs topk", ".1f"), ("x_floor", "x floor", ".2f"),
        ("fast_GBps", "GB/s", ".1f"), ("recall", "recall", ".4f"),
        ("expected_recall", "model", ".4f"),
    ])
    path = write_results(args.name, {"args": {k: str(v) for k, v in vars(args).items()},
                                     "rows": rows, "table": table}, args.out)
    plot(rows, args.out / f"{args.name}.png")
    print(f"wrote {path} and {args.out / (args.name + '.png')}")


if __name__ == "__main__":
    main()
