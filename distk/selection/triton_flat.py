"""Flat-filter Triton kernels: a first stage that reads each row once, whatever its buckets.

The default for single rows on CUDA (``DISTK_TRITON_KERNEL=auto``), where an H200
measured them faster than ``triton_kernel.py``; ``flat`` selects them everywhere they
apply (see docs/selection.md). Held to ``reference.py`` under ``TRITON_INTERPRET=1`` and
on CUDA, compiled for sm_80 / sm_90; ``benchmarks/gpu_check.py`` times them beside the
other kernels, ``benchmarks/filter_probe.py`` takes the filter apart.

Long rows, with a score floor (:func:`flat_candidates`), one launch each:

* ``floor``: one program per row gathers the floor's sample (the blocks of
  ``distk.selection.floor_sample_columns``) into registers and finds its ``above + 1``-th
  largest score key by radix selection: four 8-bit digit histograms from the top, the
  scheme of FlashInfer's radix top-k and RAFT's AIR top-k. The result equals the host
  floor (``torch.kthvalue`` on the same sample) bit for bit. Given last step's floor
  (``floor_state``), it first counts the sample entries above that floor and keeps it
  when the count lies in a band around the target (Ok-Topk's threshold reuse), decided on
  the device.
* ``filter``: programs stream contiguous chunks of a row (one wide, coalesced read; the
  next tile's load is issued before the current tile is processed), compare every score
  key with the floor, and reserve output space once per tile: the tile's hit count, one
  atomic add on the row's counter, an exclusive prefix sum for the offsets. Hits go, as
  composite keys, to one buffer per row. Optionally ``x += add`` in the same pass.
  ``DISTK_TRITON_FILTER=words`` (``FILTERS``) replaces it by ``filter_words`` (the same
  pass, a tile's hits packed into 32-bit words, only the non-zero words listed: the
  prefix sum runs over words, not entries) and ``expand`` (the listed words back to the
  same composite keys).
* ``scatter``: the buffer's keys go to per-bucket lists (``pos % b`` or the contiguous
  bucket of ``pos``; one atomic per candidate, on about 1% of the row).
* ``finish``: per bucket, the list is sorted and its top ``kept`` keys written; a bucket
  is *bad* when its list overflowed, the row's buffer overflowed, or (packed selections,
  no second stage) fewer than ``kept`` entries cleared the floor.
* ``redo``: launched every time, and it exits at once when nothing is bad: the bad
  buckets (packed) or every bucket of a bad row (rows with a second stage, also bad when
  fewer than ``k`` candidates cleared the floor) are recomputed without the floor by a
  radix selection over the bucket's entries. The result is that of the reference with no
  floor, with no host synchronisation: every shape is a capacity fixed on the host.

Short rows (:func:`row_topk`, rows of at most ``ROW_MAX_N`` entries): one program per
row finds the ``m``-th largest score exactly by radix selection over the row (read in
chunks of ``ROW_CHUNK``; the passes after the first read it from L2), takes the ``m`` best
entries (ties to the lower position), applies the bucket cut to them (a candidate
survives when fewer than ``k_b`` candidates of its bucket beat it: pairwise
comparisons), sorts the survivors and writes the top ``k`` positions. ``m`` is chosen
from the recall model so that at least ``k`` survive; a row where fewer did is flagged,
and redone by the caller.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from distk.selection.recall import expected_recall
from distk.selection.triton_common import (
    INPUT_DTYPES,
    PAD,
    KernelLaunch,
    add_rounded,
    composite,
    ordered,
    p2,
    position_of,
    radix_select,
    run_launch,
    score_key,
    unordered,
)

__all__ = [
    "FLAT_KERNELS",
    "FlatCandidates",
    "FlatPlan",
    "all_flat_variants",
    "device_floor",
    "flat_candidates",
    "plan_flat",
    "plan_row",
    "row_topk",
]

# Tunables: chosen from the bandwidth model of docs/selection.md (16-byte loads, about 8 KB
# per tile and program in flight), then swept on an H200 (benchmarks/filter_probe.py:
# within 10% of each other for fp32; 4 warps 18% faster than 8 for fp16).
FILTER_BLOCK = {4: 1024, 2: 2048}
"""Entries per ``filter`` tile by input bytes per entry: 4 KB per tile, 8 KB in flight per
program with the next tile's load (fp32: eight entries per thread, two 16-byte loads;
fp16/bf16: sixteen, two loads)."""
FILTER_WARPS = {4: 4, 2: 4}
FILTER_PROGRAMS_PER_SM = 16
"""``filter`` programs per SM over all rows (chunks split long rows to fill the chip)."""
FILTERS = ("scan", "words")
"""First-pass variants (``DISTK_TRITON_FILTER``): ``scan``, the hits' offsets from a prefix
sum over each tile's entries (measured on an H200, the default); ``words``, a tile's hits
packed into 32-bit words, only the non-zero words listed, then expanded (not yet timed on
a GPU: ``benchmarks/gpu_check.py`` times both)."""
EXPAND_WORDS = 32
"""Words per step of an ``expand`` program (1024 bit lanes)."""
EXPAND_PROGRAMS_PER_SM = 8
SCATTER_BLOCK = 1024
"""Candidates per ``scatter`` program."""
FINISH_ELEMENTS_PER_PROGRAM = 2048
"""``BLOCK_M * M_P2`` keys sorted by one ``finish`` program (eight per thread)."""
FINISH_WARPS = 8
MIN_WIDTH = 16
"""Narrowest per-bucket list (fewer compiled variants)."""
MAX_WIDTH = 2048
"""Widest per-bucket list: wider plans use the default kernels."""
REDO_CHUNK = 1024
"""Bucket entries per iteration of the ``redo`` radix selection."""
REDO_PROGRAMS_PER_SM = 4
"""``redo`` programs per SM (they exit at once when nothing is bad)."""
ROW_MAX_N = 32768
"""Longest row held in registers by the ``row`` kernel."""
ROW_CHUNK = 2048
"""Row entries per step of the ``row`` kernel's radix selection (eight per thread)."""
ROW_WARPS = 8
ROW_M_SIZES = (256, 1024)
"""Candidate counts (powers of two) the ``row`` kernel holds; its bucket cut compares
every pair of candidates (``m^2`` operations per row)."""
ROW_RANK_ELEMENTS = 1024
"""Candidate pairs compared per step of the ``row`` kernel's cut (four per thread; eight
spilled on sm_80 at 256 candidates)."""
REUSE_BAND = (2.0, 3.0)
"""Last step's floor is kept when the sample holds between ``above - 2 sqrt(above)`` and
``above + 3 sqrt(above)`` entries above it (about one and two standard deviations of the
sample's noise beyond what the list capacities already allow for; a floor too high costs
redone buckets, one too low fuller lists)."""
MAX_GRID_Y = 65535  # CUDA's limit on a grid's second dimension
_SAMPLE_BLOCK = 256  # distk.selection._FLOOR_BLOCK (imported lazily: no import cycle)


