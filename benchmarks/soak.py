"""Soak benchmark: does memory stay flat over a long sparse-training run?

Runs ``--ranks`` gloo processes (default 4) of a DDP + ``distk.ddp.enable`` training
loop for ``--steps`` steps (default 1000) on an MLP, checkpointing distk's state every
``--checkpoint-every`` steps (``state_dict()`` serialised in memory, so that path is
soaked too). Every rank samples its resident set size (RSS, ``/proc/self/statm``) and its
peak RSS (``getrusage``) every ``--sample-every`` steps.

"start" is measured once the first ``--warmup`` steps are done (residuals, selection
plans, DDP buckets and optimizer state all exist by then); "end" after the last step.
Growth between them would mean residuals, caches or statistics accumulating per step.

    .venv/bin/python benchmarks/soak.py --quick        # 4 ranks, 100 steps, small model
    .venv/bin/python benchmarks/soak.py                # 4 ranks, 1000 steps
    .venv/bin/python benchmarks/soak.py --method exact --density 0.001 --steps 5000

Prints a table (per rank: RSS and peak RSS at start and end, growth), writes
``benchmarks/results/<out>.json`` and ``<out>.png`` (RSS over steps, one line per rank).
Not a test: the default run takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import resource
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, print_table, write_results  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 2**20


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_model(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(64, width), nn.Tanh()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def worker(rank: int, args: argparse.Namespace, port: int) -> None:
    """One rank: train, sample memory, gather the samples on rank 0 and report there."""
    import distk

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks,
                            timeout=datetime.timedelta(seconds=args.timeout))
    torch.manual_seed(0)
    model = build_model(args.width, args.depth)
    ddp = nn.parallel.DistributedDataParallel(model)
    cfg = distk.SparsityConfig(density=args.density, method=args.method, min_numel=256,
                               recall_interval=args.recall_interval)
    state = distk.ddp.enable(ddp, cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    teacher = torch.randn(64, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(100 + rank)

    samples: list[tuple[int, int, int]] = []  # (step, rss, peak rss)
    peak = 0
    progress = None
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=args.steps, desc=f"soak {args.ranks} ranks", unit="step")
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        x = torch.randn(args.batch, 64, generator=gen)
        y = torch.tanh(x @ teacher).unsqueeze(1)
        loss = nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            buffer = io.BytesIO()
            torch.save(state.state_dict(), buffer)
            del buffer
        if step % args.sample_every == 0 or step in (args.warmup, args.steps):
            rss = rss_bytes()
            # The kernel updates its high-water mark lazily: keep our own running maximum.
            peak = max(peak, rss, peak_rss_bytes())
            samples.append((step, rss, peak))
        if progress is not None:
            progress.update()
    seconds = time.perf_counter() - started
    if progress is not None:
        progress.close()

    gathered: list[Any] = [None] * args.ranks
    dist.all_gather_object(gathered, {"samples": samples, "seconds": seconds,
                                      "final_loss": loss.item(), "stats": state.stats.to_dict()})
    if rank == 0:
        report(args, gathered)
    dist.barrier()
    dist.destroy_process_group()


def _at(samples: list[tuple[int, int, int]], step: int) -> tuple[int, int, int]:
    return next(s for s in samples if s[0] == step)


def report(args: argparse.Namespace, per_rank: list[dict[str, Any]]) -> None:
    rows = []
    for rank, result in enumerate(per_rank):
        _, rss_start, peak_start = _at(result["samples"], args.warmup)
        _, rss_end, peak_end = _at(result["samples"], args.steps)
        rows.append({
            "rank": rank, "rss_start_mb": rss_start / MB, "rss_end_mb": rss_end / MB,
            "peak_start_mb": peak_start / MB, "peak_end_mb": peak_end / MB,
            "peak_growth_mb": (peak_end - peak_start) / MB,
            "rss_growth_mb": (rss_end - rss_start) / MB,
            "steps_per_second": args.steps / result["seconds"],
        })
    params = sum(p.numel() for p in build_model(args.width, args.depth).parameters())
    print(f"\nsoak: {args.ranks} ranks x {args.steps} steps, {params:,} parameters, "
          f"method={args.method}, density={args.density}; start = after step {args.warmup}")
    text = print_table(rows, [
        ("rank", "rank", "d"), ("rss_start_mb", "RSS start MB", ".1f"),
        ("rss_end_mb", "RSS end MB", ".1f"), ("peak_start_mb", "peak start MB", ".1f"),
        ("peak_end_mb", "peak end MB", ".1f"), ("peak_growth_mb", "peak growth MB", "+.2f"),
        ("rss_growth_mb", "RSS growth MB", "+.2f"), ("steps_per_second", "steps/s", ".1f"),
    ])
    worst = max(row["peak_growth_mb"] for row in rows)
    print(f"largest peak-RSS growth after warm-up: {worst:+.2f} MB "
          f"(final loss rank 0: {per_rank[0]['final_loss']:.4f})")
    payload = {
        "config": vars(args), "parameters": params, "rows": rows, "table": text,
        "samples": [[list(s) for s in result["samples"]] for result in per_rank],
        "final_stats": per_rank[0]["stats"],
    }
    path = write_results(args.out, payload)
    plot(args, per_rank, RESULTS / f"{args.out}.png")
    print(f"wrote {path} and {RESULTS / (args.out + '.png')}")


def plot(args: argparse.Namespace, per_rank: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for rank, result in enumerate(per_rank):
        steps = [s[0] for s in result["samples"]]
        line, = ax.plot(steps, [s[1] / MB for s in result["samples"]], label=f"rank {rank} RSS")
        ax.plot(steps, [s[2] / MB for s in result["samples"]], linestyle="--",
                color=line.get_color(), alpha=0.6, label=f"rank {rank} peak")
    ax.axvline(args.warmup, color="grey", linestyle=":", label="start (end of warm-up)")
    ax.set_xlabel("step")
    ax.set_ylabel("MiB")
    ax.set_title(f"distk soak: {args.ranks} ranks, {args.method}, density {args.density}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4, help="gloo processes (default 4)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps (default 1000)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="steps before the 'start' sample (default: the largest of 10%% "
                             "of --steps, --checkpoint-every and --recall-interval + 1, so "
                             "that every code path has run once; at most half the steps)")
    parser.add_argument("--sample-every", type=int, default=10, help="steps between samples")
    parser.add_argument("--checkpoint-every", type=int, default=100,
                        help="serialise distk's state_dict every N steps; 0 = never")
    parser.add_argument("--recall-interval", type=int, default=50,
                        help="SparsityConfig.recall_interval (exact top-k every N steps)")
    parser.add_argument("--method", choices=("bucketed", "exact", "dense"), default="bucketed")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--width", type=int, default=1024, help="hidden width of the MLP")
    parser.add_argument("--depth", type=int, default=3, help="hidden layers of the MLP")
    parser.add_argument("--batch", type=int, default=32, help="batch per rank")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="collective timeout of the process group, seconds")
    parser.add_argument("--quick", action="store_true",
                        help="4 ranks, 100 steps, width 256, checkpoint and recall every "
                             "20 steps: a smoke run of a few seconds")
    parser.add_argument("--out", default=None, help="result name (default soak / soak_quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.width, args.sample_every = 100, 256, 5
        args.checkpoint_every = args.recall_interval = 20
    if args.warmup is None:
        args.warmup = min(max(args.steps // 10, args.checkpoint_every,
                              args.recall_interval + 1), max(1, args.steps // 2))
    if not 1 <= args.warmup <= args.steps:
        parser.error(f"--warmup must be in [1, --steps={args.steps}], got {args.warmup}")
    args.out = args.out or ("soak_quick" if args.quick else "soak")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(worker, args=(args, port), nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
