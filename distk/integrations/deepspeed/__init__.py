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
  ``_buffered_reduce_fallback_preserving_fp32`` (``contiguous_gradients: false``), with
  ``reduce_ipg_grads`` and ``copy_grads_in_partition`` wrapped to wait for them. Every
  rank receives the whole averaged bucket and DeepSpeed then keeps the rank's partition
  of it, exactly as its own all-reduce path (``reduce_scatter: false``) does;
- ZeRO stage 3, fp16, AMP, ZeRO-Offload, pipeline / sequence parallelism, MoE layers and
  sparse (``Embedding(sparse=True)``) gradients are refused with an error naming them.

The exchanges are asynchronous: a bucket travels while backward computes the next one,
and finishes where DeepSpeed itself waits for its reduction (:mod:`.seams` names the
wait points). These are private DeepSpeed methods: the supported DeepSpeed range is
pinned (:data:`SUPPORTED_DEEPSPEED`, stated once, in :mod:`.config`; the ``deepspeed``
extra of distk says the same) and ``tests/test_deepspeed.py`` fails if the seams stop
being hit. Gradient clipping (``gradient_clipping``) and the optimizer see the exchanged
gradient, because the exchange sits where DeepSpeed's all-reduce was. Statistics go to
``engine.monitor.write_events`` (DeepSpeed's ``wandb`` / ``tensorboard`` /
``csv_monitor`` blocks) and to an optional :class:`~distk.logging.StatsLogger`
(``state.logger``). ``engine.save_checkpoint`` / ``engine.load_checkpoint`` carry the
compressor state (residuals, momenta, counters) in one ``distk_rank<NNNNN>.pt`` per rank
inside the checkpoint's tag folder (:mod:`.checkpoint`).

The package, one job per module: :mod:`.config` (the ``"distk"`` block, the supported
DeepSpeed range and setups), :mod:`.state` (:class:`DeepSpeedCompressionState`, the
buckets in flight), :mod:`.seams` (the replaced DeepSpeed methods and their wait
points), :mod:`.checkpoint` (the per-rank files) and :mod:`.install` (:func:`enable`,
:func:`initialize`, :func:`install`).
"""

from __future__ import annotations

from distk.integrations.deepspeed.checkpoint import CHECKPOINT_FILE
from distk.integrations.deepspeed.config import (
    CONFIG_KEY,
    DEEPSPEED_REQUIREMENT,
    SUPPORTED_DEEPSPEED,
    SUPPORTED_ZERO_STAGES,
    check_supported,
    split_config,
)
from distk.integrations.deepspeed.install import (
    enable,
    get_state,
    initialize,
    install,
    installed,
)
from distk.integrations.deepspeed.state import MONITOR_PREFIX, DeepSpeedCompressionState

__all__ = [
    "CHECKPOINT_FILE",
    "CONFIG_KEY",
    "DEEPSPEED_REQUIREMENT",
    "MONITOR_PREFIX",
    "SUPPORTED_DEEPSPEED",
    "SUPPORTED_ZERO_STAGES",
    "DeepSpeedCompressionState",
    "check_supported",
    "enable",
    "get_state",
    "initialize",
    "install",
    "installed",
    "split_config",
]
