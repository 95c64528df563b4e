"""``distk-train``: a small byte-level GPT trained data-parallel through distk.

Reusable pieces (also used by ``distk.train.deepspeed_job``):

- :class:`TrainConfig` (``load_config``, ``apply_overrides``): the typed job config;
- :func:`build_corpus` / :func:`build_data`: the standard-library byte corpus and a rank's
  batches (``train_batch(step)``, ``val_batches()``);
- :func:`build_model` / :func:`evaluate`: the model and its validation loss;
- :func:`setup_distributed`, :func:`build_optimizer`, :func:`lr_at`: process group,
  AdamW, learning-rate schedule;
- :func:`train` (one mode) and :func:`run_compare` (every mode, table, JSON, plot).

Submodules are imported on first use so that ``import distk.train`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "distk.train.config",
    "load_config": "distk.train.config",
    "apply_overrides": "distk.train.config",
    "build_corpus": "distk.train.data",
    "build_data": "distk.train.data",
    "build_model": "distk.train.model",
    "evaluate": "distk.train.model",
    "setup_distributed": "distk.train.loop",
    "build_optimizer": "distk.train.loop",
    "lr_at": "distk.train.loop",
    "train": "distk.train.loop",
    "RunResult": "distk.train.loop",
    "run_compare": "distk.train.compare",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'distk.train' has no attribute {name!r}")
