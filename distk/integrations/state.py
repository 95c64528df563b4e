"""The one seam between a framework and the compressor: :class:`CompressionState`.

Every integration is a thin adapter over it: a framework hands over one gradient buffer
at a time (a DDP ``GradBucket``, an FSDP2 reduce-scatter input, an FSDP1 flat-parameter
gradient, a DeepSpeed gradient) and the adapter calls :meth:`CompressionState.reduce_async`
(returns a ``torch.futures.Future``; DDP) or :meth:`CompressionState.reduce` (returns
when done; FSDP, DeepSpeed) under a stable key. The state owns what the adapters share:

- config coercion (:func:`~distk.compressor.as_sparsity_config`; a dict is accepted), the
  refusal of sparse gradients and of outer synchronisation (``sync_every > 1``), both at
  construction, and the collective :func:`~distk.comm.check_same_config`: at
  construction when the process group exists, otherwise on the first exchange (a state
  built for a framework's hook slot before the group is initialised, e.g. Lightning's
  ``DDPStrategy(ddp_comm_state=...)``; every rank reaches that first exchange, so the
  check stays collective), before any gradient is exchanged;
- the one step counter (:attr:`CompressionState.iteration`) that drives the
  compressor's schedule (dense steps, warm-up, stats and recall intervals), and the one
  step boundary: :meth:`CompressionState.end_step`. DDP and FSDP end a step when the
  backward pass that reduced its buffers ends (an autograd final callback, queued behind
  the framework's own, so every buffer is done); DeepSpeed ends it at the gradient
  accumulation boundary (``engine.step``). Accumulation micro-steps that do not reach
  the reduction (``no_sync``) are not counted;
- the step's merged :class:`~distk.stats.StepStats` (:attr:`CompressionState.stats`)
  and the run totals (:attr:`CompressionState.totals`, the compressor's);
- checkpointing (``state_dict`` / ``load_state_dict``, refusing another config, rank or
  world size) and pickling (the process group is not pickled; like PowerSGD's state, an
  unpickled state binds to the default group).
"""

from __future__ import annotations

import sys
from collections.abc import Hashable
from typing import Any

import torch
import torch.distributed as dist

from distk.comm.group import rank_and_world
from distk.compressor import GradientCompressor, NonFiniteGradientError, as_sparsity_config
from distk.config import ADAMW_OUTER, SparsityConfig, is_adam_family, optimizer_chain
from distk.integrations.owner import StepOwner
from distk.stats import StepStats

__all__ = ["CompressionState", "refuse_outer_sync", "refuse_sparse_gradients",
           "residuals_for_sharding", "schedule_for_optimizer"]

_NOT_IN_BACKWARD = -1  # torch._C._current_graph_task_id() outside a backward pass


