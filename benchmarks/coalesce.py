"""Benchmark: what one collective per tensor costs on the wire and in time, against the
same exchanges coalesced (``distk.comm.coalesced``: one all-gather, one all-reduce).

Outer synchronisation exchanges every parameter on its own (52 tensors on the main
job's model), so a sync used to be 52 all-gathers (sparse syncs) or 52 all-reduces
(dense ones). Each rank runs in its own emulated host (``launchers/netem.sh``) and reads
its interface counter (``/sys/class/net/veth0/statistics/tx_bytes``) around the
measured calls, so the bytes include every frame (Ethernet, IP and TCP headers, ACKs,
gloo's own messages). For each world size, kind (an all-gather of uint8 payloads, an
all-reduce of bf16 tensors) and payload per tensor, ``--tensors`` exchanges are
launched ``--repeats`` times one collective each (``separate``) and inside one
``coalesced()`` block (``coalesced``), through the library's own ``all_gather_async`` /
``all_reduce_async``. The table gives wire bytes per rank against the ring's payload
bytes (``(P-1) x`` for an all-gather, ``2 (P-1) / P x`` for an all-reduce), the overhead
per collective call, and the wall time of one round (on 1 Gbit/s links by default;
``--latency`` adds a one-way delay where the kernel has the netem qdisc).

    # the sweep: runs netem.sh for each world size, merges, prints, writes JSON and a plot
    sudo .venv/bin/python benchmarks/coalesce.py --world 2 4 8 --out coalesce
    # one world size (every rank in its own host), CMD being the line after:
    #   sudo launchers/netem.sh run 4 1gbit 0 -- CMD
    .venv/bin/python benchmarks/coalesce.py --part runs/coalesce/4

Writes ``benchmarks/results/<out>.json`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import NETEM_INTERFACE, add_netem_part_args, tx_bytes  # noqa: E402

from distk.comm.coalesce import all_gather_async, all_reduce_async, coalesced  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
INTERFACE = NETEM_INTERFACE
KINDS = ("all_gather", "all_reduce")
MODES = ("separate", "coalesced")


def one_round(kind: str, mode: str, tensors: int, nbytes: int, world: int) -> None:
    """``tensors`` exchanges of ``nbytes`` each, launched, then waited on."""
    if kind == "all_gather":
        inputs = [torch.ones(nbytes, dtype=torch.uint8) for _ in range(tensors)]
        outputs = [torch.empty(world * nbytes, dtype=torch.uint8) for _ in range(tensors)]

        def launch(i: int) -> torch.futures.Future:
            return all_gather_async(outputs[i], inputs[i], None)
    else:
        inputs = [torch.ones(nbytes // 2, dtype=torch.bfloat16) for _ in range(tensors)]

        def launch(i: int) -> torch.futures.Future:
            return all_reduce_async(inputs[i], None)
    if mode == "coalesced":
        with coalesced():
            futures = [launch(i) for i in range(tensors)]
    else:
        futures = [launch(i) for i in range(tensors)]
    for future in futures:
        future.wait()


def measure(kind: str, mode: str, args: argparse.Namespace, nbytes: int,
            world: int) -> dict[str, Any]:
    """This rank's wire bytes and seconds over ``args.repeats`` rounds."""
    one_round(kind, mode, args.tensors, nbytes, world)  # connections warm
    dist.barrier()
    before, started = tx_bytes(), time.perf_counter()
    for _ in range(args.repeats):
        one_round(kind, mode, args.tensors, nbytes, world)
    seconds = time.perf_counter() - started
    dist.barrier()
    wire = tx_bytes() - before
    factor = (world - 1) if kind == "all_gather" else 2 * (world - 1) / world
    payload = factor * args.tensors * nbytes * args.repeats
    return {"world": world, "kind": kind, "mode": mode, "tensors": args.tensors,
            "bytes_per_tensor": nbytes, "repeats": args.repeats,
            "collectives_per_round": args.tensors if mode == "separate" else 1,
            "wire_bytes": wire, "payload_bytes": payload, "seconds": seconds}


