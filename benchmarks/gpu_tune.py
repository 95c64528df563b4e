"""Tuning aid for the Triton selection kernels (development; needs CUDA).

    python benchmarks/gpu_tune.py [--ncu]

Times the ``compact`` kernel alone (no Python around it) for several tile shapes and
warp counts, with a real floor and with a floor that no entry passes (which isolates the
cost of the candidate appends), and profiles ``distk.topk`` on CPU and GPU to separate
host overhead from kernel time. Writes benchmarks/results/gpu_tune.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_check import time_cuda  # noqa: E402  (benchmarks/ is this script's folder)

import distk  # noqa: E402
from distk.selection.reference import order_keys  # noqa: E402
from distk.selection.triton_kernel import KERNELS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def compact_variants(rows, n, dtype, buckets, above_per_bucket, out):
    x = torch.randn(rows, n, device="cuda").to(dtype)
    length = -(-n // buckets)
    keys = order_keys(x, True)
    floor = torch.kthvalue(keys, n - int(above_per_bucket * buckets), dim=1).values
    never = torch.full_like(floor, 0x7FFFFFFF)
    cap = 64
    cand = torch.empty(rows * buckets * cap, dtype=torch.int64, device="cuda")
    count = torch.zeros(rows * buckets, dtype=torch.int32, device="cuda")
    nbytes = x.numel() * x.element_size()
    for tile_t, block_b, warps in ((8, 128, 4), (16, 128, 4), (32, 128, 4), (32, 128, 8),
                                   (8, 256, 4), (16, 256, 8), (4, 512, 4), (64, 64, 4),
                                   (32, 256, 8)):
        blocks = -(-buckets // block_b)
        for segments in (1, 4, 16):
            if length // segments < tile_t:
                continue
            seg_len = -(-length // segments)
            grid = (rows * blocks, segments)
            for label, fl in (("floor", floor), ("no hits", never)):
                def call():
                    count.zero_()
                    KERNELS["compact"][grid](x, fl, cand, count, n, buckets, length, seg_len,
                                             blocks, cap, 1, TILE_T=tile_t, BLOCK_B=block_b,
                                             INTERLEAVED=True, num_warps=warps)
                us = time_cuda(lambda _: call(), [None]) * 1000
                row = {"rows": rows, "n": n, "dtype": str(dtype), "buckets": buckets,
                       "tile_t": tile_t, "block_b": block_b, "warps": warps,
                       "segments": segments, "programs": grid[0] * grid[1], "floor": label,
                       "us": us, "GBps": nbytes / us / 1e3}
                out.append(row)
                print(f"  {rows}x{n} {str(dtype)[6:]:8} b={buckets:6} tile {tile_t:2}x{block_b:3}"
                      f" w{warps} seg {segments:2} progs {row['programs']:6} {label:7} "
                      f"{us:8.1f} us {row['GBps']:6.0f} GB/s", flush=True)


def host_profile(out):
    from torch.profiler import ProfilerActivity, profile

    for rows, n, dtype, k in ((1, 1 << 26, torch.float32, (1 << 26) // 1000),
                              (256, 1 << 20, torch.float16, 1024)):
        x = torch.randn(rows, n, device="cuda").to(dtype)
        for _ in range(3):
            distk.topk(x, k)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            distk.topk(x, k)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18,
                                          max_name_column_width=60)
        print(table, flush=True)
        out.append({"rows": rows, "n": n, "table": table})


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(RESULTS / "gpu_tune.json"))
    parser.add_argument("--single", action="store_true",
                        help="one distk.topk call on a 2^26 fp32 row (a target for ncu)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_tune: no CUDA device")
        return 0
    if args.single:
        x = torch.randn(1, 1 << 26, device="cuda")
        distk.topk(x, (1 << 26) // 1000)
        torch.cuda.synchronize()
        return 0
    report = {"compact": [], "host": []}
    host_profile(report["host"])
    compact_variants(1, 1 << 26, torch.float32, 48528, 2.9, report["compact"])
    compact_variants(256, 1 << 20, torch.float16, 400, 5.3, report["compact"])
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
