"""distk.nn.TopK / topk_activation: outputs and gradients against a plain reference.

By default torch.compile is checked with the ``aot_eager`` backend; ``--runslow`` adds
the default (inductor) backend, which builds C++ code for tens of seconds.
"""

from __future__ import annotations

import pytest
import torch

import distk
from distk.nn import TopK
from distk.nn.functional import resolve_k, topk_activation
from distk.selection.reference import bucketed_topk_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def naive_topk_activation(x: torch.Tensor, k: int, dim: int, by_magnitude: bool = False,
                          indices: torch.Tensor | None = None) -> torch.Tensor:
    """The obviously-correct reference: torch.topk, then gather/scatter (autograd's own
    derivatives give the reference gradient). ``indices`` overrides the selection."""
    if indices is None:
        score = x.abs() if by_magnitude else x
        indices = torch.topk(score, k, dim=dim).indices
    return torch.zeros_like(x).scatter(dim, indices, x.gather(dim, indices))


def distinct_values(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random tensor without ties along every dim, exactly representable in bf16/fp16:
    a random permutation of small integers (|v| <= 128 < 2^8) times 1/8."""
    gen = torch.Generator().manual_seed(seed)
    numel = 1
    for size in shape:
        numel *= size
    assert numel <= 256
    values = (torch.randperm(numel, generator=gen) - numel // 2).to(torch.float64) / 8
    return values.reshape(shape).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [-1, 0, 1])
@pytest.mark.parametrize("by_magnitude", [False, True])
def test_exact_matches_reference(dtype, dim, by_magnitude):
    x = torch.randn(4, 6, 10, generator=torch.Generator().manual_seed(1)).to(dtype)
    x.requires_grad_(True)
    k = 3
    out = topk_activation(x, k=k, dim=dim, method="exact", by_magnitude=by_magnitude)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, grad_out)

    x_ref = x.detach().clone().requires_grad_(True)
    ref = naive_topk_activation(x_ref, k, dim, by_magnitude)
    (grad_ref,) = torch.autograd.grad(ref, x_ref, grad_out)
    # Pure selection and copies, no floating-point arithmetic: exact equality.
    assert out.dtype == dtype and grad.dtype == dtype
    assert torch.equal(out, ref)
    assert torch.equal(grad, grad_ref)
    assert ((out != 0).sum(dim) == k).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["exact", "bucketed"])
def test_bucketed_with_full_recall_is_exact(dtype, method):
    # Distinct values: recall_target=1.0 makes the bucketed selection exact, and without
    # ties every correct top-k agrees with torch.topk.
    x = distinct_values((4, 64), dtype).requires_grad_(True)
    out = topk_activation(x, k=7, method=method, recall_target=1.0)
    ref = naive_topk_activation(x.detach(), 7, -1)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [True, False])
def test_bucketed_selects_what_distk_topk_selects(dtype, interleaved):
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(2)).to(dtype)
    x.requires_grad_(True)
    k, buckets, k_per_bucket = 12, 8, 2
    out = topk_activation(x, k=k, method="bucketed", buckets=buckets,
                          k_per_bucket=k_per_bucket, interleaved=interleaved)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, grad_out)

    # The selection is the reference bucketed top-k (by value), nothing else.
    positions = bucketed_topk_reference(x.detach(), k, buckets, k_per_bucket, interleaved,
                                        by_magnitude=False)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = naive_topk_activation(x_ref, k, -1, indices=positions)
    (grad_ref,) = torch.autograd.grad(ref, x_ref, grad_out)
    assert torch.equal(out, ref)
    assert torch.equal(grad, grad_ref)


def test_gradient_flows_only_through_kept_entries():
    x = torch.randn(3, 50, requires_grad=True)
    out = TopK(k=4, method="bucketed", buckets=10, k_per_bucket=1)(x)
    out.pow(2).sum().backward()
    kept = out != 0
    assert torch.equal(x.grad[~kept], torch.zeros_like(x.grad[~kept]))
    assert torch.equal(x.grad[kept], 2 * x.detach()[kept])


@pytest.mark.parametrize("method", ["exact", "bucketed"])
def test_saves_only_indices(method):
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    x = torch.randn(8, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = topk_activation(x, k=16, method=method)
    assert len(saved) == 1
    assert saved[0].dtype == torch.int64 and saved[0].shape == (8, 16)
    # The saved indices suffice for backward: gradient 1 at the kept entries, 0 elsewhere.
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x).scatter(1, saved[0], 1.0))


def test_gradcheck_fp64():
    # Distinct values with gaps of 1/8 >> gradcheck's eps=1e-6: the selection is locally
    # constant, so finite differences see the piecewise-linear map.
    x = distinct_values((6, 32), torch.float64, seed=3).requires_grad_(True)
    for method in ("exact", "bucketed"):
        assert torch.autograd.gradcheck(
            lambda t, m=method: topk_activation(t, k=5, method=m, buckets=8, k_per_bucket=2),
            (x,))


def test_density_resolves_k():
    assert resolve_k(1000, None, 0.05) == 50
    assert resolve_k(10, None, 0.01) == 1  # at least one entry
    assert resolve_k(10, None, 1.0) == 10
    out = TopK(density=0.25, method="exact")(torch.randn(3, 40))
    assert ((out != 0).sum(-1) == 10).all()


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one of k and density"),
    ({"k": 3, "density": 0.1}, "exactly one of k and density"),
    ({"k": 0}, "k must be an integer >= 1"),
    ({"k": 2.5}, "k must be an integer >= 1"),
    ({"density": 0.0}, r"density must be a number in \(0, 1\]"),
    ({"density": 1.5}, r"density must be a number in \(0, 1\]"),
    ({"k": 3, "method": "approx"}, "method must be one of"),
    ({"k": 3, "recall_target": 1.5}, "recall_target"),
    ({"k": 3, "buckets": 0}, "buckets must be None or an integer >= 1"),
    ({"k": 3, "dim": 1.0}, "dim must be an integer"),
])
def test_module_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TopK(**kwargs)


def test_functional_rejects_bad_arguments():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"k must be in \[1, n=8\]"):
        topk_activation(x, k=9)
    with pytest.raises(ValueError, match=r"dim must be an integer in \[-2, 1\]"):
        topk_activation(x, k=2, dim=2)
    with pytest.raises(ValueError, match="floating-point"):
        topk_activation(torch.arange(8), k=2)
    with pytest.raises(ValueError, match="buckets"):
        topk_activation(x, k=4, buckets=2, k_per_bucket=1)  # 2 candidates < k


def test_repr():
    assert repr(TopK(k=32)) == "TopK(k=32, dim=-1, method='bucketed')"
    assert "density=0.1" in repr(TopK(density=0.1, method="exact", by_magnitude=True))


def test_torch_compile_fullgraph():
    # One compiled function exercises both methods, forward and backward.
    def fn(x: torch.Tensor) -> torch.Tensor:
        return (topk_activation(x, k=6, method="bucketed")
                + topk_activation(x, density=0.1, method="exact", by_magnitude=True))

    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(4))
    grad_out = torch.randn(4, 96, generator=torch.Generator().manual_seed(5))
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = []
    for f in (fn, compiled):
        xi = x.clone().requires_grad_(True)
        out = f(xi)
        out.backward(grad_out)
        results.append((out, xi.grad))
    # Same selection and copies; the sum of the two layers is the same fp32 addition.
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_training_through_topk_reduces_loss():
    # A tiny convergence check: a linear map followed by TopK learns a sparse target.
    # Entries a layer does not select get no gradient, so it plateaus (at ~0.2-0.25 of the
    # initial loss here, for exact and bucketed alike); halving it shows gradients flow.
    gen = torch.Generator().manual_seed(6)
    target_map = torch.randn(16, 64, generator=gen)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), TopK(k=8, method="bucketed"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    inputs = torch.randn(256, 16, generator=gen)
    targets = distk.nn.functional.topk_activation(inputs @ target_map, k=8, method="exact")
    losses = []
    for _ in range(150):
        loss = (model(inputs) - targets).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
def test_torch_compile_fullgraph_inductor():
    # The default backend generates and builds C++ code: tens of seconds on this CPU.
    layer = TopK(k=6, method="bucketed")
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(7))
    compiled = torch.compile(lambda t: layer(t) * 2.0, fullgraph=True)
    eager_x, compiled_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (layer(eager_x) * 2.0).sum().backward()
    out = compiled(compiled_x)
    out.sum().backward()
    # Selection and copies, then one multiplication by 2 (exact): exact equality.
    assert torch.equal(out, layer(x) * 2.0)
    assert torch.equal(compiled_x.grad, eager_x.grad)
