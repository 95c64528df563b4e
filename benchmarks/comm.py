"""Benchmark: per-step time and bytes of dense vs sparse gradient exchange.

Methods, per (world size, numel, density):

* ``dense_fp32`` / ``dense_bf16``: ``dist.all_reduce`` of the whole tensor;
* ``sparse_exact``: ``GradientCompressor`` with ``torch.topk`` selection, local masks;
* ``sparse_bucketed``: ``GradientCompressor`` with bucketed selection (recall 0.95), local
  masks (``--exchange``: all-gather by default);
* ``sparse_shared``: bucketed selection with a shared mask (``mask="shared"``, the union
  policy): one all-reduce of the values.

Bytes of a whole DDP step, read on the wire at 2, 4 and 8 ranks in emulated hosts, beside
PyTorch's PowerSGD and fp16 hooks: ``benchmarks/wire.py``.

A sparse step is the whole compressor step: residual add, selection, exchange, residual
update. Times are medians over ``--steps`` timed steps after ``--warmup`` untimed ones
(each step starts after a barrier). Bytes are what one rank transmits (see
``distk.comm.cost``), metadata included.

Launch:

* default: spawns the ranks of each ``--world`` size locally on loopback;
* under ``torchrun`` (``RANK``/``WORLD_SIZE`` set), runs as one rank of that world, so each
  rank can sit in its own network namespace: pass ``--master-addr/--master-port`` (or
  ``MASTER_ADDR``/``MASTER_PORT``) and ``--ifname`` (sets ``GLOO_SOCKET_IFNAME``).

    python benchmarks/comm.py --quick
    python benchmarks/comm.py                       # full sweep: 2^22..2^26, 0.1%..10%
    torchrun --nproc-per-node 2 benchmarks/comm.py --quick --ifname veth0 --out comm_1gbit

Writes ``benchmarks/results/<out>.json`` and ``<out>.png`` and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distk import GradientCompressor, SparsityConfig  # noqa: E402
from distk.comm import dense_allreduce_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("dense_fp32", "dense_bf16", "sparse_exact", "sparse_bucketed", "sparse_shared")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sweep: numel 2^18, 2^20; density 1%%, 10%%; world 2")
    parser.add_argument("--world", type=int, nargs="+", default=None,
                        help="world sizes to spawn locally (default 2 4; ignored under torchrun)")
    parser.add_argument("--numel-log2", type=int, nargs="+", default=None,
                        help="tensor sizes as powers of two (default 22 24 26)")
    parser.add_argument("--density", type=float, nargs="+", default=None,
                        help="densities (default 0.001 0.01 0.1)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--exchange", default="allgather",
                        choices=("auto", "allgather", "reduce_scatter", "dense"),
                        help="exchange scheme of the sparse methods (default allgather)")
    parser.add_argument("--value-dtype", default=None, choices=("float32", "bfloat16"),
                        help="wire dtype of sparse values (default: fp32)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR", "127.0.0.1"))
    parser.add_argument("--master-port", type=int,
                        default=int(os.environ["MASTER_PORT"]) if "MASTER_PORT" in os.environ
                        else None)
    parser.add_argument("--ifname", default=os.environ.get("GLOO_SOCKET_IFNAME"),
                        help="network interface for gloo (GLOO_SOCKET_IFNAME)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per rank (default: cores / world)")
    parser.add_argument("--out", default=None, help="result name (default comm / comm_quick)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    args.world = args.world or ([2] if args.quick else [2, 4])
    args.numel_log2 = args.numel_log2 or ([18, 20] if args.quick else [22, 24, 26])
    args.density = args.density or ([0.01, 0.1] if args.quick else [0.001, 0.01, 0.1])
    args.steps = args.steps or (3 if args.quick else 5)
    args.out = args.out or ("comm_quick" if args.quick else "comm")
    return args


def _cases(args: argparse.Namespace) -> list[tuple[int, float, str]]:
    cases = []
    for log2 in args.numel_log2:
        for method in args.methods:
            densities = args.density if method.startswith("sparse") else [None]
            cases.extend((1 << log2, density, method) for density in densities)
    return cases


def _time_steps(fn, steps: int, warmup: int) -> list[float]:
    times = []
    for i in range(warmup + steps):
        dist.barrier()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
    return times


def run_rank(rank: int, world: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The sweep on one rank (inside an initialised gloo group)."""
    from tqdm import tqdm

    rows = []
    cases = _cases(args)
    bar = tqdm(cases, desc=f"world {world}", disable=rank != 0, file=sys.stderr)
    for numel, density, method in bar:
        bar.set_postfix_str(f"2^{numel.bit_length() - 1} {method} {density or ''}")
        gen = torch.Generator().manual_seed(rank)
        grad = torch.randn(numel, generator=gen)
        row: dict[str, Any] = {"world": world, "numel": numel, "method": method,
                               "density": density}
        if method.startswith("dense"):
            dtype = torch.float32 if method == "dense_fp32" else torch.bfloat16
            tensor = grad.to(dtype)
            times = _time_steps(lambda t=tensor: dist.all_reduce(t), args.steps, args.warmup)
            row.update(bytes_sent=dense_allreduce_bytes(numel, world, dtype.itemsize),
                       k=numel, scheme="dense")
        else:
            shared = method == "sparse_shared"
            cfg = SparsityConfig(density=density, min_numel=1,
                                 exchange="auto" if shared else args.exchange,
                                 mask="shared" if shared else "local",
                                 method="bucketed" if shared else method.removeprefix("sparse_"),
                                 value_dtype=args.value_dtype, recall_interval=10**9)
            compressor = GradientCompressor(cfg)
            selection, comm = [], []
            # The update lands in a preallocated buffer, as the DDP and DeepSpeed hooks
            # write it into the gradient bucket itself.
            update = torch.empty_like(grad)

            plans = []

            def step(c=compressor, g=grad, sel=selection, com=comm, out=update, p=plans):
                work = c.launch(g, "grad", out=out, step=len(sel))
                work.wait()
                p.append(work.plan)
                sel.append(work.stats.selection_seconds)
                com.append(work.stats.comm_seconds)

            times = _time_steps(step, args.steps, args.warmup)
            stats, plan = compressor.last, plans[-1]
            row.update(bytes_sent=stats.bytes_sent, k=stats.sent, scheme=plan.scheme,
                       index_bytes=plan.wire.index_bytes, value_bytes=plan.wire.value_bytes,
                       buckets=plan.selection.buckets,
                       k_per_bucket=plan.selection.k_per_bucket,
                       selection_seconds=statistics.median(selection[args.warmup:]),
                       comm_seconds=statistics.median(comm[args.warmup:]), recall=None)
        # The slowest rank defines the step time.
        slowest = torch.tensor([statistics.median(times)], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        row["step_seconds"] = slowest.item()
        row["dense_fp32_bytes"] = dense_allreduce_bytes(numel, world, 4)
        rows.append(row)
        del grad
    return rows


def _init(rank: int, world: int, args: argparse.Namespace) -> None:
    os.environ["MASTER_ADDR"] = args.master_addr
    os.environ["MASTER_PORT"] = str(args.master_port)
    if args.ifname:
        os.environ["GLOO_SOCKET_IFNAME"] = args.ifname
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=30))


