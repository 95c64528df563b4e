"""Compute time of one dense training step, no communication (``benchmarks/e2e.py``'s
calibration of the dilated emulation).

Every rank builds the training job's model, data and optimizer from a distk-train config
and times ``--steps`` steps of forward + backward (under DDP's ``no_sync``: no gradient
exchange) + gradient clipping + optimizer step, after ``--warmup`` untimed ones. Rank 0
prints one JSON line: the median step seconds (the slowest rank's), the parameter count
and the bytes one rank transmits in a ring all-reduce of the fp32 gradient.

    netem.sh run 2 none -- .venv/bin/python benchmarks/e2e_compute.py --config C.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from distk.comm.exchange import dense_allreduce_bytes
from distk.train import build_data, build_model, build_optimizer, load_config, setup_distributed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="distk-train JSON config")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    rank, world, device = setup_distributed(cfg)
    data = build_data(cfg, rank, world, device)
    model = build_model(cfg, device)
    ddp = DistributedDataParallel(model, bucket_cap_mb=cfg.train.bucket_cap_mb)
    optimizer = build_optimizer(model, cfg)
    times = []
    dist.barrier()
    for step in range(args.warmup + args.steps):
        begin = time.perf_counter()
        with ddp.no_sync():
            _, loss = ddp(*data.train_batch(step))
            loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - begin)
    median = torch.tensor([statistics.median(times[args.warmup:])], dtype=torch.float64)
    dist.all_reduce(median, op=dist.ReduceOp.MAX)
    numel = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(json.dumps({"compute_seconds": float(median), "params": numel,
                          "world_size": world,
                          "dense_bytes_per_rank": dense_allreduce_bytes(numel, world, 4),
                          "steps": args.steps, "warmup": args.warmup}), flush=True)
    # As distk-train does: barrier, teardown, then os._exit, so gloo's known abort at
    # interpreter exit ("terminate called without an active exception") cannot turn a
    # finished calibration into a failure (an exception above still exits non-zero).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from distk.train.__main__ import exit_after_clean_finish

    main()
    exit_after_clean_finish(0)
