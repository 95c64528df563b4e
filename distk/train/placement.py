"""AdamW's sparse-training schedule in ``distk-train`` (the DDP job and the DeepSpeed job).

Measured on the main job (docs/train.md, "Sparse training with AdamW"): with AdamW after
the exchange, error feedback's bursts cost 11.9% validation loss at density 1% under the
SGD-tuned schedule (``warmup_steps`` 50, no dense steps), 2.7% with 30 dense steps and a
100-step density warm-up, 1.8% / 3.2% (seeds 0 / 1) with 50 and 150, 0.7% with 75 and 200.
Changing what is exchanged (Adam's update, its moments, a locally preconditioned gradient,
a burst-free second moment) did worse, or (the burst-free second moment, at twice the
bytes) no better once the dense start was in place. So under AdamW the sparse modes raise
``sparsity.dense_steps`` and ``sparsity.warmup_steps`` to ``train.adamw_dense_steps``
(75) and ``train.adamw_warmup_steps`` (200), and send values in bf16
(``sparsity.adam_value_dtype``), which halves the dense steps' bytes: on the e2e
protocol's model this reaches dense fp32's quality target 2.4x sooner at R = 4
(docs/netem.md). SGD (momentum correction) and the dense mode are untouched.

The same schedule is ``SparsityConfig.adam_dense_steps`` / ``adam_warmup_steps`` /
``adam_value_dtype`` (75, 200 and bfloat16 by default), which the DDP, FSDP and DeepSpeed
integrations apply when they see an Adam-family optimizer (``distk.ddp.enable(model, cfg,
optimizer=opt)``, a DeepSpeed engine's own optimizer, HF Trainer's, Lightning's,
Accelerate's); nothing else changes, the optimizer stays the user's AdamW. Here the two
lengths come from ``train.adamw_*``.
"""

from __future__ import annotations

from dataclasses import replace

from distk.config import SparsityConfig, is_adam_family
from distk.train.config import TrainConfig

__all__ = ["adamw_block_schedule", "adamw_schedule"]


def adamw_block_schedule(cfg: TrainConfig, sparsity: SparsityConfig | None
                         ) -> SparsityConfig | None:
    """``sparsity`` with AdamW's schedule when ``cfg`` trains with AdamW and ``sparsity``
    is sparse (``method`` not "dense"): ``dense_steps`` and ``warmup_steps`` raised to
    ``train.adamw_dense_steps`` / ``train.adamw_warmup_steps``, and ``value_dtype`` set
    to ``sparsity.adam_value_dtype`` when no wire dtype or codec is set
    (:meth:`SparsityConfig.for_optimizer`). Otherwise unchanged (``None`` stays
    ``None``)."""
    if sparsity is None:
        return None
    # The job's amounts become the config's Adam schedule, so an integration that applies
    # it again (distk.deepspeed.enable sees the engine's AdamW) changes nothing more.
    if not is_adam_family(cfg.train.optimizer):
        return sparsity
    return sparsity.replace(adam_dense_steps=cfg.train.adamw_dense_steps,
                            adam_warmup_steps=cfg.train.adamw_warmup_steps
                            ).for_optimizer(cfg.train.optimizer)


def adamw_schedule(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with :func:`adamw_block_schedule` applied to its ``sparsity`` section."""
    sparsity = adamw_block_schedule(cfg, cfg.sparsity)
    return cfg if sparsity == cfg.sparsity else replace(cfg, sparsity=sparsity)
