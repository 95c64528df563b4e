"""DistributedDataParallel integration: a DDP communication hook over the shared compressor.

Usage::

    ddp_model = torch.nn.parallel.DistributedDataParallel(model)
    state = distk.ddp.enable(ddp_model, distk.SparsityConfig(density=0.01))
    ...  # train as usual; no_sync() and gradient_as_bucket_view=True work
    torch.save({"model": ..., "distk": state.state_dict()}, path)   # residuals included
    state.load_state_dict(torch.load(path)["distk"])

Each ``GradBucket`` (a flat buffer holding the gradients of several parameters) goes
through the one :class:`~distk.compressor.GradientCompressor` under the key
``bucket.index()``: residual + selection + sparse exchange, averaged over the ranks and
written back into the bucket.

Why the first iteration is dense: DDP starts with provisional buckets (torch 2.13: a
single bucket holding every parameter, unless ``find_unused_parameters=True``), records
the order in which gradients become ready during the first synchronised backward, and
*rebuilds* the buckets in that order just before the second forward. Bucket ``i`` of the
first iteration is therefore not bucket ``i`` later, so a residual kept under that key
would be added to the wrong parameters. The hook all-reduces densely until at least one
synchronised iteration has completed: in all ``max(1, cfg.dense_steps)`` iterations are
dense (the compressor runs the later ones, with its key-indexed state); after that
bucket indices are stable (PowerSGD's hook has the same warm-up, for the same
reason). A bucket whose size changes later anyway fails loudly instead of mixing
residuals.

Resuming from a checkpoint: a freshly built DDP model rebuilds its buckets again after
its first synchronised iteration, so that iteration is all-reduced densely too; the
restored residuals are kept untouched through it and enter the next step (a one-step
delay, which error feedback tolerates). The bucket sizes travel in the checkpoint and
are checked against the new layout.
"""

# No ``from __future__ import annotations`` here: DDP's register_comm_hook compares the
# hook's annotations with dist.GradBucket / Future[Tensor] objects, not strings.
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from distk.comm import check_same_config
from distk.integrations._state import (
    CompressionState,
    as_flat,
    dense_stats,
)

__all__ = ["DDPCompressionState", "enable", "sparse_allreduce_hook"]

# DDP rebuilds its buckets once, after the first synchronised iteration.
_BUCKET_REBUILD_ITERATIONS = 1


