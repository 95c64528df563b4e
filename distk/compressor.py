"""``GradientCompressor``: error feedback, selection and sparse exchange of gradients.

One compressor serves every integration (through
:class:`~distk.integrations.CompressionState`): they hand it flat gradient buckets under
stable keys and write back what it returns. Per key it keeps

* the **residual** (error feedback): everything computed but not yet sent, added to the
  next gradient. Values that travel in bf16/fp16 leave their rounding error here too;
* the **velocity** (DGC momentum correction, when ``cfg.momentum > 0``);
* the number of completed exchanges, which drives ``dense_steps`` and the density warm-up
  when no owner passes its step (an owning state passes its one step counter);
* the layout last verified across ranks (see :meth:`GradientCompressor.launch`).

:meth:`GradientCompressor.step` is :meth:`GradientCompressor.launch` (residual,
selection, collectives enqueued) followed by :meth:`CompressorWork.wait` (result written).

One call of :meth:`GradientCompressor.step` for a key::

    g = grad (non-finite entries zeroed under nonfinite="zero"), clipped to clip_norm
    u = momentum * u + g                  (momentum > 0; else u = g)
    acc = residual + u                    (error_feedback; else acc = u)
    sel = top-k of |acc| (bucketed or exact), k from the schedule
    update = average over ranks of the sent entries (dense, same shape/dtype as grad)
    residual = acc - sent                 (sent = acc[sel] as receivers decode it: rounded
                                           to the wire dtype, or quantized by the codec)
    u[sel] = 0                            (DGC momentum factor masking)

Conservation (error feedback, full-precision wire, exact arithmetic): over any number of
steps, ``world * sum(updates) + sum over ranks of residuals == sum over ranks and steps
of (clipped) gradients``.
"""

from __future__ import annotations

import functools
import math
import threading
import time
import zlib
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch

from distk.comm import (
    ExchangeResult,
    PendingExchange,
    WireFormat,
    dense_allreduce_bytes,
    launch_exchange,
    rank_and_world,
)
from distk.config import SparsityConfig
from distk.selection import per_bucket_topk, resolve_buckets, topk
from distk.selection.recall import packed_bucket_counts
from distk.selection.reference import positions_of
from distk.stats import StepStats

__all__ = ["CompressorWork", "GradientCompressor", "NonFiniteGradientError",
           "as_sparsity_config"]

STATE_VERSION = 2
"""Version of the :meth:`GradientCompressor.state_dict` layout."""

MAX_PACKED_K_PER_BUCKET = 1024
"""Largest ``k_per_bucket`` used for a selection with no second stage (recall 0.9875)."""

FUSE_ADD_MIN_NUMEL = 1 << 21
"""From this many entries (8 MB of fp32, beyond the L2 caches) the residual addition of
a packed bucketed step runs inside the selection kernel's pass: one pass over memory
fewer. Smaller tensors stay in cache between the two passes, and keep the addition out
of ``selection_seconds``."""


