"""DeepSpeed integration: distk's sparse exchange in place of DeepSpeed's gradient all-reduce.

Usage: add a top-level ``"distk"`` block (the keys of :class:`~distk.config.SparsityConfig`)
to the DeepSpeed JSON and call :func:`initialize` exactly like ``deepspeed.initialize``::

    engine, optimizer, loader, scheduler = distk.deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config="ds_config.json")
    for batch in loader:
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint("ckpt")            # residuals saved too (one file per rank)

Without a ``"distk"`` block :func:`initialize` is ``deepspeed.initialize`` (its result is
returned untouched). With one, the block is validated before anything collective happens
(a typo raises the same ``ValueError`` on every rank), removed from the config DeepSpeed
sees, and after DeepSpeed has built its engine the engine's gradient reduction is
replaced by the one shared :class:`~distk.compressor.GradientCompressor`, one call per
parameter gradient under the parameter's name:

- ZeRO stage 0 (fp32, and bf16 through DeepSpeed's ``FP16_UnfusedOptimizer``) and ZeRO
  stage 1 with DeepSpeed's ``BF16_Optimizer`` (bf16 with fp32 gradient accumulation):
  the engine's ``buffered_allreduce_fallback`` (DeepSpeed calls it at every gradient
  accumulation boundary from ``allreduce_gradients``);
- ZeRO stages 1 and 2 (``DeepSpeedZeroOptimizer``): the optimizer's ``average_tensor``
  (contiguous gradient buckets, the default) and ``buffered_reduce_fallback`` /
  ``_buffered_reduce_fallback_preserving_fp32`` (``contiguous_gradients: false``). Every
  rank receives the whole averaged bucket and DeepSpeed then keeps the rank's partition
  of it, exactly as its own all-reduce path (``reduce_scatter: false``) does;
- ZeRO stage 3, fp16, AMP, ZeRO-Offload, pipeline / sequence parallelism, MoE layers and
  sparse (``Embedding(sparse=True)``) gradients are refused with an error naming them.

These are private DeepSpeed methods: the supported DeepSpeed range is pinned
(:data:`SUPPORTED_DEEPSPEED`, the ``deepspeed`` extra of distk) and ``tests/
test_deepspeed.py`` fails if the seams stop being hit. Gradient clipping
(``gradient_clipping``) and the optimizer see the exchanged gradient, because the
exchange sits where DeepSpeed's all-reduce was. Statistics go to
``engine.monitor.write_events`` (DeepSpeed's ``wandb`` / ``tensorboard`` /
``csv_monitor`` blocks) and to an optional :class:`~distk.logging.StatsLogger`
(``state.logger``). ``engine.save_checkpoint`` / ``engine.load_checkpoint`` carry the
compressor state (residuals, momenta, counters) in one ``distk_rank<NNNNN>.pt`` per rank
inside the checkpoint's tag folder.
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from distk.config import SparsityConfig
from distk.integrations.state import (
    CompressionState,
    refuse_sparse_gradients,
    schedule_for_optimizer,
)

__all__ = [
    "CONFIG_KEY",
    "SUPPORTED_DEEPSPEED",
    "SUPPORTED_ZERO_STAGES",
    "DeepSpeedCompressionState",
    "enable",
    "get_state",
    "initialize",
    "install",
    "installed",
    "split_config",
]

CONFIG_KEY = "distk"
"""Top-level key of the DeepSpeed JSON that holds the :class:`SparsityConfig` block."""

SUPPORTED_ZERO_STAGES = (0, 1, 2)
"""ZeRO stages whose gradient reduction distk replaces."""

SUPPORTED_DEEPSPEED = (0, 19)
"""DeepSpeed major.minor the seams were written and tested against (``>=0.19,<0.20``)."""

CHECKPOINT_FILE = "distk_rank{rank:05d}.pt"
"""Per-rank compressor state file, written inside the checkpoint's tag folder."""

MONITOR_PREFIX = "distk/"
"""Prefix of the event names written to ``engine.monitor`` and to ``state.logger``."""


def _import_deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError as err:  # pragma: no cover - the extra is installed in CI
        raise ImportError(
            "distk.deepspeed needs DeepSpeed; install the extra: pip install distk[deepspeed]"
        ) from err
    version = tuple(int(part) for part in deepspeed.__version__.split(".")[:2])
    if version != SUPPORTED_DEEPSPEED:
        raise RuntimeError(
            f"distk.deepspeed replaces private DeepSpeed methods and supports DeepSpeed "
            f">=0.19,<0.20; found deepspeed=={deepspeed.__version__}. Install a supported "
            "version (pip install 'distk[deepspeed]') or leave out the \"distk\" block."
        )
    _remember_original_initialize(deepspeed)
    return deepspeed


