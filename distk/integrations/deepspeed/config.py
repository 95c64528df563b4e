"""The ``"distk"`` block of a DeepSpeed config, the supported DeepSpeed range, and the
checks of what distk supports, all local to each rank (no collective), so that a bad
block or an unsupported setup raises the same error on every rank before DeepSpeed
starts its own collectives.
"""

from __future__ import annotations

from typing import Any

from distk.config import SparsityConfig
from distk.integrations.state import refuse_sparse_gradients

__all__ = [
    "CONFIG_KEY",
    "DEEPSPEED_REQUIREMENT",
    "SUPPORTED_DEEPSPEED",
    "SUPPORTED_ZERO_STAGES",
    "check_engine",
    "check_supported",
    "import_deepspeed",
    "split_config",
]

CONFIG_KEY = "distk"
"""Top-level key of the DeepSpeed JSON that holds the :class:`SparsityConfig` block."""

SUPPORTED_ZERO_STAGES = (0, 1, 2)
"""ZeRO stages whose gradient reduction distk replaces."""

SUPPORTED_DEEPSPEED = (0, 19)
"""DeepSpeed major.minor the seams were written and tested against: the one statement of
the supported range. Errors quote :data:`DEEPSPEED_REQUIREMENT`; the ``deepspeed`` extra
in pyproject.toml and docs/deepspeed.md must say the same (tests/test_deepspeed.py checks
both)."""

DEEPSPEED_REQUIREMENT = (f"deepspeed>={SUPPORTED_DEEPSPEED[0]}.{SUPPORTED_DEEPSPEED[1]},"
                         f"<{SUPPORTED_DEEPSPEED[0]}.{SUPPORTED_DEEPSPEED[1] + 1}")
""":data:`SUPPORTED_DEEPSPEED` as a pip requirement: ``deepspeed>=0.19,<0.20``."""


def import_deepspeed() -> Any:
    """``import deepspeed``, refusing a version outside :data:`SUPPORTED_DEEPSPEED`.

    Raises:
        ImportError: DeepSpeed is not installed.
        RuntimeError: its version is outside the supported range (the seams replace
            private methods, whose names and arguments change between minor versions).
    """
    try:
        import deepspeed
    except ImportError as err:  # pragma: no cover - the extra is installed in CI
        raise ImportError(
            "distk.deepspeed needs DeepSpeed; install the extra: pip install distk[deepspeed]"
        ) from err
    version = tuple(int(part) for part in deepspeed.__version__.split(".")[:2])
    if version != SUPPORTED_DEEPSPEED:
        raise RuntimeError(
            f"distk.deepspeed replaces private DeepSpeed methods and supports "
            f"{DEEPSPEED_REQUIREMENT}; found deepspeed=={deepspeed.__version__}. Install a "
            "supported version (pip install 'distk[deepspeed]') or leave out the \"distk\" "
            "block."
        )
    return deepspeed


def _load_ds_config(config: str | dict[str, Any]) -> dict[str, Any]:
    """A DeepSpeed config (dict, path, or base64 JSON, as DeepSpeed accepts) as a dict."""
    if isinstance(config, dict):
        return config
    # DeepSpeed's own loader: hjson, duplicate-key check, base64 strings.
    from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config

    return load_ds_config(config)


