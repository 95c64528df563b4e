"""How much of distk's exchange overlaps backward, under DDP, FSDP2 and DeepSpeed ZeRO 2.

The same model (``--layers`` bias-free Linear layers of ``--width``, each one gradient
buffer: a DDP bucket, an FSDP2 unit, a DeepSpeed ZeRO 2 bucket), the same data and the
same sparsity config under each framework. Per framework, rank 0 reports the median per
step of:

* ``f``: the forward pass alone, and ``a``: forward + backward with no gradient
  communication (DDP: ``no_sync()``; FSDP2: ``set_requires_gradient_sync(False)``, its
  parameter all-gathers still run; DeepSpeed: the plain module, no engine);
* ``b``: the exchange alone: every buffer of one step (same keys and sizes, read from the
  compressor) through a ``GradientCompressor``, launched back to back, then finished;
* ``c_async``: forward + backward with distk's asynchronous exchange (DDP: the hook's
  futures; DeepSpeed: ``engine.distk.overlap = True``, the default). FSDP2 has none:
  torch 2.13 gives its custom reduce-scatter no asynchronous seam (docs/ddp-fsdp.md, "Why
  FSDP2 and HSDP exchange synchronously"), so its row shows ``-``;
* ``c_sync``: the same with every exchange waited for where it is launched (DDP: a hook
  that waits for its future; FSDP2: distk's comm as it ships; DeepSpeed:
  ``engine.distk.overlap = False``): the "before" figure in the same run.

and the overlap, the time hidden over the time that could be hidden, in two definitions:

* forward excluded (the exchange of a step's gradients can only hide behind that step's
  backward): ``(a + b - c) / min(a - f, b)``;
* forward included: ``(a + b - c) / min(a, b)``.

0 means nothing overlaps, 1 that the shorter of backward (or compute) and communication
is fully hidden. The target is 0.5 or more, forward excluded, at 4 ranks.

Run it on the emulated network (root; docs/netem.md), at a rate where ``b`` is about
``a`` and each buffer's payload is well above the tbf burst (the table prints the payload
per buffer)::

    DISTK_NETEM_PREFIX=ovl launchers/netem.sh run 4 80mbit -- \\
        .venv/bin/python benchmarks/overlap.py --layers 4 --width 1024 --density 0.04 \\
        --batch 512 --threads 1 --tag 4r_80mbit

Started without ``RANK`` in the environment it spawns ``--world`` ranks on loopback (a
smoke test: loopback is too fast for any overlap to matter). Writes
``<--out>/overlap_<tag>.json`` and ``.png`` (default ``benchmarks/results``) and prints a
table.
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
from collections.abc import Callable
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

FRAMEWORKS = ("ddp", "fsdp2", "deepspeed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS),
                        choices=FRAMEWORKS, help="which to measure (default: all three)")
    parser.add_argument("--layers", type=int, default=8,
                        help="Linear layers (one gradient buffer each)")
    parser.add_argument("--width", type=int, default=1024, help="layer width")
    parser.add_argument("--batch", type=int, default=256, help="rows per rank and step")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--method", default="bucketed", choices=("bucketed", "exact", "dense"))
    parser.add_argument("--mask", default="auto", choices=("auto", "local", "shared"),
                        help="SparsityConfig.mask (local masks: all-gather; shared: one "
                             "all-reduce of the values)")
    parser.add_argument("--mask-ahead", action="store_true",
                        help="SparsityConfig.mask_ahead: the shared mask agreed one step "
                             "early, so that no collective waits inside backward")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--world", type=int, default=2, help="ranks when spawning locally")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per rank")
    parser.add_argument("--tag", default="local", help="results name: overlap_<tag>")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder for the JSON and the plot (default: benchmarks/results)")
    parser.add_argument("--no-plot", action="store_true")
    return parser.parse_args(argv)


def _model(args: argparse.Namespace) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(args.layers):
        layers += [nn.Linear(args.width, args.width, bias=False), nn.Tanh()]
    return nn.Sequential(*layers)


def _sparsity(args: argparse.Namespace) -> SparsityConfig:
    # No stats steps inside the timed window: steady-state (unverified) exchanges only.
    return SparsityConfig(density=args.density, method=args.method, min_numel=1,
                          stats_interval=10**6, recall_interval=0, mask=args.mask,
                          mask_ahead=args.mask_ahead)


def _batch(args: argparse.Namespace, rank: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(args.batch, args.width, generator=gen)


def _loss(output: torch.Tensor) -> torch.Tensor:
    return output.pow(2).mean()


# (buffer, seconds since the step started) when DDP's async hook returned and when its
# future completed: shows whether buckets travel while backward computes the next ones.
_TRACE: list[tuple[str, int, float]] = []
_STEP_STARTED = [0.0]


def _time(args: argparse.Namespace, forward: Callable[[int], Callable[[], None]],
          after: Callable[[], None]) -> tuple[list[float], list[float]]:
    """``(forward seconds, forward + backward seconds)`` of the timed steps.

    ``forward(step)`` runs the forward pass and returns the backward pass to run (the
    framework's own: ``loss.backward`` or ``engine.backward``); ``after`` (zero_grad, the
    optimizer step) runs outside the timed window."""
    forwards, totals = [], []
    for index in range(args.warmup + args.steps):
        dist.barrier()
        started = _STEP_STARTED[0] = time.perf_counter()
        _TRACE.clear()
        backward = forward(index)
        forwarded = time.perf_counter()
        backward()
        ended = time.perf_counter()
        after()
        if index >= args.warmup:
            forwards.append(forwarded - started)
            totals.append(ended - started)
    return forwards, totals


# -- DDP ----------------------------------------------------------------------------------

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


def _ddp(args: argparse.Namespace, rank: int) -> dict[str, Any]:
    # One layer's weight per bucket: DDP closes a bucket once it exceeds the cap.
    cap_mb = args.width * args.width * 4 / 2**20 * 0.9
    timed: dict[str, tuple[list[float], list[float]]] = {}
    sizes: dict[Any, int] = {}
    trace: list = []
    for variant in ("no_comm", "async", "sync"):
        ddp = DDP(_model(args), bucket_cap_mb=cap_mb)
        if variant != "no_comm":
            state = DDPCompressionState(_sparsity(args), ddp.process_group, model=ddp.module)
            ddp.register_comm_hook(state, _traced_hook if variant == "async"
                                   else _synchronous_hook)
        else:
            # Two synchronised iterations first, so that DDP rebuilds its buckets as it
            # does in the distk variants (no_sync alone never rebuilds).
            for index in range(2):
                _loss(ddp(_batch(args, rank, index))).backward()
                ddp.module.zero_grad(set_to_none=False)

        def forward(index: int, ddp: DDP = ddp,
                    variant: str = variant) -> Callable[[], None]:
            # no_sync must cover the forward: DDP decides there whether to reduce.
            with ddp.no_sync() if variant == "no_comm" else contextlib.nullcontext():
                return _loss(ddp(_batch(args, rank, index))).backward

        timed[variant] = _time(args, forward,
                               lambda ddp=ddp: ddp.module.zero_grad(set_to_none=False))
        if variant == "async":
            sizes = dict(state.bucket_numels)
            trace = list(_TRACE)  # of the last timed step
    return {"timed": timed, "sizes": sizes, "trace": trace}


# -- FSDP2 ----------------------------------------------------------------------------------

def _fsdp2(args: argparse.Namespace, rank: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import distk

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    timed: dict[str, tuple[list[float], list[float]]] = {}
    sizes: dict[Any, int] = {}
    for variant in ("no_comm", "sync"):
        model = _model(args)
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)  # one unit (one reduce-scatter) per layer
        fully_shard(model, mesh=mesh)
        if variant == "no_comm":
            model.set_requires_gradient_sync(False)
        else:
            state = distk.fsdp.enable(model, _sparsity(args))

        def forward(index: int, model: nn.Module = model) -> Callable[[], None]:
            return _loss(model(_batch(args, rank, index))).backward

        timed[variant] = _time(args, forward,
                               lambda model=model: model.zero_grad(set_to_none=True))
        if variant == "sync":
            sizes = {key: state.compressor.residual(key).numel() for key in state.unit_names}
    return {"timed": timed, "sizes": sizes, "trace": []}


# -- DeepSpeed ZeRO 2 -----------------------------------------------------------------------

def _deepspeed(args: argparse.Namespace, rank: int) -> dict[str, Any]:
    import distk

    config = {
        "train_micro_batch_size_per_gpu": args.batch,
        "optimizer": {"type": "SGD", "params": {"lr": 1e-3}},
        # One layer's weight per bucket: DeepSpeed reduces a bucket when the next
        # gradient would overflow it.
        "zero_optimization": {"stage": 2, "reduce_bucket_size": args.width * args.width},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "distk": _sparsity(args).to_dict(),
    }
    timed: dict[str, tuple[list[float], list[float]]] = {}
    sizes: dict[Any, int] = {}
    plain = _model(args)
    timed["no_comm"] = _time(args,
                             lambda index: _loss(plain(_batch(args, rank, index))).backward,
                             lambda: plain.zero_grad(set_to_none=True))
    for variant in ("async", "sync"):
        model = _model(args)
        engine, *_ = distk.deepspeed.initialize(model=model,
                                                model_parameters=model.parameters(),
                                                config=config)
        state = distk.deepspeed.get_state(engine)
        state.overlap = variant == "async"

        def forward(index: int, engine: Any = engine) -> Callable[[], None]:
            loss = _loss(engine(_batch(args, rank, index)))
            return lambda: engine.backward(loss)  # the engine's reduction runs in it

        timed[variant] = _time(args, forward, engine.step)
        if variant == "async":
            sizes = {name: state.compressor.residual(name).numel()
                     for name, _ in engine.module.named_parameters()}
    return {"timed": timed, "sizes": sizes, "trace": []}


# -- the exchange alone, and the row ----------------------------------------------------------

def _exchange_alone(args: argparse.Namespace, rank: int,
                    sizes: dict[Any, int]) -> tuple[list[float], int | None]:
    compressor = GradientCompressor(_sparsity(args))
    keys = sorted(sizes, key=str)
    grads = {key: torch.randn(sizes[key], generator=torch.Generator().manual_seed(
        index + 100 * rank)) for index, key in enumerate(keys)}
    times = []
    for index in range(args.warmup + args.steps):
        dist.barrier()
        started = time.perf_counter()
        works = [compressor.launch(grads[key].clone(), key, step=index + 1) for key in keys]
        for work in works:
            work.wait()
        if index >= args.warmup:
            times.append(time.perf_counter() - started)
    return times, compressor.last.payload_bytes if compressor.last.buffers else None


def _overlap(a: float, b: float, c: float | None, capacity: float) -> float | None:
    hidden = None if c is None else a + b - c
    return None if hidden is None or capacity <= 0 else hidden / capacity


def run_rank(rank: int, world: int, args: argparse.Namespace) -> list[dict[str, Any]] | None:
    runners = {"ddp": _ddp, "fsdp2": _fsdp2, "deepspeed": _deepspeed}
    rows = []
    for framework in args.frameworks:
        measured = runners[framework](args, rank)
        exchange, payload = _exchange_alone(args, rank, measured["sizes"])
        timed = measured["timed"]
        f = statistics.median(timed["no_comm"][0])
        a = statistics.median(timed["no_comm"][1])
        b = statistics.median(exchange)
        row: dict[str, Any] = {
            "framework": framework, "world": world, "buffers": len(measured["sizes"]),
            "buffer_numel": max(measured["sizes"].values(), default=0),
            "payload_bytes_per_buffer": payload, "f_forward_s": f, "a_no_comm_s": a,
            "b_exchange_s": b,
        }
        for variant in ("async", "sync"):
            c = statistics.median(timed[variant][1]) if variant in timed else None
            row[f"c_{variant}_s"] = c
            row[f"overlap_{variant}_fwd_excluded"] = _overlap(a, b, c, min(a - f, b))
            row[f"overlap_{variant}_fwd_included"] = _overlap(a, b, c, min(a, b))
        row["samples"] = {variant: {"forward": forwards, "step": totals}
                          for variant, (forwards, totals) in timed.items()}
        row["samples"]["exchange"] = exchange
        row["async_trace"] = measured["trace"]
        rows.append(row)
    return rows if rank == 0 else None


def _init(rank: int, world: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))


def _spawned(rank: int, world: int, args: argparse.Namespace, port: int, queue: Any) -> None:
    # DeepSpeed reads the launcher's variables even when the process group exists.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    _init(rank, world, args)
    try:
        rows = run_rank(rank, world, args)
        if rows is not None:
            queue.put(rows)
    finally:
        dist.destroy_process_group()


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no plot written (pip install distk[dev])")
        return
    series = [("f_forward_s", "f: forward"), ("a_no_comm_s", "a: fwd+bwd, no comm"),
              ("b_exchange_s", "b: exchange alone"), ("c_async_s", "c: distk async"),
              ("c_sync_s", "c: distk sync")]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(series)
    for index, (key, label) in enumerate(series):
        values = [1e3 * (row[key] or 0.0) for row in rows]
        ax.bar([i + index * width for i in range(len(rows))], values, width, label=label)
    titles = []
    for i, row in enumerate(rows):
        ax.plot([i - width / 2, i + 0.8 - width / 2],
                [1e3 * (row["a_no_comm_s"] + row["b_exchange_s"])] * 2, color="grey",
                linestyle="--")
        value = row["overlap_async_fwd_excluded"]
        titles.append(f"{row['framework']}\noverlap "
                      f"{'-' if value is None else format(value, '.2f')} (fwd excl.)")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], titles)
    ax.set_ylabel("ms per step (median); dashed: a + b")
    ax.set_title(f"{rows[0]['world']} ranks: distk's exchange against backward")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finish(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    text = print_table(rows, [
        ("framework", "framework", "s"), ("world", "ranks", "d"), ("buffers", "buffers", "d"),
        ("payload_bytes_per_buffer", "payload B/buffer", "d"),
        ("f_forward_s", "f: fwd s", ".4f"), ("a_no_comm_s", "a: no comm s", ".4f"),
        ("b_exchange_s", "b: exchange s", ".4f"), ("c_async_s", "c: async s", ".4f"),
        ("c_sync_s", "c: sync s", ".4f"),
        ("overlap_async_fwd_excluded", "overlap async (fwd excl.)", ".2f"),
        ("overlap_async_fwd_included", "overlap async (fwd incl.)", ".2f"),
        ("overlap_sync_fwd_excluded", "overlap sync (fwd excl.)", ".2f"),
        ("overlap_sync_fwd_included", "overlap sync (fwd incl.)", ".2f"),
    ])
    name = f"overlap_{args.tag}"
    config = {key: str(value) if isinstance(value, Path) else value
              for key, value in vars(args).items()}
    path = write_results(name, {"config": config, "rows": rows, "table": text}, args.out)
    if not args.no_plot:
        plot(rows, args.out / f"{name}.png")
    for row in rows:
        for event, bucket, seconds in row["async_trace"]:
            print(f"  {row['framework']} async, last step: bucket {bucket} {event} at "
                  f"{1e3 * seconds:.1f} ms")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # netem.sh run / torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        _init(rank, world, args)
        try:
            rows = run_rank(rank, world, args)
        finally:
            dist.destroy_process_group()
        if rows is not None:
            finish(rows, args)
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
    rows = queue.get()
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"rank exited with {proc.exitcode}")
    finish(rows, args)


if __name__ == "__main__":
    main()