# --- kernels ------------------------------------------------------------------------------


@triton.jit
def _floor_kernel(x_ptr, add_ptr, floor_ptr, n, blocks, rank, low, high, by_magnitude,
                  SAMPLE_P2: tl.constexpr, BLOCK: tl.constexpr, HAS_ADD: tl.constexpr,
                  HAS_PREVIOUS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, SAMPLE_P2)
    block = j // BLOCK
    valid = block < blocks
    # Integer starts, as distk.selection.floor_sample_columns; 32-bit columns (n < 2^31)
    # off a 64-bit row base keep the registers of 16 K addresses low.
    start = (block.to(tl.int64) * (n - BLOCK) // tl.maximum(blocks - 1, 1)).to(tl.int32)
    col = start + j % BLOCK
    value = tl.load(x_ptr + row * n + col, mask=valid, other=0.0)
    if HAS_ADD:
        value = add_rounded(value, tl.load(add_ptr + row * n + col, mask=valid, other=0.0),
                            x_ptr.dtype.element_ty)
    # Lanes past the sample hold 0, the smallest ordered key: below the rank asked for
    # (rank <= samples), and below any floor (no score key orders below it).
    u = tl.where(valid, ordered(score_key(value, by_magnitude)), 0)
    if HAS_PREVIOUS:
        floor = tl.load(floor_ptr + row)
        count = tl.sum((u > ordered(floor)).to(tl.int32), 0)
        if (count < low) | (count > high):
            threshold, _ = radix_select(u, valid, rank, False)
            floor = unordered(threshold)
    else:
        threshold, _ = radix_select(u, valid, rank, False)
        floor = unordered(threshold)
    tl.store(floor_ptr + row, floor)


@triton.jit
def _chunk_of(x_ptr, add_ptr, floor_ptr, n, chunk):
    """This program's row and chunk ``[start, end)``, the row's floor, and the row's
    bases in ``x`` and ``add``."""
    row = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * chunk
    return (row, start, tl.minimum(start + chunk, n), tl.load(floor_ptr + row),
            x_ptr + row * n, add_ptr + row * n)


@triton.jit
def _load_tile(row_ptr, add_row, offs, end, HAS_ADD: tl.constexpr):
    """A tile of the row (and of ``add`` when ``HAS_ADD``) at ``offs``, up to ``end``."""
    value = tl.load(row_ptr + offs, mask=offs < end, other=0.0)
    extra = tl.load(add_row + offs, mask=(offs < end) & HAS_ADD, other=0.0)
    return value, extra


@triton.jit
def _tile_hits(row_ptr, value, extra, offs, end, floor, by_magnitude, HAS_ADD: tl.constexpr):
    """Score keys of a tile (of ``value + extra``, written back, when ``HAS_ADD``) and
    which of them clear the floor."""
    ok = offs < end
    if HAS_ADD:
        value = add_rounded(value, extra, row_ptr.dtype.element_ty)
        tl.store(row_ptr + offs, value, mask=ok)
    key = score_key(value, by_magnitude)
    return key, ok & (key > floor)


@triton.jit
def _filter_kernel(x_ptr, add_ptr, floor_ptr, cand_ptr, count_ptr, n, chunk, row_cap,
                   by_magnitude, BLOCK: tl.constexpr, HAS_ADD: tl.constexpr):
    row, start, end, floor, row_ptr, add_row = _chunk_of(x_ptr, add_ptr, floor_ptr, n, chunk)
    cand_row = cand_ptr + row * row_cap
    lane = tl.arange(0, BLOCK)
    value, extra = _load_tile(row_ptr, add_row, start + lane, end, HAS_ADD)
    for tile in range(start, end, BLOCK):
        # The next tile's load is issued before this tile is processed (Triton pipelines
        # only loads that feed tl.dot): twice the bytes in flight per program.
        ahead_value, ahead_extra = _load_tile(row_ptr, add_row, tile + BLOCK + lane, end,
                                              HAS_ADD)
        offs = tile + lane
        key, hit = _tile_hits(row_ptr, value, extra, offs, end, floor, by_magnitude, HAS_ADD)
        hits = tl.sum(hit.to(tl.int32), 0)
        if hits > 0:
            # One reservation per tile; offsets from the tile's exclusive prefix sum.
            base = tl.atomic_add(count_ptr + row, hits, sem="relaxed")
            dest = base + tl.cumsum(hit.to(tl.int32), 0) - 1
            tl.store(cand_row + dest, composite(key, offs), mask=hit & (dest < row_cap))
        value = ahead_value
        extra = ahead_extra


@triton.jit
def _filter_words_kernel(x_ptr, add_ptr, floor_ptr, word_ptr, wcount_ptr, n, chunk, row_cap,
                         by_magnitude, BLOCK: tl.constexpr, HAS_ADD: tl.constexpr):
    # The same pass as _filter_kernel, but a tile's hits leave as 32-bit words: each
    # 32-entry group of the tile is one word (bit j: entry j clears the floor), and only
    # the words with a bit set are written, with their word index, to the row's word
    # list. The prefix sum runs over BLOCK / 32 words instead of BLOCK entries, and a
    # tile stores a few 8-byte words instead of scattering its hits.
    row, start, end, floor, row_ptr, add_row = _chunk_of(x_ptr, add_ptr, floor_ptr, n, chunk)
    word_row = word_ptr + row * row_cap
    group = tl.arange(0, BLOCK // 32)
    bit = tl.arange(0, 32)
    lane = group[:, None] * 32 + bit[None, :]
    value, extra = _load_tile(row_ptr, add_row, start + lane, end, HAS_ADD)
    for tile in range(start, end, BLOCK):
        ahead_value, ahead_extra = _load_tile(row_ptr, add_row, tile + BLOCK + lane, end,
                                              HAS_ADD)
        _, hit = _tile_hits(row_ptr, value, extra, tile + lane, end, floor, by_magnitude,
                            HAS_ADD)
        # Distinct powers of two: their int64 sum is their bitwise or.
        word = tl.sum(tl.where(hit, tl.full(lane.shape, 1, tl.int64) << bit[None, :], 0), 1)
        marked = word != 0
        words = tl.sum(marked.to(tl.int32), 0)
        if words > 0:
            base = tl.atomic_add(wcount_ptr + row, words, sem="relaxed")
            dest = base + tl.cumsum(marked.to(tl.int32), 0) - 1
            index = (tile // 32 + group).to(tl.int64)
            tl.store(word_row + dest, (index << 32) | word, mask=marked & (dest < row_cap))
        value = ahead_value
        extra = ahead_extra


@triton.jit
def _expand_kernel(x_ptr, word_ptr, wcount_ptr, cand_ptr, count_ptr, n, row_cap,
                   by_magnitude, WORDS: tl.constexpr):
    # The word list of _filter_words_kernel back to the composite keys of _filter_kernel's
    # buffer (the same set; the order within the buffer does not matter downstream). A
    # row whose word list overflowed has more hits than row_cap: its count says so.
    row = tl.program_id(0).to(tl.int64)
    marked = tl.load(wcount_ptr + row)
    total = tl.minimum(marked, row_cap)
    if (tl.program_id(1) == 0) & (marked > row_cap):
        tl.atomic_add(count_ptr + row, row_cap + 1, sem="relaxed")
    bit = tl.arange(0, 32)
    for first in range(tl.program_id(1) * WORDS, total, tl.num_programs(1) * WORDS):
        j = first + tl.arange(0, WORDS)
        packed = tl.load(word_ptr + row * row_cap + j, mask=j < total, other=0)
        hit = ((packed[:, None] >> bit[None, :]) & 1) != 0
        per_word = tl.sum(hit.to(tl.int32), 1)
        hits = tl.sum(per_word, 0)
        base = tl.atomic_add(count_ptr + row, hits, sem="relaxed")
        dest = (base + (tl.cumsum(per_word, 0) - per_word)[:, None]
                + tl.cumsum(hit.to(tl.int32), 1) - 1)
        pos = (packed >> 32)[:, None] * 32 + bit[None, :]
        value = tl.load(x_ptr + row * n + pos, mask=hit, other=0.0)
        key = score_key(value, by_magnitude)
        tl.store(cand_ptr + row * row_cap + dest, composite(key, pos),
                 mask=hit & (dest < row_cap))


@triton.jit
def _bucket_of(pos, n, buckets, interleaved):
    """Bucket of int64 positions: ``pos % b`` (interleaved) or the ``j`` with
    ``j * n // b <= pos < (j + 1) * n // b`` (contiguous)."""
    return tl.where(interleaved != 0, pos % buckets, ((pos + 1) * buckets - 1) // n)


@triton.jit
def _scatter_kernel(cand_ptr, count_ptr, list_ptr, bcount_ptr, n, buckets, row_cap, width,
                    interleaved, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * BLOCK
    total = tl.minimum(tl.load(count_ptr + row), row_cap)
    if start < total:
        j = start + tl.arange(0, BLOCK)
        ok = j < total
        key = tl.load(cand_ptr + row * row_cap + j, mask=ok, other=0)
        flat = row * buckets + _bucket_of(position_of(key), n, buckets, interleaved)
        slot = tl.atomic_add(bcount_ptr + flat, 1, mask=ok, sem="relaxed")
        tl.store(list_ptr + flat * width + slot, key, mask=ok & (slot < width))


@triton.jit
def _finish_kernel(list_ptr, bcount_ptr, count_ptr, out_ptr, work_ptr, flag_ptr, valid_ptr,
                   buckets, blocks, width, kept, row_cap,
                   M_P2: tl.constexpr, BLOCK_M: tl.constexpr, PACKED: tl.constexpr):
    pid = tl.program_id(0)
    row = (pid // blocks).to(tl.int64)
    bucket = (pid % blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    bucket_ok = bucket < buckets
    flat = row * buckets + bucket
    count = tl.load(bcount_ptr + flat, mask=bucket_ok, other=0)
    # A full row buffer dropped candidates of any bucket: the whole row is bad. (Compared
    # as a vector: the interpreter mistypes a vector-or-scalar of booleans.)
    lost = (count * 0 + tl.load(count_ptr + row)) > row_cap
    bad = bucket_ok & ((count > width) | lost)
    if PACKED:
        bad = bad | (bucket_ok & (count < kept))
    j = tl.arange(0, M_P2)
    listed = tl.minimum(count, width)
    keys = tl.load(list_ptr + flat[:, None] * width + j[None, :],
                   mask=bucket_ok[:, None] & (j[None, :] < listed[:, None]), other=PAD)
    keys = tl.sort(keys, dim=1, descending=True)
    tl.store(out_ptr + flat[:, None] * kept + j[None, :], keys,
             mask=bucket_ok[:, None] & (j[None, :] < kept))
    bad_count = tl.sum(bad.to(tl.int32), 0)
    if PACKED:
        # The bad buckets join the redo kernel's work list.
        if bad_count > 0:
            base = tl.atomic_add(flag_ptr, bad_count)
            tl.store(work_ptr + base + tl.cumsum(bad.to(tl.int32), 0) - 1, flat, mask=bad)
    else:
        if bad_count > 0:
            tl.atomic_add(flag_ptr + row, bad_count)
        tl.atomic_add(valid_ptr + row,
                      tl.sum(tl.where(bucket_ok, tl.minimum(count, kept), 0), 0))


@triton.jit
def _top_entries(row_ptr, first, stride, size, count, slots, by_magnitude,
                 CHUNK: tl.constexpr):
    """Writes, unsorted, to ``slots[0:min(count, size)]`` the composite keys of the
    ``count`` best of the ``size`` entries at ``first + i * stride`` (positions in the
    row; ties to the lower position) and returns how many it wrote. Radix selection of
    the ``count``-th largest score: four passes of 8-bit histograms over the entries
    (read in chunks, from L2 after the first pass), then one pass collecting the entries
    above it and, of those equal to it, the lowest positions."""
    lane = tl.arange(0, CHUNK)
    bins = tl.arange(0, 256)
    rank = tl.minimum(count, size).to(tl.int32)
    prefix = (rank * 0).to(tl.uint32)
    for step in tl.static_range(4):
        hist = tl.zeros([256], dtype=tl.int32)
        for t in range(0, size, CHUNK):
            slot = t + lane
            ok = slot < size
            value = tl.load(row_ptr + first + slot * stride, mask=ok, other=0.0)
            u = ordered(score_key(value, by_magnitude))
            if step == 0:
                match = ok
            else:
                match = ok & ((u >> (32 - 8 * step)) == (prefix >> (32 - 8 * step)))
            hist += tl.histogram(((u >> (24 - 8 * step)) & 255).to(tl.int32), 256, mask=match)
        at_least = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
        chosen = tl.max(tl.where(at_least >= rank, bins, 0), 0)
        rank -= tl.sum(tl.where(bins > chosen, hist, 0), 0)
        prefix = prefix | (chosen.to(tl.uint32) << (24 - 8 * step))
    taken = rank * 0
    ties = rank * 0
    for t in range(0, size, CHUNK):
        slot = t + lane
        ok = slot < size
        pos = first + slot * stride
        key = score_key(tl.load(row_ptr + pos, mask=ok, other=0.0), by_magnitude)
        u = ordered(key)
        equal = ok & (u == prefix)
        take = (ok & (u > prefix)) | (equal & (ties + tl.cumsum(equal.to(tl.int32), 0) <= rank))
        dest = taken + tl.cumsum(take.to(tl.int32), 0) - 1
        tl.store(slots + dest, composite(key, pos), mask=take)
        taken += tl.sum(take.to(tl.int32), 0)
        ties += tl.sum(equal.to(tl.int32), 0)
    return taken


@triton.jit
def _redo_bucket(x_ptr, out_ptr, row, bucket, n, buckets, kept, interleaved, by_magnitude,
                 CHUNK: tl.constexpr, KEPT_P2: tl.constexpr):
    """The exact top ``kept`` composite keys of one bucket (no floor), sorted, into its
    output slots (:func:`_top_entries`, then a sort in registers)."""
    bucket = bucket + row * 0  # int64 (row is), also where bucket is a loop counter
    first = tl.where(interleaved != 0, bucket, bucket * n // buckets)
    stride = tl.where(interleaved != 0, buckets, 1).to(tl.int64)
    size = tl.where(interleaved != 0, (n - 1 - bucket) // buckets + 1,
                    (bucket + 1) * n // buckets - bucket * n // buckets)
    slots = out_ptr + (row * buckets + bucket) * kept
    taken = _top_entries(x_ptr + row * n, first, stride, size, kept, slots, by_magnitude,
                         CHUNK)
    tl.debug_barrier()  # the slots written above are read back by other threads
    j = tl.arange(0, KEPT_P2)
    keys = tl.sort(tl.load(slots + j, mask=j < taken, other=PAD), descending=True)
    tl.debug_barrier()
    tl.store(slots + j, keys, mask=j < kept)


@triton.jit
def _redo_buckets_kernel(x_ptr, out_ptr, work_ptr, flag_ptr, n, buckets, kept, interleaved,
                         by_magnitude, CHUNK: tl.constexpr, KEPT_P2: tl.constexpr):
    total = tl.load(flag_ptr)
    for item in range(tl.program_id(0), total, tl.num_programs(0)):
        flat = tl.load(work_ptr + item)
        _redo_bucket(x_ptr, out_ptr, flat // buckets, flat % buckets, n, buckets, kept,
                     interleaved, by_magnitude, CHUNK, KEPT_P2)


@triton.jit
def _redo_rows_kernel(x_ptr, out_ptr, flag_ptr, valid_ptr, n, buckets, kept, k, interleaved,
                      by_magnitude, CHUNK: tl.constexpr, KEPT_P2: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if (tl.load(flag_ptr + row) > 0) | (tl.load(valid_ptr + row) < k):
        for bucket in range(tl.program_id(1), buckets, tl.num_programs(1)):
            _redo_bucket(x_ptr, out_ptr, row, bucket, n, buckets, kept, interleaved,
                         by_magnitude, CHUNK, KEPT_P2)


@triton.jit
def _row_kernel(x_ptr, scratch_ptr, out_ptr, flag_ptr, n, buckets, kept, k, m, interleaved,
                by_magnitude, M_P2: tl.constexpr, CHUNK: tl.constexpr,
                RANK_CHUNK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    # The m best entries of the row (ties to the lower position), into the row's scratch.
    scratch_row = scratch_ptr + row * M_P2
    _top_entries(x_ptr + row * n, row * 0, 1, n, m, scratch_row, by_magnitude, CHUNK)
    tl.debug_barrier()  # the candidates written above are read back by other threads
    j = tl.arange(0, M_P2)
    cand = tl.load(scratch_row + j, mask=j < m, other=PAD)
    bucket = _bucket_of(position_of(cand), n, buckets, interleaved)
    # Bucket cut: a candidate survives when fewer than `kept` candidates of its bucket
    # have larger keys (pairwise, RANK_CHUNK candidates against all at a time).
    larger = tl.zeros([M_P2], dtype=tl.int32)
    for c in range(0, m, RANK_CHUNK):
        other = c + tl.arange(0, RANK_CHUNK)
        other_key = tl.load(scratch_row + other, mask=other < m, other=PAD)
        other_bucket = _bucket_of(position_of(other_key), n, buckets, interleaved)
        beats = (other_bucket[:, None] == bucket[None, :]) & (other_key[:, None] > cand[None, :])
        larger += tl.sum(beats.to(tl.int32), 0)
    keep = (j < m) & (larger < kept)
    survivors = tl.sort(tl.where(keep, cand, PAD), descending=True)
    tl.store(out_ptr + row * k + j, position_of(survivors), mask=j < k)
    tl.store(flag_ptr + row, (tl.sum(keep.to(tl.int32), 0) < k).to(tl.int32))


FLAT_KERNELS = {"floor": _floor_kernel, "filter": _filter_kernel,
                "filter_words": _filter_words_kernel, "expand": _expand_kernel,
                "scatter": _scatter_kernel,
                "finish": _finish_kernel, "redo_buckets": _redo_buckets_kernel,
                "redo_rows": _redo_rows_kernel, "row": _row_kernel}
# Runtime arguments of each kernel and their Triton types; ``*x`` is the input's type.
FLAT_PARAMS = {
    "floor": (("x_ptr", "*x"), ("add_ptr", "*x"), ("floor_ptr", "*i32"), ("n", "i32"),
              ("blocks", "i32"), ("rank", "i32"), ("low", "i32"), ("high", "i32"),
              ("by_magnitude", "i32")),
    "filter": (("x_ptr", "*x"), ("add_ptr", "*x"), ("floor_ptr", "*i32"), ("cand_ptr", "*i64"),
               ("count_ptr", "*i32"), ("n", "i32"), ("chunk", "i32"), ("row_cap", "i32"),
               ("by_magnitude", "i32")),
    "filter_words": (("x_ptr", "*x"), ("add_ptr", "*x"), ("floor_ptr", "*i32"),
                     ("word_ptr", "*i64"), ("wcount_ptr", "*i32"), ("n", "i32"),
                     ("chunk", "i32"), ("row_cap", "i32"), ("by_magnitude", "i32")),
    "expand": (("x_ptr", "*x"), ("word_ptr", "*i64"), ("wcount_ptr", "*i32"),
               ("cand_ptr", "*i64"), ("count_ptr", "*i32"), ("n", "i32"), ("row_cap", "i32"),
               ("by_magnitude", "i32")),
    "scatter": (("cand_ptr", "*i64"), ("count_ptr", "*i32"), ("list_ptr", "*i64"),
                ("bcount_ptr", "*i32"), ("n", "i32"), ("buckets", "i32"), ("row_cap", "i32"),
                ("width", "i32"), ("interleaved", "i32")),
    "finish": (("list_ptr", "*i64"), ("bcount_ptr", "*i32"), ("count_ptr", "*i32"),
               ("out_ptr", "*i64"), ("work_ptr", "*i64"), ("flag_ptr", "*i32"),
               ("valid_ptr", "*i32"), ("buckets", "i32"), ("blocks", "i32"), ("width", "i32"),
               ("kept", "i32"), ("row_cap", "i32")),
    "redo_buckets": (("x_ptr", "*x"), ("out_ptr", "*i64"), ("work_ptr", "*i64"),
                     ("flag_ptr", "*i32"), ("n", "i32"), ("buckets", "i32"), ("kept", "i32"),
                     ("interleaved", "i32"), ("by_magnitude", "i32")),
    "redo_rows": (("x_ptr", "*x"), ("out_ptr", "*i64"), ("flag_ptr", "*i32"),
                  ("valid_ptr", "*i32"), ("n", "i32"), ("buckets", "i32"), ("kept", "i32"),
                  ("k", "i32"), ("interleaved", "i32"), ("by_magnitude", "i32")),
    "row": (("x_ptr", "*x"), ("scratch_ptr", "*i64"), ("out_ptr", "*i64"), ("flag_ptr", "*i32"),
            ("n", "i32"), ("buckets", "i32"), ("kept", "i32"), ("k", "i32"), ("m", "i32"),
            ("interleaved", "i32"), ("by_magnitude", "i32")),
}


def _spec(kernel: str, constexprs: dict, grid: tuple[int, ...], num_warps: int,
          dtype: torch.dtype, args: dict) -> KernelLaunch:
    return KernelLaunch(kernel, tuple(constexprs.items()), grid, num_warps, dtype,
                        tuple(args.items()), FLAT_PARAMS[kernel])


# --- launch specs -------------------------------------------------------------------------


@dataclass(frozen=True)
class FlatPlan:
    """Every launch of one flat first stage, as data."""

    launches: tuple[KernelLaunch, ...]
    """``floor``, ``filter`` (``filter_words`` then ``expand`` for the ``words`` filter),
    ``scatter``, ``finish`` and a ``redo`` kernel, in order."""
    row_cap: int
    """Candidate buffer per row (the filter's output capacity)."""
    width: int
    """Per-bucket list capacity (at least ``kept``, as a power of two)."""
    kept: int
    packed: bool
    """No second stage: a bucket with fewer than ``kept`` entries above the floor is bad."""


def floor_launch(rows: int, n: int, sample: tuple, by_magnitude: bool, dtype: torch.dtype,
                 has_add: bool, has_previous: bool) -> KernelLaunch:
    """The ``floor`` kernel for ``sample`` (a :class:`FloorSample`)."""
    blocks, samples, above, _ = sample
    sample_p2 = p2(samples)
    low = max(1, int(above - REUSE_BAND[0] * math.sqrt(above)))
    high = int(above + REUSE_BAND[1] * math.sqrt(above))
    return _spec("floor", {"SAMPLE_P2": sample_p2, "BLOCK": _SAMPLE_BLOCK,
                           "HAS_ADD": bool(has_add), "HAS_PREVIOUS": bool(has_previous)},
                 (rows,), 16 if sample_p2 >= 16384 else 8, dtype,
                 {"n": n, "blocks": blocks, "rank": above + 1, "low": low, "high": high,
                  "by_magnitude": int(by_magnitude)})


@functools.lru_cache(maxsize=1024)  # pure, and on every call's host path
def plan_flat(rows: int, n: int, buckets: int, k_per_bucket: int, interleaved: bool,
              by_magnitude: bool, sm_count: int, sample: tuple, k: int | None = None,
              dtype: torch.dtype = torch.float32, has_add: bool = False,
              has_previous: bool = False, filter_kind: str = "scan") -> FlatPlan | None:
    """The launch spec of :func:`flat_candidates`; ``None`` where the flat kernels do not
    apply (a list would need more than ``MAX_WIDTH`` keys, or ``kept`` too).

    Args:
        rows, n: input shape (contiguous ``(rows, n)``, ``n < 2^31``).
        buckets, k_per_bucket, interleaved, by_magnitude: the selection.
        sm_count: streaming multiprocessors (chunks fill the chip).
        sample: the floor's :class:`FloorSample`.
        k: entries the second stage keeps; ``None`` for a packed selection (no second
            stage: every bucket needs ``kept`` entries above the floor).
        dtype: input dtype (one of ``INPUT_DTYPES``).
        has_add: ``x += add`` in the floor's sample and the filter's pass.
        has_previous: the floor buffer holds last step's floor, to reuse where valid.
        filter_kind: one of ``FILTERS``.
    """
    length = -(-n // buckets)
    kept = min(k_per_bucket, length)
    upper = sample[3]
    expected_row = upper * n
    row_cap = expected_row + 6 * math.sqrt(expected_row) + 64
    row_cap = int(-(-row_cap // SCATTER_BLOCK) * SCATTER_BLOCK)
    expected = upper * length
    width = max(MIN_WIDTH, min(p2(expected + 6 * math.sqrt(expected) + 16), p2(length)),
                p2(kept))
    if (width > MAX_WIDTH or n >= 2**31 - max(buckets, row_cap)
            or row_cap // SCATTER_BLOCK > MAX_GRID_Y):
        return None
    common = {"n": n, "by_magnitude": int(by_magnitude)}
    floor = floor_launch(rows, n, sample, by_magnitude, dtype, has_add, has_previous)
    block = FILTER_BLOCK[min(dtype.itemsize, 4)]
    cdiv = triton.cdiv
    programs = max(1, min(cdiv(FILTER_PROGRAMS_PER_SM * sm_count, rows), cdiv(n, block)))
    chunk = cdiv(cdiv(n, programs), block) * block  # whole tiles: aligned 16-byte loads
    if filter_kind not in FILTERS:
        raise ValueError(f"filter_kind must be one of {FILTERS}, got {filter_kind!r}")
    words = filter_kind == "words"
    first = (_spec("filter_words" if words else "filter",
                   {"BLOCK": block, "HAS_ADD": bool(has_add)}, (rows, cdiv(n, chunk)),
                   FILTER_WARPS[min(dtype.itemsize, 4)], dtype,
                   {**common, "chunk": chunk, "row_cap": row_cap}),)
    if words:
        programs = min(cdiv(row_cap, EXPAND_WORDS), cdiv(EXPAND_PROGRAMS_PER_SM * sm_count, rows))
        first += (_spec("expand", {"WORDS": EXPAND_WORDS}, (rows, programs), 4, dtype,
                        {**common, "row_cap": row_cap}),)
    scatter = _spec("scatter", {"BLOCK": SCATTER_BLOCK}, (rows, row_cap // SCATTER_BLOCK), 4,
                    torch.float32, {"n": n, "buckets": buckets, "row_cap": row_cap,
                                    "width": width, "interleaved": int(interleaved)})
    block_m = max(1, FINISH_ELEMENTS_PER_PROGRAM // width)
    blocks = -(-buckets // block_m)
    packed = k is None
    finish = _spec("finish", {"M_P2": width, "BLOCK_M": block_m, "PACKED": packed},
                   (rows * blocks,), FINISH_WARPS, torch.float32,
                   {"buckets": buckets, "blocks": blocks, "width": width, "kept": kept,
                    "row_cap": row_cap})
    redo_common = {**common, "buckets": buckets, "kept": kept, "interleaved": int(interleaved)}
    constexprs = {"CHUNK": REDO_CHUNK, "KEPT_P2": max(MIN_WIDTH, p2(kept))}
    warps = 4 if kept <= 1024 else 8
    if packed:
        redo = _spec("redo_buckets", constexprs,
                     (max(1, min(rows * buckets, REDO_PROGRAMS_PER_SM * sm_count)),), warps,
                     dtype, redo_common)
    else:
        per_row = max(1, min(buckets, cdiv(REDO_PROGRAMS_PER_SM * sm_count, rows)))
        redo = _spec("redo_rows", constexprs, (rows, per_row), warps, dtype,
                     {**redo_common, "k": k})
    return FlatPlan((floor, *first, scatter, finish, redo), row_cap, width, kept, packed)


def row_candidates(n: int, k: int, buckets: int, kept: int) -> int:
    """Candidates ``m`` the ``row`` kernel takes so that at least ``k`` of them survive
    the bucket cut: the smallest ``m`` whose expected losses (the recall model's
    ``m * (1 - R(m))``) plus five times their square root (a Poisson bound) leave ``k``;
    ``n`` when no smaller ``m`` does (then nothing can be short)."""
    m = k
    while m < n:
        lost = m * (1.0 - expected_recall(n, m, buckets, kept))
        if m - lost - 5.0 * math.sqrt(lost) >= k:
            return m
        m = min(n, max(m + 1, int(m * 1.25)))
    return n


@functools.lru_cache(maxsize=1024)
def plan_row(rows: int, n: int, k: int, buckets: int, k_per_bucket: int, interleaved: bool,
             by_magnitude: bool, dtype: torch.dtype = torch.float32) -> KernelLaunch | None:
    """The ``row`` kernel's launch for rows of ``n`` entries, or ``None`` when the row or
    its candidates do not fit (``n > ROW_MAX_N`` or ``m > ROW_M_SIZES[-1]``)."""
    if n > ROW_MAX_N or k < 1:
        return None
    kept = min(k_per_bucket, -(-n // buckets))
    m = row_candidates(n, k, buckets, kept)
    m_p2 = next((size for size in ROW_M_SIZES if size >= m), None)
    if m_p2 is None:
        return None
    return _row_spec(rows, m_p2, dtype,
                     {"n": n, "buckets": buckets, "kept": kept, "k": k, "m": m,
                      "interleaved": int(interleaved), "by_magnitude": int(by_magnitude)})


def _row_spec(rows: int, m_p2: int, dtype: torch.dtype, args: dict) -> KernelLaunch:
    return _spec("row", {"M_P2": m_p2, "CHUNK": ROW_CHUNK,
                         "RANK_CHUNK": max(1, ROW_RANK_ELEMENTS // m_p2)},
                 (rows,), ROW_WARPS, dtype, args)


def all_flat_variants() -> Iterator[KernelLaunch]:
    """Every distinct compiled kernel :func:`plan_flat` and :func:`plan_row` can produce,
    found by walking their branches over every input dtype (for the compile test)."""
    seen = set()

    def new(launch: KernelLaunch) -> bool:
        if launch.variant() in seen:
            return False
        seen.add(launch.variant())
        return True

    # On CUDA the floor needs rows of 2^17 entries, which always sample 64 blocks.
    sample = (64, 64 * _SAMPLE_BLOCK, 64, 0.01)
    for dtype, has_add, has_previous in itertools.product(INPUT_DTYPES, (False, True),
                                                          (False, True)):
        launch = floor_launch(1, 1 << 20, sample, True, dtype, has_add, has_previous)
        if new(launch):
            yield launch
    for dtype, kept, packed, has_add, kind in itertools.product(
            INPUT_DTYPES, (1, 3, 16, 17, 33, 65, 100, 200, 300, 1000, 1024, 2000), (True, False),
            (False, True), FILTERS):
        for length in (kept + 1, 4 * kept, 1000 * kept):
            for upper in (0.001, 0.05, 0.5):
                plan = plan_flat(1, length * 64, 64, kept, True, True, 132,
                                 sample[:3] + (upper,), None if packed else kept * 32, dtype,
                                 has_add, False, kind)
                for launch in () if plan is None else plan.launches[1:]:
                    if new(launch):
                        yield launch
    for dtype, m in itertools.product(INPUT_DTYPES, ROW_M_SIZES):
        launch = _row_spec(1, m, dtype, {"n": 32768, "buckets": 1, "kept": 1, "k": 1, "m": m,
                                         "interleaved": 1, "by_magnitude": 1})
        if new(launch):
            yield launch


# --- launchers ----------------------------------------------------------------------------


class FlatCandidates(NamedTuple):
    """What :func:`flat_candidates` returns."""

    candidates: torch.Tensor
    """``(rows, buckets, kept)`` int64 composite keys, as ``bucket_candidates``."""
    floor: torch.Tensor
    """``(rows,)`` int32 floors used (the state to pass back next step)."""


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter
    from distk.selection.triton_kernel import _device_sm_count

    return _device_sm_count(device)


def flat_candidates(x: torch.Tensor, buckets: int, k_per_bucket: int,
                    interleaved: bool = True, by_magnitude: bool = True,
                    above_fraction: float = 0.01, k: int | None = None,
                    add: torch.Tensor | None = None,
                    floor_state: torch.Tensor | None = None,
                    sample: tuple | None = None,
                    sm_count: int | None = None,
                    filter_kind: str | None = None) -> FlatCandidates | None:
    """First stage of a 2-D ``x`` by the flat kernels, with no host synchronisation.

    Returns the candidates of ``reference.bucket_candidates_reference`` with no floor for
    a packed selection (``k=None``: every bucket's exact top ``kept``), or, with a second
    stage of ``k``, candidates whose top ``k`` equals the reference's (buckets keep their
    top entries above the floor; rows where fewer than ``k`` cleared it are redone
    without). ``None`` where the flat kernels do not apply: rows too short for a floor
    (``distk.selection.floor_sample``), too many entries above it, lists wider than
    ``MAX_WIDTH``, or an input dtype the kernels do not load.

    Args:
        above_fraction: fraction of each row meant to clear the floor.
        add: ``x += add`` in place first (same shape and dtype as ``x``, contiguous),
            fused into the sample and the filter's pass.
        floor_state: ``(rows,)`` int32 on ``x``'s device, read as last step's floors
            (reused on the device where still valid; ``2^31 - 1`` never is) and
            overwritten with this step's.
        sample: the floor's sample (tests; default ``floor_sample(n, above_fraction)``
            with the CUDA length threshold).
        sm_count: overrides the device's (tests).
        filter_kind: one of ``FILTERS``; ``None``: ``DISTK_TRITON_FILTER`` (default
            ``"scan"``).
    """
    from distk.selection import flat_filter_choice, floor_sample

    if x.dtype not in INPUT_DTYPES or not x.is_contiguous() or x.dim() != 2:
        return None
    if add is not None and (add.dtype != x.dtype or add.shape != x.shape
                            or not add.is_contiguous()):
        return None
    rows, n = x.shape
    if sample is None:
        sample = floor_sample(n, above_fraction, "cuda")
        if sample is None:
            return None
    if sm_count is None:
        sm_count = _sm_count(x.device)
    plan = plan_flat(rows, n, buckets, k_per_bucket, bool(interleaved), bool(by_magnitude),
                     sm_count, tuple(sample), k, x.dtype, add is not None,
                     floor_state is not None, filter_kind or flat_filter_choice())
    if plan is None:
        return None
    if floor_state is not None and (floor_state.shape != (rows,) or floor_state.dtype
                                    != torch.int32 or floor_state.device != x.device):
        raise ValueError(f"floor_state must be an int32 tensor of shape ({rows},) on "
                         f"{x.device}, got {floor_state.dtype} {tuple(floor_state.shape)} on "
                         f"{floor_state.device}")
    device = x.device
    # One zeroed buffer for every counter: row hits, listed words (the words filter),
    # bucket hits, flags, valid counts.
    zeros = torch.zeros(rows * (buckets + 4) + 1, dtype=torch.int32, device=device)
    count, wcount, zeros = zeros[:rows], zeros[rows:2 * rows], zeros[2 * rows:]
    bcount, zeros = zeros[:rows * buckets], zeros[rows * buckets:]
    flag, valid = zeros[:rows + 1], zeros[rows + 1:]
    floor = (floor_state if floor_state is not None
             else torch.empty(rows, dtype=torch.int32, device=device))
    out = torch.empty(rows, buckets, plan.kept, dtype=torch.int64, device=device)
    tensors = {
        "x": x, "add": x if add is None else add, "floor": floor, "count": count,
        "bcount": bcount, "flag": flag, "valid": valid, "out": out, "wcount": wcount,
        "cand": torch.empty(rows * plan.row_cap, dtype=torch.int64, device=device),
        "word": torch.empty(rows * plan.row_cap if plan.launches[1].kernel == "filter_words"
                            else 1, dtype=torch.int64, device=device),
        "list": torch.empty(rows * buckets * plan.width, dtype=torch.int64, device=device),
        "work": torch.empty(rows * buckets if plan.packed else 1, dtype=torch.int64,
                            device=device),
    }
    for spec in plan.launches:
        run_launch(FLAT_KERNELS[spec.kernel], spec, tensors)
    return FlatCandidates(out, floor)


def device_floor(x: torch.Tensor, sample: tuple, by_magnitude: bool = True,
                 add: torch.Tensor | None = None,
                 floor_state: torch.Tensor | None = None) -> torch.Tensor:
    """The ``floor`` kernel alone: ``(rows,)`` int32 score floors of a contiguous 2-D
    ``x`` (of ``x + add``, not written back), equal to ``distk.selection._score_floor``'s
    on the same ``sample``; with ``floor_state`` (read, then overwritten and returned),
    last step's floor is kept where the sample puts it in the reuse band."""
    rows, n = x.shape
    spec = floor_launch(rows, n, tuple(sample), by_magnitude, x.dtype, add is not None,
                        floor_state is not None)
    floor = (floor_state if floor_state is not None
             else torch.empty(rows, dtype=torch.int32, device=x.device))
    run_launch(_floor_kernel, spec, {"x": x, "add": x if add is None else add, "floor": floor})
    return floor


def row_topk(x: torch.Tensor, k: int, buckets: int, k_per_bucket: int,
             interleaved: bool = True,
             by_magnitude: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Bucketed top-``k`` positions ``(rows, k)`` of a 2-D ``x`` with short rows, one
    program per row, and a ``(rows,)`` int32 flag: 1 where fewer than ``k`` of the row's
    ``m`` best entries survived the bucket cut (that row's positions are not valid; the
    caller redoes it). Unflagged rows equal ``reference.bucketed_topk_reference``.
    ``None`` where the kernel does not apply (see :func:`plan_row`)."""
    if x.dtype not in INPUT_DTYPES or not x.is_contiguous() or x.dim() != 2:
        return None
    rows, n = x.shape
    spec = plan_row(rows, n, k, buckets, k_per_bucket, bool(interleaved), bool(by_magnitude),
                    x.dtype)
    if spec is None:
        return None
    m_p2 = dict(spec.constexprs)["M_P2"]
    out = torch.empty(rows, k, dtype=torch.int64, device=x.device)
    flag = torch.empty(rows, dtype=torch.int32, device=x.device)
    scratch = torch.empty(rows * m_p2, dtype=torch.int64, device=x.device)
    run_launch(_row_kernel, spec, {"x": x, "scratch": scratch, "out": out, "flag": flag})
    return out, flag
