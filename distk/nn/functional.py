"""Functional form of distk's activation layers.

``topk_activation`` keeps the top-k entries of each row of a tensor (zeros elsewhere) and
passes gradients only through the kept entries. Selection is ``distk.topk`` (exact or
bucketed); only the int64 indices are saved for backward, never a dense mask or the
input.

The sparse all-reduce of tensor-parallel partial activations lives in
``distk.nn.parallel`` (``sparse_all_reduce``, ``SparseAllReduce``).
"""

from __future__ import annotations

import torch

from distk.selection import METHODS, resolve_buckets, topk
from distk.selection.recall import check_recall_target

__all__ = ["check_selection_args", "resolve_k", "topk_activation"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_selection_args(k: int | None, density: float | None, method: str,
                         recall_target: float | None = None) -> None:
    """Validate the selection arguments shared by ``TopK``, ``topk_activation`` and the
    tensor-parallel layers (everything that does not depend on the input's shape).

    Raises:
        ValueError: unless exactly one of ``k`` (an int >= 1) and ``density`` (a float in
            (0, 1]) is given, ``method`` is one of ``"bucketed"``, ``"exact"``, and
            ``recall_target`` is None or in (0, 1].
    """
    if (k is None) == (density is None):
        raise ValueError(f"exactly one of k and density must be given, got k={k!r}, "
                         f"density={density!r}")
    if k is not None and (not _is_int(k) or k < 1):
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if density is not None and (isinstance(density, bool)
                                or not isinstance(density, (int, float))
                                or not 0.0 < density <= 1.0):
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if recall_target is not None:
        check_recall_target(recall_target)


def resolve_k(n: int, k: int | None, density: float | None) -> int:
    """Entries kept per row of length ``n``: ``k`` itself, or
    ``max(1, min(n, round(density * n)))`` (the rule ``SparsityConfig`` uses).

    Raises:
        ValueError: when ``k > n`` (naming both), or for invalid ``k`` / ``density``.
    """
    check_selection_args(k, density, "exact")
    if k is None:
        return max(1, min(n, round(density * n)))
    if k > n:
        raise ValueError(f"k must be in [1, n={n}] (n = size of the selected dim), got k={k}")
    return k


@torch.compiler.assume_constant_result
def _bucket_parameters(n: int, k: int, buckets: int | None, k_per_bucket: int | None,
                       recall_target: float | None) -> tuple[int, int]:
    # The choice depends only on Python ints; computing it outside the traced graph keeps
    # torch.compile(fullgraph=True) free of the recall model's tensor arithmetic.
    return resolve_buckets(n, k, buckets, k_per_bucket, recall_target)


class _TopKActivation(torch.autograd.Function):
    """Forward: scatter the selected entries into zeros. Backward: the same scatter of
    the output gradient. Saves only the selected indices."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int, dim: int, method: str, by_magnitude: bool,
                buckets: int | None, k_per_bucket: int | None, interleaved: bool
                ) -> torch.Tensor:
        values, indices = topk(x, k, dim=dim, method=method, by_magnitude=by_magnitude,
                               buckets=buckets, k_per_bucket=k_per_bucket,
                               interleaved=interleaved)
        ctx.save_for_backward(indices)
        ctx.dim = dim
        return torch.zeros_like(x).scatter_(dim, indices, values)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (indices,) = ctx.saved_tensors
        grad_x = torch.zeros_like(grad_out).scatter_(
            ctx.dim, indices, grad_out.gather(ctx.dim, indices))
        return grad_x, None, None, None, None, None, None, None


def topk_activation(x: torch.Tensor, k: int | None = None, density: float | None = None,
                    dim: int = -1, method: str = "bucketed", by_magnitude: bool = False,
                    buckets: int | None = None, k_per_bucket: int | None = None,
                    recall_target: float | None = None, interleaved: bool = True
                    ) -> torch.Tensor:
    """Keep the top-``k`` entries of every row of ``x`` along ``dim``; zero the rest.

    Args:
        x: floating tensor (fp32, bf16, fp16, fp64) of any shape.
        k: entries kept per row, in ``[1, x.shape[dim]]``. Exactly one of ``k`` and
            ``density`` must be given.
        density: fraction of each row kept, in (0, 1]; ``k = max(1, round(density * n))``.
        dim: the dimension along which rows are taken.
        method: ``"bucketed"`` (approximate, fast; see ``distk.topk``) or ``"exact"``.
        by_magnitude: rank entries by ``|x|`` instead of ``x`` (the default ranks by value,
            as sparse autoencoders do).
        buckets, k_per_bucket, recall_target, interleaved: bucketed-selection parameters,
            as in ``distk.topk`` (ignored by ``method="exact"``).

    Returns:
        A tensor shaped like ``x``: the selected entries of ``x`` in place, zeros elsewhere.
        Its gradient with respect to ``x`` is the output gradient at the selected entries
        and zero elsewhere. Only the int64 indices ``(..., k, ...)`` are saved for backward.

    Raises:
        ValueError: for a bad ``k``/``density`` (neither, both, or out of range), ``method``,
            ``dim``, ``recall_target`` or bucket parameters, naming the argument.
    """
    check_selection_args(k, density, method, recall_target)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got "
                         f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not _is_int(dim) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an integer in [{-x.dim()}, {x.dim() - 1}], got {dim!r}")
    n = x.shape[dim]
    k = resolve_k(n, k, density)
    if method == "bucketed":
        buckets, k_per_bucket = _bucket_parameters(n, k, buckets, k_per_bucket, recall_target)
    return _TopKActivation.apply(x, k, dim, method, by_magnitude, buckets, k_per_bucket,
                                 interleaved)
