"""``GradientCompressor``: error feedback, selection and exchange of gradient buffers.

One compressor serves every integration (through the step owners of
:mod:`distk.integrations`): they hand it flat gradient buffers under stable keys, with
the step they are at, and write back what it returns. Per key it keeps the **residual**
(error feedback: everything computed but not yet sent; values that travel in bf16/fp16
leave their rounding error here too), the **velocity** (DGC momentum correction, when
``cfg.momentum > 0``), the layouts verified across ranks, and what the shared-mask policy
keeps (:mod:`distk.compressor.masks`). It counts nothing itself: the owner's step drives
the schedule (dense steps, warm-up, stats and recall intervals).

A step of one buffer runs six named stages, each a method taking the typed record of
the stages before it (:class:`StepRequest` → :class:`StepPlan` → :class:`Accumulated` →
:class:`Selection` → the exchange → the result)::

    plan        k from the schedule; dense, or the selection plan and the scheme:
                a local mask (all-gather / reduce-scatter) or a shared one (all-reduce),
                whichever the cost model finds cheaper (cfg.mask)
    accumulate  g = grad (non-finite entries zeroed under nonfinite="zero"), clipped to
                clip_norm; u = momentum * u + g; acc = error_decay * residual + u
    select      local: top-k of |acc| (bucketed or exact); shared: the mask policy's
                positions, the same on every rank
    encode      values = acc[positions], fitted to the wire dtype's range
    send        the exchange's collectives enqueued (distk.comm)
    finish      update = average over ranks of the sent entries;
                residual = acc - sent (as receivers decode it); u[positions] = 0;
                the mask policy observes the update; the buffer's StepStats

:meth:`GradientCompressor.launch` runs the first five and returns a
:class:`CompressorWork` whose :meth:`~CompressorWork.finish` runs the last;
:meth:`GradientCompressor.step` is both.

Conservation (error feedback, full-precision wire, exact arithmetic): over any number of
steps, ``world * sum(updates) + sum over ranks of residuals == sum over ranks and steps
of (clipped) gradients``, for local and shared masks alike.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import zlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

from distk.comm import (
    ExchangeRequest,
    ExchangeResult,
    PendingExchange,
    WireFormat,
    check_same_digest,
    dense_allreduce_bytes,
    launch,
    rank_and_world,
    scheme_bytes,
    verify_layout,
)
from distk.comm.group import collective_errors, tensor_digest
from distk.comm.wire import from_tile_order
from distk.compressor.masks import MaskContext, MaskPolicy, make_mask_policy
from distk.compressor.plan import SelectionPlan, make_plans, tile_grid
from distk.config import TILE_SIDE, SparsityConfig
from distk.selection import flat_kernels_selected, per_bucket_topk, topk
from distk.selection.reference import positions_of
from distk.selection.syncfree import PackedSelector
from distk.stats import StepStats

__all__ = ["CompressorWork", "GradientCompressor", "NonFiniteGradientError",
           "StepPlan", "StepRequest", "as_sparsity_config"]

STATE_VERSION = 3
"""Version of the :meth:`GradientCompressor.state_dict` layout (2 is still read)."""

FUSE_ADD_MIN_NUMEL = 1 << 21
"""From this many entries (8 MB of fp32, beyond the L2 caches) the residual addition of
a packed local selection runs inside the selection kernel's pass: one pass over memory
fewer. Smaller tensors stay in cache between the two passes, and keep the addition out
of ``selection_seconds``."""

RECALL_SAMPLE = 1 << 16
"""Positions a shared mask's recall estimate sums across ranks (see
:meth:`GradientCompressor._shared_recall`)."""


class NonFiniteGradientError(FloatingPointError):
    """A gradient held NaN or Inf under ``nonfinite="raise"`` (raised on every rank)."""


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


def _nonfinite_error(step: int, keys: list[Hashable], ranks: list[int]
                     ) -> NonFiniteGradientError:
    """The error of ``nonfinite="raise"``, naming the step, the keys and the ranks."""
    named = f"key {keys[0]!r}" if len(keys) == 1 else f"keys {keys!r}"
    return NonFiniteGradientError(
        f"non-finite gradient (NaN or Inf) at step {step} for {named} on rank(s) {ranks}; "
        "set SparsityConfig.nonfinite to 'skip' (drop the step on every rank) or 'zero' "
        "(treat entries as 0)")


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


def round_to_bf16(values: torch.Tensor, seed: int) -> torch.Tensor:
    """``values`` (fp32) rounded to bf16 stochastically: up with probability equal to the
    fraction of the way to the next bf16 value, so the rounding error is zero on
    average. The random bits are a hash of the position and ``seed`` (no generator
    state: a resumed run rounds exactly as the uninterrupted one)."""
    bits = values.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    position = torch.arange(values.numel(), dtype=torch.int64, device=values.device)
    noise = ((position * 0x9E3779B1 + seed * 0x85EBCA77) >> 11) & 0xFFFF
    # Adding below bit 16 of the bit pattern rounds the magnitude up (either sign) when it
    # carries; clearing the low half leaves an exact bf16 value.
    # carries; clearing the low half leaves an exact bf16 value. (int64 arithmetic on the
    # sign-extended pattern: a negative value's magnitude grows the same way).
    rounded = ((bits + noise) & ~0xFFFF).to(torch.int32)
    return rounded.view(torch.float32).to(torch.bfloat16).view_as(values)


def _key_tag(key: Hashable) -> int:
    """Digest of a key that is the same in every process (0 when its repr is not stable)."""
    if isinstance(key, (str, int, float, bytes, tuple)):
        return zlib.crc32(repr(key).encode()) & 0x7FFFFFFF
    return 0


# -- the typed records the stages pass along ---------------------------------------------

@dataclass
class StepRequest:
    """One buffer at one step: what every stage reads.

    Attributes:
        key: stable name of the buffer.
        grad: the caller's gradient (the result has its shape and dtype).
        flat: ``grad`` viewed flat, detached.
        out: flat view of the caller's ``out`` when the update can be written there
            directly (same dtype as the state), else ``None``.
        out_given: the caller's ``out`` (``None``: a new tensor is returned).
        step: the owner's step, driving the schedule.
        stateless: a dense average leaving residual, velocity and masks untouched.
        dense: whether the step is exchanged dense (stateless, small tensor, dense steps,
            ``method="dense"``).
        world: ranks in the group.
        state_dtype: dtype of residuals (fp32, or fp64 for fp64 gradients).
        value_dtype: dtype of values on the wire.
        stats_step: whether the costlier statistics are measured at this step.
    """

    key: Hashable
    grad: torch.Tensor
    flat: torch.Tensor
    out: torch.Tensor | None
    out_given: torch.Tensor | None
    step: int
    stateless: bool
    dense: bool
    world: int
    state_dtype: torch.dtype
    value_dtype: torch.dtype
    stats_step: bool

    @property
    def numel(self) -> int:
        return self.flat.numel()


@dataclass(frozen=True)
class StepPlan:
    """What a step sends and how.

    Attributes:
        k: entries each rank sends (``numel`` when dense).
        scheme: ``"dense"``, ``"shared"`` (every rank the same positions), or the
            local-mask scheme handed to the exchange (``"auto"``, ``"allgather"``,
            ``"reduce_scatter"``).
        selection: the selection plan (``None`` when dense).
        wire: the wire format of the sent entries.
        verify: whether the ranks check their layout (sizes, plan, dtypes, key) this step:
            on a key's first exchange, when its layout changes, and on stats steps
            (all-gathers: their trailer's digest checks the layout at every step, and a
            stats step checks the indices' range alone).
        signature: the layout, as recorded once verified.
    """

    k: int
    scheme: str
    selection: SelectionPlan | None
    wire: WireFormat
    verify: bool = True
    signature: str = ""

    @property
    def dense(self) -> bool:
        return self.selection is None


@dataclass
class Accumulated:
    """The accumulate stage's output.

    Attributes:
        acc: residual + (momentum-corrected, clipped) gradient; the residual buffer itself
            in steady state (updated in place), or a fresh tensor.
        velocity: the DGC velocity (``None`` without momentum).
        nonfinite: this rank's gradient held NaN/Inf (nothing of it reached ``acc``).
        pending: a gradient whose addition to ``acc`` the selection kernel fuses into its
            pass (large packed local selections), else ``None``.
        keep_residual: whether ``acc`` becomes the key's residual after the step.
        seconds: time spent.
        input_sq: squared norm of the gradient handed over (stats steps), else ``None``.
        estimate: ``feedback="estimate"``: this rank's gradient estimate (EF21); ``acc``
            is then the innovation, the gradient minus the estimate.
        flag: the non-finite check left on the device (``defer_checks``): a 0-dim bool
            tensor, true when the gradient held NaN/Inf (then zeros reached ``acc`` in
            its place); ``nonfinite`` is then False.
    """

    acc: torch.Tensor
    velocity: torch.Tensor | None
    nonfinite: bool
    pending: torch.Tensor | None
    keep_residual: bool
    seconds: float
    input_sq: float | None = None
    estimate: torch.Tensor | None = None
    flag: torch.Tensor | None = None


@dataclass
class Selection:
    """The select and encode stages' output: what this rank sends.

    Attributes:
        positions: the selected positions (``None`` when dense).
        values: ``acc`` at ``positions`` before fitting to the wire's range.
        sent: the values handed to the exchange (fitted to the wire's range).
        recall: on recall steps, recall against exact top-k: of this rank's own
            accumulator (local masks), or of the summed accumulators (shared masks,
            estimated; recorded as ``global_recall``).
        overhead_bytes: bytes this rank spent for the ranks to agree on a shared mask
            (and, on recall steps, to estimate its recall).
        seconds: time spent selecting.
        encode_seconds: time spent encoding (counted with the exchange's).
    """

    positions: torch.Tensor | None
    values: torch.Tensor
    sent: torch.Tensor
    recall: float | None = None
    overhead_bytes: int = 0
    seconds: float = 0.0
    encode_seconds: float = 0.0


class CompressorWork:
    """One :meth:`GradientCompressor.launch`: collectives enqueued, result not yet written.

    Attributes:
        future: completed when the exchange's collectives are done; chain :meth:`finish`
            on it (``future.then(lambda _: work.finish())``) or call :meth:`wait`.
        plan: the step's :class:`StepPlan` (``None`` for an empty buffer).
        stats: the buffer's :class:`~distk.stats.StepStats`, set by :meth:`finish`.
    """

    __slots__ = ("future", "plan", "stats", "_complete", "_pending", "_result")

    def __init__(self, pending: PendingExchange | None,
                 complete: Callable[[ExchangeResult], tuple[torch.Tensor, StepStats]] | None,
                 plan: StepPlan | None = None, result: torch.Tensor | None = None) -> None:
        if pending is None:
            self.future: torch.futures.Future = torch.futures.Future()
            self.future.set_result(None)
        else:
            self.future = pending.future
        self.plan = plan
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
            self._result, self.stats = complete(self._pending.finish())
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
        defer_checks: under ``nonfinite="raise"``, leave the non-finite check of CUDA
            gradients on the device instead of reading it at every step (a host sync
            per buffer): the flag travels with the exchange and raises in ``finish`` on
            every rank (several ranks), or waits for :meth:`raise_deferred` (one
            process; :meth:`step` calls it, the integrations call it at the end of each
            step). A flagged gradient adds zeros to the residual, so none of it is kept.

    Attributes:
        last: :class:`~distk.stats.StepStats` of the last buffer finished.
        totals: :class:`~distk.stats.StepStats` of every buffer exchanged so far (the
            run's totals; checkpointed).
        masks: the shared-mask policy (``cfg.mask_policy``).
    """

    DEFER_DEVICE_TYPES = ("cuda",)
    """Devices whose gradients' non-finite check ``defer_checks`` defers (a host read of
    a CPU tensor costs nothing; tests add ``"cpu"`` to exercise the deferred path)."""

    def __init__(self, cfg: SparsityConfig | dict[str, Any] | None = None,
                 group: Any = None, *, defer_checks: bool = False) -> None:
        self.cfg = as_sparsity_config(cfg)
        if self.cfg.density == "auto":
            raise ValueError(
                "GradientCompressor: SparsityConfig.density='auto' is the share outer "
                "synchronisation chooses from the number of ranks, resolved by OuterSync "
                "(distk.outer.enable, distk.ddp.enable); for a compressor of your own pass "
                "cfg.for_world(world_size)")
        self.group = group
        self.defer_checks = defer_checks
        # defer_checks, one process: (step, key, device flag) of checks not yet read.
        self._deferred: list[tuple[int, Hashable, torch.Tensor]] = []
        self.last = StepStats()
        self.totals = StepStats()
        self.masks: MaskPolicy = make_mask_policy(self.cfg, group)
        self._residuals: dict[Hashable, torch.Tensor] = {}
        self._momenta: dict[Hashable, torch.Tensor] = {}
        # feedback="estimate" (EF21): this rank's gradient estimates and the mean estimates.
        self._estimates: dict[Hashable, torch.Tensor] = {}
        self._means: dict[Hashable, torch.Tensor] = {}
        self._overlap: dict[Hashable, float] = {}
        # Flat kernels selected (CUDA, by default): per key, select_packed with its device
        # floor state (a cache: last step's floor, reused where the device finds it still
        # valid) and, with DISTK_CUDA_GRAPHS=1, its CUDA graph.
        self._selectors: dict[Hashable, PackedSelector] = {}
        # Per (numel, k, tile grid or None): the plans used in turn.
        self._plans: dict[tuple[int, int, Any], tuple[SelectionPlan, ...]] = {}
        self._tile_noted = False  # bucket_layout="tile": the fallback note, once
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

    def reset(self, key: Hashable | None = None) -> None:
        """Forget residual, velocity and mask state of ``key`` (``None``: of every key)."""
        keys = list(self._residuals.keys() | self._momenta.keys() | self._verified.keys()
                    ) if key is None else [key]
        for name in keys:
            for table in (self._residuals, self._momenta, self._estimates, self._means,
                          self._overlap, self._verified, self._selectors):
                table.pop(name, None)
        self._deferred = [item for item in self._deferred
                          if key is not None and item[1] != key]
        self.masks.forget(key)

    def state_dict(self) -> dict[str, Any]:
        """Residuals, velocities, mask state and totals (plain tensors/ints; torch.save)."""
        return {
            "version": STATE_VERSION,
            "config": self.cfg.to_dict(),
            "residuals": {k: v.detach().clone() for k, v in self._residuals.items()},
            "momenta": {k: v.detach().clone() for k, v in self._momenta.items()},
            "estimates": {k: v.detach().clone() for k, v in self._estimates.items()},
            "means": {k: v.detach().clone() for k, v in self._means.items()},
            "overlap": dict(self._overlap),
            "verified": dict(self._verified),
            "masks": self.masks.state_dict(),
            "totals": self.totals.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (tensors move to each gradient's device on
        use). Version 2 states (before shared masks) load with no mask state."""
        version = state.get("version")
        if version not in (2, STATE_VERSION):
            raise ValueError(f"compressor state version must be 2 or {STATE_VERSION}, got "
                             f"{version!r}")
        self._residuals = {k: v.detach().clone() for k, v in state["residuals"].items()}
        self._momenta = {k: v.detach().clone() for k, v in state["momenta"].items()}
        self._estimates = {k: v.detach().clone() for k, v in state.get("estimates", {}).items()}
        self._means = {k: v.detach().clone() for k, v in state.get("means", {}).items()}
        self._overlap = dict(state.get("overlap", {}))
        self._verified = {k: tuple(v) if isinstance(v, (list, tuple)) else (v,)
                          for k, v in state.get("verified", {}).items()}
        self.masks.load_state_dict(state.get("masks", {}))
        self.totals = StepStats.from_dict(state["totals"])

    def step(self, grad: torch.Tensor, key: Hashable, out: torch.Tensor | None = None, *,
             step: int, stateless: bool = False) -> torch.Tensor:
        """Add the residual, select, exchange; return the update averaged over ranks.

        Collective: every rank calls it with the same key, numel and step, in the same
        order. :meth:`launch` followed by :meth:`CompressorWork.wait`.

        Args:
            grad: this rank's gradient (any shape; fp32, fp64, fp16 or bf16).
            key: stable name of the tensor (e.g. a bucket index or parameter name).
            out: optional contiguous tensor shaped and typed like ``grad`` (``grad``
                itself is allowed) that receives the update, sparing a numel-sized
                allocation per step; the return value is then ``out``.
            step: the owner's training step (0-based), driving the schedule.
            stateless: see :meth:`launch`.

        Returns:
            The averaged update, same shape, dtype and device as ``grad``.

        Raises:
            NonFiniteGradientError: on every rank, when some rank's gradient holds NaN/Inf
                under ``nonfinite="raise"``.
            distk.comm.RankMismatchError: on every rank, when ranks disagree on numel, k,
                key, options or a shared mask.
        """
        update = self.launch(grad, key, out, step=step, stateless=stateless).wait()
        self.raise_deferred()
        return update

    def raise_deferred(self) -> None:
        """Read the non-finite checks that ``defer_checks`` left on the device for this
        process (one process; with several ranks the flags travel with the exchange and
        raise in ``finish``): one host sync for all of them, then
        :class:`NonFiniteGradientError` if any gradient held NaN/Inf. No-op when none is
        pending. The integrations call it at the end of every step."""
        if not self._deferred:
            return
        pending, self._deferred = self._deferred, []
        device = pending[0][2].device
        flags = torch.stack([flag.to(device) for _, _, flag in pending]).tolist()
        bad = [(step, key) for (step, key, _), flag in zip(pending, flags) if flag]
        if bad:
            raise _nonfinite_error(bad[0][0], [key for _, key in bad], [0])

    def launch(self, grad: torch.Tensor, key: Hashable, out: torch.Tensor | None = None, *,
               step: int, stateless: bool = False) -> CompressorWork:
        """The first five stages of :meth:`step` (plan, accumulate, select, encode, send);
        :meth:`CompressorWork.finish` runs the sixth and writes the update.

        ``grad`` may be overwritten as soon as this returns (what is sent was copied);
        ``out`` is written only by ``finish``. Keys launched together must differ.

        ``stateless``: a dense average through the same exchange, leaving residual,
        velocity and mask state of ``key`` untouched (DDP's bucket-rebuild step, whose
        buffers are not keyed like later ones).

        The exchange's metadata is verified across ranks on a key's first exchange, when
        its size or plan changes, and on stats steps; other steps send only the payload.
        """
        request = self._request(grad, key, out, step, stateless)
        if request.numel == 0:
            empty = grad.detach().clone() if out is None else out
            return CompressorWork(None, None, result=empty)
        started = time.perf_counter()
        spent = self.masks.spent
        plan = self._plan_step(request)
        accumulated = self._accumulate(request, plan, started)
        selection = self._select(request, plan, accumulated)
        self._encode(request, plan, accumulated, selection)
        pending = self._send(request, plan, accumulated, selection)
        # What the mask policy's collectives sent during this launch (the agreement on
        # this step's mask, or on the next step's).
        selection.overhead_bytes += self.masks.spent - spent
        return CompressorWork(
            pending, lambda result: self._finish(request, plan, accumulated, selection,
                                                 result), plan)

    # -- stages ------------------------------------------------------------------------

    def _request(self, grad: torch.Tensor, key: Hashable, out: torch.Tensor | None,
                 step: int, stateless: bool) -> StepRequest:
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
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be the owner's step, an integer >= 0, got {step!r}")
        cfg = self.cfg
        state_dtype = torch.promote_types(grad.dtype, torch.float32)
        dense = stateless or cfg.is_dense_step(grad.numel(), step)
        # A step that sends every entry (k >= numel) travels in the gradient's dtype, as a
        # dense one does: bf16 values pay off only where entries are left behind.
        whole = dense or self._k_at(grad.numel(), step) >= grad.numel()
        value_dtype = cfg.wire_dtype_for(grad.dtype, whole, dense)
        direct = out is not None and out.dtype == state_dtype
        return StepRequest(
            key=key, grad=grad, flat=grad.detach().reshape(-1),
            out=out.view(-1) if direct else None, out_given=out, step=step,
            stateless=stateless, dense=dense, world=rank_and_world(self.group)[1],
            state_dtype=state_dtype, value_dtype=value_dtype,
            stats_step=step % cfg.stats_interval == 0)

    def _plan_step(self, request: StepRequest) -> StepPlan:
        """k from the schedule; dense, or the selection plan and the scheme; whether the
        layout is verified across ranks this step."""
        numel = request.numel
        if request.dense:
            plan = StepPlan(numel, "dense", None, WireFormat(numel, numel, request.value_dtype))
        else:
            plan = self._sparse_plan(request.key, numel, request.step, request.value_dtype,
                                     request.world, self._grid(request))
        signature = repr((numel, plan.k, plan.scheme, plan.selection, request.value_dtype,
                          request.state_dtype))
        # Packed plans alternate between two layouts: each is verified once, not at
        # every change between them. Stats steps verify again, except all-gathers: their
        # trailer carries a digest of the same fields at every step, so a stats step
        # only checks the indices' range (no metadata round trip: fewer bytes per sync).
        gathers = plan.scheme == "allgather" or (plan.scheme == "auto"
                                                 and plan.wire.codec is not None)
        verify = (signature not in self._verified.get(request.key, ())
                  or (request.stats_step and not gathers))
        return dataclasses.replace(plan, verify=verify, signature=signature)

    def _grid(self, request: StepRequest) -> tuple[int, int] | None:
        """The tile grid of the request's tensor under ``bucket_layout="tile"`` (``None``:
        flat buckets; a note on rank 0, once, for a 2-D tensor that does not tile)."""
        if self.cfg.bucket_layout != "tile":
            return None
        shape = request.grad.shape
        grid = tile_grid(shape)
        if grid is None and len(shape) >= 2 and not self._tile_noted:
            self._tile_noted = True
            if rank_and_world(self.group)[0] == 0:
                print(f"[distk] bucket_layout='tile': {request.key!r} of shape "
                      f"{tuple(shape)} does not divide into 64x64 tiles; it and any other "
                      "such tensor use flat buckets", flush=True)
        return grid

    def _sparse_plan(self, key: Hashable, numel: int, step: int, value_dtype: torch.dtype,
                     world: int, grid: tuple[int, int] | None = None) -> StepPlan:
        cfg = self.cfg
        k = self._k_at(numel, step)
        plans = self._plans.get((numel, k, grid))
        if plans is None:
            plans = self._plans[(numel, k, grid)] = make_plans(cfg, numel, k, grid)
        selection = plans[step % len(plans)]
        wire = selection.wire(numel, value_dtype, cfg.interleaved, cfg.value_bits,
                              cfg.value_levels)
        # Tiles are selected per rank: a local-mask scheme, never a shared mask.
        scheme = self._scheme(key, wire, world) if selection.tiles is None else cfg.exchange
        return StepPlan(selection.k, scheme, selection, wire)

    def _k_at(self, numel: int, step: int) -> int:
        """Entries sent at ``step``: every one under ``min_numel`` (``small_tensors``
        ``"codec"``: not a dense step, but sent whole), else the schedule's ``k``."""
        return numel if numel < self.cfg.min_numel else self.cfg.k_at(numel, step)

    def _scheme(self, key: Hashable, wire: WireFormat, world: int) -> str:
        """``"shared"`` where the mask may be shared and the cost model finds it cheapest
        (``cfg.mask``), else the configured local-mask scheme (``"auto"``: the exchange
        picks among the local schemes with the same model)."""
        cfg = self.cfg
        if cfg.mask == "local" or cfg.value_bits is not None or cfg.exchange != "auto":
            return cfg.exchange
        if cfg.mask == "shared" or world == 1:
            return "shared" if cfg.mask == "shared" else cfg.exchange
        costs = scheme_bytes(wire.numel, wire.k, world, wire.index_bytes, wire.value_bytes,
                             self._union_hint(key, wire.k, wire.numel, world),
                             shared_overhead=self.masks.overhead_bytes(wire, world))
        return "shared" if min(costs, key=costs.get) == "shared" else cfg.exchange

    def _accumulate(self, request: StepRequest, plan: StepPlan,
                    started: float) -> Accumulated:
        """Non-finite policy, clipping, momentum, and the residual added in place."""
        cfg, key, state_dtype = self.cfg, request.key, request.state_dtype
        g = request.flat
        # Measured before anything is written: the caller's buffer may receive the update.
        input_sq = (float(torch.linalg.vector_norm(g, dtype=torch.float64).item()) ** 2
                    if request.stats_step else None)
        nonfinite, flag = False, None
        if cfg.nonfinite == "zero":
            g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        elif (self.defer_checks and cfg.nonfinite == "raise" and cfg.feedback != "estimate"
              and g.device.type in self.DEFER_DEVICE_TYPES):
            # Decided on the device, never read here: the flag travels with the exchange
            # (several ranks) or waits for raise_deferred (one process). A flagged
            # gradient adds zeros, so no NaN reaches the residual. (A float64 sum of
            # finite values cannot overflow: only NaN/Inf make it non-finite.)
            flag = torch.isfinite(g.sum(dtype=torch.float64)).logical_not()
            g = torch.where(flag, 0.0, g)
        else:
            nonfinite = _has_nonfinite(g)
        if cfg.clip_norm is not None and not nonfinite:
            norm = torch.linalg.vector_norm(g, dtype=state_dtype)
            g = g.to(state_dtype) * torch.clamp(cfg.clip_norm / (norm + 1e-12), max=1.0)
        velocity = None
        if cfg.momentum > 0 and not nonfinite and not request.stateless:
            velocity = self._momenta.get(key)
            if velocity is None:
                velocity = g.to(state_dtype, copy=True)
            else:
                velocity = self._check_state(velocity, key, request.numel, state_dtype,
                                             g.device)
                # (A flagged step leaves the velocity as it was: x 1, + 0.)
                velocity.mul_(cfg.momentum if flag is None
                              else torch.where(flag, 1.0, cfg.momentum)).add_(g)
            g = velocity if flag is None else torch.where(flag, 0.0, velocity)
        if cfg.feedback == "estimate" and not request.stateless:
            return dataclasses.replace(self._innovation(request, g, nonfinite, started,
                                                        input_sq), flag=flag)
        keep_residual = cfg.error_feedback and not request.stateless
        residual = self._residuals.get(key) if keep_residual else None
        pending = None
        if residual is not None:
            # (A bf16 residual becomes a new fp32 accumulator here; finish rounds it back.)
            acc = self._check_state(residual, key, request.numel, state_dtype, g.device)
            decay = cfg.error_decay  # residual = decay * residual + g (1.0: no decay)
            if nonfinite:
                pass  # a non-finite gradient never reaches the residual
            elif cfg.nonfinite == "skip":
                # Another rank may still call the step off: keep the residual intact
                # until the exchange has succeeded.
                acc = (acc if decay == 1.0 else acc * decay) + g
            else:
                # In place. Should another rank raise for a non-finite gradient, this
                # rank's gradient stays in its residual (delayed, not lost).
                if decay != 1.0:
                    acc.mul_(decay if flag is None else torch.where(flag, 1.0, decay))
                if (plan.selection is not None and plan.selection.packed
                        and plan.selection.tiles is None
                        and plan.scheme != "shared" and g.dtype == state_dtype
                        and request.numel >= FUSE_ADD_MIN_NUMEL):
                    pending = g  # added inside the selection's pass over memory
                else:
                    acc.add_(g)
        elif keep_residual:
            acc = g.to(state_dtype, copy=True)  # becomes the residual buffer
        else:
            acc = g.to(state_dtype)
        return Accumulated(acc, velocity, nonfinite, pending, keep_residual,
                           time.perf_counter() - started, input_sq, flag=flag)

    def _innovation(self, request: StepRequest, g: torch.Tensor, nonfinite: bool,
                    started: float, input_sq: float | None) -> Accumulated:
        """EF21's accumulate stage (``feedback="estimate"``): the gradient (EF21-M: its
        moving average) minus this rank's estimate of it."""
        cfg, key, state_dtype, numel = self.cfg, request.key, request.state_dtype, request.numel
        estimate = self._estimates.get(key)
        if estimate is None:
            estimate = torch.zeros(numel, dtype=state_dtype, device=g.device)
        else:
            estimate = self._check_state(estimate, key, numel, state_dtype, g.device)
        if nonfinite:  # nothing of it is used; the exchange calls the step off
            acc = torch.zeros(numel, dtype=state_dtype, device=g.device)
        else:
            if cfg.feedback_beta > 0:
                average = self._momenta.get(key)
                if average is None:
                    average = g.to(state_dtype, copy=True)
                else:
                    average = self._check_state(average, key, numel, state_dtype, g.device)
                    average.mul_(cfg.feedback_beta).add_(g, alpha=1 - cfg.feedback_beta)
                self._momenta[key] = average
                g = average
            acc = g.to(state_dtype) - estimate
        return Accumulated(acc, None, nonfinite, None, False, time.perf_counter() - started,
                           input_sq, estimate)

    def _select(self, request: StepRequest, plan: StepPlan,
                accumulated: Accumulated) -> Selection:
        """The positions this rank sends: none (dense), its own top-k, or the shared mask."""
        acc = accumulated.acc
        if request.stats_step and acc.is_cuda:
            torch.cuda.synchronize(acc.device)  # time selection alone
        started = time.perf_counter()
        if plan.dense:
            return Selection(None, acc, acc)
        overhead = 0
        if plan.scheme == "shared":
            # Every rank runs the policy (its collectives), flagged or not; a non-finite
            # gradient never reached acc. The layout is checked before the policy's
            # collectives could meet mismatched sizes, the mask itself after.
            if plan.verify:
                overhead += verify_layout(request.numel, plan.wire, "shared",
                                          tag=_key_tag(request.key),
                                          out_dtype=request.state_dtype, group=self.group)
            positions = self.masks.positions(self._mask_context(request, plan, acc))
            if plan.verify:
                overhead += check_same_digest(int(tensor_digest(positions).item()),
                                              f"the shared mask of key {request.key!r}",
                                              self.group)
        elif accumulated.nonfinite:  # nothing will be sent; keep the metadata consistent
            positions = torch.arange(plan.k, dtype=torch.int64, device=acc.device)
        else:
            positions = self._select_local(acc, plan.selection, accumulated.pending,
                                           request.key)
        if request.stats_step and acc.is_cuda:
            torch.cuda.synchronize(acc.device)
        seconds = time.perf_counter() - started
        # The recall diagnostic runs an exact top-k: not part of the selection's time.
        recall = None
        if self.cfg.recall_interval and request.step % self.cfg.recall_interval == 0:
            if plan.scheme == "shared":  # collective: every rank, flagged or not
                recall, spent = self._shared_recall(acc, positions, request)
                overhead += spent
            elif self.cfg.method == "bucketed" and not accumulated.nonfinite:
                recall = self._recall(acc, positions)
        return Selection(positions, acc, acc, recall, overhead, seconds)

    def _encode(self, request: StepRequest, plan: StepPlan, accumulated: Accumulated,
                selection: Selection) -> None:
        """The values at the positions, fitted to the wire dtype's range."""
        started = time.perf_counter()
        if selection.positions is not None:
            selection.values = accumulated.acc[selection.positions]
        selection.sent = _fit_wire_range(selection.values, request.value_dtype, request.world)
        selection.encode_seconds = time.perf_counter() - started

    def _send(self, request: StepRequest, plan: StepPlan, accumulated: Accumulated,
              selection: Selection) -> PendingExchange:
        """Enqueue the exchange; verify its metadata where the layout is new or on stats
        steps; let the mask policy prepare the next step's mask."""
        key, world = request.key, request.world
        shared = plan.scheme == "shared"
        # The overlap of the ranks' local selections (for the cost model) drifts slowly:
        # measured on the first step of a key and on stats steps.
        measure = (not plan.dense and not shared and self.cfg.exchange == "auto"
                   and world > 2 and (request.stats_step or key not in self._overlap))
        hint = self._union_hint(key, plan.k, request.numel, world) if measure else None
        wire = plan.wire
        if shared and selection.positions.numel() != plan.k:  # a union of proposals
            wire = WireFormat(request.numel, selection.positions.numel(), request.value_dtype)
        pending = launch(ExchangeRequest(
            selection.sent, request.numel, selection.positions, wire=wire,
            scheme=plan.scheme, out_dtype=request.state_dtype, out=request.out, average=True,
            per_sender=self.cfg.outer_average == "senders",
            tag=_key_tag(key), nonfinite=self._nonfinite_for_exchange(request, accumulated),
            verify=plan.verify and not shared,  # shared: checked in the select stage
            check_range=request.stats_step,
            union_hint=hint, measure_union=measure), self.group)
        if plan.verify:
            self._verified[key] = (*self._verified.get(key, ())[-3:], plan.signature)
        if shared and self.masks.looks_ahead:  # every rank, flagged or not
            self.masks.after_launch(self._mask_context(request, plan, accumulated.acc,
                                                       ahead=True), selection.positions)
        return pending

    def _nonfinite_for_exchange(self, request: StepRequest,
                                accumulated: Accumulated) -> bool | torch.Tensor:
        """The exchange's non-finite flag: the host decision, or the device flag (several
        ranks; one process keeps it for :meth:`raise_deferred`)."""
        if accumulated.flag is None:
            return accumulated.nonfinite
        if request.world == 1:
            self._deferred.append((request.step, request.key, accumulated.flag))
            return False
        return accumulated.flag

    def _finish(self, request: StepRequest, plan: StepPlan, accumulated: Accumulated,
                selection: Selection, result: ExchangeResult
                ) -> tuple[torch.Tensor, StepStats]:
        """Residual = acc - what receivers decoded; velocity masked; the mask policy
        observes the update; the buffer's stats."""
        cfg, key, acc = self.cfg, request.key, accumulated.acc
        if result.nonfinite_ranks:
            if cfg.nonfinite == "raise":
                raise _nonfinite_error(request.step, [key], result.nonfinite_ranks)
            stats = self._record(request, plan, selection, result, accumulated, skipped=True)
            out = request.out_given
            return (torch.zeros_like(request.grad) if out is None else out.zero_()), stats
        positions, decoded = selection.positions, plan.wire.decoded(selection.sent)
        keep = None
        if accumulated.flag is not None and request.world == 1:
            # One process, check deferred: a flagged step takes nothing from the state
            # and updates nothing (raise_deferred raises it); several ranks never get
            # here flagged (the flag travelled with the exchange).
            keep = accumulated.flag.logical_not()
            decoded = decoded * keep.to(decoded.dtype)
        if accumulated.keep_residual:
            if positions is None:
                acc.sub_(decoded.to(request.state_dtype))
            else:
                acc[positions] = selection.values - decoded.to(request.state_dtype)
            self._residuals[key] = (round_to_bf16(acc, request.step * 1_000_003 + _key_tag(key))
                                    if self.cfg.residual_dtype == "bfloat16" else acc)
        if accumulated.velocity is not None:
            if keep is not None:  # flagged: x 1 (kept), else x 0 (sent)
                kept = accumulated.flag.to(accumulated.velocity.dtype)
                if positions is None:
                    accumulated.velocity.mul_(kept)
                else:
                    accumulated.velocity[positions] *= kept
            elif positions is None:
                accumulated.velocity.zero_()
            else:
                accumulated.velocity[positions] = 0
            self._momenta[key] = accumulated.velocity
        if not request.stateless:  # the update's support: the shared mask, or unknown
            self.masks.observe(key, request.step, result.output,
                               positions if plan.scheme == "shared" else None)
        output = result.output
        if keep is not None:
            output.mul_(keep.to(output.dtype))
        if accumulated.estimate is not None:
            output = self._move_estimates(request, accumulated, positions, decoded, output)
        stats = self._record(request, plan, selection, result, accumulated, skipped=False)
        if request.out is not None:
            if output.data_ptr() != request.out.data_ptr():
                request.out.copy_(output)
            return request.out_given, stats
        if accumulated.estimate is not None:
            output = output.clone()  # the mean estimate is state: hand back a copy
        update = output.to(request.grad.dtype).view(request.grad.shape)
        out = request.out_given
        return (update if out is None else out.copy_(update)), stats

    def _move_estimates(self, request: StepRequest, accumulated: Accumulated,
                        positions: torch.Tensor | None, decoded: torch.Tensor,
                        averaged: torch.Tensor) -> torch.Tensor:
        """EF21's finish: this rank's estimate moves by what it sent, the mean estimate by
        the averaged innovation (so it stays the mean of the ranks' estimates); returns
        the mean estimate, the dense update. ``acc`` keeps what was not sent."""
        key, dtype = request.key, request.state_dtype
        estimate, acc = accumulated.estimate, accumulated.acc
        sent = decoded.to(dtype)
        if positions is None:
            estimate.add_(sent)
            acc.sub_(sent)
        else:
            estimate[positions] += sent
            acc[positions] -= sent
        self._estimates[key] = estimate
        mean = self._means.get(key)
        if mean is None:
            mean = torch.zeros_like(estimate)
        else:
            mean = self._check_state(mean, key, request.numel, dtype, estimate.device)
        mean.add_(averaged.to(dtype))
        self._means[key] = mean
        return mean

    # -- helpers -----------------------------------------------------------------------

    def _union_hint(self, key: Hashable, k: int, numel: int, world: int) -> float | None:
        """The largest distinct-position count per reduce-scatter shard that the key's
        measured overlap predicts (``None``: not measured yet)."""
        if key not in self._overlap:
            return None
        return self._overlap[key] * min(world * k, numel) / world

    def _mask_context(self, request: StepRequest, plan: StepPlan, acc: torch.Tensor,
                      ahead: bool = False) -> MaskContext:
        following = None
        if ahead:
            step = request.step + 1
            if not self.cfg.is_dense_step(request.numel, step):
                nxt = self._sparse_plan(request.key, request.numel, step, request.value_dtype,
                                        request.world)
                if nxt.scheme == "shared":
                    following = (nxt.selection, nxt.wire)
        def plan_for(k: int, step: int) -> tuple[SelectionPlan, WireFormat]:
            plans = self._plans.get((request.numel, k, None))
            if plans is None:
                plans = self._plans[(request.numel, k, None)] = make_plans(self.cfg,
                                                                           request.numel, k)
            selection = plans[step % len(plans)]
            return selection, selection.wire(request.numel, request.value_dtype,
                                             self.cfg.interleaved)

        return MaskContext(request.key, request.step, acc, plan.selection, plan.wire,
                           lambda tensor, selection: self._select_local(tensor, selection),
                           plan_for, following)

    @staticmethod
    def _check_state(tensor: torch.Tensor, key: Hashable, numel: int, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
        if tensor.numel() != numel:
            raise ValueError(
                f"key {key!r} had {tensor.numel()} entries in an earlier step and has {numel} "
                f"now; keys must name tensors of fixed size (call reset({key!r}) after a "
                f"layout change)")
        return tensor.to(device=device, dtype=dtype)

    def _select_local(self, acc: torch.Tensor, plan: SelectionPlan,
                      pending: torch.Tensor | None = None,
                      key: Hashable | None = None) -> torch.Tensor:
        """This rank's top-k positions of ``acc`` under ``plan`` (bucket order when
        packed). ``pending``: ``acc += pending`` in place, fused into the selection
        kernel's pass where the backend can (packed plans only). With the flat Triton
        kernels selected (on CUDA by default: ``distk.selection.flat_kernels_selected``),
        a packed plan of ``key`` goes through
        :func:`~distk.selection.syncfree.select_packed` (the same positions, no host
        synchronisation) by the key's :class:`~distk.selection.syncfree.PackedSelector`
        (its floor state; its CUDA graph with ``DISTK_CUDA_GRAPHS=1``)."""
        cfg = self.cfg
        if plan.k >= acc.numel():  # every entry, in order (implicit on a codec's wire)
            return torch.arange(acc.numel(), device=acc.device)
        if plan.tiles is not None:
            return self._select_tiles(acc, plan)
        if plan.packed and key is not None and flat_kernels_selected(acc):
            selector = self._selectors.get(key)
            if selector is None or selector.device != acc.device:
                selector = self._selectors[key] = PackedSelector(acc.device)
            return selector(acc, plan.buckets, plan.k_per_bucket, cfg.interleaved,
                            add=pending)
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
    def _select_tiles(acc: torch.Tensor, plan: SelectionPlan) -> torch.Tensor:
        """``bucket_layout="tile"``: the top ``k_per_bucket`` entries of every 64 x 64 tile
        of the ``plan.tiles`` view of ``acc``, tile by tile (row-major over the tile
        grid), as positions of the flat ``acc``. The tiles are made contiguous by one
        permuting copy, then selected as contiguous buckets of 4096."""
        rows, cols = plan.tiles
        side = TILE_SIDE
        tiled = (acc.view(rows // side, side, cols // side, side).permute(0, 2, 1, 3)
                 .reshape(1, -1))
        keys = per_bucket_topk(tiled, plan.buckets, plan.k_per_bucket, False, True)
        return from_tile_order(positions_of(keys).reshape(-1), cols, side)

    @staticmethod
    def _recall(acc: torch.Tensor, positions: torch.Tensor) -> float:
        k = positions.numel()
        exact = torch.topk(acc.abs(), k, sorted=False).indices
        chosen = torch.zeros(acc.numel(), dtype=torch.bool, device=acc.device)
        chosen[positions] = True
        return float(chosen[exact].sum().item()) / max(k, 1)

    def _shared_recall(self, acc: torch.Tensor, positions: torch.Tensor,
                       request: StepRequest) -> tuple[float, int]:
        """Recall of a shared mask against the top-k of the *summed* accumulators, and the
        bytes it cost. The k-th largest summed magnitude is estimated from
        :data:`RECALL_SAMPLE` positions (the same on every rank) summed by one small
        all-reduce; the summed values at the mask are summed by a second one; recall is
        the share of the mask at or above the estimated threshold (the mask holds k
        positions, so precision and recall against the top-k coincide)."""
        import torch.distributed as dist

        from distk.comm.group import collective_device, ring_allreduce_bytes

        numel, k, world = acc.numel(), positions.numel(), request.world
        generator = torch.Generator().manual_seed(request.step * 1_000_003 + _key_tag(
            request.key))
        sample = torch.randint(numel, (min(numel, RECALL_SAMPLE),), generator=generator)
        both = torch.cat([acc[sample.to(acc.device)], acc[positions]]).to(torch.float32)
        if world > 1:
            device = collective_device(self.group, both)
            both = both.to(device)
            with collective_errors("the global recall's all-reduce", self.group):
                dist.all_reduce(both, group=self.group)
        sampled, at_mask = both[: sample.numel()].abs(), both[sample.numel():].abs()
        rank_of_kth = max(1, round(sample.numel() * k / numel))
        threshold = torch.topk(sampled, min(rank_of_kth, sampled.numel())).values[-1]
        recall = float((at_mask >= threshold).float().mean().item())
        return recall, ring_allreduce_bytes(both.numel(), world, 4)

    def _record(self, request: StepRequest, plan: StepPlan, selection: Selection,
                result: ExchangeResult, accumulated: Accumulated, *,
                skipped: bool) -> StepStats:
        """The buffer's :class:`StepStats`, merged into the totals; also ``self.last``."""
        numel, world = request.numel, request.world
        comm_seconds = selection.encode_seconds + result.seconds
        residual_sq = input_sq = update_sq = None
        if request.stats_step:
            residual = (accumulated.acc if accumulated.estimate is not None
                        else self._residuals.get(request.key))
            residual_sq = (0.0 if residual is None
                           else float(torch.linalg.vector_norm(residual).item()) ** 2)
            input_sq = accumulated.input_sq
            if result.output is not None:
                update_sq = float(torch.linalg.vector_norm(result.output, dtype=torch.float64
                                                           ).item()) ** 2
        recall = selection.recall
        shared = plan.scheme == "shared"
        k = 0 if skipped else (plan.k if selection.positions is None
                               else selection.positions.numel())
        bytes_sent = result.bytes_sent + selection.overhead_bytes
        if result.union_per_shard is not None and plan.k:
            self._overlap[request.key] = result.union_per_shard / (
                min(world * plan.k, numel) / world)
        stats = StepStats(
            buffers=1, numel=numel, sent=k, bytes_sent=bytes_sent,
            payload_bytes=0 if skipped else result.payload_bytes,
            dense_bytes=dense_allreduce_bytes(numel, world, 4),
            accumulate_seconds=accumulated.seconds, selection_seconds=selection.seconds,
            comm_seconds=comm_seconds, skipped=int(skipped), schemes={result.scheme: 1},
            residual_sq=residual_sq, input_sq=input_sq, update_sq=update_sq,
            recall_sum=0.0 if recall is None or shared else recall * max(k, 1),
            recall_weight=0 if recall is None or shared else max(k, 1),
            global_recall_sum=recall * max(k, 1) if recall is not None and shared else 0.0,
            global_recall_weight=max(k, 1) if recall is not None and shared else 0,
            step=request.step)
        with self._totals_lock:
            self.last = stats
            self.totals = self.totals.merge(stats)
        return stats
