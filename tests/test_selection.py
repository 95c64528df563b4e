"""Selection layer: reference semantics, CPU kernel parity, recall model, errors, compile.

Exact equality is used throughout: selection does no floating-point arithmetic on the
values (scores are compared as integer keys, values are gathered), so every backend must
return bit-identical indices and values.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import distk
from distk.selection import bucket_candidates, resolve_buckets
from distk.selection.cpu_kernel import bucket_candidates_cpu, load
from distk.selection.reference import (
    PAD_KEY,
    bucket_candidates_reference,
    bucket_positions,
    bucketed_topk_reference,
    positions_of,
    second_stage,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def with_specials(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Sprinkle NaN, +-inf, zeros and exact ties over a 2-D tensor."""
    gen = random.Random(seed)
    x = x.clone()
    rows, n = x.shape
    for r in range(rows):
        for value in (float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 0.5, 0.5, -0.5):
            x[r, gen.randrange(n)] = value
    return x


@pytest.fixture(autouse=True)
def _cpu_kernel_built():
    assert load() is not None, "the CPU kernel must build on this machine (g++ is required)"


# --- reference semantics --------------------------------------------------------------


def test_bucket_positions_balanced_and_cover_every_index():
    for n, b in [(10, 4), (17, 17), (1000, 7), (1001, 16)]:
        for interleaved in (True, False):
            pos = bucket_positions(n, b, interleaved)
            real = pos[pos >= 0]
            assert torch.equal(real.sort().values, torch.arange(n))
            sizes = (pos >= 0).sum(dim=1)
            assert sizes.max() - sizes.min() <= 1  # balanced: no bucket starves


@pytest.mark.parametrize("n,k", [(1000, 10), (4096, 100), (333, 333)])
@pytest.mark.parametrize("by_magnitude", [True, False])
def test_bucketed_is_exact_with_one_bucket_or_k_per_bucket_ge_k(n, k, by_magnitude):
    torch.manual_seed(0)
    x = torch.randn(3, n)  # continuous values: no ties, so torch.topk's order is defined
    score = x.abs() if by_magnitude else x
    expected = torch.topk(score, k).indices
    for buckets, k_per_bucket in [(1, k), (7, k), (n, 1) if k == n else (1, k)]:
        _, indices = distk.topk(x, k, buckets=buckets, k_per_bucket=k_per_bucket,
                                by_magnitude=by_magnitude)
        assert torch.equal(indices, expected)


def test_exact_method_is_torch_topk_on_magnitude_with_signed_values():
    torch.manual_seed(1)
    x = torch.randn(4, 500)
    values, indices = distk.topk(x, 20, method="exact")
    assert torch.equal(indices, torch.topk(x.abs(), 20).indices)
    assert torch.equal(values, x.gather(1, indices))
    assert (values < 0).any()  # signed values come back, not magnitudes


def test_nan_ranks_largest_then_inf_like_torch_topk():
    x = torch.tensor([[1.0, float("nan"), -float("inf"), 3.0, float("inf"), -2.0, 0.0, 5.0]])
    for method in ("exact", "bucketed"):
        values, indices = distk.topk(x, 3, method=method, buckets=2, k_per_bucket=3)
        assert indices[0, 0].item() == 1 and torch.isnan(values[0, 0])
        assert set(indices[0, 1:].tolist()) == {2, 4}
    # torch.topk leaves the order of ties open; distk's bucketed order gives them to the
    # lower index.
    assert distk.topk(x, 3, buckets=2, k_per_bucket=3)[1][0, 1:].tolist() == [2, 4]
    values, indices = distk.topk(x, 2, by_magnitude=False, buckets=2, k_per_bucket=2)
    assert indices[0].tolist() == [1, 4]  # NaN, then +inf; -inf ranks last when signed


def test_ties_go_to_the_lower_index():
    x = torch.ones(1, 64)
    _, indices = distk.topk(x, 5, buckets=8, k_per_bucket=2)
    assert indices[0].tolist() == [0, 1, 2, 3, 4]


