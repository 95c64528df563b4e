"""Checkpoints of the training job: one file per rank, written atomically.

Each rank saves ``<run_dir>/checkpoint/rank-<r>.pt`` holding the model and optimizer state
(identical on every rank), the rank's RNG states, the step (which is the data position,
see ``distk.train.data``), the logging accumulators and the rank's distk state (error
feedback residuals, momenta, step counters from the DDP hook state's ``state_dict()``),
which differs per rank and is why every rank writes its own file. After all ranks have
written, rank 0 records the step in ``checkpoint/meta.json``. Resuming checks that every
rank found the same step and that the world size matches.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distk.comm.group import agree

__all__ = ["checkpoint_dir", "load_checkpoint", "restore_rng", "save_checkpoint"]


def checkpoint_dir(run_dir: Path) -> Path:
    """Where a run's checkpoint lives."""
    return Path(run_dir) / "checkpoint"


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(run_dir: Path, *, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, distk_state: dict[str, Any] | None,
                    extra: dict[str, Any], rank: int, world_size: int) -> Path:
    """Save this rank's checkpoint at ``step`` (a collective: every rank must call it)."""
    directory = checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    payload = {
        "step": step,
        "world_size": world_size,
        "rank": rank,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "distk": distk_state,
        "rng": _rng_state(device),
        "extra": extra,
    }
    path = directory / f"rank-{rank}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        meta_tmp = directory / "meta.json.tmp"
        meta_tmp.write_text(json.dumps({"step": step, "world_size": world_size}) + "\n")
        os.replace(meta_tmp, directory / "meta.json")
    return path


def load_checkpoint(run_dir: Path, *, rank: int, world_size: int) -> dict[str, Any] | None:
    """This rank's checkpoint payload, or None when the run has none (every rank agrees).

    Raises ValueError when the checkpoint was written by a different world size or the
    ranks' files disagree on the step (an interrupted save).
    """
    path = checkpoint_dir(run_dir) / f"rank-{rank}.pt"
    payload = torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None
    found = -1 if payload is None else int(payload["step"])
    highest, lowest = agree(found, op="max"), agree(found, op="min")
    if highest == -1:
        return None
    if lowest != highest:
        raise ValueError(
            f"checkpoint in {checkpoint_dir(run_dir)} is inconsistent: ranks found steps "
            f"from {lowest} to {highest} (-1 = missing file); was the world size changed or "
            "a save interrupted?"
        )
    assert payload is not None
    if payload["world_size"] != world_size:
        raise ValueError(
            f"checkpoint in {checkpoint_dir(run_dir)} was written by {payload['world_size']} "
            f"ranks, this run has {world_size}; distk's error-feedback residuals are per "
            "rank, so resume with the same world size"
        )
    return payload


def restore_rng(payload: dict[str, Any], device: torch.device) -> None:
    """Restore the RNG states saved in ``payload``."""
    _set_rng_state(payload["rng"], device)
