"""A small DDP + distk training job with fault injection, used by ``tests/test_faults.py``.

One process per rank, joined through the ``env://`` variables (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) that torchrun sets, or that a test sets itself::

    torchrun --standalone --nproc_per_node 2 --max-restarts 1 tests/fault_job.py \\
        --run-dir /tmp/run --steps 40 --checkpoint-every 5 --resume \\
        --fault crash --fault-step 12 --fault-rank 1

It trains a small MLP regressor with ``DistributedDataParallel`` + ``distk.ddp.enable``
(5 % density, error feedback, SGD with momentum), checkpoints with the training job's
helpers (:mod:`distk.train.checkpoint`: model, optimizer, distk residuals, step) and
appends rank 0's loss of every step to ``<run-dir>/losses.jsonl`` (one JSON object per
step with the torchrun restart count; it depends on every rank through the parameters).
After the first step the only collectives of a step are distk's exchanges, so a peer's
failure surfaces inside distk. Batches depend only on ``(step, rank)``, so a resumed run
sees the same data as an uninterrupted one.

Torchrun restarts need ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` with torch 2.13 (see
docs/reliability.md).

Faults (``--fault``, at the start of step ``--fault-step`` on rank ``--fault-rank``):
``crash`` exits with status 13, but only in the first attempt (``TORCHELASTIC_RESTART_COUNT``
is 0 or unset), so a torchrun restart runs through; ``kill`` sends SIGKILL to itself;
``stop`` sends SIGSTOP to itself (a stalled rank: its sockets stay open, peers wait for
the collective timeout).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import distk
from distk.train.__main__ import exit_after_clean_finish
from distk.train.checkpoint import load_checkpoint, save_checkpoint
from distk.train.loop import rebuild_ddp_buckets

FEATURES = 32


class Regressor(nn.Module):
    """MLP returning ``(prediction, mse_loss)``, the interface of the training job's model."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(FEATURES, 256), nn.Tanh(), nn.Linear(256, 256),
                                 nn.Tanh(), nn.Linear(256, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prediction = self.net(x)
        return prediction, nn.functional.mse_loss(prediction, y)


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``(step, rank)``: a noisy linear teacher, different on every rank."""
    gen = torch.Generator().manual_seed(1_000_003 * step + rank)
    x = torch.randn(64, FEATURES, generator=gen)
    teacher = torch.linspace(-1.0, 1.0, FEATURES)
    y = (x @ teacher).unsqueeze(1) / 4 + 0.01 * torch.randn(64, 1, generator=gen)
    return x, y


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="checkpoint and losses.jsonl folder")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="0 = never")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run directory's checkpoint when there is one")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="collective timeout of the gloo process group, seconds")
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--fault", choices=("none", "crash", "kill", "stop"),
                        default="none")
    parser.add_argument("--fault-step", type=int, default=-1)
    parser.add_argument("--fault-rank", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def inject(args: argparse.Namespace, step: int, rank: int) -> None:
    """Trigger the configured process-level fault at the start of ``step``."""
    if args.fault_step != step or args.fault_rank != rank:
        return
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    print(f"fault_job: rank {rank} injects {args.fault!r} at step {step}", file=sys.stderr,
          flush=True)
    if args.fault == "crash" and first_attempt:
        os._exit(13)
    if args.fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if args.fault == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir = Path(args.run_dir)

    torch.manual_seed(args.seed)
    model = Regressor()
    ddp = DistributedDataParallel(model)
    cfg = distk.SparsityConfig(density=args.density, min_numel=64)
    state = distk.ddp.enable(ddp, cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    start = 0
    payload = load_checkpoint(run_dir, rank=rank, world_size=world) \
        if args.resume else None
    if payload is not None:
        # A new DDP model rebuilds its buckets after its first backward; do that now (one
        # discarded dense iteration) so the residuals load into the final bucket layout.
        rebuild_ddp_buckets(ddp, batch(payload["step"], rank))
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        state.load_state_dict(payload["distk"])
        start = int(payload["step"])
        if rank == 0:
            print(f"fault_job: resumed from step {start}", file=sys.stderr, flush=True)

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    log = run_dir / "losses.jsonl"
    run_dir.mkdir(parents=True, exist_ok=True)
    for step in range(start, args.steps):
        inject(args, step, rank)
        x, y = batch(step, rank)
        _, loss = ddp(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0:  # no collective here: every collective of a step is distk's
            with log.open("a") as out:
                out.write(json.dumps({"step": step + 1, "loss": loss.item(),
                                      "attempt": attempt}) + "\n")
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            save_checkpoint(run_dir, step=step + 1, model=model, optimizer=optimizer,
                            distk_state=state.state_dict(), extra={}, rank=rank,
                            world_size=world)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_after_clean_finish(main())  # as distk-train does
