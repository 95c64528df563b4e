"""How a buffer is selected: :class:`SelectionPlan`, and the rule that picks it.

A plan is cached per ``(numel, k)``. A bucketed selection with no second stage is
*packed*: every bucket sends exactly ``k_per_bucket`` entries, so bucket ids stay
implicit on the wire and no merge is needed. Packed plans alternate, step by step,
between two coprime bucket counts (:func:`distk.selection.recall.packed_bucket_counts`
says why); every rank counts the same steps, so every rank uses the same plan.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from distk.comm import WireFormat
from distk.config import TILE_SIDE, SparsityConfig
from distk.selection import resolve_buckets
from distk.selection.recall import packed_bucket_counts

__all__ = ["MAX_PACKED_K_PER_BUCKET", "SelectionPlan", "make_plans", "packed_k_per_bucket",
           "poisson_limit_recall", "tile_grid"]

MAX_PACKED_K_PER_BUCKET = 1024
"""Largest ``k_per_bucket`` used for a selection with no second stage (recall 0.9875)."""


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
class SelectionPlan:
    """How to select ``k`` of a buffer's entries.

    Attributes:
        k: entries selected.
        buckets, k_per_bucket: the bucketed selection (``None``: exact top-k).
        packed: bucketed with no second stage (implicit bucket ids on the wire).
        tiles: ``(rows, cols)`` of the 2-D view whose ``64 x 64`` tiles are the buckets
            (``bucket_layout="tile"``), in row-major tile order; ``None``: flat buckets.
    """

    k: int
    buckets: int | None
    k_per_bucket: int | None
    packed: bool
    tiles: tuple[int, int] | None = None

    def wire(self, numel: int, value_dtype: torch.dtype, interleaved: bool,
             value_bits: int | None = None, value_levels: str = "centres") -> WireFormat:
        """The wire format of this plan's entries."""
        if self.tiles is not None:
            return WireFormat(numel, self.k, value_dtype, self.buckets, self.k_per_bucket,
                              False, value_bits, self.tiles, value_levels)
        if self.packed:
            return WireFormat(numel, self.k, value_dtype, self.buckets, self.k_per_bucket,
                              interleaved, value_bits, value_levels=value_levels)
        return WireFormat(numel, self.k, value_dtype, value_bits=value_bits,
                          value_levels=value_levels)


def tile_grid(shape: tuple[int, ...] | torch.Size | None) -> tuple[int, int] | None:
    """``(rows, cols)`` of the 2-D view of a tensor of ``shape`` (``(shape[0], -1)``) when
    both divide by :data:`~distk.config.TILE_SIDE`; ``None`` otherwise (and for fewer
    than two dimensions)."""
    if shape is None or len(shape) < 2 or shape[0] == 0:
        return None
    rows = int(shape[0])
    cols = math.prod(int(n) for n in shape) // rows
    if rows % TILE_SIDE or cols % TILE_SIDE or cols == 0:
        return None
    return rows, cols


def make_plans(cfg: SparsityConfig, numel: int, k: int,
               grid: tuple[int, int] | None = None) -> tuple[SelectionPlan, ...]:
    """Plans used in turn, one per step (one plan, or two packed ones). ``grid``: the
    tensor's :func:`tile_grid` under ``bucket_layout="tile"`` (one packed plan whose
    buckets are the tiles, ``round(k / tiles)`` entries each)."""
    if cfg.method == "exact" or k >= numel:
        return (SelectionPlan(k, None, None, False),)
    if grid is not None:
        tiles = numel // (TILE_SIDE * TILE_SIDE)
        per_tile = max(1, min(TILE_SIDE * TILE_SIDE, round(k / tiles)))
        return (SelectionPlan(tiles * per_tile, tiles, per_tile, True, grid),)
    minimum = packed_k_per_bucket(cfg.recall_target)
    if cfg.buckets is None and cfg.k_per_bucket is None and minimum is not None:
        # Prefer a selection with no second stage. Recall grows with k_per_bucket, so any
        # value >= `minimum` meets the target. A fixed partition loses that recall under
        # error feedback, and a count sharing factors with the row stride of weight
        # matrices loses it too: the plans alternate between two coprime counts free of
        # the factors 2 and 3 (packed_bucket_counts).
        if cfg.k is None:
            # Density-derived k: round up to buckets * k_per_bucket (adds < buckets,
            # i.e. less than k / minimum entries). (k < minimum: one bucket keeping all
            # k, an exact selection.)
            counts = packed_bucket_counts(k, minimum, MAX_PACKED_K_PER_BUCKET) or (1,)
            plans = tuple(SelectionPlan(b * math.ceil(k / b), b, math.ceil(k / b), True)
                          for b in counts if b * math.ceil(k / b) <= numel)
        else:
            counts = packed_bucket_counts(k, min(minimum, k), min(k, 4 * minimum),
                                          exact=True)
            plans = tuple(SelectionPlan(k, b, k // b, True) for b in counts)
        if plans:
            return plans
    buckets, k_per_bucket = resolve_buckets(numel, k, cfg.buckets, cfg.k_per_bucket,
                                            cfg.recall_target)
    packed = WireFormat.bucket_packable(numel, k, buckets, k_per_bucket)
    return (SelectionPlan(k, buckets, k_per_bucket, packed),)
