"""Run a function on N real processes joined by a gloo process group, under a timeout.

Tests call ``run_distributed(fn, world_size, *args, timeout=60)``; ``fn(rank, world_size,
*args)`` runs in every process after ``init_process_group("gloo")`` and its return values
come back as a list indexed by rank. An exception on any rank fails the test with that
rank's traceback; a rank that does not finish within ``timeout`` seconds fails the test
(all processes are killed), so a hang can never block CI. No part of
``torch.distributed`` is mocked.
"""

from __future__ import annotations

import os
import pickle
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue: Any,
            pg_timeout: float) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        result = fn(rank, world_size, *args)
        # Pickle here: tensors put on a multiprocessing queue travel as shared-memory
        # handles that vanish when this process exits before the parent reads them.
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - the traceback is shipped to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0,
                    pg_timeout: float | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes.

    ``fn`` must be importable (a module-level function). ``timeout`` bounds the whole
    run; ``pg_timeout`` (default: ``timeout``) is the process group's collective timeout.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker,
                    args=(rank, world_size, port, fn, args, queue, pg_timeout or timeout),
                    daemon=True)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    failures: list[str] = []
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(failures) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"distributed test did not finish within {timeout:.0f}s "
                    f"(ranks done: {sorted(results)}); treating as a hang"
                )
            try:
                rank, ok, payload = queue.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and queue.empty():
                    time.sleep(0.5)
                    if queue.empty():
                        codes = {i: p.exitcode for i, p in enumerate(procs)}
                        raise RuntimeError(
                            f"a rank died without reporting: exit codes {codes}") from None
                continue
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                failures.append(f"--- rank {rank} ---\n{payload}")
                break
    finally:
        for proc in procs:
            proc.join(timeout=5)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
    if failures:
        raise AssertionError("a rank raised:\n" + "\n".join(failures))
    return [results[r] for r in range(world_size)]


def teacher_batch(rank: int, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A 32 x 16 batch of a linear teacher, distinct per (rank, step, micro-batch): the
    data of the DDP and FSDP parity tests."""
    gen = torch.Generator().manual_seed(1000 * step + 100 * rank + micro)
    x = torch.randn(32, 16, generator=gen)
    y = (x @ torch.linspace(-1.0, 1.0, 16)).unsqueeze(1) / 2
    return x, y
