"""Activation layers built on distk's top-k selection.

- :class:`TopK` / :func:`functional.topk_activation`: keep the top-k entries of each row
  (exact or bucketed selection), gradient through the kept entries only;
- :class:`SparseAllReduce` / :func:`sparse_all_reduce` / :class:`RowParallelLinear`:
  tensor-parallel layers that exchange only the top-k entries of each rank's partial
  activations;
- :mod:`distk.nn.sae`: a k-sparse (TopK) autoencoder (its training job, which needs
  ``distk.train``, is ``python -m distk.train.sae --config configs/sae.json``).

See docs/activations.md.
"""

from __future__ import annotations

from distk.nn import functional
from distk.nn.functional import topk_activation
from distk.nn.parallel import RowParallelLinear, SparseAllReduce, sparse_all_reduce
from distk.nn.topk import TopK

__all__ = [
    "RowParallelLinear",
    "SparseAllReduce",
    "TopK",
    "functional",
    "sparse_all_reduce",
    "topk_activation",
]
