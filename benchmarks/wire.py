"""Benchmark: bytes a DDP step puts on the wire, per rank, against the number of ranks.

Every rank runs in its own emulated host (``launchers/netem.sh``: one network namespace
per rank, joined by veth links) and reads its own interface counter
(``/sys/class/net/veth0/statistics/tx_bytes``) before and after the measured steps, so
the figures are what left the host (Ethernet, IP and TCP headers included), not what
distk's statistics count (those are reported beside them). Every method trains the same
MLP (6.3 M parameters, about the size of one DDP bucket cap of 25 MB) for the same steps
in the same run:

* ``ddp``: plain DDP (fp32 all-reduce), the reference every ratio is taken against;
* ``fp16_hook``: PyTorch's ``default_hooks.fp16_compress_hook``;
* ``powersgd_r1`` / ``powersgd_r4``: PyTorch's ``powerSGD_hook`` (rank 1 / 4, error
  feedback, warm start), measured after its ``start_powerSGD_iter``;
* ``distk_local``: ``SparsityConfig(density=0.01, mask="local")``: each rank's own top-k,
  all-gathered (bytes grow with the number of ranks);
* ``distk``: ``SparsityConfig(density=0.01)``, the default: a shared mask (the union of
  the ranks' top k/P proposals) whose values are summed by one all-reduce;
* ``outer``: no DDP: ``distk.outer`` with SparseLoCo's recipe
  (``SparsityConfig.sparseloco(sync_every=4)``: top-64 of every 64 x 64 tile, 2-bit
  values, 12-bit offsets, all-gathered), a sync every 4 steps; its per-step bytes are a
  sync's over 4, and the JSON adds bits per parameter per sync.

    # one world size (every rank in its own host):
    sudo launchers/netem.sh run 8 1gbit -- .venv/bin/python benchmarks/wire.py --part runs/wire/8
    # the sweep: runs netem.sh for each world size, merges, prints, writes JSON and a plot
    sudo .venv/bin/python benchmarks/wire.py --world 2 4 8 --out wire

Writes ``benchmarks/results/<out>.json`` and ``<out>.png`` (measured bytes per rank as a
fraction of plain DDP's at 2..8 ranks, beside the cost model's at 2..512).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import NETEM_INTERFACE, add_netem_part_args, tx_bytes  # noqa: E402

import distk  # noqa: E402
from distk.comm import ring_allreduce_bytes, scheme_bytes  # noqa: E402
from distk.comm.codec import bits_for, packed_nbytes  # noqa: E402
from distk.train.peer_hooks import powersgd_bucket_entries  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("ddp", "fp16_hook", "powersgd_r1", "powersgd_r4", "distk_local", "distk", "outer")
OUTER_H = 4
"""Inner steps per sync of the ``outer`` method (``--warmup`` and ``--steps`` must be
multiples of it)."""
DENSITY = 0.01
INTERFACE = NETEM_INTERFACE


def build_model() -> nn.Module:
    """6.3 M parameters: 512 -> 2048 -> 2048 -> 512."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 2048), nn.GELU(),
                         nn.Linear(2048, 512))


