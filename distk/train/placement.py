"""AdamW's sparse-training schedule in ``distk-train`` (the DDP job and the DeepSpeed job).

Measured on the main job (docs/train.md, "Sparse training with AdamW"): with AdamW after
the exchange, error feedback's bursts cost 11.9% validation loss at density 1% under the
SGD-tuned schedule (``warmup_steps`` 50, no dense steps), 2.7% with 30 dense steps and a
100-step density warm-up, 1.8% / 3.2% (seeds 0 / 1) with 50 and 150. Changing what is exchanged
(Adam's update, its moments, a locally preconditioned gradient, a burst-free second
moment) did worse, or (the burst-free second moment, at twice the bytes) no better once
the dense start was in place. So under AdamW the sparse modes raise
``sparsity.dense_steps`` and ``sparsity.warmup_steps`` to ``train.adamw_dense_steps``
(50) and ``train.adamw_warmup_steps`` (150). SGD (momentum correction) and the dense mode are
untouched.

A DDP / FSDP / DeepSpeed user gets the same by setting the two ``SparsityConfig`` fields
(``SparsityConfig(density=0.01, dense_steps=50, warmup_steps=150)``, or ``"dense_steps":
50, "warmup_steps": 150`` in the DeepSpeed ``"distk"`` block); nothing else changes, the
optimizer stays the user's AdamW.
"""

from __future__ import annotations

from dataclasses import replace

from distk.config import SparsityConfig
from distk.train.config import TrainConfig

__all__ = ["adamw_block_schedule", "adamw_schedule"]


def adamw_block_schedule(cfg: TrainConfig, sparsity: SparsityConfig | None
                         ) -> SparsityConfig | None:
    """``sparsity`` with AdamW's schedule when ``cfg`` trains with AdamW and ``sparsity``
    is sparse (``method`` not "dense"): ``dense_steps`` and ``warmup_steps`` raised to
    ``train.adamw_dense_steps`` / ``train.adamw_warmup_steps``. Otherwise unchanged
    (``None`` stays ``None``)."""
    if sparsity is None or cfg.train.optimizer != "adamw" or sparsity.method == "dense":
        return sparsity
    return sparsity.replace(
        dense_steps=max(sparsity.dense_steps, cfg.train.adamw_dense_steps),
        warmup_steps=max(sparsity.warmup_steps, cfg.train.adamw_warmup_steps))


def adamw_schedule(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with :func:`adamw_block_schedule` applied to its ``sparsity`` section."""
    sparsity = adamw_block_schedule(cfg, cfg.sparsity)
    return cfg if sparsity == cfg.sparsity else replace(cfg, sparsity=sparsity)
