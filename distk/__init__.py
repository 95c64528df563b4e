"""distk: bucketed approximate top-k selection and sparse gradient exchange for PyTorch.

Layers (each usable alone):

- ``distk.topk`` / ``distk.selection``: exact and bucketed top-k (reference, CPU kernel,
  Triton kernel), the recall model ``expected_recall`` and ``choose_buckets``;
- ``distk.comm``: wire format and sparse collectives;
- ``distk.SparsityConfig`` and ``distk.GradientCompressor``: the one config type and the
  one compressor (error feedback, momentum correction, warm-up) every integration shares;
- ``distk.ddp``, ``distk.fsdp``, ``distk.deepspeed``: thin integrations; ``distk.enable``
  picks one from the wrapper's type; ``distk.integrations.hf`` / ``.accelerate`` /
  ``.lightning`` adapt HF Trainer, Accelerate and Lightning;
- ``distk.outer``: sparse outer synchronisation (DiLoCo/SparseLoCo style) of a plain
  model every ``sync_every`` optimizer steps;
- ``distk.nn``: activation top-k layers and sparse activation exchange;
- ``distk.train``: the main job (``distk-train``).
"""

from __future__ import annotations

import importlib
from typing import Any

from distk.selection import DEFAULT_RECALL_TARGET, choose_buckets, expected_recall, topk

__version__ = "0.1.0"

# Submodules and names loaded on first use, so that `import distk` stays light and an
# integration whose extra is missing only fails when it is used.
_LAZY_MODULES = {
    "comm": "distk.comm",
    "nn": "distk.nn",
    "ddp": "distk.integrations.ddp",
    "fsdp": "distk.integrations.fsdp",
    "deepspeed": "distk.integrations.deepspeed",
    "integrations": "distk.integrations",
    "outer": "distk.outer",
    "train": "distk.train",
}
_LAZY_NAMES = {
    "SparsityConfig": "distk.config",
    "GradientCompressor": "distk.compressor",
    "enable": "distk.integrations.auto",
}

__all__ = [
    "DEFAULT_RECALL_TARGET",
    "choose_buckets",
    "expected_recall",
    "topk",
    *_LAZY_MODULES,
    *_LAZY_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY_MODULES:
        module = importlib.import_module(_LAZY_MODULES[name])
        globals()[name] = module
        return module
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(_LAZY_NAMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'distk' has no attribute {name!r}")
