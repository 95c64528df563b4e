"""``TopK``: an activation layer that keeps the top-k entries of each row."""

from __future__ import annotations

import torch
import torch.nn as nn

from distk.nn.functional import check_selection_args, topk_activation

__all__ = ["TopK"]


class TopK(nn.Module):
    """Keep the ``k`` largest entries of each row along ``dim``; zeros elsewhere.

    The gradient flows only through the kept entries, and only their int64 indices are
    saved for backward. Works with fp32, bf16, fp16 and fp64 inputs and under
    ``torch.compile(fullgraph=True)``.

    Args:
        k: entries kept per row (an int >= 1, at most the row length).
        density: fraction of each row kept, in (0, 1]; ``k = max(1, round(density * n))``
            for rows of length ``n``. Exactly one of ``k`` and ``density`` must be given.
        dim: dimension along which rows are taken (default: the last).
        method: ``"bucketed"`` (approximate top-k, see ``distk.topk``) or ``"exact"``.
        by_magnitude: rank by ``|x|`` rather than ``x`` (default: by value).
        buckets, k_per_bucket: bucketed-selection parameters; missing ones are chosen for
            ``recall_target`` by ``distk.choose_buckets``.
        recall_target: expected recall of the bucketed selection, in (0, 1] (default
            ``distk.DEFAULT_RECALL_TARGET``, 0.95).
        interleaved: interleaved (default) or contiguous buckets.

    Example::

        act = distk.nn.TopK(k=32)                 # latents of a k-sparse autoencoder
        z = act(encoder(x))                       # (batch, n_latents), 32 non-zeros per row
    """

    def __init__(self, k: int | None = None, density: float | None = None, dim: int = -1,
                 method: str = "bucketed", by_magnitude: bool = False,
                 buckets: int | None = None, k_per_bucket: int | None = None,
                 recall_target: float | None = None, interleaved: bool = True) -> None:
        super().__init__()
        check_selection_args(k, density, method, recall_target)
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise ValueError(f"dim must be an integer, got {dim!r}")
        for name, value in (("buckets", buckets), ("k_per_bucket", k_per_bucket)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
        self.k = k
        self.density = density
        self.dim = dim
        self.method = method
        self.by_magnitude = by_magnitude
        self.buckets = buckets
        self.k_per_bucket = k_per_bucket
        self.recall_target = recall_target
        self.interleaved = interleaved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` of any shape -> same shape, ``k`` non-zeros per row along ``dim``."""
        return topk_activation(x, k=self.k, density=self.density, dim=self.dim,
                               method=self.method, by_magnitude=self.by_magnitude,
                               buckets=self.buckets, k_per_bucket=self.k_per_bucket,
                               recall_target=self.recall_target, interleaved=self.interleaved)

    def extra_repr(self) -> str:
        size = f"k={self.k}" if self.k is not None else f"density={self.density}"
        parts = [size, f"dim={self.dim}", f"method={self.method!r}"]
        if self.by_magnitude:
            parts.append("by_magnitude=True")
        for name in ("buckets", "k_per_bucket", "recall_target"):
            if getattr(self, name) is not None:
                parts.append(f"{name}={getattr(self, name)}")
        if not self.interleaved:
            parts.append("interleaved=False")
        return ", ".join(parts)
