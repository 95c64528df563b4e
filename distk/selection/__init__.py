"""Selection layer: exact and bucketed approximate top-k.

``distk.topk`` validates its arguments, picks the bucket parameters, and calls the op
``distk::bucketed_topk_indices`` (registered with ``torch.library.custom_op`` so that
``torch.compile(fullgraph=True)`` traces through it). The op dispatches on the device:

* CUDA tensors: the Triton kernel (``distk/selection/triton_kernel.py``);
* CPU tensors: the OpenMP C++ kernel (``distk/selection/cpu_kernel.py``), built on first
  use; where it cannot be built, the plain-PyTorch reference with a one-time warning;
* ``DISTK_TOPK_BACKEND=reference|cpu|triton`` forces one (for tests and benchmarks).

On the Triton backend, ``DISTK_TRITON_KERNEL`` chooses between two sets of kernels:
the launch spec of ``triton_kernel.py`` and the flat-filter kernels of ``triton_flat.py``
(device floor, one-read filter, short-row kernel). ``auto`` (the default) takes the flat
kernels for single rows on CUDA, the shapes where an H200 measured them faster (long
rows and the compressor's buckets: ``benchmarks/gpu_check.py``), and the launch spec for
inputs of several rows; ``flat`` and ``default`` force one set wherever it applies.
``DISTK_TRITON_FILTER`` chooses the flat kernels' first pass: ``scan`` (the default) or
``words``.
:func:`distk.selection.syncfree.select_packed` is the compressor's selection with no host
synchronisation (flat kernels on CUDA).

Every backend returns the same positions as ``reference.py`` (which defines the order,
NaN and padding rules); the second stage is shared.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from distk.selection.recall import (
    DEFAULT_RECALL_TARGET,
    check_recall_target,
    choose_buckets,
    expected_recall,
)
from distk.selection.reference import (
    PAD_KEY,
    bucket_candidates_reference,
    order_keys,
    positions_of,
    second_stage,
)

__all__ = [
    "DEFAULT_RECALL_TARGET",
    "bucket_candidates",
    "choose_buckets",
    "flat_filter_choice",
    "flat_kernels_for",
    "flat_kernels_selected",
    "floor_sample",
    "floor_sample_columns",
    "per_bucket_topk",
    "expected_recall",
    "resolve_buckets",
    "topk",
]

METHODS = ("bucketed", "exact")
BACKENDS = ("auto", "reference", "cpu", "triton")
TRITON_KERNELS = ("auto", "default", "flat")
"""Values of ``DISTK_TRITON_KERNEL``: the measured choice per shape, the launch spec of
``triton_kernel.py``, or the flat kernels."""


def _backend() -> str:
    backend = os.environ.get("DISTK_TOPK_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"DISTK_TOPK_BACKEND must be one of {BACKENDS}, got {backend!r}")
    return backend


def triton_kernel_choice() -> str:
    """The Triton kernels selected by ``DISTK_TRITON_KERNEL`` (default ``"auto"``)."""
    kernel = os.environ.get("DISTK_TRITON_KERNEL", "auto")
    if kernel not in TRITON_KERNELS:
        raise ValueError(f"DISTK_TRITON_KERNEL must be one of {TRITON_KERNELS}, got {kernel!r}")
    return kernel


def flat_filter_choice() -> str:
    """The flat kernels' first pass selected by ``DISTK_TRITON_FILTER`` (default
    ``"scan"``, the one measured on a GPU; ``"words"`` lists a tile's hits as 32-bit
    words: ``triton_flat.FILTERS``)."""
    from distk.selection.triton_flat import FILTERS

    kind = os.environ.get("DISTK_TRITON_FILTER", "scan")
    if kind not in FILTERS:
        raise ValueError(f"DISTK_TRITON_FILTER must be one of {FILTERS}, got {kind!r}")
    return kind


def flat_kernels_selected(x: torch.Tensor) -> bool:
    """Whether the flat Triton kernels are selected for ``x`` (1-D, or 2-D rows).

    ``flat``: on CUDA tensors with the automatic backend, and on any tensor with the
    forced Triton backend (tests under the interpreter). ``auto``: on CUDA tensors of one
    row, where an H200 measured them faster than the launch spec (1.1-1.9x on rows of
    2^23-2^26 entries, and on the compressor's 25 MB buckets; slower on 256 rows of 2^20,
    mixed on 4096 short rows: docs/selection.md). ``default``: never."""
    rows = 1 if x.dim() == 1 else x.shape[0]
    return flat_kernels_for(x.is_cuda, rows, triton_kernel_choice(), _backend())


def flat_kernels_for(is_cuda: bool, rows: int, choice: str, backend: str) -> bool:
    """:func:`flat_kernels_selected` as a pure function of the input's device and rows,
    ``DISTK_TRITON_KERNEL`` (``choice``) and ``DISTK_TOPK_BACKEND`` (``backend``)."""
    if choice == "default" or backend in ("reference", "cpu"):
        return False
    if choice == "flat":
        return backend == "triton" or is_cuda
    return is_cuda and rows == 1


def bucket_candidates(x: torch.Tensor, buckets: int, k_per_bucket: int,
                      interleaved: bool = True, by_magnitude: bool = True,
                      floor: torch.Tensor | None = None, refill: bool = False,
                      add: torch.Tensor | None = None,
                      above_per_bucket: float | None = None) -> torch.Tensor:
    """First stage on a 2-D ``x``: composite keys ``(rows, buckets, kept)``, each bucket's
    top entries sorted descending (see ``reference.py`` for the key encoding and
    ``floor``). ``refill`` lets a backend redo, without the floor, a bucket left with an
    empty slot (the CPU kernel does; callers still check the others).

    ``add`` (same shape as ``x``): first ``x += add`` in place, then select on the sum.
    The CPU kernel fuses the two into one pass over memory for fp32; every other case
    runs ``x.add_(add)`` first, which defines the result.

    ``above_per_bucket``: expected entries per bucket above ``floor`` (the Triton kernel
    sizes its candidate lists with it)."""
    backend = _backend()
    if backend == "auto":
        backend = "triton" if x.is_cuda else "cpu"
    if add is not None:
        from distk.selection.cpu_kernel import can_fuse_add, load

        if not (backend == "cpu" and can_fuse_add(x, add) and load() is not None):
            x.add_(add)
            add = None
    if backend == "triton":
        from distk.selection.triton_kernel import bucket_candidates_triton

        return bucket_candidates_triton(x, buckets, k_per_bucket, interleaved, by_magnitude,
                                        floor, above_per_bucket)
    if backend == "cpu" and x.device.type == "cpu":
        from distk.selection.cpu_kernel import bucket_candidates_cpu

        result = bucket_candidates_cpu(x, buckets, k_per_bucket, interleaved, by_magnitude,
                                       floor, refill, add)
        if result is not None:
            return result
    return bucket_candidates_reference(x, buckets, k_per_bucket, interleaved, by_magnitude,
                                       floor)


# The floor pays for its sample (a gather and a k-th value per row) only on long rows:
# from 2^18 entries on the CPU; from 2^17 on CUDA, where it turns the first stage into
# one bandwidth-bound read (the Triton ``compact`` kernel). The sample is at most an
# eighth of the row.
_FLOOR_MIN_N = {"cpu": 1 << 18, "cuda": 1 << 17}
_FLOOR_BLOCKS, _FLOOR_BLOCK = 64, 256


def _score_floor(x: torch.Tensor, above_fraction: float, by_magnitude: bool,
                 add: torch.Tensor | None = None) -> tuple[torch.Tensor | None, float]:
    """Per-row score key that about ``above_fraction`` of the row's entries exceed,
    estimated from a sample of up to 16 K entries (of ``x + add`` when ``add`` is
    given), and an upper estimate of the fraction of entries really above it (the
    sample's fraction plus four standard deviations of its noise); ``(None, 0.0)`` when a
    floor would not save work.

    The first stage may skip entries at or below a floor when enough entries lie above
    it; callers check that afterwards and redo failing rows without a floor, so a floor
    changes the work, never the result. Most per-bucket insertions happen on entries
    that a good floor rules out.
    """
    rows, n = x.shape
    sample = floor_sample(n, above_fraction, x.device.type)
    if sample is None:
        return None, 0.0
    cols = floor_sample_columns(n, sample.blocks, x.device)
    values = x[:, cols] if add is None else x[:, cols] + add[:, cols]
    keys = order_keys(values, by_magnitude)
    floor = torch.kthvalue(keys, sample.samples - sample.above, dim=-1).values
    return floor, sample.upper_fraction


class FloorSample(NamedTuple):
    """How a row's score floor is sampled (see :func:`floor_sample`)."""

    blocks: int
    """Sampled blocks of ``_FLOOR_BLOCK`` adjacent entries, spread evenly over the row."""
    samples: int
    """``blocks * _FLOOR_BLOCK`` entries in all."""
    above: int
    """Sampled entries meant to lie above the floor (the floor is the ``above + 1``-th
    largest sampled score key)."""
    upper_fraction: float
    """Upper estimate of the fraction of the row above the floor (the sample's fraction
    plus four standard deviations of its noise)."""


def floor_sample(n: int, above_fraction: float, device_type: str = "cpu") -> FloorSample | None:
    """The sample of a score floor that about ``above_fraction`` of a row of ``n`` entries
    exceed, or ``None`` where a floor would not save work (short rows, or too many
    entries above it). Pure host arithmetic: shared by the host and device floors."""
    if n < _FLOOR_MIN_N.get(device_type, _FLOOR_MIN_N["cpu"]):
        return None
    blocks = min(_FLOOR_BLOCKS, n // (8 * _FLOOR_BLOCK))
    samples = blocks * _FLOOR_BLOCK
    above = int(samples * above_fraction) + 16  # slack for the sampling noise
    if above >= samples // 4:
        return None
    return FloorSample(blocks, samples, above, above / samples * (1 + 4 / math.sqrt(above)))


def floor_sample_columns(n: int, blocks: int,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 columns of the sampled blocks: block ``i`` starts at
    ``i * (n - _FLOOR_BLOCK) // (blocks - 1)``, in integer arithmetic (a float32
    ``linspace`` rounds past ``n - _FLOOR_BLOCK`` for many ``n`` above 2^24)."""
    index = torch.arange(blocks, device=device, dtype=torch.int64)
    starts = index * (n - _FLOOR_BLOCK) // max(blocks - 1, 1)
    return (starts[:, None] + torch.arange(_FLOOR_BLOCK, device=device)).flatten()


def per_bucket_topk(x: torch.Tensor, buckets: int, k_per_bucket: int,
                    interleaved: bool = True, by_magnitude: bool = True,
                    add: torch.Tensor | None = None) -> torch.Tensor:
    """Every bucket's top ``k_per_bucket`` entries of a 2-D ``x``: the same composite keys
    as :func:`bucket_candidates`, computed with a sampled floor where that saves work.

    The floor aims at ``k_per_bucket + 6 sqrt(k_per_bucket) + 4`` entries above it per
    bucket on average; a row where some bucket ends with an empty slot is redone
    without it (one device-to-host sync per call, to decide that). Used for selections
    with no second stage (the compressor's wire format with implicit bucket ids).

    ``add``: error feedback fused into the selection: ``x += add`` in place, then the
    top entries of the sum (see :func:`bucket_candidates`).

    With the flat kernels selected (on single CUDA rows by default, see
    :func:`flat_kernels_selected`) the floor, the check and the redo of short buckets all
    run on the device: no sync.
    """
    rows, n = x.shape
    length = -(-n // buckets)
    kept = min(k_per_bucket, length)
    floor, fraction = None, 0.0
    if kept < length:
        above = kept + 6 * math.sqrt(kept) + 4
        if flat_kernels_selected(x):
            from distk.selection.triton_flat import flat_candidates

            flat = flat_candidates(x, buckets, k_per_bucket, interleaved, by_magnitude,
                                   above / (n / buckets), add=add)
            if flat is not None:
                return flat.candidates
        floor, fraction = _score_floor(x, above / (n / buckets), by_magnitude, add)
    candidates = bucket_candidates(x, buckets, k_per_bucket, interleaved, by_magnitude, floor,
                                   refill=True, add=add, above_per_bucket=fraction * length)
    if floor is not None:  # x holds the sums now
        short = (candidates == PAD_KEY).flatten(1).any(dim=1)
        if bool(short.any()):
            candidates[short] = bucket_candidates(x[short], buckets, k_per_bucket, interleaved,
                                                  by_magnitude)
    return candidates


# From this many candidates per row a full sort beats torch.topk's radix selection on
# CUDA (measured on an H200 by benchmarks/gpu_check.py --profile: 104 vs 176 us for 134 K).
_SORT_SECOND_STAGE_FROM = 8192


def _second_stage(candidates: torch.Tensor, k: int) -> torch.Tensor:
    """``reference.second_stage`` (identical result: composite keys are unique)."""
    flat = candidates.reshape(candidates.shape[0], -1)
    if flat.is_cuda and flat.shape[1] >= _SORT_SECOND_STAGE_FROM:
        return positions_of(torch.sort(flat, dim=-1, descending=True).values[:, :k])
    return second_stage(candidates, k)


def _flat_topk(x: torch.Tensor, k: int, buckets: int, k_per_bucket: int, interleaved: bool,
               by_magnitude: bool) -> torch.Tensor | None:
    """Bucketed top-k positions by the flat kernels, or ``None`` where they do not apply.

    Short rows: the ``row`` kernel; rows it flags (fewer than ``k`` of its candidates
    survived the bucket cut) are redone by the default path, after one sync. Long rows:
    :func:`triton_flat.flat_candidates` with a device floor, then the second stage; no
    sync."""
    from distk.selection.triton_common import INPUT_DTYPES
    from distk.selection.triton_flat import flat_candidates, row_topk

    x = (x if x.dtype in INPUT_DTYPES else x.float()).contiguous()
    n = x.shape[1]
    row = row_topk(x, k, buckets, k_per_bucket, interleaved, by_magnitude)
    if row is not None:
        positions, flag = row
        short = flag.bool()
        if bool(short.any()):
            positions[short] = _bucketed_topk_default(x[short], k, buckets, k_per_bucket,
                                                      interleaved, by_magnitude)
        return positions
    if buckets * min(k_per_bucket, -(-n // buckets)) == k:
        return None  # no second stage: per_bucket_topk (flat kernels too)
    recall = max(expected_recall(n, k, buckets, k_per_bucket), 0.05)
    flat = flat_candidates(x, buckets, k_per_bucket, interleaved, by_magnitude,
                           2 * k / (recall * n), k=k)
    return None if flat is None else _second_stage(flat.candidates, k)


@torch.library.custom_op("distk::bucketed_topk_indices", mutates_args=())
def bucketed_topk_indices(x: torch.Tensor, k: int, buckets: int, k_per_bucket: int,
                          interleaved: bool, by_magnitude: bool) -> torch.Tensor:
    """Positions ``(rows, k)`` int64 of the bucketed top-k of a contiguous 2-D ``x``."""
    if k == 0:
        return torch.empty(x.shape[0], 0, dtype=torch.int64, device=x.device)
    if flat_kernels_selected(x):
        positions = _flat_topk(x, k, buckets, k_per_bucket, interleaved, by_magnitude)
        if positions is not None:
            return positions
    return _bucketed_topk_default(x, k, buckets, k_per_bucket, interleaved, by_magnitude)


def _bucketed_topk_default(x: torch.Tensor, k: int, buckets: int, k_per_bucket: int,
                           interleaved: bool, by_magnitude: bool) -> torch.Tensor:
    """:func:`bucketed_topk_indices` by the backend's default kernels."""
    n = x.shape[1]
    length = -(-n // buckets)
    kept = min(k_per_bucket, length)
    if buckets * kept == k:
        # No second stage: every candidate is selected; only the order remains.
        candidates = per_bucket_topk(x, buckets, k_per_bucket, interleaved, by_magnitude)
        flat = candidates.reshape(candidates.shape[0], -1)
        return positions_of(torch.sort(flat, dim=-1, descending=True).values)
    # A floor that about 2k / recall entries exceed: the k-th candidate lies above it.
    recall = max(expected_recall(n, k, buckets, k_per_bucket), 0.05)
    floor, fraction = _score_floor(x, 2 * k / (recall * n), by_magnitude)
    candidates = bucket_candidates(x, buckets, k_per_bucket, interleaved, by_magnitude, floor,
                                   above_per_bucket=fraction * length)
    positions = _second_stage(candidates, k)
    if floor is not None:
        # Checked after the second stage is queued, so that the device works while the
        # host waits on this one sync; rows with fewer than k candidates are redone.
        short = (candidates != PAD_KEY).sum(dim=(1, 2)) < k
        if bool(short.any()):
            positions[short] = _second_stage(
                bucket_candidates(x[short], buckets, k_per_bucket, interleaved, by_magnitude), k)
    return positions


@bucketed_topk_indices.register_fake
def _(x, k, buckets, k_per_bucket, interleaved, by_magnitude):
    return x.new_empty((x.shape[0], k), dtype=torch.int64)


def resolve_buckets(n: int, k: int, buckets: int | None = None,
                    k_per_bucket: int | None = None,
                    recall_target: float | None = None) -> tuple[int, int]:
    """The ``(buckets, k_per_bucket)`` that ``distk.topk`` uses for these arguments.

    Both given: used as they are (``buckets * k_per_bucket`` must be at least ``k``).
    Otherwise the missing ones are chosen by :func:`choose_buckets` for
    ``recall_target`` (default :data:`DEFAULT_RECALL_TARGET`).
    """
    if buckets is not None and (isinstance(buckets, bool) or not isinstance(buckets, int)
                                or not 1 <= buckets <= n):
        raise ValueError(f"buckets must be an integer in [1, n={n}], got {buckets!r}")
    if k_per_bucket is not None and (isinstance(k_per_bucket, bool)
                                     or not isinstance(k_per_bucket, int) or k_per_bucket < 1):
        raise ValueError(f"k_per_bucket must be an integer >= 1, got {k_per_bucket!r}")
    target = DEFAULT_RECALL_TARGET if recall_target is None else check_recall_target(recall_target)
    if buckets is not None and k_per_bucket is not None:
        if buckets * min(k_per_bucket, math.ceil(n / buckets)) < k:
            raise ValueError(
                f"buckets * k_per_bucket must be at least k: buckets={buckets}, "
                f"k_per_bucket={k_per_bucket} give {buckets * k_per_bucket} candidates "
                f"(each bucket holds at most {math.ceil(n / buckets)}), k={k}"
            )
        return buckets, k_per_bucket
    return choose_buckets(n, k, target, buckets=buckets, k_per_bucket=k_per_bucket)


def topk(x: torch.Tensor, k: int, dim: int = -1, method: str = "bucketed",
         by_magnitude: bool = True, buckets: int | None = None,
         k_per_bucket: int | None = None, interleaved: bool = True,
         recall_target: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` entries of ``x`` along ``dim``, exactly or by bucketed approximation.

    Args:
        x: floating tensor (fp32, fp16, bf16, fp64), any leading shape; selection is
            per row along ``dim``.
        k: number of entries to keep, ``0 <= k <= x.shape[dim]``.
        dim: dimension to select along.
        method: ``"bucketed"`` (approximate, fast) or ``"exact"`` (``torch.topk``).
        by_magnitude: rank by ``|x|`` (gradient sparsification) or by ``x``.
        buckets, k_per_bucket: bucket parameters; missing ones are chosen for
            ``recall_target`` by :func:`choose_buckets`.
        interleaved: element ``i`` goes to bucket ``i % buckets`` (default) rather than
            contiguous blocks; interleaving is robust to correlated neighbours.
        recall_target: expected fraction of the true top-k to return, in (0, 1];
            default :data:`DEFAULT_RECALL_TARGET` (0.95) when no bucket parameters are
            given. ``1.0`` makes the bucketed method exact.

    Returns:
        ``(values, indices)``, each of shape ``x.shape`` with ``dim`` replaced by ``k``:
        the signed values of ``x`` at the selected int64 indices, sorted by descending
        score (ties: lower index first). NaN ranks above every number, as in
        ``torch.topk``; ``+-inf`` rank by their value (or magnitude).

    Raises:
        ValueError: naming the argument and its allowed range, for a bad ``k``,
            ``method``, ``buckets``, ``k_per_bucket``, ``recall_target`` or a
            non-floating ``x``.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor (fp32, fp16, bf16, fp64), "
                         f"got dtype {x.dtype}")
    if x.layout != torch.strided:
        raise ValueError(f"x must be a dense (strided) tensor, got layout {x.layout}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension, got a 0-d tensor")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [{-x.dim()}, {x.dim() - 1}], got {dim}")
    n = x.shape[dim]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k must be an integer in [0, n={n}] (n = x.shape[{dim}]), got {k!r}")
    if recall_target is not None:
        check_recall_target(recall_target)

    if method == "exact":
        score = x.abs() if by_magnitude else x
        indices = torch.topk(score, k, dim=dim).indices
        return torch.gather(x, dim, indices), indices

    buckets, k_per_bucket = resolve_buckets(n, k, buckets, k_per_bucket, recall_target)
    moved = x.movedim(dim, -1)
    flat = moved.reshape(-1, n).contiguous()
    indices = bucketed_topk_indices(flat, k, buckets, k_per_bucket, interleaved, by_magnitude)
    indices = indices.reshape(*moved.shape[:-1], k).movedim(-1, dim)
    return torch.gather(x, dim, indices), indices
