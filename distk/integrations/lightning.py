"""PyTorch Lightning: distk on the strategy's wrapped model, on CPU and GPU.

Usage::

    from distk.integrations.lightning import DistkCallback

    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp",
                         callbacks=[DistkCallback({"density": 0.01})])
    trainer.fit(module)                               # or ckpt_path="last"

Why a callback and not ``DDPStrategy(ddp_comm_hook=..., ddp_comm_state=...)``: Lightning
registers a DDP communication hook only when ``root_device.type == "cuda"``, so on CPU
that pair is silently ignored. The callback enables distk itself in ``on_fit_start``
(after the strategy wrapped the model, before the first backward) with
:func:`distk.enable` on ``trainer.strategy.model`` (DDP, FSDP or a DeepSpeed engine).

The hook/state pair still works, on GPU by itself and on CPU with this callback::

    from distk.ddp import DDPCompressionState, sparse_allreduce_hook
    state = DDPCompressionState({"density": 0.01})     # a SparsityConfig or a dict
    strategy = DDPStrategy(ddp_comm_hook=sparse_allreduce_hook, ddp_comm_state=state)
    # built before the process group exists: the config is checked across ranks on its
    # first exchange (the first step)

Given such a strategy, ``DistkCallback()`` (no cfg) adopts that state; on CPU it
registers the hook that Lightning skipped.

Logging: after every training batch the callback logs ``distk/*``
(:func:`distk.integrations.auto.metrics`, run totals such as ``distk/total_bytes_sent``
and ``distk/total_dense_bytes`` included) through ``pl_module.log_dict``, so the values reach
``trainer.callback_metrics`` and every logger (wandb, TensorBoard, CSV); each rank logs
its own, unsynchronised.

Checkpoints: Lightning writes rank 0's ``.ckpt`` only, so in ``on_save_checkpoint`` every
rank writes its own state to ``<default_root_dir>/distk/step-<N>/distk_rank<NNNNN>.pt``
(:mod:`distk.integrations.checkpoint`) and the ``.ckpt`` records that folder;
``fit(ckpt_path=...)`` restores each rank's own file (another rank's file is refused).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import pytorch_lightning as pl

from distk.integrations import auto
from distk.integrations.checkpoint import load_rank_state, save_rank_state

__all__ = ["DistkCallback"]

CHECKPOINT_KEY = "distk"
"""Key of the ``.ckpt`` dict that names the folder of the per-rank files."""


class DistkCallback(pl.Callback):
    """Enable distk on the strategy's wrapped model; log its stats; checkpoint every rank.

    Args:
        cfg: a :class:`~distk.config.SparsityConfig`, a dict of its keys, or None: then the
            state of a ``DDPStrategy(ddp_comm_hook=sparse_allreduce_hook,
            ddp_comm_state=...)``, or the ``"distk"`` block of a ``DeepSpeedStrategy``
            config (an error when there is neither under DeepSpeed), and otherwise distk's
            default for the one optimizer (:meth:`SparsityConfig.default_for
            <distk.config.SparsityConfig.default_for>`: outer synchronisation on DDP
            for an Adam-family one; rank 0 says which).

    Attributes:
        state: the distk state once fitting started (``None`` before).
    """

    def __init__(self, cfg: Any = None) -> None:
        if cfg is not None:
            cfg = auto.resolve_config(cfg, where="distk DistkCallback")
        self.cfg = cfg
        self.state: Any = None
        self._restore_from: str | None = None
        self._restore_expected = False
        self._last_iteration = -1

    def _strategy_hook_state(self, trainer: pl.Trainer, wrapped: Any) -> Any:
        """The state of a distk hook given to DDPStrategy, registered here when Lightning
        skipped it (CPU); None when the strategy carries no distk hook."""
        from distk.integrations.ddp import DDPCompressionState, sparse_allreduce_hook

        strategy = trainer.strategy
        if getattr(strategy, "_ddp_comm_hook", None) is not sparse_allreduce_hook:
            return None
        state = getattr(strategy, "_ddp_comm_state", None)
        if not isinstance(state, DDPCompressionState):
            raise TypeError("DDPStrategy(ddp_comm_hook=distk.ddp.sparse_allreduce_hook) needs "
                            "ddp_comm_state=distk.ddp.DDPCompressionState(cfg), got "
                            f"{type(state).__name__}")
        if self.cfg is not None and self.cfg != state.cfg:
            raise ValueError(
                f"distk DistkCallback: cfg={self.cfg.to_dict()} differs from the "
                f"DDPStrategy's ddp_comm_state config {state.cfg.to_dict()}; give one of them")
        if strategy.root_device.type != "cuda":  # Lightning registers hooks on CUDA only
            wrapped.register_comm_hook(state, sparse_allreduce_hook)
        wrapped.__dict__[auto.STATE_ATTR] = state
        return state

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wrapped = auto.unwrap_compiled(trainer.strategy.model)
        # A callback reused for a new fit gets a newly wrapped model: enable on that one.
        if self.state is None or auto.get_state(wrapped) is not self.state:
            if trainer.world_size == 1:
                warnings.warn("distk DistkCallback: one process, so there is no gradient "
                              "exchange to sparsify; distk is inactive",
                              RuntimeWarning, stacklevel=2)
                return
            optimizers = trainer.optimizers
            optimizer = optimizers[0] if len(optimizers) == 1 else None
            state = auto.get_state(wrapped) or self._strategy_hook_state(trainer, wrapped)
            if state is not None and state.cfg.for_optimizer(optimizer) != state.cfg:
                warnings.warn(
                    "distk DistkCallback: the strategy's distk state was built before the "
                    f"optimizer ({type(optimizer).__name__}, Adam-family) was known, so the "
                    "Adam schedule is not applied; set dense_steps / warmup_steps / "
                    "value_dtype in its config yourself (docs/train.md, \"Sparse training "
                    "with AdamW\") or "
                    "give the config to DistkCallback instead", RuntimeWarning, stacklevel=2)
            if state is None:
                cfg = self.cfg
                if cfg is None:
                    config = getattr(trainer.strategy, "config", None)
                    cfg = auto.config_for(None, config if isinstance(config, dict) else None,
                                          where="distk DistkCallback")
                state = auto.enable(wrapped, cfg, optimizer=optimizer)
            self.state = state
        if self._restore_expected:
            if self._restore_from is None:
                warnings.warn("distk DistkCallback: the checkpoint holds no distk state "
                              "(written without distk); residuals start from zero",
                              RuntimeWarning, stacklevel=2)
            else:
                load_rank_state(self._restore_from, self.state)
            self._restore_expected = False
        self._last_iteration = self.state.iteration

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.state is None or self.state.iteration == self._last_iteration:
            return  # accumulation micro-batch: nothing was exchanged
        self._last_iteration = self.state.iteration
        metrics = auto.metrics(self.state)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=False)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self.state is None:
            return
        folder = os.path.join(trainer.default_root_dir, "distk", f"step-{trainer.global_step}")
        save_rank_state(folder, self.state)
        checkpoint[CHECKPOINT_KEY] = {"folder": os.path.abspath(folder),
                                      "world_size": trainer.world_size}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Called before the strategy wraps the model; restored in on_fit_start.
        record = checkpoint.get(CHECKPOINT_KEY)
        self._restore_expected = True
        self._restore_from = None if record is None else record["folder"]