# DeepSpeed's own ``initialize``, kept so that distk never reaches itself through the
# module attribute once that attribute points at distk (install(), or a user's
# ``deepspeed.initialize = distk.deepspeed.initialize``).
_DEEPSPEED_ORIGINALS: dict[str, Callable[..., Any]] = {}
_ORIGINAL_ATTR = "__distk_original__"


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


# -- configuration ------------------------------------------------------------------------

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


def _check_supported(ds_config: dict[str, Any], model: Any) -> None:
    """Refuse configurations whose gradient path distk does not replace (no collectives)."""
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
            device = (zero.get(key) or {}).get("device", "none") if isinstance(
                zero.get(key), dict) else "none"
            if device not in (None, "none"):
                raise ValueError(
                    f"distk.deepspeed does not support ZeRO-Offload, got "
                    f"zero_optimization.{key}.device={device!r}; allowed: 'none'"
                )
        if zero.get("zenflow"):
            raise ValueError("distk.deepspeed does not support zero_optimization.zenflow")
    sequence_parallel = ds_config.get("sequence_parallel_size", 1)
    if sequence_parallel not in (1, None):
        raise ValueError(
            f"distk.deepspeed does not support sequence parallelism, got "
            f"sequence_parallel_size={sequence_parallel!r}; allowed: 1"
        )
    if model is not None:
        from deepspeed.runtime.pipe.module import PipelineModule

        if isinstance(model, PipelineModule):
            raise ValueError("distk.deepspeed does not support pipeline parallelism "
                             "(a PipelineModule model)")
        refuse_sparse_gradients(model, "distk.deepspeed")


# -- state ---------------------------------------------------------------------------------

class DeepSpeedCompressionState(CompressionState):
    """What ``engine.distk`` holds: the shared state plus the seam in use.

    See :class:`~distk.integrations.CompressionState` for ``cfg``, ``compressor``,
    ``stats``, ``totals``, ``iteration``, ``state_dict`` and ``load_state_dict``.
    Residuals are keyed by parameter name (``model.named_parameters()``). One step
    (``iteration``) is one optimizer step: it ends at the gradient accumulation boundary
    (``engine.step``), under every ZeRO stage; ZeRO 2, which reduces after every
    micro-batch as DeepSpeed itself does, exchanges each gradient once per micro-batch
    within it. DeepSpeed's seams are synchronous (``reduce``).

    Attributes:
        seam: which DeepSpeed reduction was replaced: ``"engine"`` (ZeRO 0 and the
            BF16 optimizer) or ``"zero"`` (ZeRO 1/2 optimizer).
        zero_stage: the engine's ZeRO stage.
        logger: optional sink with ``log(metrics: dict, step: int)`` (e.g.
            :class:`~distk.logging.StatsLogger`); receives ``distk/*`` metrics after
            every optimizer step that exchanged gradients. ``None`` = only the monitor.
        sum_gradients: True when DeepSpeed is configured to sum, not average, gradients
            (``gradient_average`` false); the average is then scaled by the world size.
    """

    __slots__ = ("seam", "zero_stage", "logger", "sum_gradients")

    STEP_ENDS_WITH_BACKWARD = False

    def __init__(self, cfg: SparsityConfig | dict[str, Any],
                 process_group: dist.ProcessGroup | None, seam: str, zero_stage: int,
                 sum_gradients: bool = False, model: torch.nn.Module | None = None) -> None:
        super().__init__(cfg, process_group, model=model, entry="distk.deepspeed")
        self.seam = seam
        self.zero_stage = zero_stage
        self.logger: Any = None
        self.sum_gradients = sum_gradients

    def exchange(self, grad: torch.Tensor, key: str) -> None:
        """Replace ``grad`` in place by its sparse, error-compensated average over ranks."""
        self.reduce(grad, key)
        if self.sum_gradients:
            grad.mul_(self.world_size)

    def _report(self, engine: Any) -> None:
        """Send the last step's statistics to the monitor and the logger."""
        metrics = self.metrics(MONITOR_PREFIX)
        monitor = getattr(engine, "monitor", None)
        if monitor is not None and monitor.enabled:
            # DeepSpeed's own events use the sample count as their x axis.
            monitor.write_events([(name, value, engine.global_samples)
                                  for name, value in metrics.items()])
        if self.logger is not None:
            self.logger.log(metrics, step=engine.global_steps)

    def _extra_getstate(self) -> dict[str, Any]:
        return {"seam": self.seam, "zero_stage": self.zero_stage,
                "sum_gradients": self.sum_gradients}

    def _extra_setstate(self, state: dict[str, Any]) -> None:
        self.seam = state["seam"]
        self.zero_stage = state["zero_stage"]
        self.sum_gradients = state["sum_gradients"]
        self.logger = None


