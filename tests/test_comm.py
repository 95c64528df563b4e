"""distk.comm: wire format round trips, cost model, and the sparse collectives on gloo.

Exactness: the distributed tests use fp64 values that are small integers, so every sum
is exact whatever the summation order; a dense gloo all-reduce (whose order is the
backend's) must then match the sparse schemes bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed

from distk.comm import (
    LOCAL_SCHEMES,
    RankMismatchError,
    WireFormat,
    check_same_config,
    choose_scheme,
    exchange,
    meta_bytes,
    scheme_bytes,
    sparse_allreduce,
)
from distk.selection import bucket_candidates
from distk.selection.reference import positions_of

WORLD_SIZES = [1, 2, 3, 4]


# -- wire format (single process) -------------------------------------------------------

@pytest.mark.parametrize("numel,dtype,index_dtype", [
    (1000, torch.float32, torch.int16),
    (65536, torch.bfloat16, torch.int16),
    (65537, torch.float16, torch.int32),
    (100_000, torch.float64, torch.int32),
])
def test_absolute_round_trip(numel, dtype, index_dtype):
    gen = torch.Generator().manual_seed(0)
    k = 37
    indices = torch.randperm(numel, generator=gen)[:k]
    indices[0] = numel - 1  # the largest index must survive the 16-bit encoding
    values = torch.randn(k, generator=gen, dtype=torch.float64).to(dtype)
    wire = WireFormat(numel, k, dtype)
    assert wire.index_dtype == index_dtype
    payload = wire.pack(indices, values)
    assert payload.dtype == torch.uint8 and payload.numel() == wire.payload_bytes
    assert wire.payload_bytes == k * (index_dtype.itemsize + dtype.itemsize)
    # Unpack several rows at once (as after an all-gather); exact: no arithmetic on values.
    got_indices, got_values = wire.unpack(torch.stack([payload, payload]))
    assert torch.equal(got_indices[1], indices) and torch.equal(got_values[1], values)


def test_int64_indices_only_beyond_int32():
    assert WireFormat(2**31, 1, torch.float32).index_dtype == torch.int32
    assert WireFormat(2**31 + 1, 1, torch.float32).index_dtype == torch.int64


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("numel,buckets,k_per_bucket", [(10_007, 50, 4), (300_001, 4, 2)])
def test_bucket_offset_round_trip(interleaved, numel, buckets, k_per_bucket):
    x = torch.randn(1, numel, generator=torch.Generator().manual_seed(1))
    keys = bucket_candidates(x, buckets, k_per_bucket, interleaved, True)
    positions = positions_of(keys).reshape(-1)
    k = buckets * k_per_bucket
    wire = WireFormat(numel, k, torch.bfloat16, buckets, k_per_bucket, interleaved)
    expected_index = torch.int16 if -(-numel // buckets) <= 65536 else torch.int32
    assert wire.index_dtype == expected_index
    indices, values = wire.unpack(wire.pack(positions, x[0, positions]))
    assert torch.equal(indices, positions)
    assert torch.equal(values, x[0, positions].bfloat16())


def test_bucket_offset_needs_no_second_stage():
    with pytest.raises(ValueError, match="buckets \\* k_per_bucket == k"):
        WireFormat(1000, 10, torch.float32, buckets=4, k_per_bucket=2)
    with pytest.raises(ValueError, match="set both buckets and k_per_bucket"):
        WireFormat(1000, 10, torch.float32, buckets=10)


# -- cost model -------------------------------------------------------------------------

def test_cost_model_shapes():
    numel, world = 1 << 20, 4
    # Sparse all-gather is cheapest at low density, dense at high density.
    assert choose_scheme(numel, numel // 1000, world, 4, 4) == "allgather"
    assert choose_scheme(numel, numel // 2, world, 4, 4) == "dense"
    # With many ranks and heavy overlap, the reduce-scatter exchange wins.
    assert choose_scheme(numel, numel // 20, 64, 4, 4, union_per_shard=numel / 64 / 20) \
        == "reduce_scatter"
    # "shared" is a candidate only when a shared mask is possible.
    assert "shared" not in scheme_bytes(numel, 1000, world, 4, 4)
    assert set(scheme_bytes(numel, 1000, 1, 4, 4, shared_overhead=0).values()) == {0}


def test_shared_mask_bytes_do_not_grow_with_ranks():
    """Per rank, the all-gather grows as (P-1) k; a shared mask's all-reduce stays near
    2 k values at any P (the metadata row, which grows, is paid on verified steps only)."""
    numel, k = 124_000_000, 1_240_000  # a 124M-parameter model at density 1%
    shared, gathered = [], []
    for world in (2, 8, 32, 128, 512):
        costs = scheme_bytes(numel, k, world, 2, 2, shared_overhead=0)
        shared.append(costs["shared"] - meta_bytes(world))
        gathered.append(costs["allgather"] - meta_bytes(world))
        assert choose_scheme(numel, k, world, 2, 2, shared_overhead=0) == "shared"
    assert max(shared) <= 2 * k * 2 and min(shared) >= k * 2  # between 1x and 2x k values
    assert gathered[-1] > 100 * gathered[0]
    # A leader's positions (one offset per entry) still keep it flat.
    costs = scheme_bytes(numel, k, 512, 2, 2, shared_overhead=2 * k)
    assert costs["shared"] < costs["allgather"] / 100


# -- collectives on gloo ----------------------------------------------------------------

def _selection(rank: int, numel: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    indices = torch.randperm(numel, generator=gen)[:k]
    values = torch.randint(-50, 50, (k,), generator=gen).to(torch.float64)
    return indices, values


# Returned tensors travel as numpy arrays: a tensor put on a multiprocessing queue is
# shared through a file descriptor that disappears when the worker exits.
CASES = [(1000, 30), (70_001, 700), (50, 40)]


def _schemes_agree(rank, world):
    outs = []
    for numel, k in CASES:
        indices, values = _selection(rank, numel, k)
        dense = torch.zeros(numel, dtype=torch.float64)
        dense[indices] = values
        dist.all_reduce(dense)
        dense /= world
        out = {"dense_reference": dense.numpy()}
        for scheme in LOCAL_SCHEMES:
            result = exchange(indices, values, numel, scheme=scheme, measure_union=True)
            out[scheme] = result.output.numpy()
            out[scheme + "_bytes"] = result.bytes_sent
        out["sparse_allreduce"] = sparse_allreduce(indices, values, numel).numpy()
        out["sum"] = sparse_allreduce(indices, values, numel, average=False).numpy()
        outs.append(out)
    return outs


@pytest.mark.distributed
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_schemes_equal_dense_allreduce(world):
    results = run_distributed(_schemes_agree, world, timeout=90)
    for case, (numel, k) in enumerate(CASES):
        reference = torch.from_numpy(results[0][case]["dense_reference"])
        for rank_result in results:
            # Exact equality: integer-valued fp64 sums are exact in any order.
            for name in (*LOCAL_SCHEMES, "sparse_allreduce", "dense_reference"):
                assert torch.equal(torch.from_numpy(rank_result[case][name]), reference), \
                    (numel, k, name)
            assert torch.equal(torch.from_numpy(rank_result[case]["sum"]), reference * world)
        if world == 1:
            assert all(results[0][case][s + "_bytes"] == 0 for s in LOCAL_SCHEMES)


def _bitwise_same(rank, world, numel, k):
    gen = torch.Generator().manual_seed(rank)
    # Overlapping selections with random fp32 values: sums round, so the summation order
    # matters; every rank must still hold the same bits.
    indices = torch.randperm(numel // 2, generator=gen)[:k]
    values = torch.randn(k, generator=gen)
    return {(s, str(v)): sparse_allreduce(indices, values, numel, scheme=s,
                                          value_dtype=v).numpy()
            for s in LOCAL_SCHEMES for v in (None, torch.bfloat16)}


@pytest.mark.distributed
def test_every_rank_holds_same_bits():
    results = run_distributed(_bitwise_same, 3, 4000, 500, timeout=90)
    results = [{key: torch.from_numpy(r[key]) for key in r} for r in results]
    for key in results[0]:
        for rank_result in results[1:]:
            assert torch.equal(rank_result[key], results[0][key]), key
    fp32 = {s: results[0][(s, "None")] for s in LOCAL_SCHEMES}
    # Values travel in fp32, the accumulation dtype: reduce-scatter does the same
    # additions in the same order as all-gather, so it matches bit for bit.
    assert torch.equal(fp32["reduce_scatter"], fp32["allgather"])
    # The dense all-reduce sums in the backend's order: equal up to rounding
    # (3 terms of magnitude <~ 5, fp32: a few ulps).
    torch.testing.assert_close(fp32["dense"], fp32["allgather"], rtol=1e-6, atol=1e-6)
    # bf16 on the wire: all-gather accumulates the bf16 values in fp32 (exact here: 3
    # bf16 terms fit in fp32's mantissa) and rounds once to the output dtype, fp32.
    bf16 = results[0][("allgather", "torch.bfloat16")]
    torch.testing.assert_close(bf16, fp32["allgather"], rtol=2**-8, atol=1e-2)


def _mismatch(rank, world):
    messages = {}
    for what in ("numel", "k", "scheme"):
        numel, k, scheme = 1000, 10, "allgather"
        if what == "numel" and rank == 1:
            numel = 1200
        if what == "k" and rank == world - 1:
            k = 11
        if what == "scheme" and rank == 0:
            scheme = "reduce_scatter"
        try:
            sparse_allreduce(torch.arange(k), torch.ones(k), numel, scheme=scheme)
            messages[what] = None
        except RankMismatchError as error:
            messages[what] = str(error)
    # The group still works after the errors: nothing is left half-sent.
    messages["alive"] = sparse_allreduce(torch.arange(3), torch.ones(3), 5).tolist()
    return messages


@pytest.mark.distributed
def test_mismatch_errors_on_every_rank():
    results = run_distributed(_mismatch, 3, timeout=60)
    for messages in results:
        assert "disagree on numel (rank 0: 1000, rank 1: 1200, rank 2: 1000)" in \
            messages["numel"]
        assert "disagree on k (rank 0: 10, rank 1: 10, rank 2: 11)" in messages["k"]
        assert "exchange scheme (rank 0: reduce_scatter, rank 1: allgather" in \
            messages["scheme"]
        assert messages["alive"] == [1.0, 1.0, 1.0, 0.0, 0.0]


def _config_check(rank, world):
    out = []
    for differ in (False, True):
        config = {"density": 0.01, "method": "bucketed"}
        if differ and rank == 1:
            config["density"] = 0.02
        try:
            check_same_config(config)
            out.append(None)
        except RankMismatchError as error:
            out.append(str(error))
    return out


@pytest.mark.distributed
def test_check_same_config():
    for same, differ in run_distributed(_config_check, 2, timeout=60):
        assert same is None
        assert "density (rank 0: 0.01, rank 1: 0.02)" in differ
        assert "method" not in differ


# -- coalesced exchanges ------------------------------------------------------------------

def _coalesced_run(rank, world):
    """The CASES through the all-gather, dense and shared schemes, each exchange launched
    inside one coalesced block (unverified, so that nothing else runs), against the same
    exchanges launched one by one; then a small cap, and a block that raises."""
    from distk.comm import coalesced, launch_exchange

    def launch_all(**options):
        pending = []
        for numel, k in CASES:
            indices, values = _selection(rank, numel, k)
            for scheme in ("allgather", "dense"):
                pending.append(launch_exchange(indices, values, numel, scheme=scheme,
                                               verify=False, **options))
            dense = torch.zeros(numel, dtype=torch.float32)
            dense[indices] = values.float()  # dense input: one all-reduce in float32
            pending.append(launch_exchange(None, dense, numel, verify=False, **options))
        return pending

    alone = [p.wait().output.numpy() for p in launch_all()]
    with coalesced():
        pending = launch_all()
        held_inside = [p.future.done() for p in pending]
        try:  # waiting inside the block would never return: refused
            pending[0].wait()
        except RuntimeError as err:
            held_inside.append("wait after the block" not in str(err))
    together = [p.wait().output.numpy() for p in pending]
    with coalesced(cap_bytes=1):  # every exchange reaches the cap: sent as it comes
        capped = launch_all()
        sent_inside = [p.future.wait() is None for p in capped]
    capped = [p.wait().output.numpy() for p in capped]
    raised = None
    try:
        with coalesced():
            doomed = launch_all()
            raise KeyError("stop")
    except KeyError:
        raised = [type(_error_of(p)).__name__ for p in doomed]
    # Nothing of the abandoned block went out: the next collective still pairs up.
    check = torch.tensor([float(rank + 1)])
    dist.all_reduce(check)
    return alone, together, held_inside, capped, sent_inside, raised, float(check)


def _error_of(pending):
    try:
        pending.wait()
    except Exception as err:  # noqa: BLE001 - the test reads its type
        return err
    return None


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_coalesced_exchanges_equal_separate_ones(world):
    """Inside distk.comm.coalesced the exchanges are held until the block ends (their
    futures not done) and then go out together; every result equals the one of the same
    exchange launched alone (exact here: small integers), with a small cap too (then each
    is sent as it comes, inside the block); waiting inside the block is refused (it would
    never return); a block that raises sends nothing and fails its exchanges with that
    error, and the ranks stay paired."""
    from distk.comm import coalesced
    with pytest.raises(ValueError, match="cap_bytes must be a positive int, got 0"), \
            coalesced(cap_bytes=0):
        pass
    for alone, together, held_inside, capped, sent_inside, raised, check in \
            run_distributed(_coalesced_run, world, timeout=90):
        assert len(alone) == len(together) == len(capped) == 3 * len(CASES)
        for a, b, c in zip(alone, together, capped, strict=True):
            assert (a == b).all() and (a == c).all()
        assert held_inside == [False] * (3 * len(CASES) + 1)
        assert all(sent_inside)
        assert raised == ["KeyError"] * 3 * len(CASES)
        assert check == sum(range(1, world + 1))