def _has_nonfinite(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds NaN or +-Inf: one reduction, no tensor-sized allocation
    (a finite tensor whose sum overflows is confirmed entry by entry)."""
    if bool(torch.isfinite(tensor.sum())):
        return False
    return not bool(torch.isfinite(tensor).all())


def _fit_wire_range(values: torch.Tensor, value_dtype: torch.dtype,
                    world: int) -> torch.Tensor:
    """``values`` clamped to ``+-finfo(value_dtype).max / world`` when the wire dtype has a
    smaller range than ``values`` (fp16, bf16 from fp32 state): no value, and no sum over
    ``world`` ranks, can overflow to Inf on the wire. The excess stays in the residual."""
    if torch.finfo(value_dtype).max >= torch.finfo(values.dtype).max:
        return values
    limit = torch.finfo(value_dtype).max / max(world, 1)
    return values.clamp(-limit, limit)


class NonFiniteGradientError(FloatingPointError):
    """A gradient held NaN or Inf under ``nonfinite="raise"`` (raised on every rank)."""


@functools.lru_cache(maxsize=64)
def poisson_limit_recall(k_per_bucket: int) -> float:
    """Recall of bucketed top-k with ``k / k_per_bucket`` buckets as ``k`` grows large.

    Bucket loads become Poisson: ``R = E[min(X, m)] / m`` with ``X ~ Poisson(m)``,
    ``m = k_per_bucket``. Finite ``k`` recall is slightly higher, so this is a safe bound.
    """
    m = float(k_per_bucket)
    x = torch.arange(0, int(20 * m + 100), dtype=torch.float64)
    log_pmf = -m + x * math.log(m) - torch.lgamma(x + 1)
    return float((log_pmf.exp() * x.clamp(max=m)).sum() / m)


@functools.lru_cache(maxsize=64)
def packed_k_per_bucket(recall_target: float) -> int | None:
    """Smallest ``k_per_bucket`` whose large-``k`` recall (:func:`poisson_limit_recall`,
    increasing in ``k_per_bucket``) reaches ``recall_target``; ``None`` above
    :data:`MAX_PACKED_K_PER_BUCKET`."""
    if poisson_limit_recall(MAX_PACKED_K_PER_BUCKET) < recall_target:
        return None
    lo, hi = 0, MAX_PACKED_K_PER_BUCKET  # recall(lo) < target <= recall(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if poisson_limit_recall(mid) >= recall_target:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True)
class _Plan:
    """How to select and send ``k`` of ``numel`` entries (cached per size)."""

    k: int
    buckets: int | None
    k_per_bucket: int | None
    packed: bool  # bucketed with no second stage: implicit bucket ids on the wire

    def wire(self, numel: int, value_dtype: torch.dtype, interleaved: bool,
             value_bits: int | None = None) -> WireFormat:
        if self.packed:
            return WireFormat(numel, self.k, value_dtype, self.buckets, self.k_per_bucket,
                              interleaved, value_bits)
        return WireFormat(numel, self.k, value_dtype, value_bits=value_bits)


def _key_tag(key: Hashable) -> int:
    """Digest of a key that is the same in every process (0 when its repr is not stable)."""
    if isinstance(key, (str, int, float, bytes, tuple)):
        return zlib.crc32(repr(key).encode()) & 0x7FFFFFFF
    return 0


def as_sparsity_config(cfg: Any, what: str = "cfg") -> SparsityConfig:
    """``cfg`` as a validated :class:`SparsityConfig` (a dict goes through ``from_dict``;
    ``None`` means the defaults). The one coercion every entry point uses.

    Raises:
        TypeError: ``cfg`` is neither a SparsityConfig, a dict nor None.
        ValueError: a key or value of the dict is invalid (named by ``from_dict``).
    """
    if isinstance(cfg, SparsityConfig):
        return cfg
    if cfg is None or isinstance(cfg, dict):
        return SparsityConfig.from_dict(cfg)
    raise TypeError(f"{what} must be a distk.SparsityConfig or a dict of its keys, got "
                    f"{type(cfg).__name__}")


class CompressorWork:
    """One :meth:`GradientCompressor.launch`: collectives enqueued, result not yet written.

    Attributes:
        future: completed when the exchange's collectives are done; chain :meth:`finish`
            on it (``future.then(lambda _: work.finish())``) or call :meth:`wait`.
        stats: the buffer's :class:`~distk.stats.StepStats`, set by :meth:`finish`.
    """

    __slots__ = ("future", "stats", "_complete", "_pending", "_result")

    def __init__(self, pending: PendingExchange | None, complete: Any,
                 result: torch.Tensor | None = None) -> None:
        if pending is None:
            self.future: torch.futures.Future = torch.futures.Future()
            self.future.set_result(None)
        else:
            self.future = pending.future
        self._pending = pending
        self._complete = complete
        self._result = result
        self.stats: StepStats | None = None

    def finish(self) -> torch.Tensor:
        """Write the averaged update (into ``out`` when given) and update residuals.

        Raises the exchange's errors (NonFiniteGradientError, RankMismatchError,
        CollectiveError) in the calling thread."""
        if self._complete is not None:
            complete, self._complete = self._complete, None
            self._result = complete(self._pending.finish())
        return self._result

    def wait(self) -> torch.Tensor:
        """Block until the exchange is done, then :meth:`finish`."""
        if self._pending is not None:
            self._pending.wait()
        return self.finish()


class GradientCompressor:
    """Sparsify, exchange and average gradients with error feedback.

    Args:
        cfg: a :class:`~distk.SparsityConfig` (or a dict for ``SparsityConfig.from_dict``).
        group: process group (``None`` = default; no initialised group = one process).

    The schedule (``dense_steps``, warm-up, stats and recall intervals) follows the
    ``step`` an owner passes (:class:`~distk.integrations.CompressionState` passes its one
    step counter); called without one, as a standalone object, it follows the number of
    earlier calls for the key (:meth:`step_count`).

    Attributes:
        stats: details of the last exchanged buffer (a dict: key, step, k, scheme, wire
            layout, bytes, seconds).
        totals: :class:`~distk.stats.StepStats` of every buffer exchanged so far (the
            run's totals; checkpointed).
    """

    def __init__(self, cfg: SparsityConfig | dict[str, Any] | None = None,
                 group: Any = None) -> None:
        self.cfg = as_sparsity_config(cfg)
        self.group = group
        self.stats: dict[str, Any] = {}
        self.totals = StepStats()
        self._residuals: dict[Hashable, torch.Tensor] = {}
        self._momenta: dict[Hashable, torch.Tensor] = {}
        self._steps: dict[Hashable, int] = {}
        self._overlap: dict[Hashable, float] = {}
        self._plans: dict[tuple[int, int], tuple[_Plan, ...]] = {}
        # Per key, the layouts (sizes, plan, dtypes; the last four) whose metadata the ranks
        # verified together; checkpointed, so that a resumed run exchanges exactly as the
        # uninterrupted one (every rank resumes from the same step).
        self._verified: dict[Hashable, tuple[str, ...]] = {}
        # Exchanges of different keys may finish concurrently (DDP futures complete on
        # the backend's threads); the totals are the only state they share.
        self._totals_lock = threading.Lock()

    # -- public API ----------------------------------------------------------------------

    def residual(self, key: Hashable) -> torch.Tensor:
        """A copy of the residual kept for ``key``: flat, float32 (float64 for fp64
        gradients). (The compressor updates its own buffer in place at every step.)

        Raises ``KeyError`` for a key that has no residual yet (before its first sparse
        step, or with ``error_feedback=False``)."""
        if key not in self._residuals:
            raise KeyError(f"no residual for key {key!r} (known keys: {list(self._residuals)})")
        return self._residuals[key].clone()

    def step_count(self, key: Hashable) -> int:
        """Number of completed exchanges of ``key`` (stateless ones not counted)."""
        return self._steps.get(key, 0)

    def reset(self, key: Hashable | None = None) -> None:
        """Forget residual, velocity and step count of ``key`` (``None``: of every key)."""
        keys = list(self._steps.keys() | self._residuals.keys()) if key is None else [key]
        for name in keys:
            for table in (self._residuals, self._momenta, self._steps, self._overlap,
                          self._verified):
                table.pop(name, None)

    def state_dict(self) -> dict[str, Any]:
        """Residuals, velocities, step counts and totals (plain tensors/ints; torch.save)."""
        return {
            "version": STATE_VERSION,
            "config": self.cfg.to_dict(),
            "steps": dict(self._steps),
            "residuals": {k: v.detach().clone() for k, v in self._residuals.items()},
            "momenta": {k: v.detach().clone() for k, v in self._momenta.items()},
            "overlap": dict(self._overlap),
            "verified": dict(self._verified),
            "totals": self.totals.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (tensors move to each gradient's device on use)."""
        version = state.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"compressor state version must be {STATE_VERSION}, got {version!r}")
        self._steps = {k: int(v) for k, v in state["steps"].items()}
        self._residuals = {k: v.detach().clone() for k, v in state["residuals"].items()}
        self._momenta = {k: v.detach().clone() for k, v in state["momenta"].items()}
        self._overlap = dict(state.get("overlap", {}))
        self._verified = {k: tuple(v) if isinstance(v, (list, tuple)) else (v,)
                          for k, v in state.get("verified", {}).items()}
        self.totals = StepStats.from_dict(state["totals"])

    def step(self, grad: torch.Tensor, key: Hashable, out: torch.Tensor | None = None, *,
             step: int | None = None) -> torch.Tensor:
        """Add the residual, select, exchange; return the update averaged over ranks.

        Collective: every rank calls it with the same key and numel, in the same order.
        :meth:`launch` followed by :meth:`CompressorWork.wait`.

        Args:
            grad: this rank's gradient (any shape; fp32, fp64, fp16 or bf16).
            key: stable name of the tensor (e.g. a bucket index or parameter name).
            out: optional contiguous tensor shaped and typed like ``grad`` (``grad``
                itself is allowed) that receives the update, sparing a numel-sized
                allocation per step; the return value is then ``out``.
            step: the owner's training step driving the schedule (default: the number
                of earlier calls for ``key``).

        Returns:
            The averaged update, same shape, dtype and device as ``grad``.

        Raises:
            NonFiniteGradientError: on every rank, when some rank's gradient holds NaN/Inf
                under ``nonfinite="raise"``.
            distk.comm.RankMismatchError: on every rank, when ranks disagree on numel, k,
                key or options.
        """
        return self.launch(grad, key, out, step=step).wait()

    def launch(self, grad: torch.Tensor, key: Hashable, out: torch.Tensor | None = None, *,
               step: int | None = None, stateless: bool = False) -> CompressorWork:
        """The first half of :meth:`step`: residual, selection, and the exchange's
        collectives enqueued; :meth:`CompressorWork.finish` writes the update.

        ``grad`` may be overwritten as soon as this returns (what is sent was copied);
        ``out`` is written only by ``finish``. Keys launched together must differ.

        ``stateless``: a dense average through the same exchange, leaving residual,
        velocity and step count of ``key`` untouched (DDP's bucket-rebuild step, whose
        buffers are not keyed like later ones).

        The exchange's metadata is verified across ranks on a key's first exchange, when
        its size or plan changes, and on stats steps; other steps send only the payload.
        """
        if not isinstance(grad, torch.Tensor) or not grad.is_floating_point():
            raise ValueError(f"grad must be a floating-point tensor, got "
                             f"{getattr(grad, 'dtype', type(grad).__name__)}")
        if grad.layout != torch.strided:
            raise ValueError(f"grad must be a dense (strided) tensor, got layout {grad.layout}; "
                             "sparse gradients (e.g. nn.Embedding(sparse=True)) are not "
                             "supported")
        if out is not None and (out.shape != grad.shape or out.dtype != grad.dtype
                                or not out.is_contiguous()):
            raise ValueError(f"out must be a contiguous tensor like grad ({tuple(grad.shape)}, "
                             f"{grad.dtype}), got {tuple(out.shape)}, {out.dtype}")
        cfg = self.cfg
        flat = grad.detach().reshape(-1)
        numel = flat.numel()
        count = self._steps.get(key, 0)
        schedule = count if step is None else step
        stats_step = schedule % cfg.stats_interval == 0
        state_dtype = torch.promote_types(grad.dtype, torch.float32)
        # The compact codec (value_bits) decodes to float32; dense steps then travel fp32.
        value_dtype = (torch.float32 if cfg.value_bits is not None
                       else cfg.wire_dtype or grad.dtype)
        _, world = rank_and_world(self.group)
        if numel == 0:
            if not stateless:
                self._steps[key] = count + 1
            empty = grad.detach().clone() if out is None else out
            return CompressorWork(None, None, empty)

        started = time.perf_counter()
        # Few full passes over the gradient and no large allocation in steady state: the
        # residual buffer itself accumulates the gradient (it is "acc" below) and keeps
        # what is not sent, so nothing of numel size is allocated after the first step.
        g = flat
        nonfinite = False
        if cfg.nonfinite == "zero":
            g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        else:
            nonfinite = _has_nonfinite(g)
        if cfg.clip_norm is not None and not nonfinite:
            norm = torch.linalg.vector_norm(g, dtype=state_dtype)
            g = g.to(state_dtype) * torch.clamp(cfg.clip_norm / (norm + 1e-12), max=1.0)
        velocity = None
        if cfg.momentum > 0 and not nonfinite and not stateless:
            velocity = self._momenta.get(key)
            if velocity is None:
                velocity = g.to(state_dtype, copy=True)
            else:
                velocity = self._check_state(velocity, key, numel, state_dtype, g.device)
                velocity.mul_(cfg.momentum).add_(g)
            g = velocity
        dense = stateless or cfg.is_dense_step(numel, schedule)
        plan = None if dense else self._plan(numel, cfg.k_at(numel, schedule), schedule)
        residual = (self._residuals.get(key) if cfg.error_feedback and not stateless
                    else None)
        keep_residual = cfg.error_feedback and not stateless
        pending = None  # gradient whose addition to the residual is fused into selection
        if residual is not None:
            acc = self._check_state(residual, key, numel, state_dtype, g.device)
            if nonfinite:
                pass  # a non-finite gradient never reaches the residual
            elif cfg.nonfinite == "skip":
                # Another rank may still call the step off: keep the residual intact
                # until the exchange has succeeded.
                acc = acc + g
            elif (plan is not None and plan.packed and g.dtype == state_dtype
                  and numel >= FUSE_ADD_MIN_NUMEL):
                # In place, inside the selection's pass over memory (same sums as add_).
                pending = g
            else:
                # In place. Should another rank raise for a non-finite gradient, this
                # rank's gradient stays in its residual (delayed, not lost).
                acc.add_(g)
        elif keep_residual:
            acc = g.to(state_dtype, copy=True)  # becomes the residual buffer
        else:
            acc = g.to(state_dtype)

        # Error feedback / momentum / clipping above; the top-k selection below is timed
        # on its own, so that selection_seconds compares selection methods alone.
        if stats_step and acc.is_cuda:
            torch.cuda.synchronize(acc.device)
        selection_started = time.perf_counter()
        accumulate_seconds = selection_started - started
        recall = None
        if dense:
            k = numel
            positions = None
            values = acc
            wire = WireFormat(numel, numel, value_dtype)
            scheme = "dense"
        else:
            k = plan.k
            wire = plan.wire(numel, value_dtype, cfg.interleaved, cfg.value_bits)
            if nonfinite:  # nothing will be sent; keep the metadata consistent
                positions = torch.zeros(k, dtype=torch.int64, device=acc.device)
            else:
                positions = self._select(acc, plan, pending)
            values = acc[positions]
            scheme = cfg.exchange
        if stats_step and acc.is_cuda:
            torch.cuda.synchronize(acc.device)
        selection_seconds = time.perf_counter() - selection_started
        # The recall diagnostic runs an exact top-k: not part of the selection's time.
        if (not dense and not nonfinite and cfg.method == "bucketed" and cfg.recall_interval
                and schedule % cfg.recall_interval == 0):
            recall = self._recall(acc, positions)

        # The overlap of the ranks' selections (for the cost model) drifts slowly: measured
        # on the first step of a key and on stats steps.
        measure = (not dense and cfg.exchange == "auto" and world > 2
                   and (stats_step or key not in self._overlap))
        hint = None
        if measure and key in self._overlap:
            hint = self._overlap[key] * min(world * k, numel) / world
        direct = out is not None and out.dtype == state_dtype
        sent = _fit_wire_range(values, value_dtype, world)
        signature = repr((numel, k, scheme, plan, value_dtype, state_dtype))
        # Packed plans alternate between two layouts: each is verified once, not at
        # every change between them.
        verify = stats_step or signature not in self._verified.get(key, ())
        launched = launch_exchange(positions, sent, numel, group=self.group, average=True,
                                   wire=wire, scheme=scheme, out_dtype=state_dtype,
                                   tag=_key_tag(key), nonfinite=nonfinite, union_hint=hint,
                                   measure_union=measure,
                                   out=out.view(-1) if direct else None, verify=verify)
        if verify:
            self._verified[key] = (*self._verified.get(key, ())[-3:], signature)
        launch_seconds = time.perf_counter() - selection_started - selection_seconds

        def complete(result: ExchangeResult) -> torch.Tensor:
            if not stateless:
                self._steps[key] = count + 1
            timing = (accumulate_seconds, selection_seconds, launch_seconds + result.seconds)
            if result.nonfinite_ranks:
                if cfg.nonfinite == "raise":
                    raise NonFiniteGradientError(
                        f"non-finite gradient (NaN or Inf) at step {schedule} for key {key!r} "
                        f"on rank(s) {result.nonfinite_ranks}; set SparsityConfig.nonfinite "
                        "to 'skip' (drop the step on every rank) or 'zero' (treat entries "
                        "as 0)")
                work.stats = self._record(key, schedule, numel, 0, scheme, result, timing,
                                          world, stats_step, recall, plan, wire, skipped=True)
                return torch.zeros_like(grad) if out is None else out.zero_()

            # What receivers decode from this rank (values rounded to the wire dtype, or
            # quantized by the codec) leaves the residual; the rest stays.
            if keep_residual:
                if dense:
                    acc.sub_(wire.decoded(sent).to(state_dtype))
                else:
                    acc[positions] = values - wire.decoded(sent).to(state_dtype)
                self._residuals[key] = acc
            if velocity is not None:
                if dense:
                    velocity.zero_()
                else:
                    velocity[positions] = 0
                self._momenta[key] = velocity
            work.stats = self._record(key, schedule, numel, k, result.scheme, result, timing,
                                      world, stats_step, recall, plan, wire, skipped=False)
            if direct:
                return out
            update = result.output.to(grad.dtype).view(grad.shape)
            return update if out is None else out.copy_(update)

        work = CompressorWork(launched, complete)
        return work

    # -- internals -----------------------------------------------------------------------

    @staticmethod
    def _check_state(tensor: torch.Tensor, key: Hashable, numel: int, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
        if tensor.numel() != numel:
            raise ValueError(
                f"key {key!r} had {tensor.numel()} entries in an earlier step and has {numel} "
                f"now; keys must name tensors of fixed size (call reset({key!r}) after a "
                f"layout change)")
        return tensor.to(device=device, dtype=dtype)

    def _plan(self, numel: int, k: int, step: int = 0) -> _Plan:
        """The plan of ``step``: packed plans alternate between two bucket counts from
        step to step (see :meth:`_make_plan`); every rank counts the same steps."""
        cached = self._plans.get((numel, k))
        if cached is None:
            cached = self._plans[(numel, k)] = self._make_plan(numel, k)
        return cached[step % len(cached)]

    def _make_plan(self, numel: int, k: int) -> tuple[_Plan, ...]:
        """Plans used in turn, one per step (one plan, or two packed ones)."""
        cfg = self.cfg
        if cfg.method == "exact" or k >= numel:
            return (_Plan(k, None, None, False),)
        minimum = packed_k_per_bucket(cfg.recall_target)
        if cfg.buckets is None and cfg.k_per_bucket is None and minimum is not None:
            # Prefer a selection with no second stage: every bucket sends k_per_bucket
            # entries, so bucket ids stay implicit on the wire and no merge is needed.
            # Recall grows with k_per_bucket, so any value >= `minimum` meets the target.
            # A fixed partition loses that recall under error feedback (a bucket's unsent
            # backlog keeps it overloaded), and a count sharing factors with the row
            # stride of weight matrices loses it too: the plans alternate, step by step,
            # between two coprime counts free of the factors 2 and 3 (packed_bucket_counts).
            if cfg.k is None:
                # Density-derived k: round up to buckets * k_per_bucket (adds < buckets,
                # i.e. less than k / minimum entries).
                # (k < minimum: one bucket keeping all k, an exact selection.)
                counts = packed_bucket_counts(k, minimum, MAX_PACKED_K_PER_BUCKET) or (1,)
                plans = tuple(_Plan(b * math.ceil(k / b), b, math.ceil(k / b), True)
                              for b in counts if b * math.ceil(k / b) <= numel)
            else:
                counts = packed_bucket_counts(k, min(minimum, k), min(k, 4 * minimum),
                                              exact=True)
                plans = tuple(_Plan(k, b, k // b, True) for b in counts)
            if plans:
                return plans
        buckets, k_per_bucket = resolve_buckets(numel, k, cfg.buckets, cfg.k_per_bucket,
                                                cfg.recall_target)
        packed = WireFormat.bucket_packable(numel, k, buckets, k_per_bucket)
        return (_Plan(k, buckets, k_per_bucket, packed),)

    def _select(self, acc: torch.Tensor, plan: _Plan,
                pending: torch.Tensor | None = None) -> torch.Tensor:
        """Positions to send. ``pending`` (packed plans only): ``acc += pending`` in
        place, fused into the selection kernel's pass where the backend can."""
        cfg = self.cfg
        if plan.packed:
            keys = per_bucket_topk(acc.view(1, -1), plan.buckets, plan.k_per_bucket,
                                   cfg.interleaved, True,
                                   None if pending is None else pending.view(1, -1))
            return positions_of(keys).reshape(-1)
        method = "exact" if plan.buckets is None else cfg.method
        _, positions = topk(acc, plan.k, method=method, buckets=plan.buckets,
                                  k_per_bucket=plan.k_per_bucket, interleaved=cfg.interleaved,
                                  recall_target=cfg.recall_target)
        return positions

    @staticmethod
    def _recall(acc: torch.Tensor, positions: torch.Tensor) -> float:
        k = positions.numel()
        exact = torch.topk(acc.abs(), k, sorted=False).indices
        chosen = torch.zeros(acc.numel(), dtype=torch.bool, device=acc.device)
        chosen[positions] = True
        return float(chosen[exact].sum().item()) / max(k, 1)

    def _record(self, key, step, numel, k, scheme, result, timing, world, stats_step, recall,
                plan, wire, skipped) -> StepStats:
        accumulate_seconds, selection_seconds, comm_seconds = timing
        dense_bytes = dense_allreduce_bytes(numel, world, 4)
        residual_norm = None
        if stats_step:
            residual = self._residuals.get(key)
            residual_norm = (0.0 if residual is None
                             else float(torch.linalg.vector_norm(residual).item()))
        details: dict[str, Any] = {
            "key": key if isinstance(key, (str, int, float)) else repr(key),
            "step": step,
            "numel": numel,
            "k": k,
            "density": k / numel,
            "scheme": scheme,
            "skipped": skipped,
            "bytes_sent": result.bytes_sent,
            "payload_bytes": result.payload_bytes,
            "dense_bytes": dense_bytes,
            "compression": dense_bytes / result.bytes_sent if result.bytes_sent else 1.0,
            "index_bytes": 0 if scheme == "dense" and k == numel else wire.index_bytes,
            "value_bytes": wire.value_bytes,
            # This rank's payload: bits per sent entry, and per entry of the tensor.
            "bits_per_entry": 8 * result.payload_bytes / k if k else 0.0,
            "bits_per_param": 8 * result.payload_bytes / numel,
            "buckets": plan.buckets if plan else None,
            "k_per_bucket": plan.k_per_bucket if plan else None,
            "accumulate_seconds": accumulate_seconds,
            "selection_seconds": selection_seconds,
            "comm_seconds": comm_seconds,
        }
        if residual_norm is not None:
            details["residual_norm"] = residual_norm
        if recall is not None:
            details["recall"] = recall
        if result.union_per_shard is not None and k:
            self._overlap[key] = result.union_per_shard / (min(world * k, numel) / world)
        stats = StepStats(
            buffers=1, numel=numel, sent=k, bytes_sent=result.bytes_sent,
            payload_bytes=0 if skipped else result.payload_bytes,
            dense_bytes=dense_bytes, accumulate_seconds=accumulate_seconds,
            selection_seconds=selection_seconds, comm_seconds=comm_seconds,
            skipped=int(skipped), schemes={scheme: 1},
            residual_sq=None if residual_norm is None else residual_norm ** 2,
            recall_sum=0.0 if recall is None else recall * max(k, 1),
            recall_weight=0 if recall is None else max(k, 1), step=step)
        with self._totals_lock:
            self.stats = details
            self.totals = self.totals.merge(stats)
        return stats