class DDPCompressionState(CompressionState):
    """State of the DDP hook: the compressor, counters, last-step stats, bucket sizes.

    See :class:`~distk.integrations._state.CompressionState` for ``compressor``,
    ``stats``, ``iteration``, ``state_dict`` and ``load_state_dict``.

    Attributes:
        bucket_numels: number of elements of each bucket, by bucket index, as seen since
            compression started (checked every step, saved in checkpoints).
        local_iterations: synchronised iterations this hook has seen in this process (not
            checkpointed: a new DDP model rebuilds its buckets again). The first
            ``_BUCKET_REBUILD_ITERATIONS`` of them bypass the compressor.
    """

    __slots__ = ("bucket_numels", "local_iterations")

    def __init__(self, cfg: Any, process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__(cfg, process_group)
        self.bucket_numels: dict[int, int] = {}
        self.local_iterations = 0

    def _make_compressor(self) -> Any:
        from distk.compressor import GradientCompressor

        # The compressor counts dense_steps per key from its first call, which comes after
        # the hook's own dense rebuild iteration(s); shift so that the dense iterations
        # total max(rebuild iterations, cfg.dense_steps), not their sum.
        shifted = max(0, self.cfg.dense_steps - _BUCKET_REBUILD_ITERATIONS)
        return GradientCompressor(self.cfg.replace(dense_steps=shifted),
                                  group=self.process_group)

    def _finish_step(self) -> None:
        if self._seen_keys:
            self.local_iterations += 1
        super()._finish_step()

    def state_dict(self) -> dict[str, Any]:
        """The common state plus the bucket sizes (so a resumed run checks them too)."""
        state = super().state_dict()
        state["bucket_numels"] = dict(self.bucket_numels)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore residuals, counters and bucket sizes from :meth:`state_dict`."""
        super().load_state_dict(state_dict)
        self.bucket_numels = {int(k): int(v) for k, v in state_dict["bucket_numels"].items()}

    def _extra_setstate(self, state: dict[str, Any]) -> None:
        del state
        self.bucket_numels = {}
        self.local_iterations = 0


def _dense_allreduce(state: DDPCompressionState, buffer: torch.Tensor,
                     index: int) -> dict[str, Any]:
    """Average ``buffer`` in place by a plain all-reduce; returns its stats.

    Applies ``cfg.nonfinite`` like the compressor does: NaN/Inf survive the sum, so every
    rank sees the same non-finite result and takes the same decision without another
    collective ("zero" drops the entries locally before the sum)."""
    from distk.compressor import NonFiniteGradientError

    start = time.perf_counter()
    policy = state.cfg.nonfinite
    if policy == "zero":
        buffer.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    # Divide first, like DDP's default hook, so fp16 sums cannot overflow.
    buffer.div_(state.world_size())
    dist.all_reduce(buffer, group=state.process_group)
    stats = dense_stats(buffer.numel(), buffer.element_size(), state.world_size(),
                        time.perf_counter() - start)
    if policy != "zero" and not bool(torch.isfinite(buffer).all()):
        if policy == "raise":
            raise NonFiniteGradientError(
                f"non-finite gradient (NaN or Inf) at step {state.iteration} (DDP's dense "
                f"bucket-rebuild iteration) in DDP bucket {index} on at least one rank; set "
                "SparsityConfig.nonfinite to 'skip' (drop the step on every rank) or 'zero' "
                "(treat entries as 0)")
        buffer.zero_()  # "skip": the step's update is zero on every rank
        stats["skipped"] = True
    return stats


def sparse_allreduce_hook(
    state: DDPCompressionState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: average ``bucket`` through the sparse compressor.

    Register it with ``ddp_model.register_comm_hook(state, sparse_allreduce_hook)``, or
    let :func:`enable` do it. Returns an already completed future holding the bucket's
    buffer, now the rank-averaged (sparsified, error-compensated) gradient; DDP copies it
    into ``param.grad`` (or, with ``gradient_as_bucket_view=True``, ``param.grad`` already
    views it).
    """
    index = bucket.index()
    buffer = bucket.buffer()
    state._begin_buffer(index)
    if state.local_iterations < _BUCKET_REBUILD_ITERATIONS:
        stats = _dense_allreduce(state, buffer, index)
    else:
        expected = state.bucket_numels.setdefault(index, buffer.numel())
        if expected != buffer.numel():
            raise RuntimeError(
                f"distk DDP hook: bucket {index} holds {buffer.numel()} elements but held "
                f"{expected} in earlier steps; DDP changed its bucket layout after "
                "compression started, so the per-bucket residuals no longer line up. "
                "Raise SparsityConfig.dense_steps past the point where buckets change."
            )
        flat = as_flat(buffer)
        state.compressor.step(flat, index, out=flat)
        stats = state.compressor.stats
    state._end_buffer(stats, last=bucket.is_last())
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(buffer)
    return future


def enable(ddp_model: DistributedDataParallel, cfg: Any) -> DDPCompressionState:
    """Register the distk sparse-gradient communication hook on ``ddp_model``.

    Args:
        ddp_model: a ``torch.nn.parallel.DistributedDataParallel`` module, before its
            first backward pass (DDP accepts one communication hook, registered once).
        cfg: a :class:`~distk.config.SparsityConfig` (a dict is accepted and passed to
            ``SparsityConfig.from_dict``). Every rank must pass the same config; this is
            checked collectively and a mismatch raises on every rank.

    Returns:
        The :class:`DDPCompressionState`: ``.compressor``, ``.stats`` (last step, all
        buckets merged), ``state_dict()`` / ``load_state_dict()`` for checkpoints.

    Raises:
        TypeError: ``ddp_model`` is not a DistributedDataParallel module.
        ValueError: the configs differ across ranks, or the model has sparse gradients
            (``sparse=True`` embeddings), which DDP hands to hooks as sparse tensors.
        RuntimeError: a communication hook is already registered (raised by DDP).
    """
    from distk.config import SparsityConfig

    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(
            "distk.ddp.enable expects a torch.nn.parallel.DistributedDataParallel module, "
            f"got {type(ddp_model).__name__}; for FSDP use distk.fsdp.enable"
        )
    if isinstance(cfg, dict):
        cfg = SparsityConfig.from_dict(cfg)
    if not isinstance(cfg, SparsityConfig):
        raise TypeError(f"cfg must be a distk.SparsityConfig or a dict, got {type(cfg).__name__}")
    if any(getattr(m, "sparse", False) for m in ddp_model.modules()
           if isinstance(m, torch.nn.Embedding | torch.nn.EmbeddingBag)):
        raise ValueError(
            "distk.ddp.enable does not support sparse gradients (an Embedding with "
            "sparse=True); use sparse=False or leave that module out of DDP"
        )
    group = ddp_model.process_group
    check_same_config(cfg, group)
    state = DDPCompressionState(cfg, group)
    ddp_model.register_comm_hook(state, sparse_allreduce_hook)
    return state