def run_part(args: argparse.Namespace) -> None:
    """One world size: every kind, size and mode; this rank's rows gathered to rank 0."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", INTERFACE)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=20))
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = [measure(kind, mode, args, nbytes, world)
            for kind in KINDS for nbytes in args.bytes for mode in MODES]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        Path(args.part).parent.mkdir(parents=True, exist_ok=True)
        merged = []
        for i, row in enumerate(rows):  # per-rank wire bytes and seconds: their mean
            merged.append({**row,
                           "wire_bytes": sum(part[i]["wire_bytes"] for part in gathered) / world,
                           "seconds": max(part[i]["seconds"] for part in gathered)})
        Path(args.part).with_suffix(".json").write_text(json.dumps(merged, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    # torch 2.13's gloo can abort in its static destructors at exit (an upstream teardown
    # issue); the results are written, so leave without running them.
    sys.stdout.flush()
    os._exit(0)


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per row: wire / payload, the overhead per collective call, ms per round."""
    table = []
    for row in rows:
        calls = row["collectives_per_round"] * row["repeats"]
        table.append({
            "world": row["world"], "kind": row["kind"], "bytes": row["bytes_per_tensor"],
            "mode": row["mode"], "calls": calls,
            "wire_mb": row["wire_bytes"] / 1e6, "payload_mb": row["payload_bytes"] / 1e6,
            "ratio": row["wire_bytes"] / row["payload_bytes"],
            "overhead_per_call_kb": (row["wire_bytes"] - row["payload_bytes"]) / calls / 1e3,
            "ms_per_round": 1e3 * row["seconds"] / row["repeats"]})
    return table


def print_table(table: list[dict[str, Any]]) -> None:
    print("| ranks | collective | bytes per tensor | mode | calls | wire MB per rank | "
          "payload MB | wire / payload | overhead per call (KB) | ms per round |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['world']} | {r['kind']} | {r['bytes']} | {r['mode']} | {r['calls']} | "
              f"{r['wire_mb']:.2f} | {r['payload_mb']:.2f} | {r['ratio']:.3f} | "
              f"{r['overhead_per_call_kb']:.2f} | {r['ms_per_round']:.1f} |")


def plot(table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "ratio", "wire bytes / ring payload bytes"),
                           (axes[1], "ms_per_round", "ms per round of exchanges")):
        for kind in KINDS:
            for nbytes in sorted({r["bytes"] for r in table}):
                for mode, style in zip(MODES, ("--", "-"), strict=True):
                    sel = sorted((r for r in table if r["kind"] == kind and r["mode"] == mode
                                  and r["bytes"] == nbytes), key=lambda r: r["world"])
                    if sel:
                        ax.plot([r["world"] for r in sel], [r[key] for r in sel], style,
                                marker="o", label=f"{kind} {nbytes} B, {mode}")
        ax.set_xlabel("ranks")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("one collective per tensor (dashed) against coalesced (solid)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep(args: argparse.Namespace) -> None:
    """Each world size under netem.sh, merged, printed, written as JSON and a plot."""
    work = ROOT / "runs" / "coalesce"
    rows = []
    for world in args.world:
        part = work / f"{args.out}_{world}"
        command = ["bash", str(ROOT / "launchers" / "netem.sh"), "run", "--timeout",
                   str(args.timeout), "--log-dir", str(work / f"logs_{world}"), str(world),
                   args.rate, args.latency, "--", sys.executable, str(Path(__file__).resolve()),
                   "--part", str(part), "--tensors", str(args.tensors), "--repeats",
                   str(args.repeats), "--bytes", *map(str, args.bytes)]
        print(f"[coalesce] world {world}", flush=True)
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        rows += json.loads(part.with_suffix(".json").read_text())
    table = summarise(rows)
    print_table(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(sys.argv), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "rate": args.rate, "latency": args.latency,
            "interface": INTERFACE}
    out = RESULTS / f"{args.out}.json"
    out.write_text(json.dumps({"meta": meta, "table": table, "rows": rows}, indent=1))
    plot(table, RESULTS / f"{args.out}.png")
    print(f"wrote {out} and {RESULTS / f'{args.out}.png'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4, 8],
                        help="world sizes of the sweep (each in its own netem run)")
    parser.add_argument("--rate", default="1gbit",
                        help="link rate of every host (a tc rate, or none)")
    parser.add_argument("--latency", default="0",
                        help="one-way delay host to host (a tc time, or 0; needs the netem "
                             "qdisc in the kernel)")
    parser.add_argument("--tensors", type=int, default=52,
                        help="exchanges per round (the main job's model has 52 parameters)")
    parser.add_argument("--bytes", type=int, nargs="+", default=[1024, 32768],
                        help="payload per tensor (a sparse sync's is about 1.7 KB per "
                             "parameter on the main job at 4 ranks, a dense bf16 one 32 KB)")
    parser.add_argument("--repeats", type=int, default=10, help="measured rounds")
    add_netem_part_args(parser, "coalesce")
    args = parser.parse_args(argv)
    for name in ("tensors", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if any(b < 2 or b % 2 for b in args.bytes):
        parser.error(f"--bytes must be even and at least 2 (bf16 entries), got {args.bytes}")
    if args.part is not None:
        run_part(args)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
