"""How much of distk's exchange overlaps DDP's backward pass.

Per step, on the same model and the same DDP buckets, rank 0 reports the median of:

* ``a``: forward + backward with no communication (``ddp.no_sync()``);
* ``b``: the exchange alone: every bucket of one step through a ``GradientCompressor``
  (same config, same bucket sizes and keys), launched back to back, then finished, as
  DDP would with no computation left to hide it;
* ``c_async``: forward + backward with distk's hook (futures chained on the exchange);
* ``c_sync``: the same hook made synchronous (the future is waited for inside the hook,
  as before the seam was made asynchronous): the "before" figure in the same run.

and the overlap fraction ``(a + b - c) / min(a, b)`` for both hooks: 0 when nothing
overlaps, 1 when the shorter of compute and communication is fully hidden. The target is
0.5 or more with 4 or more buckets.

Run it on the emulated network (root; see docs/netem.md), picking a rate at which ``b``
is about ``a`` and each bucket's payload is well above the tbf burst (128 KB at low
rates; the script prints the payload per bucket)::

    DISTK_NETEM_PREFIX=ovl launchers/netem.sh run 2 50mbit -- \\
        .venv/bin/python benchmarks/overlap.py --tag 2r_50mbit
    DISTK_NETEM_PREFIX=ovl launchers/netem.sh run 4 50mbit -- \\
        .venv/bin/python benchmarks/overlap.py --tag 4r_50mbit

Started without ``RANK`` in the environment it spawns ``--world`` ranks on loopback (a
smoke test: loopback is too fast for any overlap to matter). Writes
``benchmarks/results/overlap_<tag>.json`` and ``.png`` and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, print_table, write_results  # noqa: E402
from distk import GradientCompressor, SparsityConfig  # noqa: E402
from distk.integrations.ddp import DDPCompressionState, sparse_allreduce_hook  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="Linear layers (one bucket each)")
    parser.add_argument("--width", type=int, default=1024, help="layer width")
    parser.add_argument("--batch", type=int, default=256, help="rows per rank and step")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--method", default="bucketed", choices=("bucketed", "exact", "dense"))
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--world", type=int, default=2, help="ranks when spawning locally")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per rank")
    parser.add_argument("--tag", default="local", help="results name: overlap_<tag>")
    parser.add_argument("--no-plot", action="store_true")
    return parser.parse_args(argv)


def _model(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(args.layers):
        layers += [nn.Linear(args.width, args.width, bias=False), nn.Tanh()]
    return nn.Sequential(*layers)


def _bucket_cap_mb(args: argparse.Namespace) -> float:
    # One layer's weight per bucket: DDP closes a bucket once it exceeds the cap.
    return args.width * args.width * 4 / 2**20 * 0.9


def _sparsity(args: argparse.Namespace) -> SparsityConfig:
    # No stats steps inside the timed window: steady-state (unverified) exchanges only.
    return SparsityConfig(density=args.density, method=args.method, min_numel=1,
                          stats_interval=10**6, recall_interval=0)


def _time(step_fn, args: argparse.Namespace) -> list[float]:
    times = []
    for index in range(args.warmup + args.steps):
        dist.barrier()
        started = _STEP_STARTED[0] = time.perf_counter()
        _TRACE.clear()
        step_fn(index)
        elapsed = time.perf_counter() - started
        if index >= args.warmup:
            times.append(elapsed)
    return times


def _batch(args: argparse.Namespace, rank: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(args.batch, args.width, generator=gen)


# (bucket, seconds since the step started) when the async hook returned and when its
# future completed: shows whether buckets travel while backward computes the next ones.
_TRACE: list[tuple[str, int, float]] = []
_STEP_STARTED = [0.0]


def _traced_hook(state, bucket):  # unannotated: DDP checks real annotation objects
    """distk's hook, recording when it returned and when its future completed."""
    index = bucket.index()
    future = sparse_allreduce_hook(state, bucket)
    _TRACE.append(("launched", index, time.perf_counter() - _STEP_STARTED[0]))

    def completed(fut):
        _TRACE.append(("completed", index, time.perf_counter() - _STEP_STARTED[0]))
        return fut.value()

    return future.then(completed)


def _synchronous_hook(state, bucket):  # unannotated: DDP checks real annotation objects
    """distk's hook, waited for before returning: no overlap (the "before" behaviour)."""
    future = sparse_allreduce_hook(state, bucket)
    done = torch.futures.Future()
    done.set_result(future.wait())
    return done


