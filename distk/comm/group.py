"""Process-group helpers every collective caller shares: where a collective runs, whether
all ranks agree, a digest that is the same on ranks that agree, and the ring formula.

One helper per concern, used everywhere (the exchange, the config check, the per-rank
checkpoints, outer synchronisation, the DeepSpeed adapter), so that "NCCL needs CUDA
tensors" or "all ranks restore or none" is decided in one place.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["CollectiveError", "agree", "all_gather_flat", "collective_device", "collective_errors",
           "digest63", "rank_and_world", "ring_allreduce_bytes", "tensor_digest"]

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_DIGEST_MULTIPLIER = 0x9E3779B1  # odd: position weights differ modulo 2^64


def rank_and_world(group: Any = None) -> tuple[int, int]:
    """``(rank, world size)`` in ``group``; ``(0, 1)`` when no process group is initialised."""
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class CollectiveError(RuntimeError):
    """A collective failed on this rank: a peer rank exited (crash, kill, out of memory),
    stalled past the process group's timeout, or the connection broke. The backend's
    error is chained as ``__cause__``."""


@contextlib.contextmanager
def collective_errors(what: str, group: Any = None):
    """Re-raise a backend failure inside the block (the launch or the wait of a
    collective) as :class:`CollectiveError` naming ``what``, this rank and the likely
    cause. Every collective distk runs goes through it, so a dead peer reads the same
    wherever it is noticed."""
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as err:  # gloo/nccl errors, DistBackendError, timeouts
        rank, world = rank_and_world(group)
        raise CollectiveError(
            f"distk.comm: {what} failed on rank {rank} of {world}: a peer rank probably "
            "exited (crash, kill, out of memory) or stalled longer than the process group's "
            "timeout (init_process_group(timeout=...)). Check the other ranks' logs and "
            f"resume from the last checkpoint. Backend error: {err}") from err


def all_gather_flat(out: torch.Tensor, inp: torch.Tensor, group: Any = None, *,
                    what: str = "an all-gather", async_op: bool = False) -> Any:
    """Every rank's ``inp`` concatenated into ``out`` (``world * inp.numel()`` entries),
    with torch's single-tensor all-gather (``all_gather_single`` where this torch has it,
    else ``all_gather_into_tensor``) and backend failures raised as
    :class:`CollectiveError` naming ``what``. Returns the work handle when ``async_op``
    (whose wait the caller guards with :func:`collective_errors`)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    with collective_errors(what, group):
        return gather(out, inp, group=group, async_op=async_op)


def collective_device(group: Any = None, like: torch.Tensor | None = None) -> torch.device:
    """The device a collective of ``group`` runs on: CUDA for NCCL (``like``'s device when
    it is a CUDA tensor, else the current CUDA device), the CPU for every other backend
    (a CUDA tensor on gloo is staged through the CPU).

    Raises:
        ValueError: NCCL with a ``like`` tensor that is not on a CUDA device.
    """
    backend = str(dist.get_backend(group))
    if "nccl" not in backend:
        return torch.device("cpu")
    if like is not None:
        if like.is_cuda:
            return like.device
        if backend == "nccl":
            raise ValueError(f"the NCCL backend needs CUDA tensors, got a tensor on "
                             f"{like.device}")
    return torch.device("cuda", torch.cuda.current_device())


def agree(code: int, group: Any = None, *, op: str = "max") -> int:
    """Every rank's ``code`` combined by ``op`` (``"max"`` or ``"min"``); collective, and
    every rank gets the same answer. The one way ranks decide together ("all restore or
    none", "does any rank have a file"): encode the outcomes so that the worst one is the
    largest (``"max"``) or smallest (``"min"``). Without a process group: ``code``."""
    if op not in ("max", "min"):
        raise ValueError(f"op must be 'max' or 'min', got {op!r}")
    _, world = rank_and_world(group)
    if world == 1:
        return int(code)
    flag = torch.tensor([int(code)], dtype=torch.int64, device=collective_device(group))
    with collective_errors("an agreement (all-reduce)", group):
        dist.all_reduce(flag, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN,
                        group=group)
    return int(flag.item())


def digest63(fields: Iterable[Any]) -> int:
    """A 63-bit digest of ``fields`` (their ``str``), the same in every process: what
    ranks compare to learn, in one int64, whether they hold the same sizes, options or
    mask."""
    text = ",".join(map(str, fields)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def tensor_digest(tensor: torch.Tensor) -> torch.Tensor:
    """Exact-bits digest of a tensor as a 0-d int64 on its device (no host sync): the bit
    patterns weighted by odd position-dependent factors, summed modulo 2^64. Equal
    tensors give equal digests on every rank; what ranks all-gather to check that they
    hold the same parameters or the same shared mask."""
    flat = tensor.detach().contiguous().reshape(-1)
    bits = flat.view(_INT_OF_SIZE[flat.element_size()]).to(torch.int64)
    weights = torch.arange(flat.numel(), dtype=torch.int64, device=flat.device)
    return (bits * (weights * _DIGEST_MULTIPLIER + 1)).sum()


def ring_allreduce_bytes(numel: int, world_size: int, itemsize: int) -> int:
    """Bytes one rank transmits in a ring all-reduce of ``numel`` entries of ``itemsize``
    bytes: ``2 (P - 1) ceil(n / P)`` entries (reduce-scatter, then all-gather)."""
    if world_size <= 1:
        return 0
    return 2 * (world_size - 1) * math.ceil(numel / world_size) * itemsize
