"""Sparse collectives: sum every rank's selected entries into one dense tensor.

Every call first all-gathers a small int64 metadata row per rank (sizes, ``k``, scheme,
dtypes, wire encoding, a key tag, a non-finite flag, and the reduce-scatter routing
counts). If the ranks disagree, every rank raises :class:`RankMismatchError` naming the
field and each rank's value, instead of hanging in a collective of mismatched sizes.

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

Tensors go over the wire on the device the backend needs: CUDA for NCCL, CPU otherwise
(CUDA inputs on gloo are staged through the CPU); results come back on the input's device.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from distk._native import zero_
from distk.comm.cost import (
    META_FIELDS,
    SCHEMES,
    choose_scheme,
    meta_bytes,
    shard_size,
)
from distk.comm.group import collective_device, digest63, rank_and_world, ring_allreduce_bytes
from distk.comm.wire import DTYPE_CODES, WireFormat, decode_indices, encode_indices

__all__ = [
    "CollectiveError",
    "ExchangeResult",
    "RankMismatchError",
    "check_same_config",
    "PendingExchange",
    "exchange",
    "launch_exchange",
    "rank_and_world",
    "sparse_allreduce",
]

_PROTOCOL = 0x64697374  # "dist": bumps when the metadata layout changes
_META_NAMES = ("protocol version", "numel", "k", "exchange scheme", "value dtype",
               "index encoding", "buckets", "k_per_bucket", "interleaved", "key tag",
               "non-finite flag", "output dtype")
_NONFINITE_FIELD = 10  # status flags of the rank: bit 0 non-finite, bit 1 bad indices
_FLAG_NONFINITE = 1
_FLAG_BAD_INDICES = 2
_TRAILER_BYTES = 16  # unverified steps: int64 signature digest and int64 flags
_CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
assert len(_META_NAMES) == META_FIELDS


class RankMismatchError(ValueError):
    """Ranks called a collective with different sizes or options (raised on every rank)."""


class CollectiveError(RuntimeError):
    """A collective failed on this rank: a peer rank exited (crash, kill, out of memory),
    stalled past the process group's timeout, or the connection broke. The backend's
    error is chained as ``__cause__``."""


@contextlib.contextmanager
def _collective(what: str, group: Any):
    """Re-raise a backend failure inside the block as :class:`CollectiveError` with context."""
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as err:  # gloo/nccl errors, DistBackendError, timeouts
        rank, world = rank_and_world(group)
        raise CollectiveError(
            f"distk.comm: {what} failed on rank {rank} of {world}: a peer rank probably "
            "exited (crash, kill, out of memory) or stalled longer than the process group's "
            "timeout (init_process_group(timeout=...)). Check the other ranks' logs and "
            f"resume from the last checkpoint. Backend error: {err}") from err


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


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group: Any) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    with _collective("an all-gather", group):
        gather(out, inp, group=group)


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


def exchange(indices: torch.Tensor | None, values: torch.Tensor, numel: int, *, group: Any = None,
             average: bool = True, wire: WireFormat | None = None, scheme: str = "allgather",
             out_dtype: torch.dtype | None = None, tag: int = 0, nonfinite: bool = False,
             union_hint: float | None = None, measure_union: bool = False,
             out: torch.Tensor | None = None, verify: bool = True) -> ExchangeResult:
    """Sum (or average) every rank's selected entries into a dense tensor; collective.

    :func:`launch_exchange` followed by :meth:`PendingExchange.wait`: returns once the
    result is written.

    Args:
        indices: ``(k,)`` integer positions in ``[0, numel)``, distinct within a rank
            (duplicates are summed; on CUDA in an unspecified order); ``None``: ``values``
            is the whole dense tensor, exchanged with the ``"dense"`` scheme (``k = numel``).
        values: ``(k,)`` values at those positions.
        numel: size of the dense result; must be the same on every rank.
        group: process group (``None`` = the default group; no initialised group =
            a single process).
        average: divide the sum by the world size.
        wire: wire format (``None`` = absolute indices, values in ``values.dtype``).
        scheme: ``"allgather"``, ``"reduce_scatter"``, ``"dense"`` or ``"auto"`` (the
            cheapest under :func:`distk.comm.cost.scheme_bytes`).
        out_dtype: dtype of the result (default: ``values.dtype``).
        tag: integer that must match across ranks (the compressor passes a key digest, so
            calls made in different orders are caught).
        nonfinite: this rank's gradient had NaN/Inf; if any rank sets it, ``output`` is
            ``None`` on every rank.
        union_hint: expected largest distinct-position count per shard (cost model).
        measure_union: with ``"allgather"``, also measure ``union_per_shard``.
        out: optional contiguous ``(numel,)`` tensor of ``out_dtype`` that receives the
            result (``output`` is then ``out``); saves allocating a numel-sized tensor per
            call. It may share memory with the caller's gradient but not with ``values``.
        verify: all-gather the metadata row first (sizes, dtypes, plan, key tag, range of
            the indices) and raise :class:`RankMismatchError` on every rank when the ranks
            disagree. ``False`` (steady state of a caller that verified this exchange
            before, with the same sizes): no metadata round trip and no host sync; the
            payload carries a digest of the same fields and the non-finite flag, checked
            when the data arrives (a digest mismatch still raises on every rank).

    Raises:
        RankMismatchError: on every rank, when the ranks' sizes or options differ.
        ValueError: for malformed arguments.
    """
    return launch_exchange(indices, values, numel, group=group, average=average, wire=wire,
                           scheme=scheme, out_dtype=out_dtype, tag=tag, nonfinite=nonfinite,
                           union_hint=union_hint, measure_union=measure_union, out=out,
                           verify=verify).wait()


class PendingExchange:
    """An exchange whose collectives are enqueued (:func:`launch_exchange`).

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
            with _collective(self._what, self._group):
                self.future.value()  # re-raises the backend's error, if any
            self._result = self._finish()
        return self._result

    def wait(self) -> ExchangeResult:
        """Block until the collectives are done, then :meth:`finish`."""
        with _collective(self._what, self._group):
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


