"""Inputs shared by the kernel parity scripts (``triton_parity.py``,
``triton_flat_parity.py``)."""

from __future__ import annotations

import torch


def specials(x: torch.Tensor) -> torch.Tensor:
    """A copy of the 2-D ``x`` with a NaN, both infinities and a run of 9 ties placed in
    its rows (positions taken modulo the row length)."""
    x = x.clone()
    n = x.shape[1]
    x[0, 3 % n] = float("nan")
    x[-1, 5 % n] = float("inf")
    x[0, 7 % n] = -float("inf")
    x[0, n // 3:n // 3 + 9] = 0.5  # ties
    return x
