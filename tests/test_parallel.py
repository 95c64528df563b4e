"""SparseAllReduce and RowParallelLinear on real gloo processes (2 ranks).

By default the finite-difference check of the gradient runs through exact selection;
``--runslow`` adds it through bucketed selection.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed

import distk
from distk.nn import RowParallelLinear, SparseAllReduce, sparse_all_reduce

pytestmark = pytest.mark.distributed

WORLD_SIZE = 2
TIMEOUT = 120


def _partials(world_size: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
              seed: int = 0) -> list[torch.Tensor]:
    """Every rank's partial activations (each rank can rebuild all of them)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype) for _ in range(world_size)]


def _gapped_partials(world_size: int, rows: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    """fp64 partials whose magnitudes in a row are distinct, at least 0.05 apart, and
    at least 0.05 from zero: perturbations of 1e-6 never change a top-k selection."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(world_size):
        magnitude = 0.1 + 0.05 * torch.stack([torch.randperm(n, generator=gen)
                                               for _ in range(rows)]).double()
        sign = torch.randint(0, 2, (rows, n), generator=gen).double() * 2 - 1
        out.append(magnitude * sign)
    return out


def _reference(partials: list[torch.Tensor], k: int, method: str, **select) -> torch.Tensor:
    """Sum over ranks of each partial's masked top-k (by magnitude), in rank order."""
    out = torch.zeros_like(partials[0])
    for partial in partials:
        values, indices = distk.topk(partial, k, dim=-1, method=method, by_magnitude=True,
                                     **select)
        out = out + torch.zeros_like(partial).scatter(-1, indices, values)
    return out


def _mask(partial: torch.Tensor, k: int, method: str, **select) -> torch.Tensor:
    _, indices = distk.topk(partial, k, dim=-1, method=method, by_magnitude=True, **select)
    return torch.zeros_like(partial, dtype=torch.bool).scatter(-1, indices, True)


# k=4: 2*4 < 64, the sparse backward exchange; k=40: 2*40 >= 64, the dense one.
SELECT_FOR_K = {4: {"buckets": 16, "k_per_bucket": 1}, 40: {"buckets": 8, "k_per_bucket": 6}}


def _forward_backward_worker(rank: int, world_size: int) -> dict:
    shape = (3, 5, 64)
    results = {}
    # One process group for every case: starting processes dominates the test's time.
    for method in ("exact", "bucketed"):
        for dtype in (torch.float32, torch.bfloat16):
            for k, bucket_args in SELECT_FOR_K.items():
                select = bucket_args if method == "bucketed" else {}
                partials = _partials(world_size, shape, dtype)
                grads = _partials(world_size, shape, dtype, seed=1)  # differ across ranks
                partial = partials[rank].clone().requires_grad_(True)
                out = sparse_all_reduce(partial, k=k, method=method, **select)
                out.backward(grads[rank])
                gathered = [torch.empty_like(out) for _ in range(world_size)]
                dist.all_gather(gathered, out.detach())

                expected_out = _reference(partials, k, method, **select)
                summed_grad = grads[0] + grads[1]
                expected_grad = torch.where(_mask(partials[rank], k, method, **select),
                                            summed_grad, torch.zeros_like(summed_grad))
                results[(method, str(dtype), k)] = {
                    # Two addends per entry (0 + a + b, or a + b): the same rounding in
                    # any order, so exact equality.
                    "out_equal": torch.equal(out, expected_out),
                    "same_on_all_ranks": all(torch.equal(g, gathered[0]) for g in gathered),
                    "grad_equal": torch.equal(partial.grad, expected_grad),
                    "dtype_kept": out.dtype == dtype and partial.grad.dtype == dtype,
                }
    return results


def _forward_backward_and_row_parallel_worker(rank: int, world_size: int) -> dict:
    return {"forward_backward": _forward_backward_worker(rank, world_size),
            "row_parallel": _row_parallel_worker(rank, world_size)}


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    """One 2-rank run for the reference test and the RowParallelLinear test (starting the
    processes costs more than either)."""
    return run_distributed(_forward_backward_and_row_parallel_worker, WORLD_SIZE,
                           timeout=TIMEOUT)


def test_forward_and_gradient_match_reference(runs):
    """exact/bucketed x fp32/bf16 x sparse/dense backward exchange."""
    for results in (run["forward_backward"] for run in runs):
        assert len(results) == 8
        for case, result in results.items():
            assert result == {"out_equal": True, "same_on_all_ranks": True,
                              "grad_equal": True, "dtype_kept": True}, case


def _finite_difference_case(rank: int, world_size: int, method: str, k: int,
                            own_group: dist.ProcessGroup) -> dict:
    rows, n = 3, 12
    select = {"buckets": 4, "k_per_bucket": 2} if method == "bucketed" else {}
    partials = _gapped_partials(world_size, rows, n)
    cotangents = _partials(world_size, (rows, n), torch.float64, seed=7)

    def global_objective(local: torch.Tensor) -> float:
        # L = sum over ranks of <g_r, out_r>: the total objective the backward differentiates.
        out = SparseAllReduce.apply(local, k, None, method, select.get("buckets"),
                                    select.get("k_per_bucket"), True)
        total = (cotangents[rank] * out).sum().reshape(1)
        dist.all_reduce(total)
        return total.item()

    partial = partials[rank].clone().requires_grad_(True)
    out = SparseAllReduce.apply(partial, k, None, method, select.get("buckets"),
                                select.get("k_per_bucket"), True)
    out.backward(cotangents[rank])
    analytic = partial.grad

    # Central differences, one (rank, entry) at a time; every rank runs every forward.
    eps = 1e-6
    numeric = torch.zeros(rows, n, dtype=torch.float64)
    for source in range(world_size):
        for i in range(rows):
            for j in range(n):
                shifted = []
                for sign in (1.0, -1.0):
                    local = partials[rank].clone()
                    if source == rank:
                        local[i, j] += sign * eps
                    shifted.append(global_objective(local))
                if source == rank:
                    numeric[i, j] = (shifted[0] - shifted[1]) / (2 * eps)

    # gradcheck of the same op inside each rank, on a group of one rank (in-rank autograd).
    gradcheck_ok = torch.autograd.gradcheck(
        lambda t: SparseAllReduce.apply(t, k, own_group, method, select.get("buckets"),
                                        select.get("k_per_bucket"), True),
        (partials[rank].clone().requires_grad_(True),))
    # The objective is linear where the selection is constant, so central differences
    # are exact up to rounding: |error| ~ 1e-16 * |L| / eps ~ 1e-9.
    return {"max_error": (numeric - analytic).abs().max().item(),
            "grad_nonzero": int((analytic != 0).sum()),
            "gradcheck": gradcheck_ok}


def _finite_difference_worker(rank: int, world_size: int, k: int, method: str) -> dict:
    # Every rank creates every singleton group, in the same order (new_group is collective).
    singletons = [dist.new_group([r]) for r in range(world_size)]
    return _finite_difference_case(rank, world_size, method, k, singletons[rank])


@pytest.mark.parametrize("method", [
    "exact",
    # The backward is the same masked sum whichever selection made the mask, and
    # test_forward_and_gradient_match_reference holds both methods' gradients to it
    # exactly: finite differences through bucketed selection are the slow run.
    pytest.param("bucketed", marks=pytest.mark.slow),
])
def test_gradient_matches_finite_differences_fp64(method):
    k = 3
    for result in run_distributed(_finite_difference_worker, WORLD_SIZE, k, method,
                                  timeout=TIMEOUT):
        assert result["max_error"] < 1e-7, result
        assert result["grad_nonzero"] == 3 * k, result  # rows * k entries get gradient
        assert result["gradcheck"], result


def _row_parallel_dense_worker(rank: int, world_size: int, input_is_parallel: bool) -> dict:
    torch.manual_seed(0)
    full = torch.nn.Linear(8, 6, dtype=torch.float64)
    layer = RowParallelLinear.from_linear(full, k=6, method="exact",
                                          input_is_parallel=input_is_parallel)
    x = torch.randn(4, 3, 8, dtype=torch.float64)
    x_full = x.clone().requires_grad_(True)
    x_local = (x.chunk(world_size, -1)[rank] if input_is_parallel else x).clone()
    x_local.requires_grad_(True)

    out = layer(x_local)
    # Replicated loss: divide by the group size (sum-of-rank-losses convention).
    (out.pow(2).sum() / world_size).backward()
    ref = full(x_full)
    ref.pow(2).sum().backward()

    shard = slice(rank * 4, (rank + 1) * 4)
    expected_x_grad = x_full.grad[..., shard] if input_is_parallel else x_full.grad
    # k = out_features keeps everything: an ordinary linear layer whose partial sums are
    # added in a different order than one matmul does, hence the fp64 rounding tolerance.
    tol = {"rtol": 1e-12, "atol": 1e-12}
    return {
        "out": torch.allclose(out, ref, **tol),
        "weight_grad": torch.allclose(layer.weight.grad, full.weight.grad[:, shard], **tol),
        "bias_grad": torch.allclose(layer.bias.grad, full.bias.grad, **tol),
        "x_grad": torch.allclose(x_local.grad, expected_x_grad, **tol),
    }


def _row_parallel_sparse_worker(rank: int, world_size: int) -> dict:
    torch.manual_seed(1)
    layer = RowParallelLinear(16, 32, density=0.125, method="bucketed", recall_target=0.9)
    x = torch.randn(5, 8)
    out = layer(x)
    gathered_x = [torch.empty_like(x) for _ in range(world_size)]
    gathered_w = [torch.empty_like(layer.weight) for _ in range(world_size)]
    dist.all_gather(gathered_x, x)
    dist.all_gather(gathered_w, layer.weight.detach().contiguous())
    partials = [xr @ wr.t() for xr, wr in zip(gathered_x, gathered_w)]
    buckets, k_per_bucket = distk.selection.resolve_buckets(32, 4, recall_target=0.9)
    expected = _reference(partials, 4, "bucketed", buckets=buckets,
                          k_per_bucket=k_per_bucket) + layer.bias.detach()
    nonzero_per_row = int((out - layer.bias.detach() != 0).sum(-1).max())
    # Same matmuls on the same shapes as the layer and the same two-term sums: exact.
    return {"equal": torch.equal(out.detach(), expected), "max_nonzero": nonzero_per_row,
            "shards_differ": not torch.equal(gathered_w[0], gathered_w[1])}


def _bad_arguments_worker(rank: int, world_size: int) -> list[str]:
    messages = []
    for kwargs in ({"in_features": 7, "out_features": 4, "k": 2},
                   {"in_features": 8, "out_features": 4, "k": 5},
                   {"in_features": 8, "out_features": 4}):
        try:
            RowParallelLinear(**kwargs)
        except ValueError as err:
            messages.append(str(err))
    layer = RowParallelLinear(8, 4, k=2)
    try:
        layer(torch.randn(2, 8))  # full width, but input_is_parallel=True expects 4
    except ValueError as err:
        messages.append(str(err))
    return messages


def _row_parallel_worker(rank: int, world_size: int) -> dict:
    return {"dense": {mode: _row_parallel_dense_worker(rank, world_size, mode)
                      for mode in (True, False)},
            "sparse": _row_parallel_sparse_worker(rank, world_size),
            "errors": _bad_arguments_worker(rank, world_size)}


def test_row_parallel_linear(runs):
    """Dense parity with nn.Linear (both input modes), sparse forward, argument errors."""
    for results in (run["row_parallel"] for run in runs):
        for mode, result in results["dense"].items():
            assert result == {"out": True, "weight_grad": True, "bias_grad": True,
                              "x_grad": True}, f"input_is_parallel={mode}"
        sparse = results["sparse"]
        assert sparse["equal"]
        assert sparse["max_nonzero"] <= 2 * 4  # at most k entries from each of 2 ranks
        assert sparse["shards_differ"]
        messages = results["errors"]
        assert len(messages) == 4
        assert "in_features=7 must be divisible by the group size 2" in messages[0]
        assert "k must be in [1, n=4]" in messages[1]
        assert "exactly one of k and density" in messages[2]
        assert "in_features / world_size = 4" in messages[3]


def test_requires_initialised_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        RowParallelLinear(8, 4, k=2)