def launch_exchange(indices: torch.Tensor | None, values: torch.Tensor, numel: int, *,
                    group: Any = None, average: bool = True, wire: WireFormat | None = None,
                    scheme: str = "allgather", out_dtype: torch.dtype | None = None,
                    tag: int = 0, nonfinite: bool = False, union_hint: float | None = None,
                    measure_union: bool = False, out: torch.Tensor | None = None,
                    verify: bool = True) -> PendingExchange:
    """Start :func:`exchange` (same arguments): returns once its collectives are enqueued.

    The ``"allgather"`` and ``"dense"`` schemes enqueue one collective with
    ``async_op=True`` (gloo and NCCL) and return; the caller computes meanwhile and calls
    :meth:`PendingExchange.finish` once :attr:`PendingExchange.future` is done (or
    :meth:`PendingExchange.wait`). With ``verify=True`` the small metadata all-gather runs
    first, synchronously, so that every mismatch raises here, on every rank, before any
    data moves. The ``"reduce_scatter"`` scheme routes entries by counts that travel in the
    metadata, so it always verifies and completes before returning.

    ``values`` and ``indices`` may be reused by the caller as soon as this returns (the
    payload is packed into a buffer of its own); ``out`` is written only by ``finish``.
    """
    started = time.perf_counter()
    dense_input = indices is None
    if dense_input:
        if values.dim() != 1 or values.numel() != numel:
            raise ValueError(f"with indices=None, values must be the dense ({numel},) tensor, "
                             f"got shape {tuple(values.shape)}")
        indices = torch.empty(0, dtype=torch.int64, device=values.device)
        scheme = "dense"
    elif indices.dim() != 1 or values.dim() != 1 or indices.shape != values.shape:
        raise ValueError(f"indices and values must be 1-D of the same length, got shapes "
                         f"{tuple(indices.shape)} and {tuple(values.shape)}")
    if indices.dtype not in (torch.int16, torch.int32, torch.int64):
        raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
    if not values.is_floating_point():
        raise ValueError(f"values must be floating point, got {values.dtype}")
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 1:
        raise ValueError(f"numel must be an integer >= 1, got {numel!r}")
    k = values.numel()
    if wire is None:
        wire = WireFormat(numel, k, values.dtype)
    if wire.numel != numel or wire.k != k:
        raise ValueError(f"wire format is for numel={wire.numel}, k={wire.k}; got "
                         f"numel={numel}, k={k}")
    out_dtype = values.dtype if out_dtype is None else out_dtype
    if out_dtype not in DTYPE_CODES:
        raise ValueError(f"out_dtype must be one of {list(DTYPE_CODES)}, got {out_dtype}")
    if out is not None and (out.dtype != out_dtype or out.numel() != numel
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous tensor of {numel} {out_dtype} entries, got "
                         f"{out.numel()} {out.dtype} (contiguous={out.is_contiguous()})")
    acc_dtype = _accumulation_dtype(wire.value_dtype, out_dtype)
    # The result accumulates in `out` directly where dtype and device allow.
    buffer = (out.view(-1) if out is not None and out.dtype == acc_dtype
              and out.device == values.device else None)
    rank, world = rank_and_world(group)
    if scheme == "auto":
        scheme = ("allgather" if wire.codec is not None else
                  choose_scheme(numel, k, world, wire.index_bytes, wire.value_bytes, union_hint))
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be 'auto' or one of {SCHEMES}, got {scheme!r}")
    if wire.codec is not None and scheme != "allgather":
        raise ValueError(f"the compact codec (value_bits={wire.value_bits}) travels only with "
                         f"the 'allgather' scheme (or 'auto'), got {scheme!r}")
    if scheme == "reduce_scatter":
        verify = True  # its routing counts travel in the metadata
    out_device = values.device
    indices = indices.to(torch.int64)
    payload_bytes = numel * wire.value_bytes if dense_input else wire.payload_bytes
    bad_indices = False
    if indices.numel() and (verify or world == 1):  # a host sync: verified steps only
        lowest, highest = torch.aminmax(indices)
        bad_indices = bool(lowest < 0) or bool(highest >= numel)
    if bad_indices and world == 1:
        raise ValueError(f"distk.comm: indices must lie in [0, numel={numel}), got values "
                         f"from {int(lowest)} to {int(highest)}")

    if world == 1:
        if nonfinite:
            return PendingExchange.done(ExchangeResult(
                None, scheme, 0, payload_bytes, nonfinite_ranks=[0],
                seconds=time.perf_counter() - started))
        sent_values = wire.decoded(values).to(acc_dtype)
        if dense_input:
            result = (buffer.copy_(sent_values) if buffer is not None
                      else sent_values.clone())  # never alias the caller's tensor
        else:
            result = zero_(buffer) if buffer is not None else torch.zeros(
                numel, dtype=acc_dtype, device=out_device)
            result.index_add_(0, indices, sent_values)
        return PendingExchange.done(ExchangeResult(
            _into(out, result.to(out_dtype)), scheme, 0, payload_bytes,
            seconds=time.perf_counter() - started))

    device = collective_device(group, values)
    indices, values = indices.to(device), values.to(device)
    fields = [_PROTOCOL, numel, k, SCHEMES.index(scheme), DTYPE_CODES[wire.value_dtype],
              -1 if dense_input else wire.index_code, wire.buckets or 0,
              wire.k_per_bucket or 0, int(wire.interleaved), tag,
              _FLAG_NONFINITE * int(nonfinite) + _FLAG_BAD_INDICES * int(bad_indices),
              DTYPE_CODES[out_dtype]]
    bytes_sent = 0
    routing = None
    if verify:
        shard = shard_size(numel, world)
        counts = (torch.bincount(indices // shard, minlength=world)
                  if scheme == "reduce_scatter" and not bad_indices
                  else torch.zeros(world, dtype=torch.int64, device=device))
        header = torch.tensor(fields, dtype=torch.int64, device=device)
        meta = torch.cat([header, counts.to(torch.int64)])
        rows = torch.empty(world * meta.numel(), dtype=torch.int64, device=device)
        _all_gather(rows, meta, group)
        rows = rows.view(world, -1).cpu()
        _check_metadata(rows)
        bytes_sent = meta_bytes(world)
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
        if average:
            result /= world
        return ExchangeResult(_into(out, result.to(device=out_device, dtype=out_dtype)),
                              scheme, bytes_sent + sent, payload_bytes, union_per_shard=union,
                              seconds=time.perf_counter() - started)

    if scheme == "reduce_scatter":
        result, sent, union = _reduce_scatter(indices, values, wire, rank, world, group,
                                              acc_dtype, routing)
        return PendingExchange.done(result_of(result, sent, union))
    # Unverified steps carry the metadata digest and the flags in front of the payload.
    trailer = None if verify else torch.tensor(
        [digest63(fields[:_NONFINITE_FIELD] + fields[_NONFINITE_FIELD + 1:]), fields[
            _NONFINITE_FIELD]], dtype=torch.int64, device=device)
    if scheme == "allgather":
        launched = _launch_allgather(indices, values, wire, world, group, acc_dtype,
                                     measure_union, buffer, trailer)
        what = "an all-gather"
    else:
        launched = _launch_dense(None if dense_input else indices, values, wire, rank, world,
                                 group, acc_dtype, flag_slots=not verify, nonfinite=nonfinite)
        what = "a dense all-reduce"
    future, complete = launched

    def finish() -> ExchangeResult:
        result, sent, union, flagged = complete()
        return result_of(result, sent, union, flagged)

    return PendingExchange(future, finish, what, group)


def _launch(collective: Any, what: str, group: Any, *args: Any) -> torch.futures.Future:
    """Enqueue ``collective(*args, group=group, async_op=True)``; its Work's future."""
    with _collective(what, group):
        work = collective(*args, group=group, async_op=True)
    return work.get_future()


def _launch_allgather(indices, values, wire, world, group, acc_dtype, measure_union, buffer,
                      trailer):
    payload = wire.pack(indices, values)
    if trailer is not None:  # 16 bytes in front: the payload sections stay aligned
        payload = torch.cat([trailer.view(torch.uint8), payload])
    gathered = torch.empty(world * payload.numel(), dtype=torch.uint8, device=payload.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    future = _launch(gather, "an all-gather", group, gathered, payload)

    def complete():
        rows = gathered.view(world, -1)
        flagged = None
        if trailer is not None:
            head = rows[:, :_TRAILER_BYTES].clone().view(torch.int64).view(world, 2)
            columns = head.cpu().tolist()  # host memory already on gloo
            flagged = _trailer_check([c[0] for c in columns], [c[1] for c in columns],
                                     wire.numel)
            rows = rows[:, _TRAILER_BYTES:]
        sent = (world - 1) * payload.numel()
        if flagged:
            return None, sent, None, flagged
        all_indices, all_values = wire.unpack(rows)
        result = (zero_(buffer) if buffer is not None and buffer.device == payload.device
                  else torch.zeros(wire.numel, dtype=acc_dtype, device=payload.device))
        for source in range(world):  # fixed order: bitwise-identical sums on every rank
            result.index_add_(0, all_indices[source], all_values[source].to(acc_dtype))
        union = _largest_shard_union(all_indices, wire.numel, world) if measure_union else None
        return result, sent, union, None

    return future, complete


def _launch_dense(indices, values, wire, rank, world, group, acc_dtype, *, flag_slots,
                  nonfinite):
    """All-reduce of the densified selection. ``flag_slots`` (unverified steps): ``world``
    extra entries, this rank's set to 1 when it flags a non-finite gradient (0 and 1 sum
    exactly in any float dtype, so the sum names the flagged ranks)."""
    numel = wire.numel
    extra = world if flag_slots else 0
    dense = torch.zeros(numel + extra, dtype=wire.value_dtype, device=values.device)
    if indices is None:
        dense[:numel] = values
    else:
        dense[:numel].index_add_(0, indices, values.to(wire.value_dtype))
    if extra and nonfinite:
        dense[numel + rank] = 1
    future = _launch(dist.all_reduce, "a dense all-reduce", group, dense)

    def complete():
        sent = ring_allreduce_bytes(numel, world, wire.value_bytes)
        if extra:
            flags = dense[numel:].cpu().tolist()
            flagged = [r for r, f in enumerate(flags) if f != 0]
            if flagged:
                return None, sent, None, flagged
        return dense[:numel].to(acc_dtype), sent, None, None

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


def _reduce_scatter(indices, values, wire, rank, world, group, acc_dtype, routing):
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
    with _collective("an all-to-all", group):
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
    _all_gather(sizes, torch.tensor([union.numel()], dtype=torch.int64, device=device), group)
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
        _all_gather(gathered, payload, group)
        owner_index, owner_value = gather_wire.unpack(gathered.view(world, -1))
        for source, size in enumerate(sizes_list):
            result[source * shard + owner_index[source, :size]] = \
                owner_value[source, :size].to(acc_dtype)
        sent += (world - 1) * payload.numel()
    else:
        mine = torch.zeros(shard, dtype=wire.value_dtype, device=device)
        mine[:my_len] = shard_sum.to(wire.value_dtype)
        gathered = torch.empty(world * shard, dtype=wire.value_dtype, device=device)
        _all_gather(gathered, mine, group)
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
    _all_gather(digests, digest, group)
    digests = digests.tolist()
    if all(d == digests[0] for d in digests):
        return
    configs: list[Any] = [None] * world
    with _collective("the config check's all-gather", group):
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
