"""Accelerate: distk on the model ``accelerator.prepare`` wrapped, with per-rank state.

Usage::

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = distk.integrations.accelerate.enable(accelerator, {"density": 0.01}, model=model)
    ...                                              # train as usual
    accelerator.save_state("ckpt")                   # every rank writes its residuals
    accelerator.load_state("ckpt")                   # every rank reads its own back

Why not Accelerate's own knobs: ``DistributedDataParallelKwargs(comm_hook=...)`` only
takes Accelerate's ``DDPCommunicationHookType`` values, and
``register_for_checkpointing(state)`` writes rank 0's object only, so on load every rank
would get rank 0's residuals. :func:`enable` therefore registers the hook itself
(:func:`distk.enable` on the prepared DDP / FSDP module or DeepSpeed engine) and adds
``save_state`` / ``load_state`` pre-hooks that write and read one
``distk_rank<NNNNN>.pt`` per rank in the checkpoint folder
(:mod:`distk.integrations.checkpoint`, which refuses another rank's file).

Statistics: ``state.stats`` after each step, or
``accelerator.log(distk.integrations.auto.metrics(state), step=...)`` for the trackers.
"""

from __future__ import annotations

import warnings
from typing import Any

from distk.integrations import auto
from distk.integrations.checkpoint import load_rank_state, save_rank_state

__all__ = ["enable"]


def _prepared_model(accelerator: Any) -> Any:
    # Accelerate keeps the DeepSpeed engine / FSDP module it built, but for DDP the
    # model it was given (the DDP wrapper exists only in prepare's return value).
    models = accelerator._models
    if len(models) != 1:
        raise ValueError(
            f"distk.integrations.accelerate.enable: the accelerator prepared {len(models)} "
            "models; pass the one to sparsify (what prepare returned) as model=")
    model = models[0]
    if auto.get_state(model) is None and not auto.is_wrapped(model):
        raise ValueError(
            "distk.integrations.accelerate.enable: under DDP the accelerator does not keep "
            "the DistributedDataParallel wrapper; pass what prepare returned: "
            "enable(accelerator, cfg, model=model)")
    return model


def _deepspeed_config(accelerator: Any) -> Any:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else plugin.deepspeed_config


def enable(accelerator: Any, cfg: Any = None, model: Any = None) -> Any:
    """Sparsify the gradient exchange of a prepared model; checkpoint it per rank.

    Call after ``accelerator.prepare`` and before the first backward, on every rank.

    Args:
        accelerator: the ``accelerate.Accelerator`` that prepared the model (DDP, FSDP
            or DeepSpeed; ``distributed_type`` MULTI_CPU / MULTI_GPU, FSDP or DEEPSPEED).
        cfg: a :class:`~distk.config.SparsityConfig`, a dict of its keys, or None: then
            the ``"distk"`` block of the DeepSpeed plugin's config (an error when there
            is none under DeepSpeed), and under DDP or FSDP distk's default for the one
            prepared optimizer (:meth:`SparsityConfig.default_for
            <distk.config.SparsityConfig.default_for>`: outer synchronisation on DDP for
            an Adam-family one; rank 0 says which).
        model: the prepared model (what ``prepare`` returned). Required under DDP
            (Accelerate does not keep the DDP wrapper); under DeepSpeed and FSDP the
            default is the one model the accelerator prepared.

    Returns:
        The distk state (``.stats``, ``.compressor``, ``state_dict()``).

    Raises:
        ValueError: one process only, several prepared models and no ``model``, or cfg
            missing under DeepSpeed.
        TypeError: the model is not wrapped by DDP, FSDP or DeepSpeed.
    """
    if accelerator.num_processes < 2:
        raise ValueError(
            "distk.integrations.accelerate.enable: the accelerator runs one process "
            f"(num_processes={accelerator.num_processes}), so there is no gradient "
            "exchange to sparsify; launch with accelerate launch / torchrun on 2+ ranks")
    if model is None:
        model = _prepared_model(accelerator)
    if cfg is not None or auto.get_state(model) is None:
        cfg = auto.config_for(cfg, _deepspeed_config(accelerator),
                              where="distk.integrations.accelerate.enable")
    handler = getattr(accelerator, "ddp_handler", None)
    if handler is not None and callable(getattr(handler, "comm_hook", None)):
        warnings.warn(
            "distk: DistributedDataParallelKwargs(comm_hook=...) takes only Accelerate's "
            f"DDPCommunicationHookType values; the callable {handler.comm_hook!r} was not "
            "registered by Accelerate. distk registers its own hook here instead.",
            RuntimeWarning, stacklevel=2)
    optimizers = getattr(accelerator, "_optimizers", [])
    state = auto.enable(model, cfg, optimizer=optimizers[0] if len(optimizers) == 1 else None)

    def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        del models, weights
        save_rank_state(output_dir, state)

    def load_hook(models: list[Any], input_dir: str) -> None:
        del models
        load_rank_state(input_dir, state)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    return state
