"""Compute time of one dense training step, no communication (``benchmarks/e2e.py``'s
calibration of the dilated emulation).

Every rank builds the training job's model, data and optimizer from a distk-train config
and times ``--steps`` steps of forward + backward (under DDP's ``no_sync``: no gradient
exchange) + gradient clipping + optimizer step, after ``--warmup`` untimed ones, then
(``--eval``) one evaluation of the job's validation windows. Rank 0 prints one JSON line:
the median step seconds (the slowest rank's), the evaluation's seconds (the slowest
rank's), the parameter count and the bytes one rank transmits in a ring all-reduce of the
fp32 gradient.

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
from distk.train.model import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="distk-train JSON config")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--eval", action="store_true",
                        help="also time one evaluation (train.eval_windows windows)")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps {args.steps} / --warmup {args.warmup} is invalid: allowed "
                     "--steps >= 1 and --warmup >= 0")
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
    eval_seconds = 0.0
    if args.eval:
        dist.barrier()
        begin = time.perf_counter()
        evaluate(model, data.val_batches())
        eval_seconds = time.perf_counter() - begin
    # Each rank's figures, then the slowest rank's (a step waits for it).
    slowest = torch.tensor([statistics.median(times[args.warmup:]), eval_seconds],
                           dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    numel = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(json.dumps({"compute_seconds": float(slowest[0]),
                          "eval_seconds": float(slowest[1]) if args.eval else None,
                          "eval_windows": cfg.train.eval_windows, "params": numel,
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
