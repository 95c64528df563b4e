"""Triton kernels of the first stage, chosen automatically for CUDA tensors.

The result is defined by ``reference.bucket_candidates_reference``: per bucket, the
``kept`` largest composite keys (score key in the high 32 bits, ``2^32 - 1 - position``
in the low 32), sorted descending, ``PAD_KEY`` where a bucket has fewer entries. Composite
keys are unique and totally ordered, so any split of the work merges back exactly.

Three kernels, combined by :func:`plan_launches` (the launch spec: one function maps
``(dtype, shape, plan, SM count)`` to every kernel's constexprs, grid and warps; the
launcher and the ahead-of-time compile test both use it):

* ``compact`` (with a score floor, the common case on long rows): each program streams a
  tile of ``TILE_T`` bucket slots x ``BLOCK_B`` buckets of one row segment (coalesced
  loads), and appends the rare entries above the row's floor to their bucket's candidate
  list (an atomic counter per bucket). One read of the input, about ten integer
  operations per element: bandwidth-bound. A bucket whose list overflows its capacity
  is reported, and its row is redone without the floor.
* ``stream`` (no floor, ``kept <= 64``): each program keeps the top ``KEPT_P2`` composite
  keys of ``BLOCK_B`` buckets over one segment of the bucket slots in registers
  (replace-the-minimum); segments split long rows so that the grid fills the chip.
* ``select``: per bucket, sorts up to ``M_P2`` keys and writes the top ``kept``: the
  ``compact`` lists, the ``stream`` segments, or (``SOURCE_DIRECT``) the whole bucket read
  straight from the input when it holds at most 1024 entries.

Everything else (``kept > 64`` on long buckets with no floor) runs the plain-PyTorch
reference on the GPU. A floor whose candidate lists would exceed ``MAX_SELECT_P2`` keys
is not used (the floor only ever saves work: callers get the same final result).
Tested under ``TRITON_INTERPRET=1`` against ``reference.py`` and compiled ahead of time
for sm_80 and sm_90 in ``tests/test_triton_compile.py``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from distk.selection.reference import PAD_KEY, bucket_candidates_reference
from distk.selection.triton_common import (
    INPUT_DTYPES,
    KEY_MAX,
    PAD,
    KernelLaunch,
    composite,
    p2,
    run_launch,
    score_key,
)
from distk.selection.triton_flat import FLAT_KERNELS, all_flat_variants

__all__ = [
    "KERNELS",
    "KernelLaunch",
    "SOURCE_CANDIDATES",
    "SOURCE_COUNTED",
    "SOURCE_DIRECT",
    "all_launch_variants",
    "bucket_candidates_triton",
    "plan_launches",
]

_PAD = PAD
_KEY_MAX = KEY_MAX
_score_key = score_key
_composite = composite

SOURCE_COUNTED = 0
"""``select`` reads ``compact``'s lists, ``count`` valid keys per bucket."""
SOURCE_CANDIDATES = 1
"""``select`` reads ``stream``'s segment outputs (all slots valid, PAD-padded)."""
SOURCE_DIRECT = 2
"""``select`` reads the bucket's entries straight from the input."""

# Tunables (see docs/selection.md, "GPU kernels and their bandwidth model").
COMPACT_TILE = {(True, 4): (16, 128), (True, 2): (8, 128), (False, 4): (64, 16),
                (False, 2): (64, 16)}
