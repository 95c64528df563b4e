"""Integrations: DDP, FSDP and DeepSpeed adapters, and the frameworks built on them.

- :mod:`distk.integrations.ddp`, :mod:`~distk.integrations.fsdp`,
  :mod:`~distk.integrations.deepspeed`: the gradient-exchange seams;
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

_SUBMODULES = ("accelerate", "auto", "checkpoint", "ddp", "deepspeed", "fsdp", "hf",
               "lightning")

__all__ = list(_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
