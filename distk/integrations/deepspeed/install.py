"""The entry points: :func:`enable` (an engine), :func:`initialize` (``deepspeed.initialize``
that reads the ``"distk"`` block) and :func:`install` (``deepspeed.initialize`` itself
reads it, for callers such as HF Trainer and Accelerate).

:func:`install` replaces the ``deepspeed.initialize`` module attribute. distk keeps
DeepSpeed's own function (on the replacement, and in a module-level record for a user's
manual ``deepspeed.initialize = distk.deepspeed.initialize``), so :func:`initialize`
always calls DeepSpeed's function and never itself.
"""

from __future__ import annotations

import copy
import functools
import sys
from collections.abc import Callable
from typing import Any

import torch

from distk.integrations.deepspeed.checkpoint import wrap_checkpointing
from distk.integrations.deepspeed.config import (
    check_engine,
    check_supported,
    import_deepspeed,
    split_config,
)
from distk.integrations.deepspeed.seams import (
    ENGINE_SEAM_METHODS,
    ZERO_SEAM_METHODS,
    install_engine_seam,
    install_zero_seam,
    require_methods,
    wrap_step,
)
from distk.integrations.deepspeed.state import DeepSpeedCompressionState
from distk.integrations.state import residuals_for_sharding, schedule_for_optimizer

__all__ = ["enable", "get_state", "initialize", "install", "installed"]

# DeepSpeed's own ``initialize``, kept so that distk never reaches itself through the
# module attribute once that attribute points at distk (install(), or a user's
# ``deepspeed.initialize = distk.deepspeed.initialize``).
_DEEPSPEED_ORIGINALS: dict[str, Callable[..., Any]] = {}
_ORIGINAL_ATTR = "__distk_original__"


def _import_deepspeed() -> Any:
    deepspeed = import_deepspeed()
    _remember_original_initialize(deepspeed)
    return deepspeed


def _remember_original_initialize(deepspeed: Any) -> None:
    current = deepspeed.initialize
    if current is not initialize and getattr(current, _ORIGINAL_ATTR, None) is None:
        _DEEPSPEED_ORIGINALS.setdefault("initialize", current)


def _deepspeed_initialize(deepspeed: Any) -> Callable[..., Any]:
    """DeepSpeed's own ``initialize``, whatever ``deepspeed.initialize`` now points at."""
    current = deepspeed.initialize
    original = getattr(current, _ORIGINAL_ATTR, None)
    if original is not None:
        return original
    if current is not initialize:
        return current
    if "initialize" not in _DEEPSPEED_ORIGINALS:
        raise RuntimeError(
            "deepspeed.initialize was replaced by distk.deepspeed.initialize before distk "
            "saw DeepSpeed's own function, so it cannot be reached; call "
            "distk.deepspeed.install() instead of assigning deepspeed.initialize"
        )
    return _DEEPSPEED_ORIGINALS["initialize"]


def enable(engine: Any, cfg: Any, *, overlap: bool = True) -> DeepSpeedCompressionState:
    """Replace the gradient reduction of an existing DeepSpeed engine by distk's.

    :func:`initialize` calls this; call it yourself only for an engine built by
    ``deepspeed.initialize`` directly, before the first backward pass. Collective:
    every rank must call it with the same config (checked; a mismatch raises everywhere).

    Args:
        engine: a ``deepspeed.DeepSpeedEngine`` (ZeRO stage 0, 1 or 2; fp32 or bf16).
        cfg: a :class:`~distk.config.SparsityConfig` or a dict of its keys. With the
            engine's optimizer Adam-family (its config's ``"optimizer"`` or the client
            optimizer), the Adam schedule applies (``cfg.adam_dense_steps`` /
            ``adam_warmup_steps`` / ``adam_value_dtype``).
        overlap: finish each bucket's exchange at DeepSpeed's next wait point (default),
            or where it was launched (False; see
            :attr:`DeepSpeedCompressionState.overlap`).

    Returns:
        The :class:`DeepSpeedCompressionState`, also stored as ``engine.distk``.

    Raises:
        ValueError: an unsupported configuration (ZeRO 3, fp16, offload, MoE, ...).
        RuntimeError: the DeepSpeed version lacks the methods distk replaces, or the
            engine already exchanges through distk.
    """
    _import_deepspeed()
    if get_state(engine) is not None:
        raise RuntimeError("distk.deepspeed.enable: this engine already exchanges through distk")
    check_supported(engine.config, engine.module)
    seam = check_engine(engine)
    optimizer = engine.optimizer
    if seam == "zero":
        require_methods(optimizer, ZERO_SEAM_METHODS)
        group, sum_gradients = optimizer.dp_process_group, not optimizer.gradient_average
    else:
        require_methods(engine, ENGINE_SEAM_METHODS)
        group, sum_gradients = engine.seq_data_parallel_group, not engine.gradient_average
    # The engine's own optimizer (the client's or the one its config built) decides the
    # Adam schedule (cfg.adam_dense_steps / adam_warmup_steps / adam_value_dtype).
    cfg = schedule_for_optimizer(cfg, getattr(engine, "basic_optimizer", None) or optimizer,
                                 "distk.deepspeed")
    cfg = residuals_for_sharding(cfg, int(engine.zero_optimization_stage()) == 2,
                                 "distk.deepspeed")
    state = DeepSpeedCompressionState(cfg, group, seam=seam,
                                      zero_stage=int(engine.zero_optimization_stage()),
                                      sum_gradients=sum_gradients, model=engine.module,
                                      overlap=overlap)
    if seam == "zero":
        install_zero_seam(engine, state)
    else:
        install_engine_seam(engine, state)
    wrap_step(engine, state)
    wrap_checkpointing(engine, state)
    engine.distk = state
    return state


def get_state(engine: Any) -> DeepSpeedCompressionState | None:
    """The :class:`DeepSpeedCompressionState` of an engine (``None`` without distk)."""
    return engine.__dict__.get("distk")


def initialize(args: Any = None, model: torch.nn.Module | None = None, optimizer: Any = None,
               model_parameters: Any = None, training_data: Any = None,
               lr_scheduler: Any = None, distributed_port: int | None = None, mpu: Any = None,
               dist_init_required: bool | None = None, collate_fn: Callable | None = None,
               config: str | dict[str, Any] | None = None, mesh_param: Any = None,
               config_params: str | dict[str, Any] | None = None) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize`` that also reads the config's ``"distk"`` block.

    Takes exactly ``deepspeed.initialize``'s arguments (the config as ``config``,
    ``config_params`` or ``args.deepspeed_config``: a dict, a JSON path or base64 JSON) and
    returns its ``(engine, optimizer, training_dataloader, lr_scheduler)``.

    Without a ``"distk"`` block this is ``deepspeed.initialize`` and its result is
    returned untouched. With one, the block is validated and the configuration checked
    for support before any collective (errors raise identically on every rank), the
    block is removed from what DeepSpeed sees, and :func:`enable` swaps the engine's
    gradient reduction for distk's; the state is ``engine.distk``.

    Raises:
        ValueError: a bad ``"distk"`` block (names the key), or an unsupported setup
            (ZeRO stage 3, fp16, offload, pipeline/sequence parallelism, MoE, sparse
            gradients).
    """
    deepspeed = _import_deepspeed()
    from deepspeed.constants import TORCH_DISTRIBUTED_DEFAULT_PORT

    if distributed_port is None:
        distributed_port = TORCH_DISTRIBUTED_DEFAULT_PORT
    source = config if config is not None else config_params
    from_args = source is None and getattr(args, "deepspeed_config", None) is not None
    if from_args:
        source = args.deepspeed_config
    kwargs = dict(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                  training_data=training_data, lr_scheduler=lr_scheduler,
                  distributed_port=distributed_port, mpu=mpu,
                  dist_init_required=dist_init_required, collate_fn=collate_fn, config=config,
                  mesh_param=mesh_param, config_params=config_params)
    ds_initialize = _deepspeed_initialize(deepspeed)
    if source is None:
        return ds_initialize(**kwargs)
    ds_config, cfg = split_config(source)
    if cfg is None:
        return ds_initialize(**kwargs)
    check_supported(ds_config, model)
    kwargs.update(config=ds_config, config_params=None)
    if from_args:
        # DeepSpeed refuses a config both in args and as an argument; hand it the
        # stripped dict and leave the caller's args object unchanged.
        args = copy.copy(args)
        args.deepspeed_config = None
        kwargs["args"] = args
    result = ds_initialize(**kwargs)
    enable(result[0], cfg)
    return result


def install() -> None:
    """Make ``deepspeed.initialize`` itself honour the ``"distk"`` block (the one line).

    Afterwards every caller of ``deepspeed.initialize`` (HF ``Trainer``, Accelerate, user
    code) goes through :func:`initialize`: a config with a ``"distk"`` block gets an
    engine whose gradient reduction is distk's (``engine.distk``), or an error naming
    what distk does not support; a config without one is handed to DeepSpeed untouched.
    Call it once per process before the engine is built (before ``Trainer.train()`` or
    ``accelerator.prepare``). Idempotent; DeepSpeed's own function is kept and always
    called directly, so there is no recursion. Callers that bound the function earlier
    (``from deepspeed import initialize``) keep DeepSpeed's and are not affected.
    """
    deepspeed = _import_deepspeed()
    if getattr(deepspeed.initialize, _ORIGINAL_ATTR, None) is not None:
        return
    original = _deepspeed_initialize(deepspeed)

    @functools.wraps(original)
    def initialize_with_distk(*args: Any, **kwargs: Any) -> tuple[Any, Any, Any, Any]:
        return initialize(*args, **kwargs)

    setattr(initialize_with_distk, _ORIGINAL_ATTR, original)
    deepspeed.initialize = initialize_with_distk


def installed() -> bool:
    """Whether :func:`install` has routed ``deepspeed.initialize`` through distk."""
    deepspeed = sys.modules.get("deepspeed")
    return deepspeed is not None and getattr(deepspeed.initialize, _ORIGINAL_ATTR,
                                             None) is not None


# The obvious manual patch (``deepspeed.initialize = distk.deepspeed.initialize``) reads
# distk's function before assigning it: remember DeepSpeed's if it is already imported.
if "deepspeed" in sys.modules and hasattr(sys.modules["deepspeed"], "initialize"):
    _remember_original_initialize(sys.modules["deepspeed"])