def run_rank(rank: int, world: int, args: argparse.Namespace) -> dict[str, Any] | None:
    variants: dict[str, list[float]] = {}
    buckets: dict[int, int] = {}
    for name in ("no_comm", "async", "sync"):
        ddp = DDP(_model(args), bucket_cap_mb=_bucket_cap_mb(args))
        if name != "no_comm":
            state = DDPCompressionState(_sparsity(args), ddp.process_group, model=ddp.module)
            hook = _traced_hook if name == "async" else _synchronous_hook
            ddp.register_comm_hook(state, hook)

        def step(index: int, ddp: DDP = ddp, name: str = name) -> None:
            # no_sync must cover the forward too: DDP decides there whether to reduce.
            with ddp.no_sync() if name == "no_comm" else contextlib.nullcontext():
                ddp(_batch(args, rank, index)).pow(2).mean().backward()
            ddp.module.zero_grad(set_to_none=False)

        if name == "no_comm":
            # Two synchronised iterations first, so that DDP rebuilds its buckets as it
            # does in the distk variants (no_sync alone never rebuilds).
            for index in range(2):
                ddp(_batch(args, rank, index)).pow(2).mean().backward()
                ddp.module.zero_grad(set_to_none=False)
        variants[name] = _time(step, args)
        if name == "async":
            buckets = dict(state.bucket_numels)
            trace = list(_TRACE)  # of the last timed step

    # The exchange alone, on the same bucket sizes and keys, launched back to back.
    compressor = GradientCompressor(_sparsity(args))
    grads = {key: torch.randn(numel, generator=torch.Generator().manual_seed(key + rank))
             for key, numel in buckets.items()}

    def exchange_only(index: int) -> None:
        works = [compressor.launch(grad.clone(), key, step=index + 1)
                 for key, grad in sorted(grads.items())]
        for work in works:
            work.wait()

    variants["exchange"] = _time(exchange_only, args)
    payload = compressor.stats.get("payload_bytes")
    if rank != 0:
        return None
    a = statistics.median(variants["no_comm"])
    b = statistics.median(variants["exchange"])
    row: dict[str, Any] = {"world": world, "buckets": len(buckets),
                           "bucket_numel": max(buckets.values()) if buckets else 0,
                           "payload_bytes_per_bucket": payload, "a_no_comm_s": a,
                           "b_exchange_s": b}
    for name in ("async", "sync"):
        c = statistics.median(variants[name])
        row[f"c_{name}_s"] = c
        row[f"overlap_{name}"] = (a + b - c) / min(a, b) if min(a, b) > 0 else None
    row["samples"] = variants
    row["async_trace"] = trace
    return row


def _init(rank: int, world: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))


def _spawned(rank: int, world: int, args: argparse.Namespace, port: int, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _init(rank, world, args)
    try:
        row = run_rank(rank, world, args)
        if row is not None:
            queue.put(row)
    finally:
        dist.destroy_process_group()


def plot(row: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no plot written (pip install distk[dev])")
        return
    labels = ["a: backward,\nno comm", "b: exchange\nalone", "c: DDP + distk\n(async hook)",
              "c: DDP + distk\n(sync hook)"]
    values = [row["a_no_comm_s"], row["b_exchange_s"], row["c_async_s"], row["c_sync_s"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(labels, [1e3 * v for v in values], color=["C0", "C1", "C2", "C3"])
    ax.axhline(1e3 * (row["a_no_comm_s"] + row["b_exchange_s"]), color="grey",
               linestyle="--", label="a + b (no overlap)")
    ax.set_ylabel("ms per step (median)")
    ax.set_title(f"{row['world']} ranks, {row['buckets']} buckets: overlap "
                 f"{row['overlap_async']:.2f} async, {row['overlap_sync']:.2f} sync")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finish(row: dict[str, Any], args: argparse.Namespace) -> None:
    text = print_table([row], [
        ("world", "ranks", "d"), ("buckets", "buckets", "d"),
        ("payload_bytes_per_bucket", "payload B/bucket", "d"),
        ("a_no_comm_s", "a: no comm s", ".4f"), ("b_exchange_s", "b: exchange s", ".4f"),
        ("c_async_s", "c: async s", ".4f"), ("c_sync_s", "c: sync s", ".4f"),
        ("overlap_async", "overlap async", ".2f"), ("overlap_sync", "overlap sync", ".2f"),
    ])
    name = f"overlap_{args.tag}"
    path = write_results(name, {"config": vars(args), "row": row, "table": text})
    if not args.no_plot:
        plot(row, RESULTS / f"{name}.png")
    for event, bucket, seconds in row["async_trace"]:
        print(f"  async hook, last step: bucket {bucket} {event} at {1e3 * seconds:.1f} ms")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # netem.sh run / torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        _init(rank, world, args)
        try:
            row = run_rank(rank, world, args)
        finally:
            dist.destroy_process_group()
        if row is not None:
            finish(row, args)
        return
    import torch.multiprocessing as mp

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_spawned, args=(r, args.world, args, port, queue))
             for r in range(args.world)]
    for proc in procs:
        proc.start()
    row = queue.get()
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"rank exited with {proc.exitcode}")
    finish(row, args)


if __name__ == "__main__":
    main()
