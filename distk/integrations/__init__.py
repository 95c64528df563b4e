"""Integrations: thin adapters over one :class:`CompressionState`, and the frameworks
built on them.

- :class:`CompressionState` (:mod:`distk.integrations.state`): the one seam every
  adapter goes through (config coercion and check, step counter, stats, checkpoints);
- :mod:`distk.integrations.ddp`, :mod:`~distk.integrations.fsdp`,
  :mod:`~distk.integrations.deepspeed`: the gradient-exchange adapters;
- :mod:`distk.integrations.auto`: ``distk.enable`` (picks one of the three by type);
- :mod:`distk.integrations.hf`, :mod:`~distk.integrations.accelerate`,
  :mod:`~distk.integrations.lightning`: HF Trainer, Accelerate and Lightning adapters;
- :mod:`distk.integrations.checkpoint`: per-rank state files they share.

Submodules load on first attribute access (``distk.integrations.accelerate.enable``), so
a framework that is not installed only fails when its adapter is used.
"""

from __future__ import annotations

import importlib
from typing import Any

from distk.integrations.state import CompressionState, refuse_sparse_gradients

_SUBMODULES = ("accelerate", "auto", "checkpoint", "ddp", "deepspeed", "fsdp", "hf",
               "lightning", "state")

__all__ = ["CompressionState", "refuse_sparse_gradients", *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
