"""``engine.save_checkpoint`` / ``engine.load_checkpoint`` that carry distk's state.

Residuals differ per rank, so they cannot go into DeepSpeed's rank-0 ``client_state``:
every rank writes its own ``distk_rank<NNNNN>.pt`` inside DeepSpeed's tag folder
(``<dir>/<tag>/``) through the one per-rank helper,
:func:`distk.integrations.checkpoint.save_rank_state` (atomic: a temporary file, then
``os.replace``), before DeepSpeed writes its own files and the ``latest`` pointer, so a
tag that ``latest`` names always has them. Loading goes through
:func:`~distk.integrations.checkpoint.load_rank_state` (collective: every rank restores,
or none does). A file missing on some rank, or written by another rank or number of ranks
(DeepSpeed's universal checkpoints resume at another data-parallel size), makes every rank
warn and start from fresh residuals; a file written under another ``"distk"`` block
raises on every rank.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from distk.integrations.checkpoint import FILE_NAME, load_rank_state, save_rank_state
from distk.integrations.deepspeed.state import DeepSpeedCompressionState

__all__ = ["CHECKPOINT_FILE", "checkpoint_folder", "wrap_checkpointing"]

CHECKPOINT_FILE = FILE_NAME
"""Per-rank compressor state file, written inside the checkpoint's tag folder."""


def checkpoint_folder(directory: str | os.PathLike[str], tag: Any) -> str:
    """DeepSpeed's tag folder, where every rank's distk file lives."""
    return os.path.join(os.fspath(directory), str(tag))


def wrap_checkpointing(engine: Any, state: DeepSpeedCompressionState) -> None:
    """Make ``engine.save_checkpoint`` / ``load_checkpoint`` carry ``state``."""
    original_save = engine.save_checkpoint
    original_load = engine.load_checkpoint

    def save_checkpoint(save_dir: str, tag: Any = None, client_state: dict | None = None,
                        save_latest: bool = True, exclude_frozen_parameters: bool = False
                        ) -> Any:
        """DeepSpeed's ``save_checkpoint``; every rank also writes its distk state first."""
        if tag is None:
            tag = f"global_step{engine.global_steps}"  # DeepSpeed's default tag
        save_rank_state(checkpoint_folder(save_dir, tag), state)
        return original_save(save_dir, tag=tag,
                             client_state={} if client_state is None else client_state,
                             save_latest=save_latest,
                             exclude_frozen_parameters=exclude_frozen_parameters)

    def load_checkpoint(load_dir: str, *args: Any, **kwargs: Any) -> Any:
        """DeepSpeed's ``load_checkpoint``; then every rank restores its distk state.

        Skipped for ``load_module_only=True`` or ``load_optimizer_states=False`` (a
        fine-tuning start, where stale residuals do not belong).
        """
        bound = inspect.signature(original_load).bind(load_dir, *args, **kwargs)
        bound.apply_defaults()
        options = bound.arguments
        load_path, client_state = original_load(*bound.args, **bound.kwargs)
        if (load_path is None or options["load_module_only"]
                or not options["load_optimizer_states"]):
            return load_path, client_state
        tag = options["tag"]
        if tag is None:
            latest = "latest_universal" if engine.load_universal_checkpoint() else "latest"
            with open(os.path.join(load_dir, latest)) as handle:
                tag = handle.read().strip()
        load_rank_state(checkpoint_folder(load_dir, tag), state, missing="warn",
                        other_rank="warn")
        return load_path, client_state

    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint
