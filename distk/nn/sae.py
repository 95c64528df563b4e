"""A k-sparse (TopK) autoencoder, following Gao et al. 2024 ("Scaling and evaluating
sparse autoencoders"):

    z     = ReLU(TopK(W_enc (x - b_pre) + b_enc))        (k non-zeros at most)
    x_hat = W_dec z + b_pre

* ``b_pre`` (pre-encoder bias) starts at the geometric median of a data sample;
* ``W_dec`` has unit-norm columns: they are renormalised after every step, and the part
  of their gradient parallel to them is removed before it;
* ``W_enc`` starts as ``W_dec^T`` (tied initialisation; trained untied);
* loss: normalised MSE ``||x - x_hat||^2 / ||x - mean(x)||^2`` plus the AuxK loss
  (``aux_coef`` times the normalised MSE with which the top-``aux_k`` *dead* latents
  reconstruct the residual ``x - x_hat``), which revives latents that stopped firing.

The TopK layer is ``distk.nn.TopK`` with ``method="exact"`` (``torch.topk``) or
``"bucketed"`` (distk's approximate top-k). The training job that compares the two on a
language model's activations is :mod:`distk.train.sae` (``python -m distk.train.sae``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from distk.nn.functional import topk_activation
from distk.nn.topk import TopK

__all__ = ["SparseAutoencoder", "geometric_median", "normalized_mse"]


def geometric_median(points: torch.Tensor, iterations: int = 30,
                     eps: float = 1e-8) -> torch.Tensor:
    """Geometric median of the rows of ``points`` ``(n, d)`` by Weiszfeld's iteration
    (starting from the mean)."""
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=1).clamp(min=eps)
        median = (weights[:, None] * points).sum(0) / weights.sum()
    return median


def normalized_mse(reconstruction: torch.Tensor, target: torch.Tensor,
                   target_mean: torch.Tensor) -> torch.Tensor:
    """``sum ||target - reconstruction||^2 / sum ||target - target_mean||^2``: 1.0 is the
    error of always predicting the mean, 0.0 perfect reconstruction."""
    return ((reconstruction - target).pow(2).sum()
            / (target - target_mean).pow(2).sum().clamp(min=1e-30))


class SparseAutoencoder(nn.Module):
    """k-sparse autoencoder: ``forward(x (..., d_model)) -> (x_hat, latents, pre_acts)``.

    Args:
        d_model: width of the input activations.
        n_latents: dictionary size.
        k: latents kept per token by the TopK activation.
        method: ``"exact"`` or ``"bucketed"`` selection (``distk.nn.TopK``).
        buckets, k_per_bucket, recall_target: bucketed-selection parameters.
        generator: RNG of the decoder's initialisation.

    Parameters: ``pre_bias`` (d_model), ``latent_bias`` (n_latents), ``encoder``
    (n_latents, d_model), ``decoder`` (d_model, n_latents) with unit-norm columns.
    """

    def __init__(self, d_model: int, n_latents: int, k: int, method: str = "exact",
                 buckets: int | None = None, k_per_bucket: int | None = None,
                 recall_target: float | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.d_model, self.n_latents, self.k = d_model, n_latents, k
        decoder = torch.randn(d_model, n_latents, generator=generator)
        decoder /= decoder.norm(dim=0, keepdim=True)
        self.decoder = nn.Parameter(decoder)
        self.encoder = nn.Parameter(decoder.t().clone())  # tied initialisation
        self.pre_bias = nn.Parameter(torch.zeros(d_model))
        self.latent_bias = nn.Parameter(torch.zeros(n_latents))
        self.activation = TopK(k=k, method=method, buckets=buckets, k_per_bucket=k_per_bucket,
                               recall_target=recall_target)
        self.method = method
        self.buckets, self.k_per_bucket, self.recall_target = buckets, k_per_bucket, recall_target

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``W_enc (x - b_pre) + b_enc``, shape ``(..., n_latents)``."""
        return (x - self.pre_bias) @ self.encoder.t() + self.latent_bias

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``W_dec z + b_pre``."""
        return latents @ self.decoder.t() + self.pre_bias

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pre = self.pre_activations(x)
        latents = torch.relu(self.activation(pre))
        return self.decode(latents), latents, pre

    def aux_reconstruction(self, pre: torch.Tensor, dead: torch.Tensor,
                           aux_k: int) -> torch.Tensor:
        """Reconstruction (no bias) of the residual from the top-``aux_k`` dead latents."""
        masked = pre.masked_fill(~dead, torch.finfo(pre.dtype).min)
        latents = torch.relu(topk_activation(
            masked, k=aux_k, method=self.method, buckets=self.buckets,
            k_per_bucket=self.k_per_bucket, recall_target=self.recall_target))
        return latents @ self.decoder.t()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale the decoder's columns to unit norm."""
        self.decoder /= self.decoder.norm(dim=0, keepdim=True).clamp(min=1e-12)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out of the decoder's gradient its component along each (unit) column,
        which the renormalisation would undo anyway."""
        grad = self.decoder.grad
        if grad is not None:
            grad -= (grad * self.decoder).sum(0, keepdim=True) * self.decoder


# ----------------------------------------------------------------------------- data