# -- seams -----------------------------------------------------------------------------------

def _param_names(engine: Any) -> dict[int, str]:
    return {id(param): name for name, param in engine.module.named_parameters()}


def _engine_gradients(engine: Any, names: dict[int, str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, gradient) pairs that DeepSpeed's engine all-reduce would have reduced."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    optimizer = engine.optimizer
    if isinstance(optimizer, BF16_Optimizer):
        # The fp32 accumulation buffers, one view per parameter (padding stays zero).
        for group_index, group in enumerate(optimizer.bf16_groups):
            for param_index, param in enumerate(group):
                yield (names.get(id(param), f"group{group_index}.{param_index}"),
                       optimizer.fp32_groups_gradients[group_index][param_index])
        return
    for name, param in engine.module.named_parameters():
        if not param.requires_grad or param.numel() == 0:
            continue
        if param.grad is None:
            # Every rank must exchange the same tensors (DeepSpeed does the same).
            param.grad = torch.zeros_like(param)
        if param.grad.is_sparse:
            raise ValueError(f"distk.deepspeed: parameter {name!r} has a sparse gradient, "
                             "which distk does not exchange")
        yield name, param.grad.data


def _install_engine_seam(engine: Any, state: DeepSpeedCompressionState) -> None:
    names = _param_names(engine)

    def buffered_allreduce_fallback(grads: Any = None,
                                    elements_per_buffer: int = 500000000) -> None:
        """distk: exchange every gradient through the compressor (replaces DeepSpeed's)."""
        del elements_per_buffer  # distk exchanges per parameter, not per flat buffer
        if grads is not None:
            raise RuntimeError("distk.deepspeed: explicit gradient lists (pipeline "
                               "parallelism) are not supported")
        for name, grad in _engine_gradients(engine, names):
            state.exchange(grad, name)

    engine.buffered_allreduce_fallback = buffered_allreduce_fallback


def _install_zero_seam(engine: Any, state: DeepSpeedCompressionState) -> None:
    from deepspeed.accelerator import get_accelerator

    optimizer = engine.optimizer
    names = _param_names(engine)
    accelerator = get_accelerator()

    def bucket_keys(communication_data_type: torch.dtype) -> list[tuple[str, int]]:
        keys = []
        for group_index, param_index, _ in optimizer.ipg_buckets[communication_data_type].params:
            param = optimizer.bit16_groups[group_index][param_index]
            keys.append((names.get(id(param), f"group{group_index}.{param_index}"),
                         param.numel()))
        return keys

    def average_tensor(tensor: torch.Tensor, communication_data_type: torch.dtype) -> None:
        """distk: exchange a contiguous gradient bucket, one parameter slice at a time."""
        if optimizer.overlap_comm and not accelerator.resolves_data_dependency():
            # The bucket may have been filled on several streams; the exchange runs on
            # the current one, and reduce_ipg_grads post-processes on the reduction stream.
            bucket = optimizer.ipg_buckets[communication_data_type]
            for stream in bucket.copy_streams:
                accelerator.current_stream().wait_stream(stream)
        offset = 0
        for key, numel in bucket_keys(communication_data_type):
            state.exchange(tensor.narrow(0, offset, numel), key)
            offset += numel
        if offset != tensor.numel():
            raise RuntimeError(
                f"distk.deepspeed: ZeRO bucket holds {tensor.numel()} elements but its "
                f"parameters {offset}; the DeepSpeed bucket layout changed (supported: "
                "deepspeed>=0.19,<0.20)"
            )
        # What DeepSpeed's full all-reduce path does next (fp32 partition buffers, used
        # with bf16 parameters and fp32 gradient accumulation).
        optimizer._add_full_reduction_to_compact_grad_partition(tensor, communication_data_type)
        if optimizer.overlap_comm and not accelerator.resolves_data_dependency():
            optimizer.reduction_stream.wait_stream(accelerator.current_stream())

    def exchange_list(grads: list[torch.Tensor], communication_data_type: torch.dtype) -> None:
        keys = bucket_keys(communication_data_type)
        if len(keys) != len(grads):
            raise RuntimeError(
                f"distk.deepspeed: ZeRO bucket lists {len(keys)} parameters but "
                f"{len(grads)} gradients (supported: deepspeed>=0.19,<0.20)"
            )
        for grad, (key, _) in zip(grads, keys):
            state.exchange(grad, key)

    def buffered_reduce_fallback(rank: int | None, grads: list[torch.Tensor],
                                 communication_data_type: torch.dtype,
                                 elements_per_buffer: int = 500000000,
                                 log: Any = None) -> None:
        """distk: exchange a non-contiguous gradient bucket (contiguous_gradients=false)."""
        del elements_per_buffer, log
        if rank is not None:
            raise RuntimeError("distk.deepspeed: reduce-to-one-rank buckets are not supported")
        exchange_list(grads, communication_data_type)

    def buffered_reduce_fallback_preserving_fp32(grads: list[torch.Tensor], grad_params: Any,
                                                 communication_data_type: torch.dtype,
                                                 elements_per_buffer: int) -> None:
        """distk: as above, then fill the fp32 partition buffers like DeepSpeed does."""
        del grad_params, elements_per_buffer
        exchange_list(grads, communication_data_type)
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        optimizer._add_full_reduction_to_compact_grad_partition(flat, communication_data_type)

    optimizer.average_tensor = average_tensor
    optimizer.buffered_reduce_fallback = buffered_reduce_fallback
    optimizer._buffered_reduce_fallback_preserving_fp32 = buffered_reduce_fallback_preserving_fp32


_ENGINE_SEAM_METHODS = ("allreduce_gradients", "buffered_allreduce_fallback")
_ZERO_SEAM_METHODS = (
    "reduce_ipg_grads", "average_tensor", "buffered_reduce_fallback",
    "_buffered_reduce_fallback_preserving_fp32", "_add_full_reduction_to_compact_grad_partition",
)


def _require_methods(obj: Any, methods: tuple[str, ...]) -> None:
    missing = [name for name in methods if not callable(getattr(type(obj), name, None))]
    if missing:
        import deepspeed

        raise RuntimeError(
            f"distk.deepspeed: {type(obj).__name__} of deepspeed=={deepspeed.__version__} "
            f"lacks {missing}; the seams need deepspeed>=0.19,<0.20"
        )


# -- engine wrappers ---------------------------------------------------------------------------

def _wrap_step(engine: Any, state: DeepSpeedCompressionState) -> None:
    original = engine.step

    def step(*args: Any, **kwargs: Any) -> Any:
        """DeepSpeed's ``step``; at the accumulation boundary distk's step ends too and its
        statistics go to the monitor and logger."""
        boundary = engine.is_gradient_accumulation_boundary()
        closed = boundary and state.end_step()
        result = original(*args, **kwargs)
        if closed:
            state._report(engine)
        return result

    engine.step = step


def _checkpoint_path(directory: str, tag: Any, rank: int) -> str:
    return os.path.join(directory, str(tag), CHECKPOINT_FILE.format(rank=rank))


def _wrap_checkpointing(engine: Any, state: DeepSpeedCompressionState) -> None:
    original_save = engine.save_checkpoint
    original_load = engine.load_checkpoint

    def save_checkpoint(save_dir: str, tag: Any = None, client_state: dict | None = None,
                        save_latest: bool = True, exclude_frozen_parameters: bool = False
                        ) -> Any:
        """DeepSpeed's ``save_checkpoint``; every rank also writes its distk state.

        The file is written before DeepSpeed's (and before the ``latest`` pointer), so a
        checkpoint that ``latest`` points to always has it.
        """
        if tag is None:
            tag = f"global_step{engine.global_steps}"  # DeepSpeed's default tag
        path = _checkpoint_path(save_dir, tag, dist.get_rank())
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(state.state_dict(), path)  # carries its rank and world size
        return original_save(save_dir, tag=tag,
                             client_state={} if client_state is None else client_state,
                             save_latest=save_latest,
                             exclude_frozen_parameters=exclude_frozen_parameters)

    def load_checkpoint(load_dir: str, *args: Any, **kwargs: Any) -> Any:
        """DeepSpeed's ``load_checkpoint``; then every rank restores its distk state.

        Skipped for ``load_module_only=True`` or ``load_optimizer_states=False`` (a
        fine-tuning start, where stale residuals do not belong). When the files are
        missing on some rank or were written by another number of ranks, every rank
        warns and keeps a fresh state (residuals cannot be remapped to other ranks).
        """
        bound = inspect.signature(original_load).bind(load_dir, *args, **kwargs)
        bound.apply_defaults()
        options = bound.arguments
        load_path, client_state = original_load(*bound.args, **bound.kwargs)
        if (load_path is None or options["load_module_only"]
                or not options["load_optimizer_states"]):
            return load_path, client_state
        tag = options["tag"]
        if tag is None:
            latest = "latest_universal" if engine.load_universal_checkpoint() else "latest"
            with open(os.path.join(load_dir, latest)) as handle:
                tag = handle.read().strip()
        path = _checkpoint_path(load_dir, tag, dist.get_rank())
        saved = torch.load(path, weights_only=False) if os.path.isfile(path) else None
        usable = saved is not None and (saved.get("rank"), saved.get("world_size")) == (
            state.rank, state.world_size)
        # All ranks restore, or none: compressor step counters must agree across ranks.
        flag = torch.tensor([1 if usable else 0], dtype=torch.int32, device=engine.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() == 1:
            state.load_state_dict(saved)
        else:
            warnings.warn(
                f"distk.deepspeed: no usable distk state for every rank in "
                f"{os.path.join(load_dir, str(tag))} (missing {CHECKPOINT_FILE}, or written "
                "by another rank or number of ranks); residuals start from zero",
                stacklevel=2,
            )
        return load_path, client_state

    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint


# -- public entry points ----------------------------------------------------------------------

def enable(engine: Any, cfg: Any) -> DeepSpeedCompressionState:
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

    Returns:
        The :class:`DeepSpeedCompressionState`, also stored as ``engine.distk``.

    Raises:
        ValueError: an unsupported configuration (ZeRO 3, fp16, offload, MoE, ...).
        RuntimeError: the DeepSpeed version lacks the methods distk replaces.
    """
    _import_deepspeed()
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if get_state(engine) is not None:
        raise RuntimeError("distk.deepspeed.enable: this engine already exchanges through distk")
    _check_supported(engine.config, engine.module)
    stage = int(engine.zero_optimization_stage())
    if stage not in SUPPORTED_ZERO_STAGES:
        raise ValueError(f"distk.deepspeed supports ZeRO stages {SUPPORTED_ZERO_STAGES}, "
                         f"got zero_optimization.stage={stage}")
    if engine.fp16_enabled():
        raise ValueError("distk.deepspeed supports fp32 and bf16, got fp16.enabled=true")
    if engine.has_moe_layers:
        raise ValueError("distk.deepspeed does not support MoE layers (expert-parallel "
                         "gradient groups)")
    if engine.pipeline_parallelism:
        raise ValueError("distk.deepspeed does not support pipeline parallelism")

    optimizer = engine.optimizer
    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        if type(optimizer) is not DeepSpeedZeroOptimizer:
            raise ValueError(f"distk.deepspeed does not support {type(optimizer).__name__} "
                             "(e.g. ZenFlow); plain ZeRO stage 1/2 only")
        if optimizer.cpu_offload:
            raise ValueError("distk.deepspeed does not support ZeRO-Offload")
        _require_methods(optimizer, _ZERO_SEAM_METHODS)
        seam, group = "zero", optimizer.dp_process_group
        sum_gradients = not optimizer.gradient_average
    else:
        if stage != 0 and not isinstance(optimizer, BF16_Optimizer):
            raise ValueError(f"distk.deepspeed: unexpected optimizer {type(optimizer).__name__} "
                             f"for ZeRO stage {stage}")
        _require_methods(engine, _ENGINE_SEAM_METHODS)
        seam, group = "engine", engine.seq_data_parallel_group
        sum_gradients = not engine.gradient_average
    # The engine's own optimizer (the client's or the one its config built) decides the
    # Adam schedule (cfg.adam_dense_steps / adam_warmup_steps / adam_value_dtype).
    cfg = schedule_for_optimizer(cfg, getattr(engine, "basic_optimizer", None) or optimizer,
                                 "distk.deepspeed")
    state = DeepSpeedCompressionState(cfg, group, seam=seam, zero_stage=stage,
                                      sum_gradients=sum_gradients, model=engine.module)
    if seam == "zero":
        _install_zero_seam(engine, state)
    else:
        _install_engine_seam(engine, state)
    _wrap_step(engine, state)
    _wrap_checkpointing(engine, state)
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
    _check_supported(ds_config, model)
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