def enable(method: str, ddp: DDP) -> Any:
    """Register ``method``'s hook on ``ddp``; the state whose stats count bytes, if any."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if method == "fp16_hook":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif method.startswith("powersgd"):
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=int(method[-1]),
            start_powerSGD_iter=2, use_error_feedback=True, warm_start=True)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif method == "distk_local":
        return distk.ddp.enable(ddp, distk.SparsityConfig(density=DENSITY, mask="local"))
    elif method == "distk":
        return distk.ddp.enable(ddp, distk.SparsityConfig(density=DENSITY))
    elif method != "ddp":
        raise ValueError(f"method {method!r} is invalid: allowed {METHODS}")
    return None


def measure(method: str, rank: int, world: int, warmup: int, steps: int) -> dict[str, Any]:
    """Train ``warmup + steps`` steps; bytes this host sent during the last ``steps``.

    One DDP bucket holds the whole model (``bucket_cap_mb=64``): PyTorch's PowerSGD hook
    launches its second all-reduce from the first one's callback, and with two buckets on
    gloo the ranks can then issue their collectives in different orders (a mismatch
    gloo aborts on)."""
    if method == "outer":  # a plain model; the optimizer's hook syncs every OUTER_H steps
        ddp = build_model()
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
        state = distk.outer.enable(ddp, optimizer,
                                   distk.SparsityConfig.sparseloco(sync_every=OUTER_H))
    else:
        ddp = DDP(build_model(), bucket_cap_mb=64)
        state = enable(method, ddp)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(rank)
    counted = 0
    for step in range(warmup + steps):
        if step == warmup:
            dist.barrier()
            start, began = tx_bytes(), time.perf_counter()
        x = torch.randn(32, 512, generator=gen)
        loss = ddp(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if state is not None and step >= warmup and (method != "outer"
                                                      or (step + 1) % OUTER_H == 0):
            counted += state.stats.bytes_sent  # outer: the sync this step ran
    dist.barrier()
    sent = tx_bytes() - start
    row = {"method": method, "world": world, "rank": rank, "steps": steps,
           "wire_bytes_per_step": sent / steps,
           "seconds_per_step": (time.perf_counter() - began) / steps,
           "counted_bytes_per_step": counted / steps if state is not None else None,
           "schemes": dict(state.stats.schemes) if state is not None else None}
    if method == "outer":
        params = sum(p.numel() for p in ddp.parameters())
        row["sync_every"] = OUTER_H
        row["wire_bits_per_param_per_sync"] = 8 * sent / (steps // OUTER_H) / params
        row["counted_bits_per_param_per_sync"] = 8 * counted / (steps // OUTER_H) / params
    return row


def run_part(args: argparse.Namespace) -> None:
    """One world size: every method, this rank's rows gathered to rank 0."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", INTERFACE)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=20))
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for method in args.methods:
        rows.append(measure(method, rank, world, args.warmup, args.steps))
        if rank == 0:
            print(f"[wire] world {world} {method}: "
                  f"{rows[-1]['wire_bytes_per_step'] / 1e6:.3f} MB/step", flush=True)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        Path(args.part).parent.mkdir(parents=True, exist_ok=True)
        Path(args.part).with_suffix(".json").write_text(
            json.dumps([row for part in gathered for row in part], indent=1))
    dist.barrier()
    dist.destroy_process_group()
    # torch 2.13's gloo can abort in its static destructors at exit (an upstream teardown
    # issue); the results are written, so leave without running them.
    sys.stdout.flush()
    os._exit(0)


def modelled(worlds: list[int]) -> list[dict[str, Any]]:
    """Bytes per rank and step of each method under the cost model (distk.comm.cost, the
    ring formulas; PowerSGD: its P and Q factors), for the benchmark's MLP."""
    shapes = [p.shape for p in build_model().parameters()]
    numel = sum(math.prod(s) for s in shapes)
    k = round(DENSITY * numel)
    rows = []
    for world in worlds:
        # Sparse values travel in bf16 (value_dtype="auto"), with 16-bit bucket offsets.
        local = scheme_bytes(numel, k, world, 2, 2)["allgather"]
        share = math.ceil(k / world)
        # Each rank's proposal as bucket offsets of at most 16 bits (buckets of <= 65536).
        shared = (ring_allreduce_bytes(k, world, 2)
                  + (world - 1) * packed_nbytes(share, min(16, bits_for(numel))))
        plain, p_q = {}, {}
        for rank_ in (1, 4):
            dense, p_entries, q_entries = powersgd_bucket_entries(shapes, rank_, 2.0)
            p_q[rank_] = sum(ring_allreduce_bytes(n, world, 4)
                             for n in (dense, p_entries, q_entries) if n)
        plain = ring_allreduce_bytes(numel, world, 4)
        for method, value in (("ddp", plain), ("fp16_hook", plain / 2),
                              ("powersgd_r1", p_q[1]), ("powersgd_r4", p_q[4]),
                              ("distk_local", local), ("distk", shared)):
            rows.append({"method": method, "world": world, "bytes_per_step": value,
                         "fraction_of_ddp": value / plain})
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (world, method): the mean over ranks of wire bytes per step, and the fraction
    of plain DDP's at that world size."""
    table = []
    for world in sorted({r["world"] for r in rows}):
        ranks = [r for r in rows if r["world"] == world]
        base = None
        for method in METHODS:
            mine = [r for r in ranks if r["method"] == method]
            if not mine:
                continue
            wire = sum(r["wire_bytes_per_step"] for r in mine) / len(mine)
            counted = [r["counted_bytes_per_step"] for r in mine
                       if r["counted_bytes_per_step"] is not None]
            base = wire if method == "ddp" else base
            extra = ({key: sum(r[key] for r in mine) / len(mine)
                      for key in ("wire_bits_per_param_per_sync",
                                  "counted_bits_per_param_per_sync")}
                     if method == "outer" else {})
            table.append({
                **extra,
                "world": world, "method": method, "wire_bytes_per_step": wire,
                "max_rank_wire_bytes_per_step": max(r["wire_bytes_per_step"] for r in mine),
                "counted_bytes_per_step": sum(counted) / len(counted) if counted else None,
                "fraction_of_ddp": wire / base if base else None,
                "seconds_per_step": max(r["seconds_per_step"] for r in mine),
                "schemes": mine[0]["schemes"]})
    return table


