"""The outer-synchronisation mode of ``distk-train`` (``sparsity.sync_every > 1``).

Instead of DDP, every rank trains the plain model with its own AdamW/SGD and, every
``sync_every`` optimizer steps, :mod:`distk.outer` exchanges the compressed
pseudo-gradients and applies the outer step. The training loop keeps its shape: these
functions are what it calls in this mode.

* :func:`uses_outer_sync`: whether a config asks for the mode;
* :func:`outer_schedule`: the config the mode runs (step-counted schedules of the
  compressor converted into syncs);
* :func:`outer_mode_config`: the ``"outer"`` mode of ``--compare``;
* :class:`OuterTrainState`: stands where the DDP backend's CompressionState stands
  (``stats`` per step as :class:`~distk.stats.StepStats`, ``totals``, ``metrics()``,
  ``state_dict`` / ``load_state_dict`` for checkpoints); ``distk.train.loop.OuterBackend``
  holds it.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from distk.config import ADAMW_OUTER, SparsityConfig
from distk.integrations.outer import OuterSync
from distk.integrations.outer import enable as enable_outer
from distk.stats import StepStats
from distk.train.config import TrainConfig

__all__ = [
    "OUTER_MODE",
    "OuterTrainState",
    "adamw_outer_notice",
    "outer_mode_config",
    "outer_schedule",
    "runs_adamw_outer",
    "uses_outer_sync",
]

OUTER_MODE = "outer"
"""Name of the mode in ``--compare`` and in results."""


def uses_outer_sync(cfg: TrainConfig) -> bool:
    """Whether ``cfg`` trains with outer synchronisation instead of DDP."""
    return cfg.sparsity.sync_every > 1


def outer_schedule(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the compressor's step-counted schedule expressed in syncs.

    The compressor counts one step per sync in this mode, so ``warmup_steps`` and
    ``dense_steps`` (given in training steps, like every other count of the job) become
    ``ceil(steps / sync_every)`` syncs. Idempotent only on configs it has not converted:
    call it once, where the run starts."""
    sparsity = cfg.sparsity
    every = sparsity.sync_every
    if every == 1:
        return cfg
    return replace(cfg, sparsity=sparsity.replace(
        warmup_steps=math.ceil(sparsity.warmup_steps / every),
        dense_steps=math.ceil(sparsity.dense_steps / every)))


def runs_adamw_outer(cfg: TrainConfig) -> bool:
    """Whether the ``"outer"`` compare mode replaces ``cfg``'s sparsity options by
    :data:`~distk.config.ADAMW_OUTER` (:func:`outer_mode_config`): a per-step config,
    ``sparsity.sync_every`` 1."""
    return cfg.sparsity.sync_every == 1


def adamw_outer_notice() -> str:
    """What rank 0 prints when the ``"outer"`` compare mode runs ADAMW_OUTER."""
    every, syncs = ADAMW_OUTER["sync_every"], ADAMW_OUTER["dense_steps"]
    return (f"[distk-train] mode {OUTER_MODE!r}: sparsity.sync_every is 1, so it runs "
            f"SparseLoCo's recipe at distk.config.ADAMW_OUTER (a sync every {every} steps, "
            f"{syncs * every} dense {ADAMW_OUTER['value_dtype']} steps first, the share of "
            "each tile by the number of ranks) in place of the "
            "config's sparsity options; set sparsity.sync_every > 1 to compare your own")


def outer_mode_config(cfg: TrainConfig) -> TrainConfig:
    """The ``"outer"`` mode of ``--compare``.

    A config that sets ``sparsity.sync_every > 1`` runs as configured, with bucketed
    selection of the pseudo-gradients. One that leaves it at 1 (a per-step config, such
    as the main job's) runs the setting that matched dense AdamW:
    ``SparsityConfig.adamw_outer()`` (a sync every 5 steps, 50 dense steps
    in bf16, then each rank's share of every 4096-entry tile chosen from the number of
    ranks, at 2 bits: :func:`~distk.config.outer_density`), keeping the config's
    ``stats_interval``, ``recall_interval`` and ``nonfinite``, and without the job's
    AdamW schedule for per-step exchange (``train.adamw_dense_steps`` /
    ``adamw_warmup_steps``)."""
    sparsity = cfg.sparsity
    if not runs_adamw_outer(cfg):
        return replace(cfg, sparsity=sparsity.replace(method="bucketed"))
    recipe = SparsityConfig.adamw_outer(
        dense_steps=ADAMW_OUTER["dense_steps"] * ADAMW_OUTER["sync_every"],  # in steps here
        **{name: getattr(sparsity, name)
           for name in ("stats_interval", "recall_interval", "nonfinite")})
    return replace(cfg, sparsity=recipe,
                   train=replace(cfg.train, adamw_dense_steps=0, adamw_warmup_steps=0))


class OuterTrainState:
    """What :class:`~distk.train.loop.OuterBackend` holds where the DDP backend holds its
    :class:`~distk.integrations.CompressionState` (the same reading surface for the loop:
    ``stats``, ``totals``, ``metrics()``, ``state_dict`` / ``load_state_dict``).

    Attributes:
        outer: the :class:`~distk.outer.OuterSync`.
        stats: after an optimizer step that synchronised, that sync's
            :class:`~distk.stats.StepStats` (every parameter merged); after any other step
            an empty one (nothing was sent).
        synced: whether the last optimizer step synchronised.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 cfg: TrainConfig) -> None:
        self.outer: OuterSync = enable_outer(model, optimizer, cfg.sparsity)
        self.stats = StepStats()
        self.synced = False
        self._syncs_seen = 0
        # Registered after the sync's own hook, so it runs after the sync.
        optimizer.register_step_post_hook(self._after_step)

    def end_step(self) -> bool:
        """The training loop's step boundary. Outer sync ends its steps in the optimizer
        post-hook (:meth:`_after_step`), so there is nothing to close here; returns
        whether the last optimizer step synced."""
        return self.synced

    def _after_step(self, *_: Any) -> None:
        self.synced = self.outer.syncs != self._syncs_seen
        self._syncs_seen = self.outer.syncs
        self.stats = self.outer.stats if self.synced else StepStats()

    @property
    def totals(self) -> StepStats:
        """Every buffer exchanged in the run (checkpointed with the compressor)."""
        return self.outer.totals

    def metrics(self, prefix: str = "distk/") -> dict[str, float]:
        """After a sync: the sync's metrics (:meth:`OuterSync.metrics
        <distk.integrations.outer.OuterSync.metrics>`: its StepStats, ``sync_seconds``,
        ``bits_per_param_per_step``); otherwise the run totals (``<prefix>total_*``),
        ``syncs`` and ``iteration`` only."""
        metrics = self.outer.metrics(prefix)
        if not self.synced:
            metrics = {name: value for name, value in metrics.items()
                       if name.startswith(prefix + "total_")
                       or name in (prefix + "syncs", prefix + "iteration")}
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return self.outer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.outer.load_state_dict(state)
        self._syncs_seen = self.outer.syncs
        self.synced = False
        self.stats = StepStats()
