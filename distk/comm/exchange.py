"""Sparse collectives: sum every rank's selected entries into one dense tensor.

A verified call first all-gathers a small int64 metadata row per rank (sizes, ``k``,
scheme, dtypes, wire encoding, a key tag, a non-finite flag, a shared mask's digest, and
the reduce-scatter routing counts). If the ranks disagree, every rank raises
:class:`RankMismatchError` naming the field and each rank's value, instead of hanging in a
collective of mismatched sizes.

Schemes (see :mod:`distk.comm.cost` for their byte counts):

* ``"allgather"``: one all-gather of every rank's packed entries, then a scatter-add in
  rank order 0..P-1 into a zero tensor; every rank does the same arithmetic on the same
  bytes, so every rank holds bitwise the same result.
* ``"reduce_scatter"``: entries are routed (one all-to-all) to the rank owning their
  contiguous shard of ``[0, numel)``; each owner sums what it received in source-rank
  order, then the summed shards are all-gathered, each as its sparse union of touched
  positions or as the dense shard, whichever is smaller. No entry is dropped (no
  re-sparsification), so when values travel in the accumulation dtype the result is
  bitwise that of ``"allgather"``; with bf16/fp16 values the summed shard travels in
  that dtype too (one extra rounding).
* ``"dense"``: all-reduce of the densified selection in the value dtype (the summation
  order is the backend's, so it matches the others up to floating-point rounding).
* ``"shared"``: every rank passes the *same* positions (a shared mask, agreed by the
  compressor's mask policy); one all-reduce sums the ``k`` values and every rank writes
  them to those positions. No index travels and the bytes per rank do not grow with the
  number of ranks. Verified steps compare a digest of the positions across ranks.

The typed input is :class:`ExchangeRequest` (:func:`launch`); :func:`exchange` and
:func:`launch_exchange` take its fields as keywords.

Tensors go over the wire on the device the backend needs: CUDA for NCCL, CPU otherwise
(CUDA inputs on gloo are staged through the CPU); results come back on the input's device.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from distk._native import zero_
from distk.comm.coalesce import all_gather_async, all_reduce_async, refuse_held
from distk.comm.cost import (
    META_FIELDS,
    SCHEMES,
    choose_scheme,
    meta_bytes,
    shard_size,
)
from distk.comm.group import (
    CollectiveError,
    all_gather_flat,
    collective_device,
    collective_errors,
    digest63,
    rank_and_world,
    ring_allreduce_bytes,
)
from distk.comm.wire import DTYPE_CODES, WireFormat, decode_indices, encode_indices

__all__ = [
    "CollectiveError",
    "ExchangeRequest",
    "ExchangeResult",
    "RankMismatchError",
    "check_same_config",
    "PendingExchange",
    "exchange",
    "check_same_digest",
    "launch",
    "launch_exchange",
    "rank_and_world",
    "sparse_allreduce",
    "verify_layout",
]

_PROTOCOL = 0x64697375  # bumps when the metadata layout changes
_META_NAMES = ("protocol version", "numel", "k", "exchange scheme", "value dtype",
               "index encoding", "buckets", "k_per_bucket", "interleaved", "key tag",
               "non-finite flag", "output dtype")
_NONFINITE_FIELD = 10  # status flags of the rank: bit 0 non-finite, bit 1 bad indices
_FLAG_NONFINITE = 1
_FLAG_BAD_INDICES = 2
_TRAILER_BYTES = 8  # unverified steps: one int64, a 55-bit signature digest over 8 flag bits
_FLAG_BITS = 8
_CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
assert len(_META_NAMES) == META_FIELDS


class RankMismatchError(ValueError):
    """Ranks called a collective with different sizes or options (raised on every rank)."""


@dataclass
class ExchangeResult:
    """Outcome of :func:`exchange`.

    Attributes:
        output: dense ``(numel,)`` sum (or average) of every rank's entries, in the
            output dtype on the input's device; ``None`` when some rank flagged a
            non-finite gradient (see ``nonfinite_ranks``).
        scheme: the scheme used.
        bytes_sent: bytes this rank transmitted (metadata included), counted as in
            :mod:`distk.comm.cost` with the real sizes.
        payload_bytes: bytes of this rank's own packed entries.
        union_per_shard: largest number of distinct selected positions in one of the
            ``P`` shards (measured by the reduce-scatter scheme, or by the all-gather scheme
            when asked); ``None`` when not measured.
        nonfinite_ranks: ranks that flagged a non-finite gradient.
        seconds: wall time of the exchange.
    """

    output: torch.Tensor | None
    scheme: str
    bytes_sent: int
    payload_bytes: int
    union_per_shard: float | None = None
    nonfinite_ranks: list[int] = field(default_factory=list)
    seconds: float = 0.0


def _accumulation_dtype(value_dtype: torch.dtype, out_dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(torch.promote_types(value_dtype, torch.float32), out_dtype)


def _check_metadata(rows: torch.Tensor) -> None:
    """Raise the same :class:`RankMismatchError` on every rank if the rows disagree."""
    problems = []
    for col, name in enumerate(_META_NAMES):
        if col == _NONFINITE_FIELD:
            continue
        column = rows[:, col].tolist()
        if any(v != column[0] for v in column):
            if name in ("value dtype", "output dtype"):
                column = [str(_CODE_DTYPES.get(v, v)).replace("torch.", "") for v in column]
            elif name == "exchange scheme":
                column = [SCHEMES[v] if 0 <= v < len(SCHEMES) else v for v in column]
            per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(column))
            problems.append(f"{name} ({per_rank})")
    if problems:
        raise RankMismatchError(
            "distk.comm: ranks disagree on " + "; ".join(problems) + ". Every rank must call "
            "the exchange with the same tensor sizes, k, key and options, in the same order.")


@dataclass
class ExchangeRequest:
    """One rank's contribution to one exchange: the typed input of :func:`launch`.

    Payload (mechanism): ``values`` at ``indices`` of a dense ``(numel,)`` tensor, the
    ``wire`` format and the ``scheme``. Checks the caller decides on (policy, passed as
    data): ``tag``, ``verify``, ``nonfinite``, ``union_hint`` / ``measure_union``.

    Attributes:
        values: ``(k,)`` values at ``indices`` (or the dense ``(numel,)`` tensor when
            ``indices`` is ``None``).
        numel: size of the dense result; the same on every rank.
        indices: ``(k,)`` integer positions in ``[0, numel)``, distinct within a rank
            (duplicates are summed; on CUDA in an unspecified order). ``None``: ``values``
            is the whole tensor, exchanged with the ``"dense"`` scheme. With the
            ``"shared"`` scheme every rank passes the same positions.
        wire: wire format (``None`` = absolute indices, values in ``values.dtype``).
        scheme: ``"allgather"``, ``"reduce_scatter"``, ``"dense"``, ``"shared"`` (one
            all-reduce of the ``k`` values at positions every rank agreed on: no index
            travels) or ``"auto"`` (the cheapest local-mask scheme under
            :func:`distk.comm.cost.scheme_bytes`).
        out_dtype: dtype of the result (default: ``values.dtype``).
        out: optional contiguous ``(numel,)`` tensor of ``out_dtype`` that receives the
            result (saves a numel-sized allocation per call); it may share memory with
            the caller's gradient but not with ``values``.
        average: divide the sum by the world size.
        per_sender: with ``average``, divide each position's sum by the number of ranks
            that sent that position instead (positions nobody sent stay 0); needs the
            ``"allgather"`` scheme (``"auto"`` then picks it). Dense input (every rank
            sends every position) is averaged over the world size either way.
        tag: integer that must match across ranks (the compressor passes a key digest).
        nonfinite: this rank's gradient had NaN/Inf; if any rank sets it, the result is
            ``None`` on every rank. A 0-dim bool tensor on the values' device is also
            accepted, so that the sender need not read it on the host: it travels in the
            trailer (all-gather) or the flag slots (dense, shared) as written on the
            device; verified steps and a single process read it on the host.
        verify: all-gather the metadata row first (sizes, dtypes, plan, key tag, range of
            the indices) and raise :class:`RankMismatchError` on every rank when the ranks
            disagree. ``False`` (a steady state the caller verified before, or checked
            with :func:`verify_layout`): no metadata round trip and no host sync; a
            digest of the same fields and the non-finite flag travel with the payload
            (all-gather), the non-finite flags as extra slots of the all-reduce (dense,
            shared). With one process, the indices' range is checked on verified calls
            only (a host sync); an unverified call trusts them.
        check_range: on an unverified all-gather, check the indices' range anyway (a host
            sync, no metadata round trip): a bad range travels as a flag in the trailer
            and raises on every rank (the compressor's stats steps).
        union_hint: expected largest distinct-position count per shard (cost model).
        measure_union: with ``"allgather"``, also measure ``union_per_shard``.
    """

    values: torch.Tensor
    numel: int
    indices: torch.Tensor | None = None
    wire: WireFormat | None = None
    scheme: str = "allgather"
    out_dtype: torch.dtype | None = None
    out: torch.Tensor | None = None
    average: bool = True
    per_sender: bool = False
    tag: int = 0
    nonfinite: bool | torch.Tensor = False
    check_range: bool = False
    verify: bool = True
    union_hint: float | None = None
    measure_union: bool = False


def exchange(indices: torch.Tensor | None, values: torch.Tensor, numel: int, *, group: Any = None,
             **options: Any) -> ExchangeResult:
    """Sum (or average) every rank's selected entries into a dense tensor; collective.

    ``launch(ExchangeRequest(values, numel, indices, **options), group).wait()``: returns
    once the result is written. ``options`` are :class:`ExchangeRequest`'s fields
    (``average``, ``wire``, ``scheme``, ``out_dtype``, ``tag``, ``nonfinite``,
    ``union_hint``, ``measure_union``, ``out``, ``verify``).

    Raises:
        RankMismatchError: on every rank, when the ranks' sizes or options differ.
        ValueError: for malformed arguments.
    """
    return launch_exchange(indices, values, numel, group=group, **options).wait()


def launch_exchange(indices: torch.Tensor | None, values: torch.Tensor, numel: int, *,
                    group: Any = None, **options: Any) -> PendingExchange:
    """:func:`launch` of ``ExchangeRequest(values, numel, indices, **options)``."""
    unknown = sorted(set(options) - set(ExchangeRequest.__dataclass_fields__))
    if unknown:
        raise TypeError(f"launch_exchange got unknown option(s) {unknown}; allowed: "
                        f"{sorted(set(ExchangeRequest.__dataclass_fields__) - {'values'})}")
    return launch(ExchangeRequest(values, numel, indices, **options), group)


class PendingExchange:
    """An exchange whose collectives are enqueued (:func:`launch`).

    Attributes:
        future: a ``torch.futures.Future`` completed when the collectives are done (its
            value is meaningless); chain the :meth:`finish` on it with ``.then``.
    """

    __slots__ = ("future", "_finish", "_result", "_what", "_group")

    def __init__(self, future: torch.futures.Future, finish: Any, what: str,
                 group: Any) -> None:
        self.future = future
        self._finish = finish
        self._result: ExchangeResult | None = None
        self._what = what
        self._group = group

    @classmethod
    def done(cls, result: ExchangeResult) -> PendingExchange:
        """An exchange completed at launch (one process, a flagged step, reduce-scatter)."""
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(None)
        pending = cls(future, None, "", None)
        pending._result = result
        return pending

    def finish(self) -> ExchangeResult:
        """Unpack, scatter-add, average and write ``out`` (once :attr:`future` is done).

        Raises :class:`CollectiveError` when a collective failed, and
        :class:`RankMismatchError` on every rank when the payload digests disagree."""
        if self._result is None:
            refuse_held(self.future, self._what)
            with collective_errors(self._what, self._group):
                self.future.value()  # re-raises the backend's error, if any
            self._result = self._finish()
        return self._result

    def wait(self) -> ExchangeResult:
        """Block until the collectives are done, then :meth:`finish`."""
        refuse_held(self.future, self._what)
        with collective_errors(self._what, self._group):
            self.future.wait()
        return self.finish()


def _trailer_check(signatures: list[int], flags: list[int], numel: int) -> list[int]:
    """Ranks that flagged a non-finite gradient; raises on a signature mismatch."""
    if any(s != signatures[0] for s in signatures):
        per_rank = ", ".join(f"rank {r}: {s:#x}" for r, s in enumerate(signatures))
        raise RankMismatchError(
            "distk.comm: ranks disagree on the exchange's sizes, dtypes, plan or key in a "
            f"step whose metadata was not re-verified (signature digests {per_rank}). Every "
            "rank must call the exchange with the same tensor sizes, k, key and options, "
            "in the same order.")
    bad = [r for r, f in enumerate(flags) if f & _FLAG_BAD_INDICES]
    if bad:
        raise ValueError(f"distk.comm: indices out of range [0, numel={numel}) on rank(s) {bad}")
    return [r for r, f in enumerate(flags) if f & _FLAG_NONFINITE]


@dataclass
class _Context:
    """What every scheme's launcher needs, resolved once by :func:`launch`."""

    request: ExchangeRequest
    indices: torch.Tensor  # int64 on the collective device (empty for dense input)
    values: torch.Tensor   # on the collective device
    wire: WireFormat
    rank: int
    world: int
    group: Any
    acc_dtype: torch.dtype
    buffer: torch.Tensor | None  # the caller's ``out`` when the sum can accumulate in it
    trailer: torch.Tensor | None  # unverified all-gather: digest and flags in front
    per_sender: bool  # average each position over the ranks that sent it (all-gather)
    device_flag: torch.Tensor | None = None  # this rank's non-finite flag, on the device


def _validate(request: ExchangeRequest) -> tuple[ExchangeRequest, torch.Tensor, WireFormat]:
    """Check the request's arguments; returns it with the scheme resolved for dense input,
    the int64 indices and the wire format."""
    values, numel = request.values, request.numel
    if request.indices is None:
        if values.dim() != 1 or values.numel() != numel:
            raise ValueError(f"with indices=None, values must be the dense ({numel},) tensor, "
                             f"got shape {tuple(values.shape)}")
        indices = torch.empty(0, dtype=torch.int64, device=values.device)
        request = dataclasses.replace(request, scheme="dense")
    else:
        indices = request.indices
        if indices.dim() != 1 or values.dim() != 1 or indices.shape != values.shape:
            raise ValueError(f"indices and values must be 1-D of the same length, got shapes "
                             f"{tuple(indices.shape)} and {tuple(values.shape)}")
        if indices.dtype not in (torch.int16, torch.int32, torch.int64):
            raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
    if not values.is_floating_point():
        raise ValueError(f"values must be floating point, got {values.dtype}")
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 1:
        raise ValueError(f"numel must be an integer >= 1, got {numel!r}")
    k = values.numel()
    wire = request.wire if request.wire is not None else WireFormat(numel, k, values.dtype)
    if wire.numel != numel or wire.k != k:
        raise ValueError(f"wire format is for numel={wire.numel}, k={wire.k}; got "
                         f"numel={numel}, k={k}")
    out_dtype = values.dtype if request.out_dtype is None else request.out_dtype
    if out_dtype not in DTYPE_CODES:
        raise ValueError(f"out_dtype must be one of {list(DTYPE_CODES)}, got {out_dtype}")
    out = request.out
    if out is not None and (out.dtype != out_dtype or out.numel() != numel
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous tensor of {numel} {out_dtype} entries, got "
                         f"{out.numel()} {out.dtype} (contiguous={out.is_contiguous()})")
    if request.scheme not in ("auto", *SCHEMES):
        raise ValueError(f"scheme must be 'auto' or one of {SCHEMES}, got {request.scheme!r}")
    if (request.per_sender and request.indices is not None
            and request.scheme not in ("auto", "allgather")):
        raise ValueError(f"per_sender averaging needs the 'allgather' scheme (or 'auto'), got "
                         f"{request.scheme!r}")
    if wire.codec is not None and request.scheme not in ("auto", "allgather"):
        raise ValueError(f"the compact codec (value_bits={wire.value_bits}) travels only with "
                         f"the 'allgather' scheme (or 'auto'), got {request.scheme!r}")
    return dataclasses.replace(request, out_dtype=out_dtype), indices.to(torch.int64), wire


def launch(request: ExchangeRequest, group: Any = None) -> PendingExchange:
    """Start the exchange of ``request``; collective. Returns once its collectives are
    enqueued.

    The ``"allgather"``, ``"dense"`` and ``"shared"`` schemes enqueue one collective with
    ``async_op=True`` (gloo and NCCL) and return; the caller computes meanwhile and calls
    :meth:`PendingExchange.finish` once :attr:`PendingExchange.future` is done (or
    :meth:`PendingExchange.wait`). With ``verify=True`` the small metadata all-gather runs
    first, synchronously, so that every mismatch raises here, on every rank, before any
    data moves. The ``"reduce_scatter"`` scheme routes entries by counts that travel in the
    metadata, so it always verifies and completes before returning.

    ``values`` and ``indices`` may be reused by the caller as soon as this returns (the
    payload is copied into a buffer of its own); ``out`` is written only by ``finish``.
    """
    started = time.perf_counter()
    request, indices, wire = _validate(request)
    values, numel, out = request.values, request.numel, request.out
    dense_input = request.indices is None
    acc_dtype = _accumulation_dtype(wire.value_dtype, request.out_dtype)
    # The result accumulates in `out` directly where dtype and device allow.
    buffer = (out.view(-1) if out is not None and out.dtype == acc_dtype
              and out.device == values.device else None)
    rank, world = rank_and_world(group)
    scheme = request.scheme
    per_sender = request.per_sender and request.average and not dense_input
    if scheme == "auto":
        scheme = ("allgather" if wire.codec is not None or per_sender else
                  choose_scheme(numel, values.numel(), world, wire.index_bytes,
                                wire.value_bytes, request.union_hint))
    verify = request.verify or scheme == "reduce_scatter"  # its routing travels in metadata
    out_device = values.device
    payload_bytes = (numel * wire.value_bytes if dense_input
                     else values.numel() * wire.value_bytes if scheme == "shared"
                     else wire.payload_bytes)
    bad_indices = False
    # One host sync: verified steps, and all-gathers asked to check the range alone (a bad
    # range then travels as a flag in the trailer and raises on every rank).
    if indices.numel() and (verify or (request.check_range and scheme == "allgather")):
        lowest, highest = torch.aminmax(indices)
        bad_indices = bool((lowest < 0) | (highest >= numel))
    if bad_indices and world == 1:
        raise ValueError(f"distk.comm: indices must lie in [0, numel={numel}), got values "
                         f"from {int(lowest)} to {int(highest)}")
    device_flag = request.nonfinite if isinstance(request.nonfinite, torch.Tensor) else None
    if device_flag is not None and (world == 1 or verify):  # a host sync: no way around it
        request = dataclasses.replace(request, nonfinite=bool(device_flag))
        device_flag = None
    if world == 1:
        return PendingExchange.done(_single_process(request, indices, wire, scheme, acc_dtype,
                                                    buffer, payload_bytes, started))

    device = collective_device(group, values)
    indices, values = indices.to(device), values.to(device)
    fields = [_PROTOCOL, numel, values.numel(), SCHEMES.index(scheme),
              DTYPE_CODES[wire.value_dtype], -1 if dense_input else wire.index_code,
              wire.buckets or 0, wire.k_per_bucket or 0, int(wire.interleaved), request.tag,
              _FLAG_NONFINITE * int(device_flag is None and request.nonfinite)
              + _FLAG_BAD_INDICES * int(bad_indices),
              DTYPE_CODES[request.out_dtype]]
    bytes_sent = 0
    routing = None
    if verify:
        rows = _verify_metadata(fields, indices, scheme, world, group, device)
        bytes_sent += meta_bytes(world)
        flags = rows[:, _NONFINITE_FIELD].tolist()
        bad_ranks = [r for r in range(world) if flags[r] & _FLAG_BAD_INDICES]
        if bad_ranks:  # raised on every rank, before any data moves
            raise ValueError(f"distk.comm: indices out of range [0, numel={numel}) on rank(s) "
                             f"{bad_ranks}")
        flagged = [r for r in range(world) if flags[r] & _FLAG_NONFINITE]
        if flagged:
            return PendingExchange.done(ExchangeResult(
                None, scheme, bytes_sent, payload_bytes, nonfinite_ranks=flagged,
                seconds=time.perf_counter() - started))
        routing = rows[:, META_FIELDS:]

    def result_of(result: torch.Tensor | None, sent: int, union: float | None = None,
                  flagged: list[int] | None = None) -> ExchangeResult:
        if flagged:
            return ExchangeResult(None, scheme, bytes_sent + sent, payload_bytes,
                                  nonfinite_ranks=flagged,
                                  seconds=time.perf_counter() - started)
        if request.average and not per_sender:  # per_sender: divided in the all-gather
            result /= world
        output = _into(out, result.to(device=out_device, dtype=request.out_dtype))
        return ExchangeResult(output, scheme, bytes_sent + sent, payload_bytes,
                              union_per_shard=union, seconds=time.perf_counter() - started)

    # Unverified all-gathers carry the metadata digest and the flags in front of the payload.
    trailer = None if verify or scheme != "allgather" else torch.tensor(
        [(digest63(fields[:_NONFINITE_FIELD] + fields[_NONFINITE_FIELD + 1:])
          >> _FLAG_BITS << _FLAG_BITS) | fields[_NONFINITE_FIELD]],
        dtype=torch.int64, device=device)
    if trailer is not None and device_flag is not None:  # written on the device: no sync
        trailer += device_flag.to(device=device, dtype=torch.int64) * _FLAG_NONFINITE
    ctx = _Context(request, indices, values, wire, rank, world, group, acc_dtype, buffer,
                   trailer, per_sender, device_flag)
    if scheme == "reduce_scatter":
        result, sent, union = _reduce_scatter(ctx, routing)
        return PendingExchange.done(result_of(result, sent, union))
    launcher, what = {"allgather": (_launch_allgather, "an all-gather"),
                      "dense": (_launch_dense, "a dense all-reduce"),
                      "shared": (_launch_shared, "a shared-mask all-reduce")}[scheme]
    future, complete = launcher(ctx, flag_slots=not verify)

    def finish() -> ExchangeResult:
        result, sent, union, flagged = complete()
        return result_of(result, sent, union, flagged)

    return PendingExchange(future, finish, what, group)


def _single_process(request: ExchangeRequest, indices: torch.Tensor, wire: WireFormat,
                    scheme: str, acc_dtype: torch.dtype, buffer: torch.Tensor | None,
                    payload_bytes: int, started: float) -> ExchangeResult:
    """The exchange of a single process: the decoded entries, scattered (nothing moves)."""
    if request.nonfinite:
        return ExchangeResult(None, scheme, 0, payload_bytes, nonfinite_ranks=[0],
                              seconds=time.perf_counter() - started)
    values = request.values
    sent_values = wire.decoded(values).to(acc_dtype)
    if request.indices is None:
        result = (buffer.copy_(sent_values) if buffer is not None
                  else sent_values.clone())  # never alias the caller's tensor
    else:
        result = zero_(buffer) if buffer is not None else torch.zeros(
            request.numel, dtype=acc_dtype, device=values.device)
        result.index_add_(0, indices, sent_values)
    return ExchangeResult(_into(request.out, result.to(request.out_dtype)), scheme, 0,
                          payload_bytes, seconds=time.perf_counter() - started)


def verify_layout(numel: int, wire: WireFormat, scheme: str, *, tag: int = 0,
                  out_dtype: torch.dtype = torch.float32, group: Any = None) -> int:
    """Check, before anything else moves, that every rank is about to exchange the same
    layout (numel, k, scheme, dtypes, wire encoding, key tag); collective. Raises the same
    :class:`RankMismatchError` on every rank otherwise; returns the bytes this rank sent.

    For callers that run collectives of their own before the exchange (a shared mask's
    policy), which would otherwise meet mismatched sizes first; the exchange itself then
    runs with ``verify=False``."""
    _, world = rank_and_world(group)
    if world == 1:
        return 0
    device = collective_device(group)
    fields = [_PROTOCOL, numel, wire.k, SCHEMES.index(scheme), DTYPE_CODES[wire.value_dtype],
              wire.index_code, wire.buckets or 0, wire.k_per_bucket or 0,
              int(wire.interleaved), tag, 0, DTYPE_CODES[out_dtype]]
    _verify_metadata(fields, torch.empty(0, dtype=torch.int64, device=device), scheme, world,
                     group, device)
    return meta_bytes(world)


def check_same_digest(digest: int, what: str, group: Any = None) -> int:
    """Raise :class:`RankMismatchError` on every rank unless every rank passes the same
    ``digest`` (of ``what``, named in the error); collective. Returns the bytes this rank
    sent (one int64 all-gather)."""
    _, world = rank_and_world(group)
    if world == 1:
        return 0
    device = collective_device(group)
    gathered = torch.empty(world, dtype=torch.int64, device=device)
    all_gather_flat(gathered, torch.tensor([digest], dtype=torch.int64, device=device), group)
    digests = gathered.tolist()
    if any(d != digests[0] for d in digests):
        per_rank = ", ".join(f"rank {r}: {d:#x}" for r, d in enumerate(digests))
        raise RankMismatchError(f"distk.comm: ranks disagree on {what} (digests {per_rank}); "
                                "every rank must hold the same one")
    return (world - 1) * 8


def _verify_metadata(fields: list[int], indices: torch.Tensor, scheme: str, world: int,
                     group: Any, device: torch.device) -> torch.Tensor:
    """All-gather every rank's metadata row (and the reduce-scatter routing counts); raise
    the same :class:`RankMismatchError` on every rank if they disagree. The rows, on the
    CPU."""
    shard = shard_size(fields[1], world)
    bad = fields[_NONFINITE_FIELD] & _FLAG_BAD_INDICES
    counts = (torch.bincount(indices // shard, minlength=world)
              if scheme == "reduce_scatter" and not bad
              else torch.zeros(world, dtype=torch.int64, device=device))
    header = torch.tensor(fields, dtype=torch.int64, device=device)
    meta = torch.cat([header, counts.to(torch.int64)])
    rows = torch.empty(world * meta.numel(), dtype=torch.int64, device=device)
    all_gather_flat(rows, meta, group)
    rows = rows.view(world, -1).cpu()
    _check_metadata(rows)
    return rows


def _launch_allgather(ctx: _Context, *, flag_slots: bool):
    """Every rank's packed entries to every rank; scatter-added in rank order."""
    del flag_slots  # the trailer (ctx.trailer) carries the flags of unverified steps
    wire, world, trailer, buffer = ctx.wire, ctx.world, ctx.trailer, ctx.buffer
    payload = wire.pack(ctx.indices, ctx.values)
    if trailer is not None:  # 8 bytes in front: the payload sections stay aligned
        payload = torch.cat([trailer.view(torch.uint8), payload])
    gathered = torch.empty(world * payload.numel(), dtype=torch.uint8, device=payload.device)
    future = all_gather_async(gathered, payload, ctx.group)

    def complete():
        rows = gathered.view(world, -1)
        flagged = None
        if trailer is not None:
            words = rows[:, :_TRAILER_BYTES].clone().view(torch.int64).view(-1)
            words = words.cpu().tolist()  # host memory already on gloo
            mask = (1 << _FLAG_BITS) - 1
            flagged = _trailer_check([w >> _FLAG_BITS for w in words],
                                     [w & mask for w in words], wire.numel)
            rows = rows[:, _TRAILER_BYTES:]
        sent = (world - 1) * payload.numel()
        if flagged:
            return None, sent, None, flagged
        all_indices, all_values = wire.unpack(rows)
        result = (zero_(buffer) if buffer is not None and buffer.device == payload.device
                  else torch.zeros(wire.numel, dtype=ctx.acc_dtype, device=payload.device))
        for source in range(world):  # fixed order: bitwise-identical sums on every rank
            result.index_add_(0, all_indices[source], all_values[source].to(ctx.acc_dtype))
        if ctx.per_sender:
            # Each position's sum over the ranks that sent it (a count is exact in float).
            senders = torch.zeros(wire.numel, dtype=ctx.acc_dtype, device=result.device)
            senders.index_add_(0, all_indices.reshape(-1),
                               torch.ones(all_indices.numel(), dtype=ctx.acc_dtype,
                                          device=result.device))
            result.div_(senders.clamp_(min=1))
        union = (_largest_shard_union(all_indices, wire.numel, world)
                 if ctx.request.measure_union else None)
        return result, sent, union, None

    return future, complete


def _flagged_allreduce(ctx: _Context, dense: torch.Tensor, length: int, flag_slots: bool,
                       what: str):
    """All-reduce ``dense`` (``length`` entries, then ``world`` flag slots when
    ``flag_slots``: this rank's set to 1 when it flags a non-finite gradient; 0 and 1 sum
    exactly in any float dtype, so the sum names the flagged ranks)."""
    if flag_slots and ctx.device_flag is not None:  # written on the device: no sync
        dense[length + ctx.rank] = ctx.device_flag.to(device=dense.device, dtype=dense.dtype)
    elif flag_slots and ctx.request.nonfinite:
        dense[length + ctx.rank] = 1
    future = all_reduce_async(dense, ctx.group, what)

    def flagged() -> list[int] | None:
        if not flag_slots:
            return None
        flags = dense[length:].cpu().tolist()
        return [r for r, f in enumerate(flags) if f != 0] or None

    return future, flagged


def _launch_dense(ctx: _Context, *, flag_slots: bool):
    """All-reduce of the densified selection, in the value dtype."""
    wire, numel = ctx.wire, ctx.wire.numel
    extra = ctx.world if flag_slots else 0
    dense = torch.zeros(numel + extra, dtype=wire.value_dtype, device=ctx.values.device)
    if ctx.request.indices is None:
        dense[:numel] = ctx.values
    else:
        dense[:numel].index_add_(0, ctx.indices, ctx.values.to(wire.value_dtype))
    future, flagged = _flagged_allreduce(ctx, dense, numel, flag_slots, "a dense all-reduce")

    def complete():
        sent = ring_allreduce_bytes(numel + extra, ctx.world, wire.value_bytes)
        ranks = flagged()
        if ranks:
            return None, sent, None, ranks
        return dense[:numel].to(ctx.acc_dtype), sent, None, None

    return future, complete


def _launch_shared(ctx: _Context, *, flag_slots: bool):
    """All-reduce of the ``k`` values at positions every rank agreed on: no index travels,
    and the bytes per rank, ``2 (P - 1) / P * k * value_bytes``, do not grow with ``P``.
    Every rank scatters the same summed values to the same positions, so every rank holds
    bitwise the same result."""
    wire, k = ctx.wire, ctx.values.numel()
    extra = ctx.world if flag_slots else 0
    summed = torch.zeros(k + extra, dtype=wire.value_dtype, device=ctx.values.device)
    summed[:k] = ctx.values
    future, flagged = _flagged_allreduce(ctx, summed, k, flag_slots,
                                         "a shared-mask all-reduce")

    def complete():
        sent = ring_allreduce_bytes(k + extra, ctx.world, wire.value_bytes)
        ranks = flagged()
        if ranks:
            return None, sent, None, ranks
        buffer = ctx.buffer
        result = (zero_(buffer) if buffer is not None and buffer.device == summed.device
                  else torch.zeros(wire.numel, dtype=ctx.acc_dtype, device=summed.device))
        result[ctx.indices] = summed[:k].to(ctx.acc_dtype)
        return result, sent, None, None

    return future, complete


def _largest_shard_union(positions: torch.Tensor, numel: int, world: int) -> float:
    """Most distinct ``positions`` falling into one reduce-scatter shard (a sort of the
    ``world * k`` gathered positions; nothing of ``numel`` size)."""
    shard = shard_size(numel, world)
    distinct = torch.unique(positions.reshape(-1))
    return float(torch.bincount(distinct // shard, minlength=world).max().item())


def _into(out: torch.Tensor | None, result: torch.Tensor) -> torch.Tensor:
    """``result`` written into ``out`` (when given and not already there)."""
    if out is None or result.data_ptr() == out.data_ptr():
        return result if out is None else out
    return out.copy_(result.view_as(out))


def _pack_rows(local: torch.Tensor, values: torch.Tensor, index_dtype: torch.dtype,
               value_dtype: torch.dtype) -> torch.Tensor:
    """``(n, value_bytes + index_bytes)`` uint8 rows, one per entry (for all-to-all)."""
    n = local.numel()
    value_part = values.to(value_dtype).contiguous().view(torch.uint8).view(n, -1)
    index_part = encode_indices(local, index_dtype).view(torch.uint8).view(n, -1)
    return torch.cat([value_part, index_part], dim=1)


def _unpack_rows(rows: torch.Tensor, index_dtype: torch.dtype,
                 value_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    value_bytes = value_dtype.itemsize
    # A fresh, offset-0 copy of each column block can always be viewed as the wider dtype.
    fresh = dict(memory_format=torch.contiguous_format)
    values = rows[:, :value_bytes].clone(**fresh).view(value_dtype).view(-1)
    local = decode_indices(rows[:, value_bytes:].clone(**fresh).view(index_dtype).view(-1))
    return local, values


def _reduce_scatter(ctx: _Context, routing: torch.Tensor):
    """Route entries to shard owners, sum there, gather the summed shards back."""
    indices, values, wire = ctx.indices, ctx.values, ctx.wire
    rank, world, group, acc_dtype = ctx.rank, ctx.world, ctx.group, ctx.acc_dtype
    device = values.device
    numel = wire.numel
    shard = shard_size(numel, world)
    shard_wire = WireFormat(shard, 0, wire.value_dtype)  # index dtype for shard-local offsets
    index_dtype = shard_wire.index_dtype
    entry = index_dtype.itemsize + wire.value_bytes

    # Phase 1: route every entry to the owner of its shard (one all-to-all).
    owner = indices // shard
    order = torch.argsort(owner, stable=True)
    send = _pack_rows(indices[order] - owner[order] * shard, values[order], index_dtype,
                      wire.value_dtype).reshape(-1)
    send_counts = routing[rank].tolist()
    recv_counts = routing[:, rank].tolist()
    recv = torch.empty(sum(recv_counts) * entry, dtype=torch.uint8, device=device)
    with collective_errors("an all-to-all", group):
        dist.all_to_all_single(recv, send,
                               output_split_sizes=[c * entry for c in recv_counts],
                               input_split_sizes=[c * entry for c in send_counts], group=group)
    sent = sum(c for r, c in enumerate(send_counts) if r != rank) * entry

    # Owners sum in source-rank order (the same arithmetic as the all-gather scheme).
    my_start = rank * shard
    my_len = max(0, min(numel, my_start + shard) - my_start)
    local, received = _unpack_rows(recv.view(-1, entry), index_dtype, wire.value_dtype)
    shard_sum = torch.zeros(my_len, dtype=acc_dtype, device=device)
    touched = torch.zeros(my_len, dtype=torch.bool, device=device)
    start = 0
    for count in recv_counts:
        part = slice(start, start + count)
        shard_sum.index_add_(0, local[part], received[part].to(acc_dtype))
        start += count
    touched[local] = True
    union = touched.nonzero().view(-1)

    sizes = torch.empty(world, dtype=torch.int64, device=device)
    all_gather_flat(sizes, torch.tensor([union.numel()], dtype=torch.int64, device=device), group)
    sizes_list = sizes.tolist()
    largest = max(sizes_list)
    sent += (world - 1) * 8

    # Phase 2: gather the summed shards back, sparse or dense, whichever is smaller.
    result = torch.zeros(shard * world, dtype=acc_dtype, device=device)
    if largest * entry < shard * wire.value_bytes:
        gather_wire = WireFormat(shard, largest, wire.value_dtype)
        padded_index = torch.zeros(largest, dtype=torch.int64, device=device)
        padded_value = torch.zeros(largest, dtype=wire.value_dtype, device=device)
        padded_index[: union.numel()] = union
        padded_value[: union.numel()] = shard_sum[union].to(wire.value_dtype)
        payload = gather_wire.pack(padded_index, padded_value)
        gathered = torch.empty(world * payload.numel(), dtype=torch.uint8, device=device)
        all_gather_flat(gathered, payload, group)
        owner_index, owner_value = gather_wire.unpack(gathered.view(world, -1))
        for source, size in enumerate(sizes_list):
            result[source * shard + owner_index[source, :size]] = \
                owner_value[source, :size].to(acc_dtype)
        sent += (world - 1) * payload.numel()
    else:
        mine = torch.zeros(shard, dtype=wire.value_dtype, device=device)
        mine[:my_len] = shard_sum.to(wire.value_dtype)
        gathered = torch.empty(world * shard, dtype=wire.value_dtype, device=device)
        all_gather_flat(gathered, mine, group)
        result.copy_(gathered.to(acc_dtype))
        sent += (world - 1) * shard * wire.value_bytes
    return result[:numel], sent, float(largest)


def sparse_allreduce(indices: torch.Tensor, values: torch.Tensor, numel: int,
                     group: Any = None, average: bool = True, *, scheme: str = "allgather",
                     value_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense ``(numel,)`` sum (``average=True``: mean) over ranks of each rank's entries.

    Collective: every rank calls it with the same ``numel`` and the same number of
    entries ``k``; otherwise every rank raises :class:`RankMismatchError`. The default
    all-gather scheme scatter-adds the ranks' entries in rank order, so every rank holds
    bitwise the same tensor.

    Args:
        indices: ``(k,)`` distinct integer positions in ``[0, numel)``.
        values: ``(k,)`` floating values at those positions.
        numel: size of the result.
        group: process group (``None`` = default; no initialised group = one process).
        average: divide by the world size.
        scheme: ``"allgather"``, ``"reduce_scatter"``, ``"dense"`` or ``"auto"``.
        value_dtype: dtype of values on the wire (default: ``values.dtype``).

    Returns:
        The dense result, in ``values.dtype`` on ``values.device``.
    """
    if not values.is_floating_point():  # before WireFormat, which would name value_dtype
        raise ValueError(f"values must be floating point, got {values.dtype}")
    indices = indices.reshape(-1)
    values = values.reshape(-1)
    wire = WireFormat(numel, indices.numel(), value_dtype or values.dtype)
    return exchange(indices, values, numel, group=group, average=average, wire=wire,
                    scheme=scheme, out_dtype=values.dtype).output


def dense_allreduce_bytes(numel: int, world_size: int, itemsize: int = 4) -> int:
    """Bytes one rank transmits in a ring all-reduce of ``numel`` entries (fp32 default)."""
    return ring_allreduce_bytes(numel, world_size, itemsize)


def _config_digest(config: dict[str, Any]) -> int:
    return digest63([json.dumps(config, sort_keys=True, default=str)])


def check_same_config(config: dict[str, Any] | Any, group: Any = None) -> None:
    """Check that every rank holds the same configuration; collective.

    ``config`` is a dict (or an object with ``to_dict()``, such as ``SparsityConfig``).
    A digest is all-gathered; only when digests differ are the full configs gathered, to
    name the differing keys.

    Raises:
        RankMismatchError: on every rank, naming each differing key and its value per rank.
    """
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    rank, world = rank_and_world(group)
    if world == 1:
        return
    device = collective_device(group)
    digest = torch.tensor([_config_digest(config)], dtype=torch.int64, device=device)
    digests = torch.empty(world, dtype=torch.int64, device=device)
    all_gather_flat(digests, digest, group)
    digests = digests.tolist()
    if all(d == digests[0] for d in digests):
        return
    configs: list[Any] = [None] * world
    with collective_errors("the config check's all-gather", group):
        dist.all_gather_object(configs, config, group=group)
    keys = sorted({key for c in configs for key in c}, key=str)
    missing = object()
    lines = []
    for key in keys:
        column = [c.get(key, missing) for c in configs]
        if any(v != column[0] for v in column):
            per_rank = ", ".join(f"rank {r}: {'<missing>' if v is missing else repr(v)}"
                                 for r, v in enumerate(column))
            lines.append(f"{key} ({per_rank})")
    raise RankMismatchError("distk: the sparsity config differs across ranks: "
                            + "; ".join(lines or ["(unrepresentable difference)"]))