"""``(slot rows, buckets)`` of a ``compact`` tile by (interleaved, input bytes per entry):
the fastest of those timed by ``benchmarks/gpu_tune.py`` on an H200. Contiguous buckets
put the slot axis last, so that loads stay coalesced."""
MAX_STREAM_KEPT_P2 = 16
"""Largest power-of-two slot count the register kernel holds per bucket."""
STREAM_SLOTS_PER_PROGRAM = 2048
"""``BLOCK_B * KEPT_P2`` of a ``stream`` program (bounds its registers)."""
SELECT_ELEMENTS_PER_PROGRAM = 2048
"""``BLOCK_M * M_P2`` keys sorted by one ``select`` program."""
MIN_SELECT_P2 = 16
"""Smallest sort width of ``select`` (narrower lists are padded: fewer variants)."""
MAX_SELECT_P2 = 2048
"""Widest sort of ``select`` (candidate lists and stream segments)."""
MAX_DIRECT_P2 = 1024
"""Buckets of at most this many entries are sorted whole, straight from the input."""
PROGRAMS_PER_SM = 8
"""Target number of programs per SM when choosing how many segments split a row."""
MIN_SEGMENT_SLOTS = 64
"""Fewest bucket slots per segment (below that the per-program overhead dominates)."""
@triton.jit
def _compact_kernel(x_ptr, floor_ptr, cand_ptr, count_ptr, n, buckets, length, seg_len,
                    blocks, cap, by_magnitude,
                    TILE_T: tl.constexpr, BLOCK_B: tl.constexpr, INTERLEAVED: tl.constexpr):
    pid = tl.program_id(0)
    row = (pid // blocks).to(tl.int64)
    bucket = (pid % blocks) * BLOCK_B + tl.arange(0, BLOCK_B)
    bucket_ok = bucket < buckets
    t_start = tl.program_id(1) * seg_len
    t_end = tl.minimum(t_start + seg_len, length)
    floor = tl.load(floor_ptr + row)
    row_ptr = x_ptr + row * n
    count_row = count_ptr + row * buckets
    cand_row = cand_ptr + row * buckets * cap
    if INTERLEAVED:
        # Tile (TILE_T, BLOCK_B): each slot row is BLOCK_B adjacent entries. The next
        # tile's load is issued before this tile is processed (Triton pipelines only
        # loads that feed tl.dot): twice the bytes in flight per program.
        lane = tl.arange(0, TILE_T)
        slot = t_start + lane
        pos = slot[:, None] * buckets + bucket[None, :]
        ok = bucket_ok[None, :] & (slot[:, None] < t_end) & (pos < n)
        value = tl.load(row_ptr + pos, mask=ok, other=0.0)
        for t in range(t_start, t_end, TILE_T):
            ahead = t + TILE_T + lane
            ahead_pos = ahead[:, None] * buckets + bucket[None, :]
            ahead_ok = bucket_ok[None, :] & (ahead[:, None] < t_end) & (ahead_pos < n)
            ahead_value = tl.load(row_ptr + ahead_pos, mask=ahead_ok, other=0.0)
            slot = t + lane
            pos = slot[:, None] * buckets + bucket[None, :]
            ok = bucket_ok[None, :] & (slot[:, None] < t_end) & (pos < n)
            key = _score_key(value, by_magnitude)
            hit = ok & (key > floor)
            target = bucket[None, :] + tl.zeros_like(pos)
            index = tl.atomic_add(count_row + target, 1, mask=hit, sem="relaxed")
            tl.store(cand_row + target.to(tl.int64) * cap + index, _composite(key, pos),
                     mask=hit & (index < cap))
            value = ahead_value
    else:
        # Tile (BLOCK_B, TILE_T): each bucket's slots are adjacent.
        start = (bucket.to(tl.int64) * n // buckets)
        size = ((bucket.to(tl.int64) + 1) * n // buckets) - start
        for t in range(t_start, t_end, TILE_T):
            slot = t + tl.arange(0, TILE_T)
            ok = bucket_ok[:, None] & (slot[None, :] < t_end) & (slot[None, :] < size[:, None])
            pos = start[:, None] + slot[None, :]
            key = _score_key(tl.load(row_ptr + pos, mask=ok, other=0.0), by_magnitude)
            hit = ok & (key > floor)
            target = bucket[:, None] + tl.zeros_like(slot)[None, :]
            index = tl.atomic_add(count_row + target, 1, mask=hit, sem="relaxed")
            tl.store(cand_row + target.to(tl.int64) * cap + index, _composite(key, pos),
                     mask=hit & (index < cap))


@triton.jit
def _stream_kernel(x_ptr, cand_ptr, n, buckets, length, seg_len, blocks, segments, kept,
                   by_magnitude,
                   KEPT_P2: tl.constexpr, BLOCK_B: tl.constexpr, INTERLEAVED: tl.constexpr):
    pid = tl.program_id(0)
    row = (pid // blocks).to(tl.int64)
    bucket = (pid % blocks) * BLOCK_B + tl.arange(0, BLOCK_B)
    bucket_ok = bucket < buckets
    segment = tl.program_id(1)
    t_start = segment * seg_len
    t_end = tl.minimum(t_start + seg_len, length)
    slot = tl.arange(0, KEPT_P2)
    # Slots past `kept` hold the largest key, so they are never the one replaced.
    slots = tl.where(slot[None, :] < kept, tl.full((BLOCK_B, KEPT_P2), _PAD, tl.int64),
                     tl.full((BLOCK_B, KEPT_P2), _KEY_MAX, tl.int64))
    row_ptr = x_ptr + row * n
    if INTERLEAVED:
        start = bucket.to(tl.int64)
        size = n
    else:
        start = bucket.to(tl.int64) * n // buckets
        size = (bucket.to(tl.int64) + 1) * n // buckets - start
    for t in range(t_start, t_end):
        if INTERLEAVED:
            pos = start + t * buckets
            ok = bucket_ok & (pos < n)
        else:
            pos = start + t
            ok = bucket_ok & (t < size)
        key = _score_key(tl.load(row_ptr + pos, mask=ok, other=0.0), by_magnitude)
        composite = _composite(key, pos)
        smallest = tl.min(slots, axis=1)
        take = ok & (composite > smallest)
        column = tl.argmin(slots, axis=1)
        replace = (slot[None, :] == column[:, None]) & take[:, None]
        slots = tl.where(replace, composite[:, None], slots)
    slots = tl.where(slot[None, :] < kept, slots, tl.full((BLOCK_B, KEPT_P2), _PAD, tl.int64))
    out = (cand_ptr + ((row * buckets + bucket[:, None]) * segments + segment) * KEPT_P2
           + slot[None, :])
    tl.store(out, slots, mask=bucket_ok[:, None])


@triton.jit
def _select_kernel(src_ptr, count_ptr, x_ptr, out_ptr, overflow_ptr, n, buckets, blocks,
                   width, kept, by_magnitude,
                   M_P2: tl.constexpr, BLOCK_M: tl.constexpr, SOURCE: tl.constexpr,
                   INTERLEAVED: tl.constexpr):
    pid = tl.program_id(0)
    row = (pid // blocks).to(tl.int64)
    bucket = (pid % blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    bucket_ok = bucket < buckets
    j = tl.arange(0, M_P2)
    flat_bucket = row * buckets + bucket
    if SOURCE == 2:
        if INTERLEAVED:
            pos = j[None, :].to(tl.int64) * buckets + bucket[:, None]
            valid = bucket_ok[:, None] & (pos < n)
        else:
            start = bucket.to(tl.int64) * n // buckets
            size = (bucket.to(tl.int64) + 1) * n // buckets - start
            pos = start[:, None] + j[None, :]
            valid = bucket_ok[:, None] & (j[None, :] < size[:, None])
        value = tl.load(x_ptr + row * n + pos, mask=valid, other=0.0)
        keys = tl.where(valid, _composite(_score_key(value, by_magnitude), pos), _PAD)
    else:
        if SOURCE == 0:
            count = tl.load(count_ptr + flat_bucket, mask=bucket_ok, other=0)
            # An overflowing list lost entries: its row is redone without the floor.
            tl.store(overflow_ptr + row + tl.zeros_like(bucket), 1,
                     mask=bucket_ok & (count > width))
            valid = bucket_ok[:, None] & (j[None, :] < tl.minimum(count, width)[:, None])
        else:
            valid = bucket_ok[:, None] & (j[None, :] < width)
        keys = tl.load(src_ptr + flat_bucket[:, None] * width + j[None, :], mask=valid,
                       other=_PAD)
    keys = tl.sort(keys, dim=1, descending=True)
    tl.store(out_ptr + flat_bucket[:, None] * kept + j[None, :], keys,
             mask=bucket_ok[:, None] & (j[None, :] < kept))


KERNELS = {"compact": _compact_kernel, "stream": _stream_kernel, "select": _select_kernel,
           **FLAT_KERNELS}
"""Every Triton kernel of the first stage by name: the default launch spec's and the
flat kernels of ``triton_flat.py`` (selectable)."""
# Runtime arguments of each kernel and their Triton types (for ahead-of-time compiles);
# ``*x`` is the input's element type.
_PARAMS = {
    "compact": (("x_ptr", "*x"), ("floor_ptr", "*i32"), ("cand_ptr", "*i64"),
                ("count_ptr", "*i32"), ("n", "i32"), ("buckets", "i32"), ("length", "i32"),
                ("seg_len", "i32"), ("blocks", "i32"), ("cap", "i32"),
                ("by_magnitude", "i32")),
    "stream": (("x_ptr", "*x"), ("cand_ptr", "*i64"), ("n", "i32"), ("buckets", "i32"),
               ("length", "i32"), ("seg_len", "i32"), ("blocks", "i32"),
               ("segments", "i32"), ("kept", "i32"), ("by_magnitude", "i32")),
    "select": (("src_ptr", "*i64"), ("count_ptr", "*i32"), ("x_ptr", "*x"),
               ("out_ptr", "*i64"), ("overflow_ptr", "*i32"), ("n", "i32"),
               ("buckets", "i32"), ("blocks", "i32"), ("width", "i32"), ("kept", "i32"),
               ("by_magnitude", "i32")),
}


@dataclass(frozen=True)
class LaunchPlan:
    """How :func:`bucket_candidates_triton` computes one first stage."""

    path: str  # "compact", "stream", "direct" or "reference"
    launches: tuple[KernelLaunch, ...]
    cap: int = 0  # compact: candidate list capacity per bucket
    segments: int = 1  # stream: segments per row


_p2 = p2


def _segments(rows: int, programs_per_segment: int, length: int, sm_count: int,
              limit: int) -> int:
    """Segments per row: enough programs to fill the chip, segments of at least
    ``MIN_SEGMENT_SLOTS`` slots, a power of two up to ``limit``."""
    want = PROGRAMS_PER_SM * sm_count
    segments = 1
    while (rows * programs_per_segment * segments < want and segments * 2 <= limit
           and length // (segments * 2) >= MIN_SEGMENT_SLOTS):
        segments *= 2
    return segments


def _select_launch(rows: int, buckets: int, m_p2: int, source: int, interleaved: bool,
                   dtype: torch.dtype, args: dict) -> KernelLaunch:
    m_p2 = max(MIN_SELECT_P2, m_p2)
    block_m = max(1, SELECT_ELEMENTS_PER_PROGRAM // m_p2)
    blocks = triton.cdiv(buckets, block_m)
    direct = source == SOURCE_DIRECT
    return KernelLaunch(
        "select", (("M_P2", m_p2), ("BLOCK_M", block_m), ("SOURCE", source),
                   ("INTERLEAVED", bool(interleaved) if direct else True)),
        (rows * blocks, 1), 4 if m_p2 <= 1024 else 8, dtype if direct else torch.float32,
        tuple({**args, "blocks": blocks}.items()), _PARAMS["select"])


def compact_capacity(above_per_bucket: float) -> int:
    """Candidate list capacity for ``above_per_bucket`` entries above the floor (an upper
    estimate): six Poisson standard deviations plus 16 more, as a power of two. An
    overflow costs a redo of the row, never a wrong result."""
    return max(MIN_SELECT_P2, _p2(above_per_bucket + 6 * above_per_bucket**0.5 + 16))


@functools.lru_cache(maxsize=1024)  # pure, and on every call's host path
def plan_launches(rows: int, n: int, buckets: int, k_per_bucket: int, interleaved: bool,
                  by_magnitude: bool, has_floor: bool, sm_count: int,
                  above_per_bucket: float | None = None,
                  dtype: torch.dtype = torch.float32) -> LaunchPlan:
    """The launch spec: every kernel launch of one first stage, as data.

    Args:
        rows, n: input shape (contiguous ``(rows, n)``).
        buckets, k_per_bucket: the plan (``kept = min(k_per_bucket, ceil(n / buckets))``).
        has_floor: a per-row score floor is given (``compact`` path).
        sm_count: streaming multiprocessors of the device (segments fill the chip).
        above_per_bucket: expected entries per bucket above the floor (sizes the lists;
            default: the bucket length, i.e. never overflows).
        dtype: input dtype (one of :data:`INPUT_DTYPES`).
    """
    length = -(-n // buckets)
    kept = min(k_per_bucket, length)
    common = {"n": n, "buckets": buckets, "by_magnitude": int(by_magnitude)}
    if has_floor:
        expected = length if above_per_bucket is None else above_per_bucket
        # select sorts lists of `cap` keys and writes the top `kept`: a list narrower than
        # kept would leave slots of the output unwritten.
        cap = max(min(compact_capacity(expected), _p2(length)), _p2(kept))
        if cap <= MAX_SELECT_P2:
            tile_t, block_b = COMPACT_TILE[(bool(interleaved), min(dtype.itemsize, 4))]
            blocks = triton.cdiv(buckets, block_b)
            segments = _segments(rows, blocks, length, sm_count, limit=1 << 16)
            seg_len = -(-length // segments)
            compact = KernelLaunch(
                "compact", (("TILE_T", tile_t), ("BLOCK_B", block_b),
                            ("INTERLEAVED", bool(interleaved))),
                (rows * blocks, segments), 4, dtype,
                tuple({**common, "length": length, "seg_len": seg_len, "blocks": blocks,
                       "cap": cap}.items()), _PARAMS["compact"])
            select = _select_launch(rows, buckets, cap, SOURCE_COUNTED, True, dtype,
                                    {**common, "width": cap, "kept": kept})
            return LaunchPlan("compact", (compact, select), cap=cap)
    kept_p2 = _p2(kept)
    length_p2 = _p2(length)
    sort_stages = length_p2.bit_length() * (length_p2.bit_length() - 1) // 2
    # Sorting a whole bucket costs about `sort_stages` compare-exchanges per entry, the
    # register kernel a few operations per kept slot: sort when that is cheaper.
    if length_p2 <= MAX_DIRECT_P2 and (sort_stages <= 2 * kept_p2
                                       or kept_p2 > MAX_STREAM_KEPT_P2):
        select = _select_launch(rows, buckets, _p2(length), SOURCE_DIRECT, interleaved, dtype,
                                {**common, "width": 0, "kept": kept})
        return LaunchPlan("direct", (select,))
    if kept_p2 <= MAX_STREAM_KEPT_P2:
        # Few sizes (fewer compiled variants): the smallest that covers the buckets.
        sizes = [b for b in (16, 64, 256) if b * kept_p2 <= STREAM_SLOTS_PER_PROGRAM]
        block_b = next((b for b in sizes if b >= buckets), sizes[-1])
        blocks = triton.cdiv(buckets, block_b)
        segments = _segments(rows, blocks, length, sm_count,
                             limit=MAX_SELECT_P2 // max(kept_p2, 1))
        seg_len = -(-length // segments)
        stream = KernelLaunch(
            "stream", (("KEPT_P2", kept_p2), ("BLOCK_B", block_b),
                       ("INTERLEAVED", bool(interleaved))),
            (rows * blocks, segments), 4, dtype,
            tuple({**common, "length": length, "seg_len": seg_len, "blocks": blocks,
                   "segments": segments, "kept": kept}.items()), _PARAMS["stream"])
        select = _select_launch(rows, buckets, segments * kept_p2, SOURCE_CANDIDATES, True,
                                dtype, {**common, "width": segments * kept_p2, "kept": kept})
        return LaunchPlan("stream", (stream, select), segments=segments)
    return LaunchPlan("reference", ())


def all_launch_variants() -> Iterator[KernelLaunch]:
    """Every distinct compiled kernel :func:`plan_launches` (and the flat kernels'
    launch specs) can produce, found by walking their branches over every input dtype: the
    compile test builds each of them for sm_80 and sm_90."""
    seen = set()
    lengths = [2**e for e in range(0, 15)] + [3, 1000, 1025, 5000]
    for length, kept, interleaved, has_floor, dtype in itertools.product(
            lengths, [1, 2, 3, 5, 8, 12, 16, 24, 32, 48, 64, 100, 200, 500, 1000],
            (True, False), (True, False), INPUT_DTYPES):
        if kept > length:
            continue
        for above, buckets in itertools.product(
                (None, 1.0, kept + 6 * kept**0.5 + 4, 200.0, 1000.0), (7, 20, 50, 100, 5000)):
            for rows, sm_count in ((1, 132), (256, 132)):
                plan = plan_launches(rows, length * buckets, buckets, kept, interleaved, True,
                                     has_floor, sm_count, above, dtype)
                for launch in plan.launches:
                    if launch.variant() not in seen:
                        seen.add(launch.variant())
                        yield launch
    yield from all_flat_variants()


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: segments are exercised by the tests' own settings
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _launch(spec: KernelLaunch, tensors: dict[str, torch.Tensor]) -> None:
    run_launch(KERNELS[spec.kernel], spec, tensors)


def bucket_candidates_triton(x: torch.Tensor, buckets: int, k_per_bucket: int,
                             interleaved: bool = True, by_magnitude: bool = True,
                             floor: torch.Tensor | None = None,
                             above_per_bucket: float | None = None,
                             sm_count: int | None = None,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """First stage on a 2-D tensor; same result as
    ``reference.bucket_candidates_reference`` (with the same ``floor``).

    ``above_per_bucket``: expected entries per bucket above ``floor`` (sizes the
    candidate lists; a row whose list overflows comes back as all padding, which the
    callers redo without the floor: it changes the work, never the result).
    ``sm_count`` overrides the device's (tests). ``out``: an int64
    ``(rows, buckets, kept)`` tensor to write into (tests poison it first).
    """
    if x.dtype not in INPUT_DTYPES:
        x = x.float()  # fp64: scores compare at fp32 precision, as in the reference
    x = x.contiguous()
    rows, n = x.shape
    if n >= 2**31 - buckets:
        raise ValueError(f"the Triton kernel handles rows of fewer than 2^31 entries, got {n}")
    length = -(-n // buckets)
    kept = min(k_per_bucket, length)
    if sm_count is None:
        sm_count = _device_sm_count(x.device)
    plan = plan_launches(rows, n, buckets, k_per_bucket, interleaved, by_magnitude,
                         floor is not None, sm_count, above_per_bucket, x.dtype)
    if out is None:
        out = torch.empty(rows, buckets, kept, dtype=torch.int64, device=x.device)
    elif out.shape != (rows, buckets, kept) or out.dtype != torch.int64 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous int64 tensor of shape {(rows, buckets, kept)}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    if plan.path == "reference":
        return out.copy_(bucket_candidates_reference(x, buckets, k_per_bucket, interleaved,
                                                     by_magnitude, floor))
    tensors = {"x": x, "out": out, "src": out, "count": out, "floor": out, "cand": out,
               "overflow": out}
    overflow = None
    if plan.path == "compact":
        tensors["floor"] = floor.to(device=x.device, dtype=torch.int32).contiguous()
        tensors["cand"] = tensors["src"] = torch.empty(rows * buckets * plan.cap,
                                                       dtype=torch.int64, device=x.device)
        tensors["count"] = torch.zeros(rows * buckets, dtype=torch.int32, device=x.device)
        overflow = tensors["overflow"] = torch.zeros(rows, dtype=torch.int32, device=x.device)
    elif plan.path == "stream":
        tensors["cand"] = tensors["src"] = torch.empty(
            rows * buckets * dict(plan.launches[1].args)["width"], dtype=torch.int64,
            device=x.device)
    for launch in plan.launches:
        _launch(launch, tensors)
    if overflow is not None:
        # Rows with an overflowing list become all padding, which every caller of a
        # floored first stage already redoes without the floor (no host sync here).
        out.masked_fill_(overflow.bool()[:, None, None], PAD_KEY)
    return out
