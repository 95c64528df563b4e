"""Benchmark: cost of the compact wire codecs on one device (no network).

For a flat fp32 gradient of ``2^--numel-log2`` entries and density ``--density`` (a
bucketed selection with no second stage, as the compressor plans it), per value width
(``none`` = fp32 values and 16-bit offsets, then 8, 4, 2, 1 bits):

* ``bits/entry`` and ``bits/param``: payload bits per selected entry and per entry of
  the tensor (one rank's payload per step);
* ``pack ms`` / ``unpack ms``: :meth:`WireFormat.pack` of the selected entries and
  :meth:`WireFormat.unpack` of 2 such payloads (what a rank decodes in a 2-rank
  all-gather), medians of ``--repeat`` runs after a warm-up;
* ``rel err``: ``||decoded - values|| / ||values||`` of one step (what stays in the
  residual for later steps).

    python benchmarks/codec.py                       # CPU
    python benchmarks/codec.py --device cuda         # GPU

Prints a table; ``--json PATH`` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from distk.comm.wire import WireFormat
from distk.selection import per_bucket_topk
from distk.selection.reference import positions_of


def _timed(fn, repeat: int, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--numel-log2", type=int, default=24)
    parser.add_argument("--density", type=float, default=64 / 4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    numel = 1 << args.numel_log2
    # The compressor's plan at its default recall target: 64 entries per bucket.
    k_per_bucket = 64
    buckets = max(1, round(args.density * numel / k_per_bucket))
    k = buckets * k_per_bucket
    grad = torch.randn(numel, generator=torch.Generator().manual_seed(0)).to(device)
    keys = per_bucket_topk(grad.view(1, -1), buckets, k_per_bucket, True, True)
    positions = positions_of(keys).reshape(-1)
    values = grad[positions]
    rows = []
    print(f"numel 2^{args.numel_log2}, k {k} ({buckets} buckets x {k_per_bucket}), "
          f"device {device}")
    print(f"{'bits':>5} {'bits/entry':>10} {'bits/param':>10} {'pack ms':>8} {'unpack ms':>9} "
          f"{'rel err':>8}")
    for bits in (None, 8, 4, 2, 1):
        wire = WireFormat(numel, k, torch.float32, buckets, k_per_bucket, True, bits)
        payload = wire.pack(positions, values)
        gathered = torch.stack([payload, payload])
        pack_ms = _timed(lambda w=wire: w.pack(positions, values), args.repeat, device)
        unpack_ms = _timed(lambda w=wire, g=gathered: w.unpack(g), args.repeat, device)
        error = float((wire.decoded(values) - values).norm() / values.norm())
        row = {"value_bits": bits, "bits_per_entry": wire.bits_per_entry,
               "bits_per_param": 8 * wire.payload_bytes / numel, "pack_ms": pack_ms,
               "unpack_ms": unpack_ms, "relative_error": error, "device": str(device),
               "numel": numel, "k": k}
        rows.append(row)
        print(f"{bits or 'none':>5} {row['bits_per_entry']:>10.2f} {row['bits_per_param']:>10.4f} "
              f"{pack_ms:>8.2f} {unpack_ms:>9.2f} {error:>8.4f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
