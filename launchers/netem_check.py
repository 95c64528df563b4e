"""Measure the emulated network (launchers/netem.sh): a gloo all-reduce timed across hosts,
or (``--transfer``) one-way TCP transfers of given sizes between two hosts.

Run it through the launcher, one rank per network namespace, e.g. (docs/netem.md)::

    sudo launchers/netem.sh run 2 1gbit -- .venv/bin/python launchers/netem_check.py --mb 64
    sudo launchers/netem.sh run 2 20mbit -- \
        .venv/bin/python launchers/netem_check.py --transfer 65536 4194304

All-reduce: rank 0 prints one JSON line: the all-reduce's median seconds, the time the
link rate predicts (a ring all-reduce sends ``2 (P - 1) / P`` times the tensor from every
rank; from ``DISTK_NETEM_RATE``, set by the launcher) and their ratio. With
``--min-ratio`` the script fails (exit 1) when the measured time is below that fraction
of the prediction: proof that the rate limit is not applied.

Transfer: host 1 sends each size to host 0 over one TCP connection, after an idle pause
that refills the shaper's bucket (the case where a burst would let a small message through
at line speed), and waits for host 0's one-byte reply that the last byte arrived. Host 1
prints one JSON line per size: the median seconds, the time the rate predicts for the
frames on the wire (payload plus each segment's Ethernet, IP and TCP headers) and their
ratio. ``--min-ratio`` / ``--max-ratio`` fail the run outside those bounds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import socket
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


def wire_bytes(payload: int, mss: int, frame: int) -> int:
    """Bytes a TCP payload occupies on an Ethernet link: ``ceil(payload / mss)`` segments,
    each carrying ``frame - mss`` bytes of Ethernet, IP and TCP headers (``frame`` = MTU +
    14, the largest frame, which carries ``mss`` payload bytes)."""
    return payload + -(-payload // mss) * (frame - mss)


def _recv_exactly(conn: socket.socket, nbytes: int, buffer: bytearray) -> None:
    view = memoryview(buffer)
    left = nbytes
    while left:
        got = conn.recv_into(view[:min(left, len(view))])
        if not got:
            raise ConnectionError(f"peer closed the connection with {left} bytes missing")
        left -= got


def transfer(sizes: list[int], repeats: int, idle: float, timeout: float) -> list[dict] | None:
    """Time one-way TCP transfers host 1 -> host 0 (see the module docstring); host 1
    returns one report per size, host 0 None."""
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size != 2:
        raise ValueError(f"--transfer needs WORLD_SIZE=2 (two hosts), got {world_size}")
    address = (os.environ["MASTER_ADDR"], int(os.environ.get("MASTER_PORT", "29500")))
    rounds = [size for size in sizes for _ in range(repeats)]
    buffer = bytearray(1 << 20)
    if rank == 0:
        with socket.create_server(address) as server:
            server.settimeout(timeout)
            conn, _ = server.accept()
        with conn:
            conn.settimeout(timeout)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for size in rounds:
                _recv_exactly(conn, size, buffer)
                conn.sendall(b"\x01")
        return None
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = socket.create_connection(address, timeout=timeout)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    interface = os.environ.get("GLOO_SOCKET_IFNAME", "veth0")
    with open(f"/sys/class/net/{interface}/mtu") as fh:
        frame = int(fh.read()) + 14
    times: dict[int, list[float]] = {size: [] for size in sizes}
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mss = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
        payload = bytes(max(sizes))
        for size in rounds:
            time.sleep(idle)
            begin = time.perf_counter()
            conn.sendall(memoryview(payload)[:size])
            _recv_exactly(conn, 1, buffer)
            times[size].append(time.perf_counter() - begin)
    bits = rate_bits_per_second(os.environ.get("DISTK_NETEM_RATE", "none"))
    reports = []
    for size in sizes:
        median = statistics.median(times[size])
        on_wire = wire_bytes(size, mss, frame)
        predicted = on_wire * 8 / bits if bits else None
        reports.append({
            "bytes": size, "wire_bytes": on_wire, "mss": mss, "repeats": repeats,
            "rate": os.environ.get("DISTK_NETEM_RATE", "none"),
            "seconds_median": round(median, 5), "seconds_min": round(min(times[size]), 5),
            "seconds_max": round(max(times[size]), 5),
            "predicted_seconds": round(predicted, 5) if predicted else None,
            "ratio": round(median / predicted, 3) if predicted else None})
    return reports


def main(argv: list[str] | None = None) -> int:
    """Entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=64.0,
                        help="all-reduced tensor size in MB (10^6 bytes, float32; default 64)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed all-reduces; the median is reported (default 3)")
    parser.add_argument("--min-ratio", type=float, default=None,
                        help="fail unless measured/predicted time >= this (e.g. 0.5)")
    parser.add_argument("--max-ratio", type=float, default=None,
                        help="fail unless measured/predicted time <= this (e.g. 1.15)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="process-group (or connection) timeout in seconds (default 120)")
    parser.add_argument("--transfer", type=int, nargs="+", default=None, metavar="BYTES",
                        help="time one-way TCP transfers of these sizes from host 1 to "
                             "host 0 instead of the all-reduce (2 hosts)")
    parser.add_argument("--idle", type=float, default=0.2,
                        help="--transfer: seconds of silence before each transfer, so the "
                             "shaper's bucket is full (default 0.2)")
    args = parser.parse_args(argv)
    if args.mb <= 0:
        parser.error(f"--mb {args.mb} is invalid: allowed a size > 0")
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats} is invalid: allowed an int >= 1")
    if args.transfer is not None and any(size < 1 for size in args.transfer):
        parser.error(f"--transfer {args.transfer} is invalid: allowed sizes >= 1 byte")
    if args.idle < 0:
        parser.error(f"--idle {args.idle} is invalid: allowed seconds >= 0")
    if args.transfer is not None:
        return _check_transfers(args)

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
    if args.max_ratio is not None and predicted and median > args.max_ratio * predicted:
        print(f"rank {rank}: all-reduce took {median:.3f}s, above {args.max_ratio} x the "
              f"{predicted:.3f}s the {rate} limit predicts", file=sys.stderr)
        return 1
    if args.min_ratio is not None and predicted and median < args.min_ratio * predicted:
        print(f"rank {rank}: all-reduce took {median:.3f}s, below {args.min_ratio} x the "
              f"{predicted:.3f}s the {rate} limit predicts: the limit is not applied",
              file=sys.stderr)
        return 1
    return 0


def _check_transfers(args: argparse.Namespace) -> int:
    reports = transfer(args.transfer, args.repeats, args.idle, args.timeout)
    if reports is None:
        return 0
    status = 0
    for report in reports:
        print(json.dumps(report), flush=True)
        ratio = report["ratio"]
        if ratio is None:
            continue
        if args.min_ratio is not None and ratio < args.min_ratio:
            print(f"transfer of {report['bytes']} bytes took {report['seconds_median']}s, "
                  f"{ratio} x the {report['predicted_seconds']}s the {report['rate']} limit "
                  f"predicts, below --min-ratio {args.min_ratio}: the limit lets it through",
                  file=sys.stderr)
            status = 1
        if args.max_ratio is not None and ratio > args.max_ratio:
            print(f"transfer of {report['bytes']} bytes took {report['seconds_median']}s, "
                  f"{ratio} x the {report['predicted_seconds']}s the {report['rate']} limit "
                  f"predicts, above --max-ratio {args.max_ratio}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
