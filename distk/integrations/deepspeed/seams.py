"""The DeepSpeed methods distk replaces on an engine (or its ZeRO optimizer) instance.

Every replaced method hands its gradients to :meth:`DeepSpeedCompressionState.launch`
(one ``reduce_async`` per parameter, keyed by the parameter's name) and the exchange
finishes at a point where DeepSpeed itself waits for its reduction:

- **ZeRO 0, and ZeRO 1 with DeepSpeed's BF16_Optimizer** (the engine seam): DeepSpeed
  reduces after backward, at the accumulation boundary, in
  ``DeepSpeedEngine.allreduce_gradients`` -> ``buffered_allreduce_fallback``
  (deepspeed/runtime/engine.py). distk's
  ``buffered_allreduce_fallback`` launches every gradient, then waits before returning
  (DeepSpeed's own all-reduce returns with the gradients reduced): one gradient travels
  while the next is selected, but nothing overlaps backward, which is already over.
- **ZeRO 1/2** (``DeepSpeedZeroOptimizer`` in deepspeed/runtime/zero/stage_1_and_2.py,
  the ZeRO seam): DeepSpeed fills a gradient bucket from its gradient hooks and reduces
  it in ``reduce_ipg_grads`` when full (ZeRO 2 at every micro-batch; ZeRO 1 only with
  ``overlap_comm: true``, otherwise after backward from ``reduce_gradients``), then
  copies this rank's partition out of it.
  distk's ``average_tensor`` / ``buffered_reduce_fallback`` /
  ``_buffered_reduce_fallback_preserving_fp32`` launch the bucket's exchange into a
  buffer of its own (DeepSpeed refills the bucket buffer at once) and return;
  ``copy_grads_in_partition`` of a parameter whose exchange is in flight is held back
  and run, in DeepSpeed's order, when the bucket finishes. distk's ``reduce_ipg_grads``
  runs DeepSpeed's, then waits where DeepSpeed's ``overlap_comm`` waits: for a full
  bucket during backward, every bucket but the newest (DeepSpeed's double buffer keeps
  one reduction in flight while the next bucket fills: ``average_tensor`` makes the
  compute stream wait for the reduction stream); from
  ``independent_gradient_partition_epilogue`` (``comm_dtype=None``, the end of the
  reduction, where DeepSpeed synchronises before reading the partition), all of them.

``engine.step`` ends distk's step at the accumulation boundary (and raises, before the
optimizer step, the first error an exchange of the step met).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch

from distk.integrations.deepspeed.config import DEEPSPEED_REQUIREMENT
from distk.integrations.deepspeed.state import DeepSpeedCompressionState

__all__ = ["ENGINE_SEAM_METHODS", "ZERO_SEAM_METHODS", "install_engine_seam",
           "install_zero_seam", "require_methods", "wrap_step"]

ENGINE_SEAM_METHODS = ("allreduce_gradients", "buffered_allreduce_fallback")
"""Engine methods the engine seam relies on (DeepSpeed's call chain, and the replaced one)."""

ZERO_SEAM_METHODS = (
    "reduce_ipg_grads", "average_tensor", "buffered_reduce_fallback",
    "_buffered_reduce_fallback_preserving_fp32", "_add_full_reduction_to_compact_grad_partition",
    "copy_grads_in_partition", "get_gradient_for_reduction", "get_param_id",
    "independent_gradient_partition_epilogue", "_use_compact_grad_partition_buffer",
)
"""``DeepSpeedZeroOptimizer`` methods the ZeRO seam replaces or calls."""


def require_methods(obj: Any, methods: tuple[str, ...]) -> None:
    """Raise RuntimeError unless ``type(obj)`` has every method in ``methods``."""
    missing = [name for name in methods if not callable(getattr(type(obj), name, None))]
    if missing:
        import deepspeed

        raise RuntimeError(
            f"distk.deepspeed: {type(obj).__name__} of deepspeed=={deepspeed.__version__} "
            f"lacks {missing}; the seams need {DEEPSPEED_REQUIREMENT}"
        )


def _param_names(engine: Any) -> dict[int, str]:
    return {id(param): name for name, param in engine.module.named_parameters()}


# -- ZeRO 0 and the BF16 optimizer: the engine's all-reduce ---------------------------------

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


def install_engine_seam(engine: Any, state: DeepSpeedCompressionState) -> None:
    """Replace ``engine.buffered_allreduce_fallback`` (ZeRO 0, BF16_Optimizer)."""
    names = _param_names(engine)

    def buffered_allreduce_fallback(grads: Any = None,
                                    elements_per_buffer: int = 500000000) -> None:
        """distk: exchange every gradient through the compressor (replaces DeepSpeed's);
        all are launched, then waited for, in place."""
        del elements_per_buffer  # distk exchanges per parameter, not per flat buffer
        if grads is not None:
            raise RuntimeError("distk.deepspeed: explicit gradient lists (pipeline "
                               "parallelism) are not supported")
        state.launch([(grad, name, None) for name, grad in _engine_gradients(engine, names)])
        state.wait()  # allreduce_gradients returns with reduced gradients

    engine.buffered_allreduce_fallback = buffered_allreduce_fallback


# -- ZeRO 1/2: the optimizer's gradient buckets ---------------------------------------------

class _BucketInFlight:
    """A ZeRO bucket whose exchange travels: its parameters (DeepSpeed's ``(group index,
    index in group, param id)`` entries), where each one's average will be, and the
    ``copy_grads_in_partition`` calls DeepSpeed made for it meanwhile."""

    __slots__ = ("params", "gradients", "result", "dtype", "offsets", "copies")

    def __init__(self, params: list[tuple[int, int, int]], gradients: list[torch.Tensor],
                 result: torch.Tensor | None, dtype: torch.dtype) -> None:
        self.params = params
        self.gradients = gradients  # averaged in place when there is no result buffer
        self.result = result  # the averaged bucket (contiguous buckets), else None
        self.dtype = dtype  # DeepSpeed's communication dtype: the bucket's key
        self.offsets: dict[int, int] = {}  # param id -> offset in the bucket
        self.copies: list[tuple[Any, int | None]] = []  # (param, group index)


class _ZeroSeam:
    """The ZeRO 1/2 optimizer's bucket reduction, replaced by distk's asynchronous one
    (the methods below are set on the optimizer instance by :meth:`install`)."""

    def __init__(self, engine: Any, state: DeepSpeedCompressionState) -> None:
        from deepspeed.accelerator import get_accelerator

        self.optimizer = optimizer = engine.optimizer
        self.state = state
        self.names = _param_names(engine)
        self.accelerator = get_accelerator()
        # Stream order matters only on devices with streams under overlap_comm.
        self.streams = (optimizer.overlap_comm
                        and not self.accelerator.resolves_data_dependency())
        self.deepspeed_reduce_ipg_grads = optimizer.reduce_ipg_grads
        self.deepspeed_copy_grads_in_partition = optimizer.copy_grads_in_partition
        self.in_flight: dict[int, _BucketInFlight] = {}  # param id -> its bucket

    def install(self) -> None:
        optimizer = self.optimizer
        optimizer.average_tensor = self.average_tensor
        optimizer.buffered_reduce_fallback = self.buffered_reduce_fallback
        optimizer._buffered_reduce_fallback_preserving_fp32 = (
            self.buffered_reduce_fallback_preserving_fp32)
        optimizer.copy_grads_in_partition = self.copy_grads_in_partition
        optimizer.reduce_ipg_grads = self.reduce_ipg_grads

    # -- the replaced methods ------------------------------------------------------------
    def average_tensor(self, tensor: torch.Tensor, communication_data_type: torch.dtype) -> None:
        """distk: launch the exchange of a contiguous gradient bucket, one parameter slice
        per key, into a buffer of its own (DeepSpeed refills the bucket at once)."""
        if self.streams:
            # The bucket may have been filled on several streams; the exchange reads it
            # on the current one.
            for stream in self.optimizer.ipg_buckets[communication_data_type].copy_streams:
                self.accelerator.current_stream().wait_stream(stream)
        params = self._bucket_params(communication_data_type)
        numels = [self._param(entry).numel() for entry in params]
        if sum(numels) != tensor.numel():
            raise RuntimeError(
                f"distk.deepspeed: ZeRO bucket holds {tensor.numel()} elements but its "
                f"parameters {sum(numels)}; the DeepSpeed bucket layout changed (supported: "
                f"{DEEPSPEED_REQUIREMENT})"
            )
        self._launch(_BucketInFlight(params, list(tensor.split(numels)),
                                     torch.empty_like(tensor), communication_data_type))

    def buffered_reduce_fallback(self, rank: int | None, grads: list[torch.Tensor],
                                 communication_data_type: torch.dtype,
                                 elements_per_buffer: int = 500000000,
                                 log: Any = None) -> None:
        """distk: exchange a non-contiguous gradient bucket (contiguous_gradients=false)."""
        del elements_per_buffer, log
        if rank is not None:
            raise RuntimeError("distk.deepspeed: reduce-to-one-rank buckets are not supported")
        self._launch_list(grads, communication_data_type)

    def buffered_reduce_fallback_preserving_fp32(self, grads: list[torch.Tensor],
                                                 grad_params: Any,
                                                 communication_data_type: torch.dtype,
                                                 elements_per_buffer: int) -> None:
        """distk: as above; the fp32 partition buffers are filled when it finishes."""
        del grad_params, elements_per_buffer
        self._launch_list(grads, communication_data_type)

    def copy_grads_in_partition(self, param: Any, group_idx: int | None = None) -> None:
        """DeepSpeed's, held back until the parameter's bucket has finished."""
        bucket = self.in_flight.get(self.optimizer.get_param_id(param))
        if bucket is None:
            self.deepspeed_copy_grads_in_partition(param, group_idx)
        else:
            bucket.copies.append((param, group_idx))

    def reduce_ipg_grads(self, comm_dtype: torch.dtype | None = None) -> None:
        """DeepSpeed's, then its wait point: one bucket may stay in flight while backward
        fills the next; none once the reduction ends (the epilogue's call)."""
        self.deepspeed_reduce_ipg_grads(comm_dtype)
        self.state.wait(keep=1 if comm_dtype is not None else 0)

    # -- launching and finishing a bucket ------------------------------------------------
    def _bucket_params(self, communication_data_type: torch.dtype) -> list[tuple[int, int, int]]:
        return list(self.optimizer.ipg_buckets[communication_data_type].params)

    def _param(self, entry: tuple[int, int, int]) -> Any:
        group_index, param_index, _ = entry
        return self.optimizer.bit16_groups[group_index][param_index]

    def _key(self, entry: tuple[int, int, int]) -> str:
        group_index, param_index, _ = entry
        return self.names.get(id(self._param(entry)), f"group{group_index}.{param_index}")

    def _launch_list(self, grads: list[torch.Tensor],
                     communication_data_type: torch.dtype) -> None:
        params = self._bucket_params(communication_data_type)
        if len(params) != len(grads):
            raise RuntimeError(
                f"distk.deepspeed: ZeRO bucket lists {len(params)} parameters but "
                f"{len(grads)} gradients (supported: {DEEPSPEED_REQUIREMENT})"
            )
        # In place: these are the parameters' own gradient tensors, not a shared buffer.
        self._launch(_BucketInFlight(params, grads, None, communication_data_type))

    def _launch(self, bucket: _BucketInFlight) -> None:
        gradients, offset = [], 0
        for entry, gradient in zip(bucket.params, bucket.gradients):
            out = None if bucket.result is None else bucket.result.narrow(
                0, offset, gradient.numel())
            gradients.append((gradient, self._key(entry), out))
            bucket.offsets[entry[2]] = offset
            self.in_flight[entry[2]] = bucket
            offset += gradient.numel()
        self.state.launch(gradients, functools.partial(self._finish, bucket))

    def _finish(self, bucket: _BucketInFlight) -> None:
        """What DeepSpeed's all-reduce path does with an averaged bucket, in its order: the
        fp32 partition buffers (bf16 parameters with fp32 gradient accumulation), then
        this rank's partition (``copy_grads_in_partition``)."""
        optimizer = self.optimizer
        for param_id in bucket.offsets:
            self.in_flight.pop(param_id, None)
        if any(optimizer._use_compact_grad_partition_buffer(group_index)
               for group_index, _, _ in bucket.params):
            self._add_to_fp32_partition(bucket)
        if bucket.result is not None:
            # Parameters of this rank's partition read their average from the result.
            for entry in bucket.params:
                param = self._param(entry)
                gradient = optimizer.get_gradient_for_reduction(param)
                if gradient is not None and optimizer.is_param_in_current_partition[entry[2]]:
                    gradient.data = bucket.result.narrow(
                        0, bucket.offsets[entry[2]], param.numel()).view_as(gradient)
        for param, group_index in bucket.copies:
            self.deepspeed_copy_grads_in_partition(param, group_index)
        if self.streams:
            optimizer.reduction_stream.wait_stream(self.accelerator.current_stream())

    def _add_to_fp32_partition(self, bucket: _BucketInFlight) -> None:
        from deepspeed.runtime.zero.stage_1_and_2 import IPGBucket

        reduced = bucket.result if bucket.result is not None else torch.cat(
            [gradient.reshape(-1) for gradient in bucket.gradients])
        # DeepSpeed's own method reads the *current* bucket's parameter list, which has
        # moved on to the next bucket by now: hand it this bucket's list for the call.
        buckets = self.optimizer.ipg_buckets
        live = buckets[bucket.dtype]
        buckets[bucket.dtype] = IPGBucket(params=bucket.params)
        try:
            self.optimizer._add_full_reduction_to_compact_grad_partition(reduced, bucket.dtype)
        finally:
            buckets[bucket.dtype] = live


def install_zero_seam(engine: Any, state: DeepSpeedCompressionState) -> None:
    """Replace the ZeRO 1/2 optimizer's bucket reduction by distk's asynchronous one."""
    _ZeroSeam(engine, state).install()


# -- the step boundary ------------------------------------------------------------------------

def wrap_step(engine: Any, state: DeepSpeedCompressionState) -> None:
    """``engine.step``: at the accumulation boundary distk's step ends too (raising an
    exchange's error before the optimizer step) and its statistics are reported."""
    original = engine.step

    def step(*args: Any, **kwargs: Any) -> Any:
        """DeepSpeed's ``step``; at the accumulation boundary distk's step ends too and its
        statistics go to the monitor and logger."""
        boundary = engine.is_gradient_accumulation_boundary()
        closed = boundary and state.end_step()
        result = original(*args, **kwargs)
        if closed:
            state.report(engine)
        return result

    engine.step = step
