"""Recall model of bucketed top-k and the choice of (buckets, k_per_bucket).

The model (Key et al. 2024, "Approximate top-k for increased parallelism"): if the top
items land in buckets at random, the i-th largest item (0-based) survives the first stage
when fewer than ``k_per_bucket`` of the ``i`` items larger than it share its bucket, so

    R(k, b, k_b) = (1/k) * sum_{i=0}^{k-1} P[Binomial(i, 1/b) <= k_b - 1].

The second stage is exact, so the recall of the whole selection is that of the first.
"""

from __future__ import annotations

import functools
import math

DEFAULT_RECALL_TARGET = 0.95
"""Recall target used by ``distk.topk`` when neither ``buckets``/``k_per_bucket`` nor
``recall_target`` is given."""

MAX_CHOSEN_K_PER_BUCKET = 16
"""Largest ``k_per_bucket`` that :func:`choose_buckets` considers (explicit values may be
larger)."""

# Cost model, in units of "one streaming read of one input element". Calibrated on this
# project's CPU kernel (benchmarks/topk.py): the first pass costs about one read per
# element plus a little per kept slot; the second stage is an exact top-k over the
# candidates, which costs tens of reads per candidate (torch.topk on 2^26 floats takes
# ~90x the time of x.sum() here).
_PASS_COST_PER_ELEMENT = 1.0
_PASS_COST_PER_SLOT = 0.02
_STAGE2_COST_PER_CANDIDATE = 40.0
# The kernels compare 32 adjacent buckets per SIMD step (CPU) or per program (Triton):
# with fewer buckets per row the first pass runs scalar, about 8x slower per element.
_SIMD_BUCKETS = 32
_SCALAR_PASS_FACTOR = 8.0


def _check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_recall_target(recall_target: object) -> float:
    if (isinstance(recall_target, bool) or not isinstance(recall_target, (int, float))
            or not 0.0 < float(recall_target) <= 1.0):
        raise ValueError(f"recall_target must be a number in (0, 1], got {recall_target!r}")
    return float(recall_target)


@functools.lru_cache(maxsize=4096)  # pure; distk.topk asks it on every call
def expected_recall(n: int, k: int, buckets: int, k_per_bucket: int) -> float:
    """Expected fraction of the true top-``k`` of ``n`` items that bucketed top-k returns.

    ``buckets`` buckets each keep their ``k_per_bucket`` largest items. Exact (1.0) when
    there is one bucket, when ``k_per_bucket >= k`` or when every bucket keeps all of
    its items; otherwise the binomial model above. It assumes the top items land in
    buckets at random: under error feedback a fixed packed partition breaks that (see
    :func:`packed_bucket_counts`).
    """
    _check_positive_int("n", n)
    _check_positive_int("k", k, minimum=0)
    _check_positive_int("buckets", buckets)
    _check_positive_int("k_per_bucket", k_per_bucket)
    if k > n:
        raise ValueError(f"k must be in [0, n={n}], got {k}")
    if k == 0 or buckets == 1 or k_per_bucket >= k or k_per_bucket >= math.ceil(n / buckets):
        return 1.0
    # Closed form of the sum: sum_i P[Bin(i, p) = j] = P[Bin(k, p) > j] / p (the (j+1)-th
    # success of a Bernoulli(p) sequence comes within k trials), so
    #     R = (b / k) * E[min(X, k_b)],  X ~ Binomial(k, 1/b),
    # i.e. b buckets each keep min(X, k_b) of the X top items that land in them.
    # O(k_b) terms instead of O(k * k_b).
    p = 1.0 / buckets
    log_p, log_q = math.log(p), math.log1p(-p)
    expected_kept = float(k_per_bucket)
    for j in range(min(k_per_bucket, k + 1)):
        log_pmf = (math.lgamma(k + 1) - math.lgamma(j + 1) - math.lgamma(k - j + 1)
                   + j * log_p + (k - j) * log_q)
        expected_kept -= (k_per_bucket - j) * math.exp(log_pmf)
    return min(1.0, buckets * expected_kept / k)


def _min_buckets_for(n: int, k: int, k_per_bucket: int, recall_target: float) -> int | None:
    """Smallest bucket count meeting the target with this k_per_bucket (None: none does)."""
    lo = max(1, math.ceil(k / k_per_bucket))
    hi = n
    if expected_recall(n, k, hi, k_per_bucket) < recall_target:
        return None
    if expected_recall(n, k, lo, k_per_bucket) >= recall_target:
        return lo
    while hi - lo > 1:  # recall grows with the bucket count
        mid = (lo + hi) // 2
        if expected_recall(n, k, mid, k_per_bucket) >= recall_target:
            hi = mid
        else:
            lo = mid
    return hi


def packed_bucket_counts(k: int, min_k_per_bucket: int, max_k_per_bucket: int, *,
                         exact: bool = False) -> tuple[int, ...]:
    """Bucket counts that a packed selection (no second stage, ``k_per_bucket =
    ceil(k / buckets)``) of ``k`` entries uses in turn, one per step: two coprime counts,
    one when no second exists, none when no count fits.

    A count ``b`` fits when ``ceil(k / b)`` lies in ``[min_k_per_bucket,
    max_k_per_bucket]``, i.e. ``b <= k // min_k_per_bucket`` (so its recall is at least
    what the rule that chose ``min_k_per_bucket`` promises), and, with ``exact``, when
    ``b`` divides ``k`` (``b * k_per_bucket == k``). Counts free of the factors 2 and 3
    come first, then odd multiples of 3, then even counts, each group largest first; the
    pair is the first count in that order that has a coprime partner, with its first
    coprime partner in that order. Without ``exact`` these are the two largest fitting
    counts of the form ``6j +- 1`` (consecutive ones are odd and differ by 2 or 4, hence
    coprime).

    Why two: :func:`expected_recall` assumes the top items land in buckets at random.
    With error feedback and a packed plan, that stops holding after a few steps: every
    bucket sends exactly ``k_per_bucket`` entries, so a bucket that held more than its
    share of the large entries keeps the rest in the residual (momentum correction makes
    them grow) and is overloaded again at the next step, while an underloaded one spends
    its quota on small entries. The backlog stays with the bucket, the load of the true
    top-k across buckets becomes over-dispersed (variance 5-8x the binomial one on
    ByteGPT gradients and on iid Gaussian ones with momentum 0.9) and recall falls from
    0.95 to 0.86-0.89 (docs/selection.md, "Recall on real gradients"). With interleaved
    buckets, positions share a bucket when equal modulo ``b``; for coprime ``b1, b2`` the
    entries of one bucket of ``b1`` spread evenly over all buckets of ``b2``, so a backlog
    built under one partition is served by every bucket of the next.

    Why free of 2 and 3: parameter layouts repeat with row strides of the form
    ``2^a 3^c`` (``d_model``-wide rows, 3x3 convolution kernels, fused qkv). A count
    sharing a factor ``g`` with the stride maps a column of a weight matrix whose large
    entries sit in a few columns to ``b / g`` buckets only (``b = 128`` with 128-wide
    rows: one bucket per column; recall 0.90-0.94 instead of 0.95 on ByteGPT vectors).
    """
    _check_positive_int("k", k)
    _check_positive_int("min_k_per_bucket", min_k_per_bucket)
    _check_positive_int("max_k_per_bucket", max_k_per_bucket, minimum=min_k_per_bucket)
    lowest = max(1, math.ceil(k / max_k_per_bucket))
    highest = k // min_k_per_bucket

    fitting = [b for b in range(highest, lowest - 1, -1) if not exact or k % b == 0]
    # Counts free of the factors 2 and 3 first, then odd ones, then the rest; largest first.
    preferred = sorted(fitting, key=lambda b: (b % 2 == 0, b % 3 == 0, -b))
    for first in preferred:  # (with exact, a count may have no coprime partner)
        second = next((b for b in preferred if b != first and math.gcd(b, first) == 1), None)
        if second is not None:
            return first, second
    return tuple(preferred[:1])


def selection_cost(n: int, buckets: int, k_per_bucket: int) -> float:
    """Modelled cost of bucketed selection, in element reads (see the constants above)."""
    candidates = buckets * min(k_per_bucket, math.ceil(n / buckets))
    stage2 = _STAGE2_COST_PER_CANDIDATE * candidates if buckets > 1 else 0.0
    per_element = _PASS_COST_PER_ELEMENT + _PASS_COST_PER_SLOT * k_per_bucket
    # Interleaved rows of `buckets` entries: the last (buckets % 32) run scalar.
    scalar_share = 1.0 if buckets < _SIMD_BUCKETS else (buckets % _SIMD_BUCKETS) / buckets
    if n <= _SIMD_BUCKETS:
        scalar_share = 0.0
    per_element *= 1.0 + (_SCALAR_PASS_FACTOR - 1.0) * scalar_share
    return n * per_element + stage2


@functools.lru_cache(maxsize=4096)  # pure, and a few ms of Python per call
def choose_buckets(n: int, k: int, recall_target: float = DEFAULT_RECALL_TARGET,
                   *, buckets: int | None = None,
                   k_per_bucket: int | None = None) -> tuple[int, int]:
    """Cheapest ``(buckets, k_per_bucket)`` whose expected recall meets ``recall_target``.

    Tries every ``k_per_bucket`` in 1..16 (or the one given), finds the fewest buckets
    that reach the target under :func:`expected_recall`, and returns the pair with the
    lowest :func:`selection_cost`. Passing ``buckets`` fixes the bucket count and picks
    the smallest ``k_per_bucket`` that reaches the target. ``recall_target=1.0`` always
    yields an exact selection (one bucket keeping k items).
    """
    _check_positive_int("n", n)
    _check_positive_int("k", k, minimum=0)
    recall_target = check_recall_target(recall_target)
    if k > n:
        raise ValueError(f"k must be in [0, n={n}], got {k}")
    if k == 0:
        return 1, 1
    if buckets is not None:
        _check_positive_int("buckets", buckets)
        if buckets > n:
            raise ValueError(f"buckets must be in [1, n={n}], got {buckets}")
        if k_per_bucket is not None:
            return buckets, _check_positive_int("k_per_bucket", k_per_bucket)
        kb = max(1, math.ceil(k / buckets))
        while kb < k and expected_recall(n, k, buckets, kb) < recall_target:
            kb += 1
        return buckets, kb
    if recall_target >= 1.0:
        return 1, k
    options = ([k_per_bucket] if k_per_bucket is not None
               else range(1, MAX_CHOSEN_K_PER_BUCKET + 1))
    best: tuple[float, int, int] | None = None
    for kb in options:
        _check_positive_int("k_per_bucket", kb)
        b = _min_buckets_for(n, k, kb, recall_target)
        if b is None:
            continue
        cost = selection_cost(n, b, kb)
        if best is None or cost < best[0]:
            best = (cost, b, kb)
    if best is None:
        return 1, k
    return best[1], best[2]