def _spawned(rank: int, world: int, args: argparse.Namespace, queue: Any) -> None:
    _init(rank, world, args)
    try:
        rows = run_rank(rank, world, args)
        if rank == 0:
            queue.put(rows)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    dense = {(r["world"], r["numel"]): r["step_seconds"] for r in rows
             if r["method"] == "dense_fp32"}
    for row in rows:
        base = dense.get((row["world"], row["numel"]))
        row["speedup_vs_dense_fp32"] = base / row["step_seconds"] if base else None
        row["bytes_ratio_vs_dense_fp32"] = (row["bytes_sent"] / row["dense_fp32_bytes"]
                                            if row["dense_fp32_bytes"] else None)


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (f"{'world':>5} {'numel':>9} {'method':<16} {'density':>8} {'k':>9} "
              f"{'scheme':<10} {'step ms':>9} {'select ms':>9} {'comm ms':>9} "
              f"{'MB sent':>9} {'vs fp32':>8} {'recall':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        def ms(key, r=r):
            return f"{1e3 * r[key]:9.1f}" if r.get(key) is not None else f"{'':>9}"
        ratio = r.get("speedup_vs_dense_fp32")
        recall = f"{r['recall']:.3f}" if r.get("recall") is not None else ""
        print(f"{r['world']:>5} 2^{r['numel'].bit_length() - 1:<7} {r['method']:<16} "
              f"{r['density'] if r['density'] is not None else '':>8} {r['k']:>9} "
              f"{r['scheme']:<10} {ms('step_seconds')} {ms('selection_seconds')} "
              f"{ms('comm_seconds')} {r['bytes_sent'] / 2**20:9.2f} "
              f"{f'{ratio:7.2f}x' if ratio else '':>8} "
              f"{recall:>6}")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["world"], r["numel"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (world, numel) in zip(axes[0], panels):
        sub = [r for r in rows if r["world"] == world and r["numel"] == numel]
        for method in METHODS:
            points = sorted((r["density"], r["step_seconds"]) for r in sub
                            if r["method"] == method)
            if not points:
                continue
            if method.startswith("dense"):
                ax.axhline(1e3 * points[0][1], linestyle="--", label=method,
                           color="black" if method == "dense_fp32" else "gray")
            else:
                ax.plot([100 * d for d, _ in points], [1e3 * t for _, t in points],
                        marker="o", label=method)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("density (%)")
        ax.set_ylabel("step time (ms)")
        ax.set_title(f"world {world}, numel 2^{numel.bit_length() - 1}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finish(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    _add_ratios(rows)
    print_table(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(sys.argv), "torch": torch.__version__,
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "ifname": args.ifname, "master_addr": args.master_addr,
            "time": datetime.datetime.now().isoformat(timespec="seconds")}
    json_path = RESULTS / f"{args.out}.json"
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {json_path}")
    if not args.no_plot:
        png_path = RESULTS / f"{args.out}.png"
        plot(rows, png_path)
        print(f"wrote {png_path}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if args.master_port is None:
            raise SystemExit("under torchrun, MASTER_PORT (or --master-port) must be set")
        _init(rank, world, args)
        try:
            rows = run_rank(rank, world, args)
        finally:
            dist.destroy_process_group()
        if rank == 0:
            finish(rows, args)
        return
    import torch.multiprocessing as mp

    rows: list[dict[str, Any]] = []
    ctx = mp.get_context("spawn")
    for world in args.world:
        args.master_port = args.master_port if args.master_port else _free_port()
        queue = ctx.Queue()
        procs = [ctx.Process(target=_spawned, args=(r, world, args, queue))
                 for r in range(world)]
        for proc in procs:
            proc.start()
        rows.extend(queue.get())
        for proc in procs:
            proc.join()
            if proc.exitcode != 0:
                raise SystemExit(f"a rank of world {world} failed (exit {proc.exitcode})")
        args.master_port = None
    finish(rows, args)


if __name__ == "__main__":
    main()
