"""DistributedDataParallel integration: a DDP communication hook over the shared state.

Usage::

    ddp_model = torch.nn.parallel.DistributedDataParallel(model)
    state = distk.ddp.enable(ddp_model, distk.SparsityConfig(density=0.01))
    ...  # train as usual; no_sync() and gradient_as_bucket_view=True work
    torch.save({"model": ..., "distk": state.state_dict()}, path)   # residuals included
    state.load_state_dict(torch.load(path)["distk"])

Each ``GradBucket`` (a flat buffer holding the gradients of several parameters) goes
through :meth:`~distk.integrations.CompressionState.reduce_async` under the key
``bucket.index()``: residual + selection, then the exchange's collectives are enqueued
and the hook returns a future chained on them (as PyTorch's PowerSGD hook does), so
backward goes on computing the next buckets while this one travels. The future
completes with the bucket holding the rank-averaged update.

Why the first iteration in each process is stateless: DDP starts with provisional
buckets (torch 2.13: a single bucket holding every parameter, unless
``find_unused_parameters=True``), records the order in which gradients become ready
during the first synchronised backward, and *rebuilds* the buckets in that order just
before the second forward. Bucket ``i`` of the first iteration is therefore not bucket
``i`` later, so a residual kept under that key would be added to the wrong parameters.
That iteration goes through the compressor's dense path with ``stateless=True`` (no
residual, velocity or count touched); it is step ``iteration`` like any other, so
``cfg.dense_steps`` counts it (PowerSGD's hook has the same warm-up, for the same
reason). A bucket whose size changes later anyway fails loudly instead of mixing
residuals.

Resuming from a checkpoint: a freshly built DDP model rebuilds its buckets again after
its first synchronised iteration, so that iteration is stateless too; the restored
residuals are kept untouched through it and enter the next step (a one-step delay, which
error feedback tolerates). The bucket sizes travel in the checkpoint and are checked
against the new layout.
"""

# No ``from __future__ import annotations`` here: DDP's register_comm_hook compares the
# hook's annotations with dist.GradBucket / Future[Tensor] objects, not strings.
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
from torch.nn.parallel import DistributedDataParallel

from distk.config import SparsityConfig
from distk.integrations.outer import OuterSync, attach, inner_optimizer
from distk.integrations.state import CompressionState, schedule_for_optimizer

__all__ = ["DDPCompressionState", "enable", "sparse_allreduce_hook"]


class DDPCompressionState(CompressionState):
    """State of the DDP hook: the shared state plus bucket sizes.

    See :class:`~distk.integrations.CompressionState` for ``compressor``, ``stats``,
    ``iteration``, ``state_dict`` and ``load_state_dict``.

    Attributes:
        bucket_numels: number of elements of each bucket, by bucket index, as seen since
            compression started (checked every step, saved in checkpoints).
        buckets_final: whether DDP's bucket layout is final in this process (after its
            first synchronised iteration; not checkpointed: a new DDP model rebuilds its
            buckets again).
    """

    __slots__ = ("bucket_numels", "buckets_final")

    def __init__(self, cfg: SparsityConfig | dict[str, Any],
                 process_group: dist.ProcessGroup | None = None,
                 model: torch.nn.Module | None = None) -> None:
        super().__init__(cfg, process_group, model=model, entry="distk.ddp.enable")
        self.bucket_numels: dict[int, int] = {}
        self.buckets_final = False

    def reduce_bucket(self, bucket: dist.GradBucket) -> torch.futures.Future:
        """Launch the exchange of one DDP bucket; a future of its averaged buffer."""
        index = bucket.index()
        buffer = bucket.buffer()
        if self.buckets_final:
            expected = self.bucket_numels.setdefault(index, buffer.numel())
            if expected != buffer.numel():
                raise RuntimeError(
                    f"distk DDP hook: bucket {index} holds {buffer.numel()} elements but "
                    f"held {expected} in earlier steps; DDP changed its bucket layout after "
                    "compression started, so the per-bucket residuals no longer line up. "
                    "Raise SparsityConfig.dense_steps past the point where buckets change.")
        return self.reduce_async(buffer, index, stateless=not self.buckets_final)

    def _on_step_end(self) -> None:
        self.buckets_final = True

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
        self.buckets_final = False