def refuse_sparse_gradients(model: torch.nn.Module, entry: str) -> None:
    """Raise ValueError (naming ``entry`` and the module) when ``model`` has an embedding
    with ``sparse=True``: frameworks hand those gradients over as sparse tensors, which
    distk does not exchange. Local and deterministic, so every rank raises alike."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding | torch.nn.EmbeddingBag) and module.sparse:
            raise ValueError(
                f"{entry} does not support sparse gradients: module {name!r} is an "
                "embedding with sparse=True; use sparse=False or leave it out of the model")


def refuse_outer_sync(cfg: SparsityConfig, entry: str) -> None:
    """Raise ValueError for ``sync_every > 1`` (outer synchronisation, :mod:`distk.outer`)
    in a state that exchanges gradients: FSDP and DeepSpeed reduce them at every backward
    pass / engine step, so ranks cannot take local steps under them, and a DDP hook state
    exchanges every bucket (``distk.ddp.enable`` runs outer synchronisation without one).
    Local and deterministic (every rank holds the same config), so every rank raises
    alike."""
    if cfg.sync_every == 1:
        return
    why = ("DeepSpeed's engine reduces (and under ZeRO partitions) gradients inside every "
           "backward/step, so ranks cannot take local steps without replacing its optimizer "
           "step" if "deepspeed" in entry.lower() else
           "DDP/FSDP all-reduce or reduce-scatter gradients at every backward pass")
    raise ValueError(
        f"SparsityConfig.sync_every={cfg.sync_every} (outer synchronisation) is not supported "
        f"by {entry}: {why}. Use distk.ddp.enable(ddp_model, cfg, optimizer=optimizer) on a "
        "DDP model (it switches DDP's all-reduce off; the HF Trainer, Accelerate and "
        "Lightning callbacks on DDP call it), distk.outer.enable(model, optimizer, cfg) on a "
        "plain model, or set sync_every=1.")


def residuals_for_sharding(cfg: SparsityConfig | dict[str, Any], sharded: bool,
                           entry: str) -> SparsityConfig:
    """``cfg`` (coerced) with ``residual_dtype="auto"`` resolved: ``"bfloat16"`` where the
    framework shards gradients for memory (``sharded``: FSDP2 without a replicate group,
    DeepSpeed ZeRO 2), whose residuals would otherwise be an unsharded fp32 copy of the
    gradients on every rank; ``"float32"`` elsewhere. Rank 0 says so once on stderr when
    it chooses bf16."""
    cfg = as_sparsity_config(cfg)
    if cfg.residual_dtype != "auto":
        return cfg
    resolved = cfg.replace(residual_dtype="bfloat16" if sharded else "float32")
    if sharded and rank_and_world()[0] == 0:
        print(f"[distk] {entry}: the gradients are sharded, so residuals are kept in "
              "bfloat16 (2 bytes per parameter on every rank instead of 4; stochastic "
              "rounding). SparsityConfig.residual_dtype=\"float32\" keeps them exact.",
              file=sys.stderr, flush=True)
    return resolved


def _default_config(optimizer: Any, entry: str, outer_sync: bool) -> SparsityConfig:
    """:meth:`SparsityConfig.default_for`, with one line on rank 0 saying which it took."""
    chosen = SparsityConfig.default_for(optimizer, outer_sync=outer_sync)
    if rank_and_world()[0] != 0:
        return chosen
    names = " -> ".join(type(o).__name__ for o in optimizer_chain(optimizer))
    if chosen.sync_every > 1:
        why = (f"the optimizer ({names}) is Adam-family, so distk uses "
               "SparsityConfig.adamw_outer(): outer synchronisation, the setting that "
               "matched dense AdamW at a few % of its bytes (docs/outer.md). Pass "
               "cfg=distk.SparsityConfig() for a per-step exchange instead")
    elif optimizer is None:
        why = ("no optimizer= either, so distk uses the per-step default SparsityConfig() "
               "(1% of each bucket every step). Pass optimizer=: with an Adam-family one "
               "distk uses outer synchronisation (SparsityConfig.adamw_outer()), which "
               "matched dense AdamW where a per-step exchange did not")
    elif is_adam_family(optimizer):
        why = (f"the optimizer ({names}) is Adam-family, but {entry} cannot run outer "
               "synchronisation (each rank would need a whole replica to step on its own; "
               "docs/outer.md, \"Where it is refused\"), so distk uses the per-step default "
               "SparsityConfig() with the Adam schedule")
    else:
        why = (f"the optimizer ({names}) is not Adam-family, so distk uses the per-step "
               "default SparsityConfig() (1% of each bucket every step)")
    print(f"[distk] {entry}: no config given; {why}", file=sys.stderr, flush=True)
    return chosen


def schedule_for_optimizer(cfg: SparsityConfig | dict[str, Any] | None, optimizer: Any,
                           entry: str, *, outer_sync: bool = False) -> SparsityConfig:
    """``cfg`` (coerced) under ``optimizer`` (:meth:`SparsityConfig.for_optimizer`): the
    Adam schedule for an Adam-family optimizer. When it changes the config, rank 0 says
    so once on stderr, naming ``entry``. ``optimizer=None`` leaves ``cfg`` as it is.
    ``cfg=None`` is distk's default for ``optimizer``
    (:meth:`SparsityConfig.default_for`; ``outer_sync``: whether ``entry`` can run outer
    synchronisation), announced on rank 0."""
    if cfg is None:
        cfg = _default_config(optimizer, entry, outer_sync)
    cfg = as_sparsity_config(cfg)
    scheduled = cfg.for_optimizer(optimizer)
    if scheduled != cfg and rank_and_world()[0] == 0:
        names = " -> ".join(type(o).__name__ for o in optimizer_chain(optimizer))
        changes = [f"{name} {getattr(cfg, name)} -> {getattr(scheduled, name)}"
                   for name in ("dense_steps", "warmup_steps", "value_dtype")
                   if getattr(cfg, name) != getattr(scheduled, name)]
        if not scheduled.adam_warms_up:
            changes.append(f"no density warm-up (density {cfg.density} is not below "
                           f"warmup_density {cfg.warmup_density})")
        print(f"[distk] {entry}: the optimizer ({names}) is Adam-family, so "
              f"{', '.join(changes)} (SparsityConfig.adam_dense_steps / adam_warmup_steps / "
              "adam_value_dtype; 0, 0 and None turn it off; docs/train.md, \"Sparse "
              "training with AdamW\"). Under AdamW a per-step exchange ends above dense "
              "quality; to match it at a few % of the bytes use outer synchronisation: "
              "distk.ddp.enable(ddp_model, SparsityConfig.adamw_outer(), "
              "optimizer=optimizer), distk's default on DDP when no config is given (a "
              "sync every "
              f"{ADAMW_OUTER['sync_every']} steps, the first "
              f"{ADAMW_OUTER['dense_steps'] * ADAMW_OUTER['sync_every']} steps dense in "
              f"{ADAMW_OUTER['value_dtype']}), or distk.outer.enable(model, optimizer, "
              "SparsityConfig.adamw_outer()) on a plain model "
              "(docs/train.md, \"AdamW at a true 1%\")", file=sys.stderr, flush=True)
    return scheduled


class CompressionState(StepOwner):
    """What ``distk.ddp.enable`` / ``distk.fsdp.enable`` / ``distk.deepspeed.enable`` return.

    Args:
        cfg: a :class:`~distk.config.SparsityConfig` or a dict of its keys.
        process_group: the group gradients are averaged over (``None`` = default).
        model: when given, refused if it has sparse gradients.
        entry: the public entry point named in errors (e.g. ``"distk.ddp.enable"``).

    Collective: every rank constructs it with the same config (checked; a mismatch raises
    :class:`~distk.comm.RankMismatchError` on every rank). Built before the process group
    is initialised, it checks the config, and takes its rank and world size, on its first
    exchange instead (rank and world size also when checkpointed or restored first).

    Attributes:
        cfg: the validated config (identical on every rank).
        compressor: the one :class:`~distk.compressor.GradientCompressor` every buffer
            goes through (residuals keyed by bucket index, module or parameter name).
        process_group, rank, world_size: where gradients are averaged.
        iteration: completed steps (the one step counter; checkpointed).
        stats: :class:`~distk.stats.StepStats` of the last completed step (all buffers
            merged); empty before the first one.
    """

    __slots__ = ("compressor", "_step_stats", "_step_open", "_step_backward", "_inflight",
                 "_errors")

    STEP_ENDS_WITH_BACKWARD = True
    """Whether :meth:`end_step` is called by an autograd callback at the end of the
    backward pass that opened the step (DDP, FSDP) or by the adapter (DeepSpeed)."""

    def __init__(self, cfg: SparsityConfig | dict[str, Any],
                 process_group: dist.ProcessGroup | None = None, *,
                 model: torch.nn.Module | None = None, entry: str = "distk") -> None:
        cfg = as_sparsity_config(cfg)
        refuse_outer_sync(cfg, f"{type(self).__name__} ({entry})")
        if model is not None:
            refuse_sparse_gradients(model, entry)
        super().__init__(cfg, process_group, entry=entry)
        self.compressor = GradientCompressor(self.cfg, group=process_group,
                                             defer_checks=True)
        self._reset_step()

    def _reset_step(self) -> None:
        self._step_stats: list[StepStats] = []
        self._step_open = False
        self._step_backward = _NOT_IN_BACKWARD
        self._inflight: list[torch.futures.Future] = []
        # (launch order, error) of failed asynchronous exchanges; finishes run on the
        # backend's threads in any order, the first launched one is raised.
        self._errors: list[tuple[int, BaseException]] = []

    # -- the seam ----------------------------------------------------------------------
    def reduce_async(self, tensor: torch.Tensor, key: Hashable,
                     out: torch.Tensor | None = None, *,
                     stateless: bool = False) -> torch.futures.Future:
        """Average ``tensor`` over ranks through the compressor, asynchronously.

        Returns once the exchange's collectives are enqueued; the future completes with
        ``out`` (default: ``tensor`` itself, overwritten) holding the update. An error of
        the exchange (non-finite gradient under ``nonfinite="raise"``, ranks that
        disagree, a failed collective) does not fail the future (frameworks would
        re-wrap it as a RuntimeError): :meth:`end_step` raises it, with its type, on
        every rank. ``stateless``: see :meth:`GradientCompressor.launch`.
        """
        target = tensor if out is None else out
        work, _ = self._launch(tensor, key, target, stateless)
        order = len(self._inflight)

        def finish(_: torch.futures.Future) -> torch.Tensor:
            try:
                result = work.finish()
            except Exception as err:  # noqa: BLE001 - re-raised by end_step, typed
                self._errors.append((order, err))
                return target
            self._step_stats.append(work.stats)
            return self._into(target, result)

        future = work.future.then(finish)
        self._inflight.append(future)
        return future

    def reduce(self, tensor: torch.Tensor, key: Hashable, out: torch.Tensor | None = None, *,
               stateless: bool = False) -> torch.Tensor:
        """:meth:`reduce_async`, waited for: returns ``out`` (default ``tensor``) holding
        the update, and raises the exchange's errors here."""
        target = tensor if out is None else out
        work, _ = self._launch(tensor, key, target, stateless)
        result = work.wait()
        self.compressor.raise_deferred()
        self._step_stats.append(work.stats)
        return self._into(target, result)

    def end_step(self) -> bool:
        """Close the current step: merge its buffers' stats into :attr:`stats`, advance
        :attr:`iteration`, and raise the first error an asynchronous exchange of the step
        met (then the step is dropped: not counted, stats unchanged). Returns False (and
        does nothing) when no buffer was reduced since the last call."""
        if not self._step_open:
            return False
        if self._inflight:  # already complete where the framework waited for them (DDP)
            torch.futures.wait_all(self._inflight)
        try:  # the non-finite checks left on the device (one process): one host sync
            self.compressor.raise_deferred()
        except NonFiniteGradientError as err:
            self._errors.append((len(self._inflight), err))
        error = min(self._errors, key=lambda item: item[0])[1] if self._errors else None
        merged = StepStats()
        for stats in self._step_stats:
            merged = merged.merge(stats)
        self._reset_step()
        if error is not None:
            raise error
        merged.target_density = self.cfg.density
        self.stats = merged
        self.iteration += 1
        self._on_step_end()
        return True

    @property
    def totals(self) -> StepStats:
        """:class:`~distk.stats.StepStats` of every buffer exchanged in this run (the
        compressor's totals, checkpointed with it)."""
        return self.compressor.totals

    def _launch(self, tensor: torch.Tensor, key: Hashable, target: torch.Tensor,
                stateless: bool) -> tuple[Any, torch.Tensor]:
        self._late_bind(check=True)
        self._open_step()
        # One flattening rule: contiguous buffers are exchanged and written in place;
        # others go through a contiguous copy that _into writes back.
        flat = tensor.reshape(-1)
        out = target.view(-1) if target.is_contiguous() and target.dtype == tensor.dtype \
            else None
        work = self.compressor.launch(flat, key, out, step=self.iteration,
                                      stateless=stateless)
        return work, flat

    @staticmethod
    def _into(target: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if result.data_ptr() != target.data_ptr():
            target.copy_(result.view_as(target))
        return target

    def _open_step(self) -> None:
        if not self.STEP_ENDS_WITH_BACKWARD:
            self._step_open = True
            return
        backward = torch._C._current_graph_task_id()
        if backward == _NOT_IN_BACKWARD:
            raise RuntimeError(
                f"{type(self).__name__}: gradients must be reduced inside a backward pass "
                "(the step ends with it); call end_step() yourself otherwise")
        if self._step_open and backward == self._step_backward:
            return
        if self._step_open:
            # The previous backward raised before its step ended: its buffers are stale.
            self._reset_step()
        self._step_open = True
        self._step_backward = backward
        # Queued from inside the backward; it queues end_step once more, so that it runs
        # after every final callback the framework queued meanwhile (DDP queues its own
        # wait for the bucket futures when the last bucket is ready).
        engine = torch.autograd.Variable._execution_engine
        engine.queue_callback(lambda: engine.queue_callback(self._end_step_callback))

    def _end_step_callback(self) -> None:
        self.end_step()  # autograd callbacks must return None

    def _on_step_end(self) -> None:
        """Hook for adapters (DDP marks its buckets final)."""

    # -- checkpointing ---------------------------------------------------------------
    def _payload(self) -> dict[str, Any]:
        """Residuals, momenta and mask state (``weights_only=True`` loading works)."""
        return {"compressor": self.compressor.state_dict()}

    def _restore(self, state_dict: dict[str, Any]) -> None:
        self.compressor.load_state_dict(state_dict["compressor"])
        self._reset_step()

    def __getstate__(self) -> dict[str, Any]:
        # The process group cannot be pickled; everything else goes through state_dict.
        return {"state_dict": self.state_dict(), "stats": self.stats.to_dict(),
                **self._extra_getstate()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # The default group, as PowerSGDState does; the config is checked on the first
        # exchange when no group exists yet.
        StepOwner.__init__(self, SparsityConfig.from_dict(state["state_dict"]["config"]),
                           None, entry="distk")
        self.compressor = GradientCompressor(self.cfg, group=None, defer_checks=True)
        self._reset_step()
        self.stats = StepStats.from_dict(state["stats"])
        self._extra_setstate(state)
        self.load_state_dict(state["state_dict"])

    def _extra_getstate(self) -> dict[str, Any]:
        return {}

    def _extra_setstate(self, state: dict[str, Any]) -> None:
        del state

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(method={self.cfg.method!r}, density={self.cfg.density}, "
                f"iteration={self.iteration})")
