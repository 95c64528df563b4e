"""Cost model of the exchange schemes: bytes each rank transmits, per call.

All counts are what one rank puts on the wire under the bandwidth-optimal algorithm of
each collective (ring all-gather: ``(P - 1) * m`` for ``m`` bytes per rank; ring
all-reduce: ``2 * (P - 1) * ceil(n / P)`` elements; all-to-all: the bytes addressed to
other ranks). The same formulas produce the ``bytes_sent`` statistics after the call,
with the real sizes filled in.

* ``allgather``: every rank receives every rank's ``k`` entries: ``(P-1) * k * e``.
* ``reduce_scatter`` (after Ok-Topk, Li & Hoefler 2022): entries go to the rank owning
  their shard of ``[0, numel)`` (about ``k * (P-1)/P`` entries sent), owners sum them and
  all-gather the summed shards back, each as its union of touched positions or as the
  dense shard, whichever is smaller: ``(P-1) * min(U_max * e_shard, ceil(n/P) * v)``
  where ``U_max`` is the largest number of distinct positions in one shard. The union
  is not known before the call; the model uses a hint (the last call's, from the
  compressor) or the pessimistic ``min(P * k, n) / P`` (no overlap between ranks).
* ``dense``: ring all-reduce of the densified selection in the value dtype.
* ``shared`` (every rank selects the same positions, a shared mask): ring all-reduce of
  the ``k`` values, ``2 (P-1) ceil(k/P) * v``, plus what the ranks spend agreeing on the
  positions (nothing for a mask derived from state every rank holds; a leader's positions
  or a small summed sketch otherwise). Constant in ``P``, where the all-gather grows as
  ``(P-1) k e``: at density 1% with bf16 values and 16-bit offsets the all-gather sends
  2% of a dense bf16 all-reduce's bytes at 2 ranks, 8% at 8, 32% at 32, 128% at 128; a
  shared mask sends 1% at every size.

With the compact codec (:mod:`distk.comm.codec`) entries are not a whole number of bytes:
the all-gather then costs ``(P-1) * payload_bytes`` with the codec's exact payload (ranges,
bit-packed values and indices), and is the only sparse scheme (summed shards would have
to be re-quantized).

Every scheme also pays one small metadata all-gather (:data:`META_FIELDS` + ``P`` int64
per rank), which checks that ranks agree and carries the reduce-scatter routing counts.
"""

from __future__ import annotations

import math

from distk.comm.group import ring_allreduce_bytes
from distk.comm.wire import index_dtype_for

__all__ = ["LOCAL_SCHEMES", "META_FIELDS", "SCHEMES", "choose_scheme", "scheme_bytes"]

SCHEMES = ("allgather", "reduce_scatter", "dense", "shared")
"""Exchange schemes, in tie-break order."""

LOCAL_SCHEMES = SCHEMES[:3]
"""The schemes in which every rank sends its own selection (a local mask)."""

META_FIELDS = 12
"""int64 header fields of the metadata exchanged before every call (plus ``P`` counts)."""


def index_bytes_for(limit: int) -> int:
    """Bytes of an absolute index into ``limit`` positions (16/32/64-bit)."""
    return index_dtype_for(limit).itemsize


def meta_bytes(world_size: int) -> int:
    """Bytes one rank transmits for the metadata all-gather."""
    return (world_size - 1) * (META_FIELDS + world_size) * 8


def shard_size(numel: int, world_size: int) -> int:
    """Entries per shard of the reduce-scatter scheme (the last shard may be shorter)."""
    return math.ceil(numel / world_size)


def scheme_bytes(numel: int, k: int, world_size: int, index_bytes: int | float,
                 value_bytes: int | float, union_per_shard: float | None = None,
                 payload_bytes: int | None = None,
                 shared_overhead: int | None = None) -> dict[str, int]:
    """Modelled bytes one rank transmits for each scheme.

    Args:
        numel, k, world_size: tensor size, entries per rank, ranks.
        index_bytes, value_bytes: sizes of one index and one value in the all-gather
            wire format.
        union_per_shard: expected largest number of distinct selected positions in one
            shard (reduce-scatter); ``None`` = assume no overlap between ranks.
        payload_bytes: exact bytes of one rank's all-gather payload when entries are
            bit-packed (compact codec); ``None`` = ``k * (index_bytes + value_bytes)``.
        shared_overhead: bytes one rank transmits, per call, for the ranks to agree on a
            shared mask (0 when the mask comes from state every rank already holds; a
            leader's positions, a summed sketch otherwise). ``None``: no shared mask is
            possible (e.g. values in a codec that does not sum), and ``"shared"`` is left
            out of the result.
    """
    p = world_size
    if p <= 1:
        costs = dict.fromkeys(LOCAL_SCHEMES, 0)
        if shared_overhead is not None:
            costs["shared"] = 0
        return costs
    meta = meta_bytes(p)
    shard = shard_size(numel, p)
    shard_entry = index_bytes_for(shard) + value_bytes
    if union_per_shard is None:
        union_per_shard = min(p * k, numel) / p
    union_per_shard = min(float(union_per_shard), float(shard))
    phase1 = math.ceil(k * (p - 1) / p) * shard_entry
    phase2 = (p - 1) * min(math.ceil(union_per_shard) * shard_entry, shard * value_bytes)
    costs = {
        "allgather": meta + math.ceil((p - 1) * (k * (index_bytes + value_bytes)
                                                 if payload_bytes is None else payload_bytes)),
        "reduce_scatter": meta + (p - 1) * 8 + math.ceil(phase1 + phase2),
        "dense": meta + ring_allreduce_bytes(numel, p, value_bytes),
    }
    if shared_overhead is not None:
        costs["shared"] = meta + ring_allreduce_bytes(k, p, value_bytes) + shared_overhead
    return costs


def choose_scheme(numel: int, k: int, world_size: int, index_bytes: int | float,
                  value_bytes: int | float, union_per_shard: float | None = None,
                  shared_overhead: int | None = None) -> str:
    """The scheme with the fewest modelled bytes (ties: the earlier in :data:`SCHEMES`);
    ``"shared"`` only when ``shared_overhead`` is given."""
    costs = scheme_bytes(numel, k, world_size, index_bytes, value_bytes, union_per_shard,
                         shared_overhead=shared_overhead)
    return min(costs, key=lambda s: (costs[s], SCHEMES.index(s)))
