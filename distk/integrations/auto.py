"""``distk.enable``: one entry point for whatever a framework wrapped the model in.

The framework adapters (HF Trainer, Accelerate, Lightning) receive a model that DDP,
FSDP or DeepSpeed has already wrapped; :func:`enable` picks the integration from the
wrapper's type, :func:`get_state` finds a state enabled earlier, and :func:`metrics`
turns a state's last-step statistics into the flat ``{"distk/<name>": float}`` dict the
frameworks' loggers (and so wandb / TensorBoard) take.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

__all__ = ["config_for", "enable", "get_state", "is_wrapped", "metrics", "resolve_config",
           "unwrap_compiled"]

STATE_ATTR = "distk"
"""Attribute of the wrapper (DDP/FSDP module, DeepSpeed engine) that holds its state."""

METRIC_PREFIX = "distk/"


def unwrap_compiled(module: Any) -> Any:
    """``torch.compile(m)`` returns an ``OptimizedModule``; the wrapper is its ``_orig_mod``."""
    compiled = getattr(torch, "_dynamo", None)
    optimized = getattr(getattr(compiled, "eval_frame", None), "OptimizedModule", None)
    while optimized is not None and isinstance(module, optimized):
        module = module._orig_mod
    return module


def _is_deepspeed_engine(obj: Any) -> bool:
    deepspeed = sys.modules.get("deepspeed")
    if deepspeed is None:
        return False
    from deepspeed.runtime.engine import DeepSpeedEngine

    return isinstance(obj, DeepSpeedEngine)


def _is_fsdp(module: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

    return isinstance(module, torch.nn.Module) and any(
        isinstance(m, FSDPModule | FSDP1) for m in module.modules())


def is_wrapped(obj: Any) -> bool:
    """Whether ``obj`` is a wrapper :func:`enable` accepts (DDP, FSDP, DeepSpeed engine)."""
    module = unwrap_compiled(obj)
    return (_is_deepspeed_engine(module) or isinstance(module, DistributedDataParallel)
            or _is_fsdp(module))


def get_state(wrapped: Any) -> Any:
    """The distk state of a DDP/FSDP module or DeepSpeed engine, or ``None``."""
    wrapped = unwrap_compiled(wrapped)
    return getattr(wrapped, "__dict__", {}).get(STATE_ATTR)


def resolve_config(cfg: Any, ds_config: Any = None, *, where: str) -> Any:
    """``cfg`` as a SparsityConfig; ``None`` reads the ``"distk"`` block of ``ds_config``.

    Args:
        cfg: a SparsityConfig, a dict of its keys, or None.
        ds_config: a DeepSpeed config (dict, JSON path or base64), consulted when cfg is
            None; may be None.
        where: the caller's name, used in error messages.

    Raises:
        TypeError: cfg is of another type.
        ValueError: cfg is None and there is no ``"distk"`` block to read.
    """
    from distk.compressor import as_sparsity_config

    if cfg is not None:  # the seam's one coercion (CompressionState uses it too)
        return as_sparsity_config(cfg, what=f"{where}: cfg")
    if ds_config is not None:
        from distk.integrations.deepspeed import split_config

        _, block = split_config(ds_config)
        if block is not None:
            return block
    raise ValueError(f"{where}: cfg=None, and there is no DeepSpeed config with a \"distk\" "
                     "block to read it from; pass a distk.SparsityConfig or a dict")


def config_for(cfg: Any, ds_config: Any, *, where: str) -> Any:
    """The one config a framework adapter uses: ``cfg``, or the ``"distk"`` block, or
    ``None`` when neither is given (then :func:`enable` takes distk's default for the
    optimizer on DDP and FSDP, :meth:`SparsityConfig.default_for
    <distk.config.SparsityConfig.default_for>`, and refuses a DeepSpeed engine).

    ``cfg`` (SparsityConfig, dict or None) and the ``"distk"`` block of ``ds_config`` (the
    framework's DeepSpeed config, or None) may both be given only when they are equal;
    otherwise one of them would be silently ignored.

    Raises:
        ValueError: both are given and differ.
    """
    block = None
    if ds_config is not None:
        from distk.integrations.deepspeed import split_config

        _, block = split_config(ds_config)
    if cfg is None:
        return block
    cfg = resolve_config(cfg, where=where)
    if block is not None and block != cfg:
        raise ValueError(
            f"{where}: cfg={cfg.to_dict()} differs from the \"distk\" block of the DeepSpeed "
            f"config {block.to_dict()}; give the config once (cfg=None reads the block)")
    return cfg


def _given(cfg: Any) -> Any:
    """``cfg`` coerced, or ``None`` (distk's default for the optimizer) left as it is."""
    return None if cfg is None else resolve_config(cfg, where="distk.enable")


def enable(wrapped: Any, cfg: Any = None, optimizer: Any = None) -> Any:
    """Sparsify the gradient exchange of a wrapped model, whichever wrapper it is.

    Args:
        wrapped: a ``DistributedDataParallel`` module, an FSDP2 (``fully_shard``) or
            FSDP1 root module, or a DeepSpeed engine; a ``torch.compile``'d wrapper is
            unwrapped. Call it before the first backward pass, on every rank.
        cfg: a :class:`~distk.config.SparsityConfig`, a dict of its keys, or None: then
            the ``"distk"`` block of the DeepSpeed engine's config (an error when there
            is none), and for DDP and FSDP distk's default for ``optimizer``
            (:meth:`SparsityConfig.default_for <distk.config.SparsityConfig.default_for>`:
            on DDP outer synchronisation for an Adam-family optimizer, otherwise the
            per-step ``SparsityConfig()``; rank 0 says which).
        optimizer: the training optimizer for DDP and FSDP, optional: an Adam-family one
            gets the Adam schedule (``cfg.adam_*``, as in :func:`distk.ddp.enable`), and
            with ``cfg=None`` on DDP outer synchronisation. A DeepSpeed engine uses its
            own optimizer.

    Returns:
        The integration's state (``.stats``, ``.compressor``, ``state_dict()``), also
        stored as ``wrapped.distk``. An engine that already exchanges through distk (built
        by ``distk.deepspeed.initialize`` or after ``distk.deepspeed.install()``) keeps
        its state, which is returned (cfg, when given, must equal its config).

    Raises:
        TypeError: ``wrapped`` is none of the supported wrappers, or cfg has a wrong type.
        ValueError: cfg is None for a DeepSpeed engine whose config has no ``"distk"``
            block, cfg differs from the engine's, or the
            setup is not supported by the integration (its error names the setting).
    """
    module = unwrap_compiled(wrapped)
    if _is_deepspeed_engine(module):
        from distk.integrations import deepspeed as ds

        existing = ds.get_state(module)
        if existing is not None:
            if cfg is not None:
                wanted = resolve_config(cfg, where="distk.enable")
                if wanted != existing.cfg:
                    raise ValueError(
                        "distk.enable: this DeepSpeed engine already exchanges through distk "
                        f"with {existing.cfg.to_dict()}, which differs from cfg="
                        f"{wanted.to_dict()}; pass cfg=None or the same config")
            return existing
        return ds.enable(module, resolve_config(cfg, module.config, where="distk.enable"))
    if isinstance(module, DistributedDataParallel):
        from distk.integrations import ddp

        state = ddp.enable(module, _given(cfg), optimizer=optimizer)
    elif _is_fsdp(module):
        from distk.integrations import fsdp

        state = fsdp.enable(module, _given(cfg), optimizer=optimizer)
    else:
        raise TypeError(
            "distk.enable expects a torch.nn.parallel.DistributedDataParallel module, an "
            "FSDP2 (fully_shard) or FSDP1 module, or a DeepSpeed engine, got "
            f"{type(wrapped).__name__}; a model that no framework wrapped exchanges no "
            "gradients (one process, or the wrapper not built yet)")
    module.__dict__[STATE_ATTR] = state
    return state


def metrics(state: Any) -> dict[str, float]:
    """The last step's statistics as ``{"distk/<name>": float}`` (empty before one).

    :meth:`CompressionState.metrics <distk.integrations.CompressionState.metrics>` of the
    state: the last step's :class:`~distk.stats.StepStats` (``distk/density`` is the
    effective density, entries sent / all gradient entries of the step, dense tensors
    counted in full; DDP's first, bucket-rebuilding step is dense: 1.0;
    ``distk/target_density`` is ``cfg.density``), the run totals (``distk/total_*``, e.g.
    ``distk/total_bytes_sent``) and ``distk/iteration``.
    """
    if state is None or not state.stats.buffers:
        return {}
    return state.metrics(METRIC_PREFIX)
