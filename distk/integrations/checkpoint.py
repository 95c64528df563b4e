"""Per-rank distk state files, shared by the HF Trainer, Accelerate and Lightning adapters.

Every rank's residuals differ (each holds what *that* rank did not send), so a checkpoint
needs one file per rank, and a rank must never load another rank's file. Framework
checkpoints are written by rank 0 only (HF Trainer's model files, Accelerate's
``register_for_checkpointing``, Lightning's ``.ckpt``), so these helpers write
``distk_rank<NNNNN>.pt`` from every rank into a folder the caller picks, and read them
back with a check:

- :func:`save_rank_state` writes ``state.state_dict()``, which carries the rank and world
  size that wrote it (atomically: a temporary file, then ``os.replace``);
- :func:`read_rank_state` returns one file's state dict once
  :meth:`CompressionState.check_state_dict <distk.integrations.CompressionState.check_state_dict>`
  (the one check of a checkpoint's origin) accepted it: ``ValueError`` when the file was
  written by another rank, another number of ranks or under another config;
- :func:`load_rank_state` is collective: every rank checks its own file, the ranks agree
  (one small all-reduce, :func:`distk.comm.group.agree`, the worst outcome wins), and
  then either every rank restores its state, or every rank warns and keeps a fresh state
  (files missing), or every rank raises (a file written by another rank or world size,
  or unreadable). A mixed outcome would desynchronise the compressors' step counters, so
  there is none. DeepSpeed, whose own checkpoints may be resumed at another
  data-parallel size, asks for a file of another rank or world size to count as missing
  (``other_rank="warn"``).

The DeepSpeed adapter writes its files through these helpers too, inside DeepSpeed's
checkpoint tag folder.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.distributed as dist

from distk.comm.group import agree, rank_and_world

__all__ = ["FILE_NAME", "load_rank_state", "rank_file", "read_rank_state", "save_rank_state"]

FILE_NAME = "distk_rank{rank:05d}.pt"
"""Name of one rank's file inside a checkpoint folder."""

_OK, _MISSING, _REFUSED = 0, 1, 2


def _rank_and_world() -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("distk per-rank checkpoints need an initialised process group "
                           "(torch.distributed.init_process_group)")
    return dist.get_rank(), dist.get_world_size()


def rank_file(directory: str | os.PathLike[str], rank: int | None = None) -> str:
    """Path of ``rank``'s file (default: this process's global rank) in ``directory``."""
    if rank is None:
        rank = _rank_and_world()[0]
    return os.path.join(os.fspath(directory), FILE_NAME.format(rank=rank))


def save_rank_state(directory: str | os.PathLike[str], state: Any) -> str:
    """Write this rank's ``state.state_dict()`` to ``directory``; returns the file's path.

    Args:
        directory: the checkpoint folder (created if missing); every rank writes its own
            file there, so on several machines it must be a shared filesystem or each
            machine keeps the files of its own ranks.
        state: a distk state (``distk.enable``'s result) with ``state_dict()``.
    """
    path = rank_file(directory, _rank_and_world()[0])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp"
    torch.save(state.state_dict(), temporary)  # carries its rank and world size
    os.replace(temporary, path)
    return path


def read_rank_state(path: str | os.PathLike[str], state: Any) -> dict[str, Any]:
    """The distk state dict stored in ``path``, refused unless ``state`` may load it.

    Args:
        path: a file :func:`save_rank_state` wrote.
        state: the distk state it is meant for; its ``check_state_dict`` decides.

    Raises:
        ValueError: the file was written by another rank, under another world size
            (residuals hold what that rank did not send; using them here would apply
            another rank's error feedback) or under another config, or it is not a distk
            state file.
    """
    return _checked(path, _load(path), state)


def _checked(path: str | os.PathLike[str], saved: dict[str, Any],
             state: Any) -> dict[str, Any]:
    try:
        state.check_state_dict(saved)
    except ValueError as err:
        raise ValueError(f"distk state file {os.fspath(path)}: {err}") from None
    return saved


def _load(path: str | os.PathLike[str]) -> dict[str, Any]:
    saved = torch.load(os.fspath(path), map_location="cpu", weights_only=False)
    if not isinstance(saved, dict) or not {"config", "rank", "world_size"} <= set(saved):
        raise ValueError(f"{os.fspath(path)} is not a distk per-rank state file (expected "
                         "a state_dict() with 'config', 'rank', 'world_size')")
    return saved


def load_rank_state(directory: str | os.PathLike[str], state: Any, *,
                    missing: str = "warn", other_rank: str = "raise") -> bool:
    """Restore every rank's own state from ``directory`` (collective; all ranks call it).

    Args:
        directory: the folder :func:`save_rank_state` wrote to.
        state: the distk state to restore into (``load_state_dict``).
        missing: what to do when some rank has no file: ``"warn"`` (every rank warns and
            keeps its fresh state, e.g. a checkpoint written before distk was enabled) or
            ``"raise"``.
        other_rank: what to do when some rank's file was written by another rank or under
            another world size: ``"raise"`` (every rank raises) or ``"warn"`` (it counts
            as missing, and ``missing`` decides; residuals cannot be remapped to other
            ranks). A file written under another config raises either way.

    Returns:
        True when every rank restored its state, False when files were missing.

    Raises:
        ValueError: a rank's file was written by another rank or world size (unless
            ``other_rank="warn"``), is not a distk file, or its config differs (raised on
            every rank), or ``missing`` / ``other_rank`` is not ``"warn"`` or ``"raise"``.
        FileNotFoundError: files are missing and ``missing="raise"``.
    """
    for name, value in (("missing", missing), ("other_rank", other_rank)):
        if value not in ("warn", "raise"):
            raise ValueError(f"{name} must be 'warn' or 'raise', got {value!r}")
    rank, _ = _rank_and_world()
    path = rank_file(directory, rank)
    local_error: str | None = None
    payload_state = None
    elsewhere = False  # this rank's file was written by another rank or world size
    if not os.path.isfile(path):
        code = _MISSING
    else:
        try:
            saved = _load(path)
            elsewhere = (other_rank == "warn" and (saved["rank"], saved["world_size"])
                         != rank_and_world(getattr(state, "process_group", None)))
            if elsewhere:
                code = _MISSING
            else:
                payload_state = _checked(path, saved, state)
                code = _OK
        except Exception as err:  # noqa: BLE001 - reported on every rank below
            code, local_error = _REFUSED, f"{type(err).__name__}: {err}"
    worst = agree(code)
    if worst == _REFUSED:
        raise ValueError(local_error or (
            f"distk: another rank refused its state file in {os.fspath(directory)}; "
            "no rank restores (see that rank's error)"))
    if worst == _MISSING:
        mine = ("written by another rank or world size" if elsewhere else
                "present" if code == _OK else "missing")
        message = (f"distk: {os.fspath(directory)} has no usable distk state file for every "
                   f"rank (this rank's: {mine}); residuals start from zero on every rank")
        if missing == "raise":
            raise FileNotFoundError(message)
        warnings.warn(f"[rank {rank}] {message}", RuntimeWarning, stacklevel=2)
        return False
    state.load_state_dict(payload_state)
    return True