def test_k_equals_n_and_k_zero():
    x = torch.randn(2, 37)
    values, indices = distk.topk(x, 37, buckets=5, k_per_bucket=8)
    assert torch.equal(indices.sort(dim=1).values, torch.arange(37).expand(2, 37))
    values, indices = distk.topk(x, 0)
    assert values.shape == (2, 0) and indices.dtype == torch.int64


@pytest.mark.parametrize("dtype", DTYPES)
def test_leading_dims_and_dim_argument(dtype):
    torch.manual_seed(2)
    x = torch.randn(3, 50, 4).to(dtype)
    values, indices = distk.topk(x, 6, dim=1, buckets=5, k_per_bucket=2)
    assert values.shape == (3, 6, 4) and values.dtype == dtype and indices.dtype == torch.int64
    rows = x.movedim(1, -1).reshape(-1, 50)
    expected = bucketed_topk_reference(rows.contiguous(), 6, 5, 2)
    assert torch.equal(indices.movedim(1, -1).reshape(-1, 6), expected)
    assert torch.equal(values, x.gather(1, indices))


def test_candidates_never_select_padding():
    # n not a multiple of buckets and k_per_bucket larger than the smallest bucket.
    x = torch.randn(5, 10)
    for interleaved in (True, False):
        _, indices = distk.topk(x, 10, buckets=4, k_per_bucket=3, interleaved=interleaved)
        assert torch.equal(indices.sort(dim=1).values, torch.arange(10).expand(5, 10))


# --- fast paths against the reference ---------------------------------------------------


CASES = [  # rows, n, buckets, k_per_bucket
    (3, 1000, 16, 3), (2, 1001, 7, 5), (1, 10, 4, 3), (2, 5000, 100, 16),
    (1, 17, 17, 2), (2, 100_000, 64, 4), (1, 99_999, 1000, 2), (4, 4096, 256, 1),
    (1, 70_000, 3000, 20),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("by_magnitude", [True, False])
def test_cpu_kernel_first_stage_equals_reference(dtype, interleaved, by_magnitude):
    torch.manual_seed(3)
    for rows, n, buckets, k_per_bucket in CASES:
        x = with_specials(torch.randn(rows, n)).to(dtype)
        got = bucket_candidates_cpu(x, buckets, k_per_bucket, interleaved, by_magnitude)
        want = bucket_candidates_reference(x, buckets, k_per_bucket, interleaved, by_magnitude)
        assert torch.equal(got, want), (rows, n, buckets, k_per_bucket)


@pytest.mark.parametrize("by_magnitude", [True, False])
def test_cpu_kernel_floor_equals_reference(by_magnitude):
    torch.manual_seed(4)
    x = torch.randn(3, 20_000)
    keys = distk.selection.reference.order_keys(x, by_magnitude)
    floor = keys.kthvalue(19_000, dim=1).values
    for interleaved in (True, False):
        got = bucket_candidates_cpu(x, 128, 4, interleaved, by_magnitude, floor)
        want = bucket_candidates_reference(x, 128, 4, interleaved, by_magnitude, floor)
        assert torch.equal(got, want)
        assert ((got == PAD_KEY) | ((got >> 32) > floor[:, None, None])).all()


@pytest.mark.parametrize("interleaved", [True, False])
def test_topk_with_sampled_floor_equals_reference_topk(interleaved, monkeypatch):
    # n >= 2^18 makes distk.topk sample a floor; the result must not change.
    torch.manual_seed(5)
    x = with_specials(torch.randn(2, 1 << 18))
    x[1, :160_000] = 0.0  # a row where the sampled floor leaves too few candidates
    for k, buckets, k_per_bucket in [(600, 300, 3), (64, 64, 2), (2000, 512, 8)]:
        want = bucketed_topk_reference(x, k, buckets, k_per_bucket, interleaved)
        for backend in ("cpu", "reference"):
            monkeypatch.setenv("DISTK_TOPK_BACKEND", backend)
            _, got = distk.topk(x, k, buckets=buckets, k_per_bucket=k_per_bucket,
                                interleaved=interleaved)
            assert torch.equal(got, want), (backend, k, buckets)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 3), n=st.integers(1, 400), data=st.data(),
    dtype=st.sampled_from(DTYPES), interleaved=st.booleans(), by_magnitude=st.booleans(),
    pool=st.sampled_from(["normal", "ties", "specials"]),
)
def test_property_cpu_equals_reference(rows, n, data, dtype, interleaved, by_magnitude, pool):
    buckets = data.draw(st.integers(1, n))
    k_per_bucket = data.draw(st.integers(1, 18))
    kept = min(k_per_bucket, -(-n // buckets))
    k = data.draw(st.integers(0, min(n, buckets * kept)))
    seed = data.draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    if pool == "ties":
        x = torch.randint(-3, 4, (rows, n), generator=gen).float()
    else:
        x = torch.randn(rows, n, generator=gen)
        if pool == "specials":
            x = with_specials(x, seed)
    x = x.to(dtype)
    got = bucket_candidates_cpu(x, buckets, k_per_bucket, interleaved, by_magnitude)
    want = bucket_candidates_reference(x, buckets, k_per_bucket, interleaved, by_magnitude)
    assert torch.equal(got, want)
    values, indices = distk.topk(x, k, buckets=buckets, k_per_bucket=k_per_bucket,
                                 interleaved=interleaved, by_magnitude=by_magnitude)
    assert indices.shape == (rows, k)
    assert ((indices >= 0) & (indices < n)).all()
    for r in range(rows):
        assert len(set(indices[r].tolist())) == k  # no duplicates, no padding
    gathered = x.gather(1, indices)
    assert torch.equal(values.isnan(), gathered.isnan())
    assert torch.equal(values[~values.isnan()], gathered[~gathered.isnan()])
    assert torch.equal(indices, bucketed_topk_reference(x, k, buckets, k_per_bucket,
                                                        interleaved, by_magnitude))


def test_bucket_candidates_dispatch_returns_sorted_keys_per_bucket():
    x = torch.randn(2, 3000)
    keys = bucket_candidates(x, 30, 4)
    assert keys.shape == (2, 30, 4)
    assert (keys[..., :-1] > keys[..., 1:]).all()  # unique keys, descending
    pos = positions_of(keys)
    assert torch.equal(pos % 30, torch.arange(30)[None, :, None].expand_as(pos))


# --- recall model -----------------------------------------------------------------------


def test_expected_recall_matches_the_published_model():
    # The recall model of Key et al., "Approximate Top-k for Increased Parallelism" (2024,
    # arXiv:2412.04358), evaluated at n = 2^20, k = 1024; for k_per_bucket = 1 it has the
    # closed form (b / k) * (1 - (1 - 1/b)^k) = 0.885 at b = 4096.
    n, k = 1 << 20, 1024
    assert distk.expected_recall(n, k, 4096, 1) == pytest.approx(0.885, abs=5e-4)
    assert distk.expected_recall(n, k, 2048, 2) == pytest.approx(0.967, abs=5e-4)
    assert distk.expected_recall(n, k, 1024, 4) == pytest.approx(0.9957, abs=5e-5)
    assert distk.expected_recall(n, k, 512, 8) == pytest.approx(0.9999, abs=5e-5)
    assert distk.expected_recall(n, k, 1, 1) == 1.0
    assert distk.expected_recall(n, k, 10, 1024) == 1.0


@pytest.mark.parametrize("k,buckets,k_per_bucket", [(256, 512, 1), (256, 128, 2), (500, 100, 6)])
def test_expected_recall_against_monte_carlo(k, buckets, k_per_bucket):
    # Simulate the model directly: the top-k items land in uniformly random buckets and a
    # bucket keeps its k_per_bucket largest. 400 trials of k items: the standard error of
    # the mean recall is below 0.003; 0.01 is > 3 standard errors.
    gen = torch.Generator().manual_seed(0)
    trials = 400
    bucket = torch.randint(0, buckets, (trials, k), generator=gen)  # item i = i-th largest
    one_hot = torch.nn.functional.one_hot(bucket, buckets)
    larger_in_same_bucket = (one_hot.cumsum(dim=1) - one_hot).gather(2, bucket[..., None])
    kept = (larger_in_same_bucket.squeeze(-1) < k_per_bucket).float().mean()
    assert kept.item() == pytest.approx(
        distk.expected_recall(10**9, k, buckets, k_per_bucket), abs=0.01)


@pytest.mark.parametrize("k_per_bucket", [1, 2, 4])
def test_measured_recall_on_iid_data_matches_the_model(k_per_bucket):
    # iid data, n = 2^18, k = 1024: recall over 8 rows; the binomial model ignores that
    # bucket sizes are finite (a hypergeometric effect of order k/n), and the 8 x 1024
    # selected items give a standard error below 0.004; tolerance 0.015.
    n, k = 1 << 18, 1024
    buckets = {1: 4096, 2: 1024, 4: 400}[k_per_bucket]
    torch.manual_seed(6)
    x = torch.randn(8, n)
    _, got = distk.topk(x, k, buckets=buckets, k_per_bucket=k_per_bucket)
    exact = torch.topk(x.abs(), k).indices
    recall = torch.stack([torch.isin(got[r], exact[r]).float().mean() for r in range(8)]).mean()
    assert recall.item() == pytest.approx(distk.expected_recall(n, k, buckets, k_per_bucket),
                                          abs=0.015)


def test_choose_buckets_meets_the_target_at_the_lowest_modelled_cost():
    from distk.selection.recall import selection_cost

    n, k = 1 << 22, 4194
    for target in (0.8, 0.95, 0.99):
        buckets, k_per_bucket = distk.choose_buckets(n, k, target)
        assert distk.expected_recall(n, k, buckets, k_per_bucket) >= target
        assert buckets * k_per_bucket >= k
        cost = selection_cost(n, buckets, k_per_bucket)
        for kb in range(1, 17):  # no other k_per_bucket meets the target more cheaply
            b = distk.choose_buckets(n, k, target, k_per_bucket=kb)[0]
            if distk.expected_recall(n, k, b, kb) >= target:
                assert selection_cost(n, b, kb) >= cost
    assert distk.choose_buckets(n, k, 1.0) == (1, k)
    assert distk.choose_buckets(n, k, 0.95, buckets=512)[0] == 512


def test_default_recall_target_is_met_on_iid_data():
    torch.manual_seed(7)
    n, k = 1 << 20, 1 << 10
    x = torch.randn(n)
    _, got = distk.topk(x, k)  # default: DEFAULT_RECALL_TARGET
    recall = torch.isin(got, torch.topk(x.abs(), k).indices).float().mean().item()
    # Sampling noise of one row of 1024: about 0.007; allow 3 sigma below the target.
    assert recall >= distk.DEFAULT_RECALL_TARGET - 0.02


# --- bad arguments ----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=11), r"k must be an integer in \[0, n=10\].*got 11"),
    (dict(k=-1), r"k must be.*got -1"),
    (dict(k=3, method="fast"), r"method must be one of \('bucketed', 'exact'\), got 'fast'"),
    (dict(k=3, buckets=0), r"buckets must be an integer in \[1, n=10\], got 0"),
    (dict(k=3, buckets=11), r"buckets must be an integer in \[1, n=10\], got 11"),
    (dict(k=3, k_per_bucket=0), r"k_per_bucket must be an integer >= 1, got 0"),
    (dict(k=3, recall_target=0.0), r"recall_target must be a number in \(0, 1\], got 0.0"),
    (dict(k=3, recall_target=1.5), r"recall_target must be a number in \(0, 1\], got 1.5"),
    (dict(k=5, buckets=2, k_per_bucket=2), r"buckets \* k_per_bucket must be at least k"),
    (dict(k=3, dim=2), r"dim must be in \[-1, 0\], got 2"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        distk.topk(torch.randn(10), **kwargs)


def test_non_floating_and_sparse_inputs_are_refused():
    with pytest.raises(ValueError, match=r"x must be a floating-point tensor.*torch.int64"):
        distk.topk(torch.arange(10), 3)
    with pytest.raises(ValueError, match=r"x must be a dense \(strided\) tensor"):
        distk.topk(torch.randn(10).to_sparse(), 3)


def test_resolve_buckets_explicit_pair_and_defaults():
    assert resolve_buckets(1000, 10, 20, 2) == (20, 2)
    b, kb = resolve_buckets(1 << 20, 1024)
    assert distk.expected_recall(1 << 20, 1024, b, kb) >= distk.DEFAULT_RECALL_TARGET


# --- torch.compile ----------------------------------------------------------------------


def test_torch_compile_fullgraph_traces_through_topk():
    def select(x):
        values, indices = distk.topk(x * 2.0, 16, buckets=32, k_per_bucket=2)
        return values.sum(dim=-1), indices

    x = torch.randn(4, 1000)
    compiled = torch.compile(select, fullgraph=True, backend="aot_eager")
    got_sum, got_idx = compiled(x)
    want_sum, want_idx = select(x)
    assert torch.equal(got_idx, want_idx)
    assert torch.equal(got_sum, want_sum)


def test_gradient_flows_through_selected_values():
    x = torch.randn(3, 200, requires_grad=True)
    values, indices = distk.topk(x, 10, buckets=20, k_per_bucket=1)
    values.sum().backward()
    expected = torch.zeros_like(x).scatter_(1, indices, 1.0)
    assert torch.equal(x.grad, expected)


def test_per_bucket_topk_with_sampled_floor_equals_plain_first_stage():
    # n >= 2^18: per_bucket_topk samples a floor; every bucket must still get its exact
    # top k_per_bucket, including a row (all zeros but a few) that forces the redo path.
    torch.manual_seed(8)
    x = torch.randn(3, 1 << 18)
    x[2] = 0.0
    x[2, ::1000] = 1.0
    for buckets, k_per_bucket in [(256, 64), (1000, 16), (64, 200)]:
        for interleaved in (True, False):
            want = bucket_candidates_reference(x, buckets, k_per_bucket, interleaved)
            got = distk.selection.per_bucket_topk(x, buckets, k_per_bucket, interleaved)
            assert torch.equal(got, want), (buckets, k_per_bucket, interleaved)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_per_bucket_topk_fused_add_equals_add_then_select(backend, monkeypatch):
    # add= (error feedback fused into the kernel's pass): x ends as x + add bitwise, and
    # the keys are those of the sum, with the sampled floor, its refill of short buckets
    # (row 2 is all zeros but a few entries) and the scalar tail of interleaved rows.
    monkeypatch.setenv("DISTK_TOPK_BACKEND", backend)
    torch.manual_seed(9)
    n = (1 << 18) + 77
    x = torch.randn(3, n)
    add = with_specials(torch.randn(3, n))
    x[2] = 0.0
    add[2] = 0.0
    add[2, ::1000] = 1.0
    for buckets, k_per_bucket in [(256, 64), (1000, 16), (64, 200)]:
        for interleaved in (True, False):
            summed = x + add
            want = bucket_candidates_reference(summed, buckets, k_per_bucket, interleaved)
            fused = x.clone()
            got = distk.selection.per_bucket_topk(fused, buckets, k_per_bucket, interleaved,
                                                  add=add)
            assert torch.equal(fused.isnan(), summed.isnan())
            assert torch.equal(fused.nan_to_num(), summed.nan_to_num())
            assert torch.equal(got, want), (backend, buckets, k_per_bucket, interleaved)


def test_fused_add_is_refused_for_the_kernel_on_mismatched_inputs():
    if load() is None:
        pytest.skip("CPU kernel unavailable")
    x = torch.randn(1, 4096)
    with pytest.raises(ValueError, match="add needs x and add contiguous fp32"):
        bucket_candidates_cpu(x, 16, 2, add=torch.randn(1, 4096, dtype=torch.float64))
    # bucket_candidates falls back to x.add_(add) for inputs the kernel cannot fuse
    bf16 = torch.randn(1, 4096).bfloat16()
    add = torch.randn(1, 4096).bfloat16()
    want = bucket_candidates_reference(bf16 + add, 16, 2)
    got = bucket_candidates(bf16, 16, 2, add=add)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("by_magnitude", [True, False])
def test_cpu_kernel_short_interleaved_rows_equal_reference(dtype, by_magnitude):
    # Fewer than 256 interleaved buckets: the kernel streams each row as one flat array
    # (blocks straddle bucket rows; below 32 buckets a block holds a bucket twice).
    torch.manual_seed(10)
    for buckets in (1, 3, 17, 31, 32, 33, 100, 255):
        for n in (buckets * 5 + 3, 4096 + 7, 50_000):
            x = with_specials(torch.randn(2, n), seed=buckets).to(dtype)
            x[1, : n // 2] = 0.5  # ties across and within blocks
            for k_per_bucket in (1, 3, 16, 70):
                want = bucket_candidates_reference(x, buckets, k_per_bucket, True, by_magnitude)
                got = bucket_candidates_cpu(x, buckets, k_per_bucket, True, by_magnitude)
                assert torch.equal(got, want), (buckets, n, k_per_bucket)
                keys = distk.selection.reference.order_keys(x.float(), by_magnitude)
                floor = keys.kthvalue(max(1, n - 4 * buckets), dim=1).values
                want = bucket_candidates_reference(x, buckets, k_per_bucket, True, by_magnitude,
                                                   floor)
                got = bucket_candidates_cpu(x, buckets, k_per_bucket, True, by_magnitude, floor)
                assert torch.equal(got, want), ("floor", buckets, n, k_per_bucket)


# --- the sampled floor on rows longer than 2^24 -------------------------------------------

@settings(max_examples=200, deadline=None)
@given(n=st.integers((1 << 24) + 1, (1 << 31) - 1).filter(lambda v: v & (v - 1)))
@example(n=67109157)
@example(n=(1 << 28) - 1)
def test_score_floor_samples_inside_rows_longer_than_2_to_24(n):
    # Sample starts computed in float32 (24-bit mantissa) rounded past n - block for many
    # lengths above 2^24: an IndexError on the CPU, an out-of-bounds gather on CUDA. A
    # stride-0 view of one element has any length at no memory cost, and its gather
    # checks bounds like a real row's.
    from distk.selection import _score_floor

    x = torch.zeros(1, 1).expand(1, n)
    floor, fraction = _score_floor(x, 0.001, True)
    assert floor is not None and floor.shape == (1,) and 0 < fraction < 0.01


def test_topk_on_a_row_longer_than_2_to_24_that_once_raised():
    # The case: distk.topk(torch.randn(67109157), 67109) raised IndexError. The
    # floor only changes the work: the result equals the first stage without a floor
    # followed by the exact second stage (the same CPU kernel, no floor).
    torch.manual_seed(11)
    n, k = 67109157, 67109
    x = torch.randn(n)
    values, indices = distk.topk(x, k)
    buckets, k_per_bucket = resolve_buckets(n, k)
    want = second_stage(bucket_candidates(x.view(1, -1), buckets, k_per_bucket), k)[0]
    assert torch.equal(indices, want)
    assert torch.equal(values, x[want])


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1 << 17, (1 << 31) - 1))
@example(n=67109157)
@example(n=(1 << 28) - 1)
def test_floor_sample_columns_are_ordered_disjoint_blocks_inside_the_row(n):
    # Integer arithmetic, so exact: the first block starts at 0, the last ends at n, and
    # blocks neither overlap nor leave the row.
    from distk.selection import _FLOOR_BLOCK, floor_sample, floor_sample_columns

    sample = floor_sample(n, 0.001, "cuda")  # from 2^17 entries on CUDA
    cols = floor_sample_columns(n, sample.blocks).view(sample.blocks, _FLOOR_BLOCK)
    assert cols[0, 0] == 0 and cols[-1, -1] == n - 1
    assert bool((cols[:, 1:] - cols[:, :-1] == 1).all())
    assert bool((cols[1:, 0] > cols[:-1, -1]).all())
