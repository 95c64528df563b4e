"""HF ``transformers.Trainer``: distk on DDP, FSDP or DeepSpeed in one callback.

Usage::

    from distk.integrations.hf import DistkCallback

    trainer = Trainer(model, args, train_dataset=..., callbacks=[DistkCallback(cfg)])
    trainer.train()                                  # or resume_from_checkpoint=True

With ``TrainingArguments(deepspeed="ds_config.json")`` the callback takes ``cfg`` from the
config's ``"distk"`` block when ``cfg`` is None (``distk.deepspeed.install()`` alone also
works on that path; the callback then adopts the engine's state and adds logging).

What the callback does, on every rank:

- ``on_train_begin`` (after the Trainer has wrapped the model and loaded a checkpoint,
  before the first backward): :func:`distk.enable` on ``trainer.model_wrapped`` (the DDP
  / FSDP module or DeepSpeed engine; the ``model`` that callbacks receive is the
  unwrapped model, which exchanges nothing); when resuming, every rank restores its own
  residuals from ``<checkpoint>/distk_rank<NNNNN>.pt``;
- ``on_log``: adds ``distk/*`` statistics (:func:`distk.integrations.auto.metrics`: the
  last step's, and the run totals ``distk/total_bytes_sent`` / ``distk/total_dense_bytes``
  ..., restored with the checkpoint) to the
  Trainer's logs, i.e. ``trainer.state.log_history`` and every ``report_to`` integration
  (wandb, TensorBoard). The callback moves itself to the front of the callback list so
  reporters see the statistics;
- ``on_save``: every rank writes its own state next to the Trainer's checkpoint.

Callbacks are not handed the Trainer; the callback finds the Trainer that calls it (the
one whose callback handler holds it) on the call stack at ``on_train_begin``, together
with the checkpoint that ``train(resume_from_checkpoint=...)`` resolved. That reads
``Trainer._inner_training_loop``'s frame of transformers ``>=5.23,<6`` (the
``frameworks`` extra); ``tests/test_frameworks.py`` fails if it stops finding it.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

from transformers import Trainer, TrainerCallback

from distk.integrations import auto
from distk.integrations.checkpoint import load_rank_state, save_rank_state

__all__ = ["DistkCallback"]

_CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR


def _calling_trainer(callback: TrainerCallback) -> tuple[Trainer, str | None]:
    """The Trainer whose callback handler is running ``callback``, and its resume path."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer) and callback in owner.callback_handler.callbacks:
            resume = frame.f_locals.get("resume_from_checkpoint")
            return owner, resume if isinstance(resume, str | os.PathLike) else None
        frame = frame.f_back
    raise RuntimeError(
        "distk DistkCallback: no transformers.Trainer holding this callback is on the call "
        "stack; pass the callback to Trainer(callbacks=[...]) or trainer.add_callback(...) "
        "and let trainer.train() call it")


def _deepspeed_config(trainer: Trainer) -> Any:
    """The Trainer's DeepSpeed config (dict, or the JSON path it was given), or None."""
    hf_config = getattr(trainer.args, "hf_deepspeed_config", None)
    if hf_config is not None and isinstance(getattr(hf_config, "config", None), dict):
        return hf_config.config
    return trainer.args.deepspeed or None


class DistkCallback(TrainerCallback):
    """Enable distk on the Trainer's wrapped model, log its stats, checkpoint every rank.

    Args:
        cfg: a :class:`~distk.config.SparsityConfig`, a dict of its keys, or None: then the
            ``"distk"`` block of the Trainer's DeepSpeed config (an error when there is
            none), and on DDP or FSDP distk's default for the Trainer's optimizer
            (:meth:`SparsityConfig.default_for
            <distk.config.SparsityConfig.default_for>`: outer synchronisation on DDP for
            the Trainer's default AdamW; rank 0 says which).

    Attributes:
        state: the distk state once training began (``None`` before).
    """

    def __init__(self, cfg: Any = None) -> None:
        if cfg is not None:
            cfg = auto.resolve_config(cfg, where="DistkCallback")
        self.cfg = cfg
        self.state: Any = None

    # -- training ----------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer, resume = _calling_trainer(self)
        wrapped = trainer.model_wrapped
        if args.world_size == 1 and auto.get_state(wrapped) is None:
            warnings.warn("distk DistkCallback: the Trainer runs one process, so there is no "
                          "gradient exchange to sparsify; distk is inactive",
                          RuntimeWarning, stacklevel=2)
            return
        # A callback reused by a new Trainer gets a newly wrapped model: enable on that one.
        if self.state is None or auto.get_state(wrapped) is not self.state:
            ds_config = _deepspeed_config(trainer)
            if self.cfg is None and auto.get_state(wrapped) is not None:
                cfg = None  # an engine built with distk (distk.deepspeed.install())
            else:
                cfg = auto.config_for(self.cfg, ds_config, where="distk DistkCallback")
            self.state = auto.enable(wrapped, cfg, optimizer=trainer.optimizer)
        # Run before the reporting callbacks (wandb, TensorBoard) so they see our stats.
        callbacks = trainer.callback_handler.callbacks
        callbacks.remove(self)
        callbacks.insert(0, self)
        if resume is not None:
            load_rank_state(resume, self.state)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if self.state is None or logs is None or "loss" not in logs:
            return  # evaluation / final summary logs carry no training step
        extra = auto.metrics(self.state)
        if not extra:
            return
        logs.update(extra)
        # Trainer.log appended a copy of ``logs`` to the history before calling on_log.
        history = state.log_history
        if history and history[-1].get("step") == state.global_step and "loss" in history[-1]:
            history[-1].update(extra)

    # -- checkpoints ---------------------------------------------------------------------
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.state is None:
            return
        folder = os.path.join(args.output_dir, f"{_CHECKPOINT_PREFIX}-{state.global_step}")
        save_rank_state(folder, self.state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.state is not None and self.state.iteration == 0:
            warnings.warn(
                "distk DistkCallback: training ended without a single distk exchange "
                "(no synchronised backward pass reached the distk hook)",
                RuntimeWarning, stacklevel=2)