def sparse_allreduce_hook(
    state: DDPCompressionState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: average ``bucket`` through the sparse compressor.

    Register it with ``ddp_model.register_comm_hook(state, sparse_allreduce_hook)``, or
    let :func:`enable` do it. Returns a future completed, once the exchange's collectives
    are done, with the bucket's buffer holding the rank-averaged (sparsified,
    error-compensated) gradient; DDP copies it into ``param.grad`` (or, with
    ``gradient_as_bucket_view=True``, ``param.grad`` already views it).
    """
    return state.reduce_bucket(bucket)


def enable(ddp_model: DistributedDataParallel,
           cfg: SparsityConfig | dict[str, Any] | None = None, *,
           optimizer: Any = None) -> DDPCompressionState | OuterSync:
    """Register the distk sparse-gradient communication hook on ``ddp_model``.

    Args:
        ddp_model: a ``torch.nn.parallel.DistributedDataParallel`` module, before its
            first backward pass (DDP accepts one communication hook, registered once).
        cfg: a :class:`~distk.config.SparsityConfig` (a dict is accepted and passed to
            ``SparsityConfig.from_dict``). Every rank must pass the same config; this is
            checked collectively and a mismatch raises on every rank. ``None`` (the
            default) is distk's default for ``optimizer``
            (:meth:`SparsityConfig.default_for <distk.config.SparsityConfig.default_for>`):
            outer synchronisation (:meth:`SparsityConfig.adamw_outer()
            <distk.config.SparsityConfig.adamw_outer>`) for an Adam-family optimizer, the
            per-step ``SparsityConfig()`` otherwise; rank 0 says which.
        optimizer: the training optimizer (or a wrapper of it), optional. An Adam-family
            one (Adam, AdamW, ...) gets the Adam schedule (``cfg.adam_dense_steps`` /
            ``adam_warmup_steps`` / ``adam_value_dtype``: at least 75 dense steps, a
            200-step density warm-up and bf16 values), announced on rank 0. Without it
            the hook cannot know the optimizer and uses ``cfg`` as given. Required for
            outer synchronisation.

    Outer synchronisation (``cfg.sync_every > 1``, e.g.
    :meth:`SparsityConfig.adamw_outer() <distk.config.SparsityConfig.adamw_outer>`, the
    setting that matched dense AdamW): DDP's all-reduce is switched off (PyTorch's
    ``noop_hook``), every rank steps ``optimizer`` on its own gradients, and after every
    ``sync_every``-th step the ranks exchange compressed pseudo-gradients
    (:mod:`distk.outer`; rank 0 says so). DDP still broadcasts buffers at each forward.

    Returns:
        The :class:`DDPCompressionState`: ``.compressor``, ``.stats`` (last step, all
        buckets merged), ``state_dict()`` / ``load_state_dict()`` for checkpoints. With
        ``sync_every > 1`` the :class:`~distk.integrations.outer.OuterSync`, which has
        the same attributes and methods (its ``.stats`` are the last sync's).

    Raises:
        TypeError: ``ddp_model`` is not a DistributedDataParallel module, or ``cfg`` is
            neither a SparsityConfig nor a dict.
        ValueError: the configs differ across ranks, the model has sparse gradients
            (``sparse=True`` embeddings), which DDP hands to hooks as sparse tensors, or
            ``sync_every > 1`` without ``optimizer``.
        RuntimeError: a communication hook is already registered (raised by DDP).
    """
    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(
            "distk.ddp.enable expects a torch.nn.parallel.DistributedDataParallel module, "
            f"got {type(ddp_model).__name__}; for FSDP use distk.fsdp.enable"
        )
    cfg = schedule_for_optimizer(cfg, optimizer, "distk.ddp.enable", outer_sync=True)
    if cfg.sync_every > 1:
        return _enable_outer_sync(ddp_model, cfg, optimizer)
    state = DDPCompressionState(cfg, ddp_model.process_group, model=ddp_model.module)
    ddp_model.register_comm_hook(state, sparse_allreduce_hook)
    return state


def _enable_outer_sync(ddp_model: DistributedDataParallel, cfg: SparsityConfig,
                       optimizer: Any) -> OuterSync:
    """``sync_every > 1``: DDP's all-reduce off (PyTorch's ``noop_hook``: each rank steps
    on its own gradients) and :mod:`distk.outer` on the replica DDP wraps, counting the
    steps of ``optimizer``. Every check that can fail on one rank only runs before the
    first collective."""
    if optimizer is None:
        raise ValueError(
            f"distk.ddp.enable: SparsityConfig.sync_every={cfg.sync_every} (outer "
            "synchronisation) needs optimizer=, the optimizer whose steps it counts; got "
            "optimizer=None")
    inner_optimizer(optimizer, "distk.ddp.enable")  # a bad one raises before the hook
    ddp_model.register_comm_hook(None, noop_hook)
    sync = attach(ddp_model.module, optimizer, cfg, ddp_model.process_group, broadcast=False,
                  entry="distk.ddp.enable")
    if sync.rank == 0:
        print(f"[distk] distk.ddp.enable: sync_every={cfg.sync_every}, so this is outer "
              "synchronisation: DDP's per-step all-reduce is switched off (each rank steps "
              f"on its own gradients) and every {cfg.sync_every} optimizer steps the "
              "ranks exchange compressed pseudo-gradients and take one outer step "
              "(docs/outer.md)", file=sys.stderr, flush=True)
    return sync
