"""Where the optimizer's state lives in sparse modes of ``distk-train`` (AdamW).

:func:`local_adam_placement` is the AdamW counterpart of
:func:`distk.train.loop.momentum_placement` (SGD's momentum correction): in the sparse
modes Adam moves from the optimizer into distk's compressor
(``SparsityConfig.local_optimizer="adam"``, see :mod:`distk.local_adam`), and the
optimizer that applies the exchanged update becomes momentum-free SGD with AdamW's
learning rate and (decoupled) weight decay. The dense mode keeps AdamW, so ``--compare``
compares against plain dense AdamW.
"""

from __future__ import annotations

from dataclasses import replace

from distk.config import SparsityConfig
from distk.train.config import TrainConfig

__all__ = ["local_adam_block", "local_adam_placement", "update_applying_train"]


def local_adam_placement(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` rewritten for local Adam when ``train.local_adam`` asks; otherwise ``cfg``.

    Applies to sparse modes (``sparsity.method`` not "dense") with ``train.optimizer ==
    "adamw"`` and ``sparsity.local_optimizer == "none"``. The result has
    ``sparsity.local_optimizer="adam"`` with Adam's betas from ``train.beta1`` /
    ``train.beta2``, and ``train.optimizer="sgd"`` with ``beta1=0`` (momentum-free SGD:
    ``p -= lr * (update + weight_decay * p)``, AdamW's decoupled decay), same ``lr``,
    schedule and weight decay. The global-norm clip ``train.grad_clip`` moves to the
    compressor as a per-tensor clip of the local gradient before Adam
    (``sparsity.clip_norm``, unless set): after the exchange it would clip the update.
    """
    cfg, sparsity = local_adam_block(cfg, cfg.sparsity)
    return replace(cfg, sparsity=sparsity)


def _wants_local_adam(cfg: TrainConfig, sparsity: SparsityConfig) -> bool:
    return (sparsity.method != "dense" and cfg.train.local_adam
            and cfg.train.optimizer == "adamw" and sparsity.local_optimizer == "none")


def update_applying_train(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` whose optimizer applies exchanged Adam updates: momentum-free SGD
    (``train.optimizer="sgd"``, ``beta1=0``), same lr, schedule and weight decay, no
    global-norm clip (it would clip the update)."""
    return replace(cfg, train=replace(cfg.train, optimizer="sgd", beta1=0.0, grad_clip=0.0))


def local_adam_block(cfg: TrainConfig, sparsity: SparsityConfig | None
                     ) -> tuple[TrainConfig, SparsityConfig | None]:
    """The rule of :func:`local_adam_placement` for a given compression config (the DDP
    job's ``sparsity`` section, or the DeepSpeed job's ``"distk"`` block).

    Returns ``(cfg, sparsity)``: with ``local_optimizer="adam"`` turned on when the rule
    applies; and whenever the result has an Adam ``local_optimizer`` (set here or by the
    user), ``cfg``'s optimizer is the update-applying SGD of :func:`update_applying_train`.
    """
    if sparsity is None:
        return cfg, None
    if _wants_local_adam(cfg, sparsity):
        clip = sparsity.clip_norm
        if clip is None and cfg.train.grad_clip > 0:
            clip = cfg.train.grad_clip
        sparsity = sparsity.replace(local_optimizer="adam", adam_beta1=cfg.train.beta1,
                                    adam_beta2=cfg.train.beta2, clip_norm=clip)
    if sparsity.local_optimizer != "none":
        cfg = update_applying_train(cfg)
    return cfg, sparsity
