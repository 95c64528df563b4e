"""Plain-PyTorch reference for bucketed top-k: the definition every fast path is held to.

Semantics, for a 2-D input ``x`` of shape ``(rows, n)``, selecting along the last dim:

* **Score.** ``|x|`` (``by_magnitude=True``) or ``x``. NaN ranks above every number
  (as in ``torch.topk``); the sign of a NaN is ignored.
* **Order.** Entries are totally ordered by (score descending, position ascending), so
  ties go to the lower index and the result is fully deterministic. This order is
  encoded in one int64 "composite key" per entry (see :func:`composite_keys`).
* **Buckets.** ``b`` buckets of balanced size (``ceil(n/b)`` or ``floor(n/b)``):
  interleaved (position ``i`` in bucket ``i % b``) or contiguous (bucket ``j`` holds
  positions ``[j*n//b, (j+1)*n//b)``). Each keeps its ``k_per_bucket`` largest entries.
  A bucket with fewer entries than that pads with a key below every real entry.
* **Second stage.** The exact top-``k`` of the ``b * k_per_bucket`` candidates.
  Balanced buckets guarantee at least ``min(n, b * k_per_bucket) >= k`` real
  candidates, so padding is never selected.
* **Output.** ``k`` positions per row, sorted by the order above.
"""

from __future__ import annotations

import torch

PAD_KEY = torch.iinfo(torch.int64).min
"""Composite key of a padding slot: below the key of every real entry."""

_INT32_MAX = 0x7FFFFFFF
_POS_MASK = 0xFFFFFFFF


def order_keys(x: torch.Tensor, by_magnitude: bool) -> torch.Tensor:
    """int32 keys whose integer order is the score order (NaN largest)."""
    bits = x.float().view(torch.int32)
    if by_magnitude:
        key = bits & _INT32_MAX
    else:
        # Flip the magnitude bits of negatives so that integer order matches float order.
        key = bits ^ ((bits >> 31) & _INT32_MAX)
    nan = (bits & _INT32_MAX) > 0x7F800000
    return torch.where(nan, torch.full_like(key, _INT32_MAX), key)


def composite_keys(x: torch.Tensor, by_magnitude: bool) -> torch.Tensor:
    """int64 keys: high 32 bits the score key, low 32 bits ``2^32 - 1 - position``."""
    n = x.shape[-1]
    pos = torch.arange(n, device=x.device, dtype=torch.int64)
    return (order_keys(x, by_magnitude).to(torch.int64) << 32) | (_POS_MASK - pos)


def positions_of(keys: torch.Tensor) -> torch.Tensor:
    """Positions encoded in composite keys."""
    return _POS_MASK - (keys & _POS_MASK)


def bucket_positions(n: int, buckets: int, interleaved: bool,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """``(buckets, ceil(n/buckets))`` positions of each bucket's entries; -1 marks padding."""
    length = -(-n // buckets)
    slot = torch.arange(length, device=device)
    bucket = torch.arange(buckets, device=device)
    if interleaved:
        pos = slot[None, :] * buckets + bucket[:, None]
        return torch.where(pos < n, pos, -1)
    start = bucket * n // buckets
    size = (bucket + 1) * n // buckets - start
    pos = start[:, None] + slot[None, :]
    return torch.where(slot[None, :] < size[:, None], pos, -1)


def bucket_candidates_reference(x: torch.Tensor, buckets: int, k_per_bucket: int,
                                interleaved: bool = True, by_magnitude: bool = True,
                                floor: torch.Tensor | None = None) -> torch.Tensor:
    """First stage: ``(rows, buckets, min(k_per_bucket, ceil(n/buckets)))`` composite keys
    of each bucket's top entries, sorted descending; padding slots hold ``PAD_KEY``.

    ``floor`` (optional, ``(rows,)`` int32 score keys): entries whose score key is not
    above their row's floor are treated as padding. ``distk.topk`` uses it to skip work
    on entries that cannot reach the final top-k (and checks that they could not)."""
    rows, n = x.shape
    pos = bucket_positions(n, buckets, interleaved, x.device)
    keys = composite_keys(x, by_magnitude)
    if floor is not None:
        below = (keys >> 32) <= floor.to(torch.int64)[:, None]
        keys = torch.where(below, torch.full_like(keys, PAD_KEY), keys)
    gathered = keys[:, pos.clamp(min=0)]
    gathered = torch.where(pos >= 0, gathered, torch.full_like(gathered, PAD_KEY))
    kept = min(k_per_bucket, pos.shape[1])
    return torch.topk(gathered, kept, dim=-1).values


def second_stage(candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Exact top-``k`` positions among ``(rows, ...)`` candidate keys, sorted."""
    flat = candidates.reshape(candidates.shape[0], -1)
    return positions_of(torch.topk(flat, k, dim=-1).values)


def bucketed_topk_reference(x: torch.Tensor, k: int, buckets: int, k_per_bucket: int,
                            interleaved: bool = True, by_magnitude: bool = True) -> torch.Tensor:
    """Positions ``(rows, k)`` (int64) selected by bucketed top-k of a 2-D ``x``."""
    candidates = bucket_candidates_reference(x, buckets, k_per_bucket, interleaved, by_magnitude)
    return second_stage(candidates, k)
