"""Triton kernel of the first stage, chosen automatically for CUDA tensors.

One program owns ``BLOCK_B`` buckets of one row and walks down the bucket slots: for
interleaved buckets, step ``t`` loads the ``BLOCK_B`` adjacent entries
``t*buckets + j`` (one coalesced load), fuses ``|x|`` and the NaN rule into an int32 score
key, and keeps each bucket's ``k_per_bucket`` best composite keys in registers: a new
entry replaces the bucket's smallest kept key when it beats it (keys are unique, so this
matches the reference's order exactly). The kept keys are sorted at the end.

Tested on the CPU under ``TRITON_INTERPRET=1`` (set before this module is imported)
against ``reference.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_PAD = -(2**63)
_INT64_MAX = 2**63 - 1


@triton.jit
def _bucket_candidates_kernel(x_ptr, out_ptr, floor_ptr, n, buckets, length,
                              KEPT: tl.constexpr, KEPT_P2: tl.constexpr,
                              BLOCK_B: tl.constexpr, INTERLEAVED: tl.constexpr,
                              BY_MAGNITUDE: tl.constexpr, HAS_FLOOR: tl.constexpr):
    row = tl.program_id(1).to(tl.int64)
    bucket = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    bucket_ok = bucket < buckets
    slot = tl.arange(0, KEPT_P2)
    pad = tl.full((BLOCK_B, KEPT_P2), _PAD, tl.int64)
    # Slots past KEPT (padding to a power of two) hold the maximum key: never evicted.
    slots = tl.where(slot[None, :] < KEPT, pad, tl.full((BLOCK_B, KEPT_P2), _INT64_MAX, tl.int64))
    if HAS_FLOOR:
        floor = tl.load(floor_ptr + row)
    else:
        floor = -2147483648
    row_ptr = x_ptr + row * n
    if INTERLEAVED:
        start = bucket.to(tl.int64)
        end = n
    else:
        start = bucket.to(tl.int64) * n // buckets
        end = (bucket.to(tl.int64) + 1) * n // buckets
    for t in range(0, length):
        if INTERLEAVED:
            pos = t * buckets + start
        else:
            pos = start + t
        ok = bucket_ok & (pos < end)
        value = tl.load(row_ptr + pos, mask=ok, other=0.0).to(tl.float32)
        bits = value.to(tl.int32, bitcast=True)
        abs_bits = bits & 0x7FFFFFFF
        if BY_MAGNITUDE:
            key = abs_bits
        else:
            key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        key = tl.where(abs_bits > 0x7F800000, 0x7FFFFFFF, key)   # NaN ranks largest
        composite = (key.to(tl.int64) << 32) | (4294967295 - pos)
        smallest = tl.min(slots, axis=1)
        take = ok & (key > floor) & (composite > smallest)
        column = tl.argmin(slots, axis=1)
        replace = (slot[None, :] == column[:, None]) & take[:, None]
        slots = tl.where(replace, composite[:, None], slots)
    slots = tl.where(slot[None, :] < KEPT, slots, pad)
    slots = tl.sort(slots, dim=1, descending=True)
    out = out_ptr + (row * buckets + bucket[:, None]) * KEPT + slot[None, :]
    tl.store(out, slots, mask=bucket_ok[:, None] & (slot[None, :] < KEPT))


def bucket_candidates_triton(x: torch.Tensor, buckets: int, k_per_bucket: int,
                             interleaved: bool = True, by_magnitude: bool = True,
                             floor: torch.Tensor | None = None) -> torch.Tensor:
    """First stage on a contiguous 2-D tensor; same result as
    ``reference.bucket_candidates_reference``."""
    x = x.contiguous()
    rows, n = x.shape
    length = -(-n // buckets)
    kept = min(k_per_bucket, length)
    out = torch.empty(rows, buckets, kept, dtype=torch.int64, device=x.device)
    kept_p2 = triton.next_power_of_2(kept)
    # Fewer buckets per program when each keeps many slots, to bound register use.
    block_b = max(16, min(256, 2048 // kept_p2))
    has_floor = floor is not None
    floor_arg = floor.to(torch.int32).contiguous() if has_floor else out
    grid = (triton.cdiv(buckets, block_b), rows)
    _bucket_candidates_kernel[grid](
        x, out, floor_arg, n, buckets, length,
        KEPT=kept, KEPT_P2=kept_p2, BLOCK_B=block_b, INTERLEAVED=interleaved,
        BY_MAGNITUDE=by_magnitude, HAS_FLOOR=has_floor,
    )
    return out