def print_table(table: list[dict[str, Any]]) -> None:
    header = (f"{'ranks':>5} {'method':<12} {'wire MB/step':>12} {'vs DDP':>8} "
              f"{'counted MB':>10} {'max rank MB':>11}")
    print(header)
    print("-" * len(header))
    for row in table:
        counted = row["counted_bytes_per_step"]
        fraction = row["fraction_of_ddp"]
        print(f"{row['world']:>5} {row['method']:<12} {row['wire_bytes_per_step'] / 1e6:>12.3f} "
              f"{f'{100 * fraction:.2f}%' if fraction is not None else '':>8} "
              f"{f'{counted / 1e6:.3f}' if counted is not None else '':>10} "
              f"{row['max_rank_wire_bytes_per_step'] / 1e6:>11.3f}")
    for row in table:
        if row["method"] == "outer":
            print(f"outer sync at {row['world']} ranks: "
                  f"{row['wire_bits_per_param_per_sync']:.4f} bits per parameter per sync on "
                  f"the wire, {row['counted_bits_per_param_per_sync']:.4f} counted")


def plot(table: list[dict[str, Any]], model: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for index, method in enumerate(METHODS[1:], start=1):
        color = f"C{index}"
        curve = sorted((r["world"], r["fraction_of_ddp"]) for r in model
                       if r["method"] == method)
        if curve:  # no cost model for outer sync
            ax.plot(*zip(*curve), color=color, linestyle="--", alpha=0.7)
        points = sorted((r["world"], r["fraction_of_ddp"]) for r in table
                        if r["method"] == method and r["fraction_of_ddp"] is not None)
        if points:
            ax.plot(*zip(*points), color=color, marker="o", linestyle="none", label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("ranks")
    ax.set_ylabel("bytes per rank and step / plain DDP's")
    ax.set_title(f"DDP step of a 6.3M-parameter MLP, density {DENSITY:.0%}: "
                 "measured (dots), modelled (dashed)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(rows: list[dict[str, Any]], args: argparse.Namespace,
           command: str | None = None) -> None:
    """Print the table; write the JSON and the plot (``command``: the one that ran)."""
    table = summarise(rows)
    model = modelled([2 ** i for i in range(1, 10)])
    print_table(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"command": command or " ".join(sys.argv), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "rate": args.rate, "interface": INTERFACE,
            "density": DENSITY, "warmup": args.warmup, "steps": args.steps}
    out = RESULTS / f"{args.out}.json"
    out.write_text(json.dumps({"meta": meta, "table": table, "model": model, "rows": rows},
                              indent=1))
    print(f"wrote {out}")
    plot(table, model, RESULTS / f"{args.out}.png")
    print(f"wrote {RESULTS / f'{args.out}.png'}")


def sweep(args: argparse.Namespace) -> None:
    """Run each world size and method under netem.sh (one process per rank and method:
    PyTorch's PowerSGD hook does not survive another DDP model's hook in the same
    process), merge, print, write JSON and the plot."""
    work = ROOT / "runs" / "wire"
    rows = []
    for world in args.world:
        for method in args.methods:
            part = work / f"{args.out}_{world}_{method}"
            command = ["bash", str(ROOT / "launchers" / "netem.sh"), "run", "--timeout",
                       str(args.timeout), "--log-dir", str(work / f"logs_{world}_{method}"),
                       str(world), args.rate, "--", sys.executable,
                       str(Path(__file__).resolve()), "--part", str(part), "--warmup",
                       str(args.warmup), "--steps", str(args.steps), "--methods", method]
            print(f"[wire] world {world}, {method}", flush=True)
            subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            rows += json.loads(part.with_suffix(".json").read_text())
    report(rows, args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4, 8],
                        help="world sizes of the sweep (each in its own netem run)")
    parser.add_argument("--rate", default="1gbit", help="link rate of every host (tc rate)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--warmup", type=int, default=12,
                        help="untimed steps first (DDP's bucket rebuild, PowerSGD's start, "
                             "distk's first verified steps)")
    parser.add_argument("--steps", type=int, default=20, help="measured steps")
    add_netem_part_args(parser, "wire")
    parser.add_argument("--replot", action="store_true",
                        help="no runs: rebuild table, model and plot from <out>.json's rows")
    args = parser.parse_args(argv)
    if "outer" in args.methods and (args.warmup % OUTER_H or args.steps % OUTER_H):
        parser.error(f"--warmup {args.warmup} --steps {args.steps} with the outer method: "
                     f"both must be multiples of its sync period {OUTER_H}")
    if args.part is not None:
        run_part(args)
    elif args.replot:
        saved = json.loads((RESULTS / f"{args.out}.json").read_text())
        report(saved["rows"], args, saved["meta"]["command"])
    else:
        sweep(args)


if __name__ == "__main__":
    main()
