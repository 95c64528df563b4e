"""Measure the throughput of the emulated network: a gloo all-reduce timed across hosts.

Run it through the launcher, one rank per network namespace, e.g. (docs/netem.md)::

    sudo launchers/netem.sh run 2 1gbit -- .venv/bin/python launchers/netem_check.py --mb 64

Rank 0 prints one JSON line: the all-reduce's median seconds, the time the link rate
predicts (a ring all-reduce sends ``2 (P - 1) / P`` times the tensor from every rank;
from ``DISTK_NETEM_RATE``, set by the launcher) and their ratio. With ``--min-ratio`` the
script fails (exit 1) when the measured time is below that fraction of the prediction:
proof that the rate limit is not applied.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import sys
import time

import torch
import torch.distributed as dist

_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def rate_bits_per_second(rate: str) -> float | None:
    """A tc rate (``50mbit``, ``1gbit``, ``10mbps``) in bits per second; None for ``none``."""
    if rate == "none":
        return None
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([kmgt]?)(bit|bps)", rate)
    if match is None:
        raise ValueError(f"rate={rate!r} is invalid: allowed a tc rate like 1gbit or 'none'")
    value, prefix, unit = match.groups()
    bits = float(value) * _UNITS[prefix]
    return bits * 8 if unit == "bps" else bits


def ring_allreduce_seconds(nbytes: int, world_size: int, bits_per_second: float) -> float:
    """Time a bandwidth-optimal (ring) all-reduce of ``nbytes`` needs when every rank's link
    carries ``bits_per_second`` in each direction: each rank sends and receives
    ``2 (P - 1) / P * nbytes``."""
    return 2 * (world_size - 1) / world_size * nbytes * 8 / bits_per_second


def main(argv: list[str] | None = None) -> int:
    """Entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=64.0,
                        help="all-reduced tensor size in MB (10^6 bytes, float32; default 64)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed all-reduces; the median is reported (default 3)")
    parser.add_argument("--min-ratio", type=float, default=None,
                        help="fail unless measured/predicted time >= this (e.g. 0.5)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="process-group timeout in seconds (default 120)")
    args = parser.parse_args(argv)
    if args.mb <= 0:
        parser.error(f"--mb {args.mb} is invalid: allowed a size > 0")
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats} is invalid: allowed an int >= 1")

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    numel = int(args.mb * 1e6) // 4
    tensor = torch.ones(numel)
    dist.all_reduce(torch.ones(1024))  # connect every pair before timing
    times = []
    for _ in range(args.repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        times.append(time.perf_counter() - start)
    # ones summed over world_size ranks, repeated: an exact small integer in float32.
    expected_value = float(world_size ** args.repeats)
    correct = bool(tensor[0].item() == expected_value and tensor[-1].item() == expected_value)
    dist.barrier()
    dist.destroy_process_group()

    rate = os.environ.get("DISTK_NETEM_RATE", "none")
    bits = rate_bits_per_second(rate)
    nbytes = numel * 4
    median = statistics.median(times)
    predicted = ring_allreduce_seconds(nbytes, world_size, bits) if bits else None
    report = {
        "world_size": world_size, "rate": rate, "bytes": nbytes, "repeats": args.repeats,
        "seconds_median": round(median, 4), "seconds_min": round(min(times), 4),
        "predicted_seconds": round(predicted, 4) if predicted else None,
        "ratio": round(median / predicted, 3) if predicted else None,
        "achieved_gbit_per_s": round(
            2 * (world_size - 1) / world_size * nbytes * 8 / median / 1e9, 3),
        "correct": correct,
    }
    if rank == 0:
        print(json.dumps(report), flush=True)
    if not correct:
        print(f"rank {rank}: wrong all-reduce result {tensor[0].item()} "
              f"(expected {expected_value})", file=sys.stderr)
        return 1
    if args.min_ratio is not None and predicted and median < args.min_ratio * predicted:
        print(f"rank {rank}: all-reduce took {median:.3f}s, below {args.min_ratio} x the "
              f"{predicted:.3f}s the {rate} limit predicts: the limit is not applied",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