def split_config(config: str | dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Split a DeepSpeed config into (config without the ``"distk"`` block, SparsityConfig).

    Args:
        config: a DeepSpeed config as a dict, a path to a JSON file, or base64 JSON.

    Returns:
        ``(ds_config, cfg)``: a shallow copy of the config without the block, and the
        validated :class:`~distk.config.SparsityConfig` (``None`` when there is no block).

    Raises:
        ValueError: the block is not a JSON object, has an unknown key (the closest valid
            key is suggested) or a bad value (key, value and what is allowed are named).
    """
    ds_config = _load_ds_config(config)
    if CONFIG_KEY not in ds_config:
        return ds_config, None
    block = ds_config[CONFIG_KEY]
    if not isinstance(block, dict):
        raise ValueError(
            f'the "{CONFIG_KEY}" block of the DeepSpeed config must be a JSON object of '
            f"SparsityConfig keys, got {type(block).__name__}: {block!r}"
        )
    try:
        cfg = SparsityConfig.from_dict(dict(block))
    except (TypeError, ValueError) as err:
        raise ValueError(f'invalid "{CONFIG_KEY}" block in the DeepSpeed config: {err}') from err
    stripped = {key: value for key, value in ds_config.items() if key != CONFIG_KEY}
    return stripped, cfg


def _enabled(section: Any) -> bool:
    return isinstance(section, dict) and section.get("enabled", False) is True


def check_supported(ds_config: dict[str, Any], model: Any = None) -> None:
    """Refuse a DeepSpeed config (and model) whose gradient path distk does not replace.

    Local and deterministic (no collective): every rank raises alike, before DeepSpeed
    builds its engine. What only the built engine shows (MoE layers, the optimizer
    class) is checked by :func:`check_engine`.

    Args:
        ds_config: the DeepSpeed config as a dict (with or without the ``"distk"`` block).
        model: the model handed to ``deepspeed.initialize``, or None.

    Raises:
        ValueError: naming the setting, its value and what is allowed: ZeRO stage 3, fp16,
            AMP, ZeRO-Offload, ZenFlow, sequence parallelism, a ``PipelineModule`` model,
            or sparse (``Embedding(sparse=True)``) gradients.
    """
    zero = ds_config.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    if stage not in SUPPORTED_ZERO_STAGES:
        raise ValueError(
            f"distk.deepspeed supports ZeRO stages {SUPPORTED_ZERO_STAGES}, got "
            f"zero_optimization.stage={stage!r}; ZeRO stage 3 is not supported (its "
            "reduce-scatter of partitioned parameters has no distk seam yet). Use stage 2 "
            f'or remove the "{CONFIG_KEY}" block.'
        )
    if _enabled(ds_config.get("fp16")):
        raise ValueError(
            "distk.deepspeed supports fp32 and bf16, got fp16.enabled=true: dynamic loss "
            "scaling would leave loss-scaled values in the residuals and skipped overflow "
            'steps would desynchronise them; use "bf16": {"enabled": true} instead'
        )
    if _enabled(ds_config.get("amp")):
        raise ValueError("distk.deepspeed does not support amp.enabled=true; use bf16 instead")
    if isinstance(zero, dict):
        for key in ("offload_optimizer", "offload_param"):
            section = zero.get(key)
            device = section.get("device", "none") if isinstance(section, dict) else "none"
            if device not in (None, "none"):
                raise ValueError(
                    f"distk.deepspeed does not support ZeRO-Offload, got "
                    f"zero_optimization.{key}.device={device!r}; allowed: 'none'"
                )
        if zero.get("zenflow"):
            raise ValueError(f"distk.deepspeed does not support zero_optimization.zenflow, got "
                             f"{zero['zenflow']!r}; allowed: absent or empty")
    sequence_parallel = ds_config.get("sequence_parallel_size", 1)
    if sequence_parallel not in (1, None):
        raise ValueError(
            f"distk.deepspeed does not support sequence parallelism, got "
            f"sequence_parallel_size={sequence_parallel!r}; allowed: 1"
        )
    if model is not None:
        from deepspeed.runtime.pipe.module import PipelineModule

        if isinstance(model, PipelineModule):
            raise ValueError("distk.deepspeed does not support pipeline parallelism, got a "
                             "PipelineModule model; allowed: a plain torch.nn.Module")
        refuse_sparse_gradients(model, "distk.deepspeed")


def check_engine(engine: Any) -> str:
    """Refuse a built engine whose gradient path distk does not replace; otherwise name
    the seam: ``"zero"`` (ZeRO 1/2's ``DeepSpeedZeroOptimizer``) or ``"engine"`` (ZeRO 0,
    and ZeRO 1 with DeepSpeed's ``BF16_Optimizer``).

    What only the built engine shows: MoE layers, the optimizer class, offload. Every rank
    builds the same engine, so every rank raises alike.

    Raises:
        ValueError: naming what is not supported and what is allowed.
    """
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    stage = int(engine.zero_optimization_stage())
    if stage not in SUPPORTED_ZERO_STAGES:
        raise ValueError(f"distk.deepspeed supports ZeRO stages {SUPPORTED_ZERO_STAGES}, "
                         f"got zero_optimization.stage={stage}")
    if engine.fp16_enabled():
        raise ValueError("distk.deepspeed supports fp32 and bf16, got fp16.enabled=true")
    if engine.has_moe_layers:
        raise ValueError("distk.deepspeed does not support MoE layers (expert-parallel "
                         "gradient groups); allowed: models without deepspeed.moe layers")
    if engine.pipeline_parallelism:
        raise ValueError("distk.deepspeed does not support pipeline parallelism")
    optimizer = engine.optimizer
    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        if type(optimizer) is not DeepSpeedZeroOptimizer:
            raise ValueError(f"distk.deepspeed does not support {type(optimizer).__name__} "
                             "(e.g. ZenFlow); allowed: plain ZeRO stage 1/2 "
                             "(DeepSpeedZeroOptimizer)")
        if optimizer.cpu_offload:
            raise ValueError("distk.deepspeed does not support ZeRO-Offload")
        return "zero"
    if stage != 0 and not isinstance(optimizer, BF16_Optimizer):
        raise ValueError(f"distk.deepspeed: unexpected optimizer {type(optimizer).__name__} "
                         f"for ZeRO stage {stage}; allowed: DeepSpeedZeroOptimizer or "
                         "BF16_Optimizer")
    return "engine"
