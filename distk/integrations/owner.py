""":class:`StepOwner`: the one shape every owner of a training step shares.

Three things own a step: :class:`~distk.integrations.CompressionState` (DDP, FSDP,
DeepSpeed and the frameworks on them), :class:`~distk.integrations.outer.OuterSync`
(outer synchronisation) and the peer-hook state of ``distk-train``. Each needs the same
five things, written once here:

* **config**: coerced once by the owner (a dict goes through
  ``SparsityConfig.from_dict``; the peer-hook state's is a small config of PyTorch's
  hook) and checked across ranks (:func:`~distk.comm.check_same_config`): at
  construction when the process group exists, otherwise on the first collective (a
  state built before ``init_process_group``, e.g. for Lightning's
  ``DDPStrategy(ddp_comm_state=...)``);
* **one counter**, :attr:`StepOwner.iteration`, the step the owner passes to the
  compressor (nothing else counts);
* **one statistics type**: :attr:`StepOwner.stats` (the last step, a
  :class:`~distk.stats.StepStats`) and :attr:`StepOwner.totals` (the run), read through
  :meth:`StepOwner.metrics`;
* **one checkpoint form**: :meth:`StepOwner.state_dict` carries the config, rank and
  world size that wrote it, and :meth:`StepOwner.check_state_dict` (the one check of a
  checkpoint's origin) refuses another config, rank or world size: residuals hold what
  *that* rank did not send;
* where the collectives run: the process group, this rank and the world size.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from distk.comm import check_same_config, rank_and_world
from distk.config import SparsityConfig
from distk.stats import StepStats

__all__ = ["StepOwner", "group_ready"]


def group_ready() -> bool:
    """Whether a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


class StepOwner:
    """Base of the step owners (see the module docstring).

    Args:
        cfg: the owner's validated config: a :class:`~distk.config.SparsityConfig`, or any
            config object with ``to_dict()`` (compared across ranks and in checkpoints).
        process_group: the group the owner's collectives run on (``None`` = default).
        entry: the public entry point named in errors and messages.

    Attributes:
        cfg: the validated config (identical on every rank).
        process_group, rank, world_size: where the collectives run.
        iteration: completed steps (checkpointed); the compressor's schedule follows it.
        stats: :class:`~distk.stats.StepStats` of the last completed step.
        entry: the entry point that built the owner.
    """

    __slots__ = ("cfg", "process_group", "rank", "world_size", "iteration", "stats", "entry",
                 "_config_checked")

    def __init__(self, cfg: SparsityConfig | Any, process_group: dist.ProcessGroup | None = None,
                 *, entry: str = "distk") -> None:
        if not hasattr(cfg, "to_dict"):
            raise TypeError(f"{entry}: cfg must be a config object with to_dict(), got "
                            f"{type(cfg).__name__}")
        self.cfg = cfg
        self.entry = entry
        ready = group_ready()
        if ready:
            check_same_config(self.cfg, process_group)
        self._config_checked = ready
        self.process_group = process_group
        self.rank, self.world_size = rank_and_world(process_group)
        self.iteration = 0
        self.stats = StepStats()

    def _late_bind(self, check: bool) -> None:
        """For an owner built before the process group existed: take the rank and world
        size now, and (``check``: at the first collective, which every rank reaches) run
        the cross-rank config check once."""
        if self._config_checked or not group_ready():
            return
        self.rank, self.world_size = rank_and_world(self.process_group)
        if check:
            check_same_config(self.cfg, self.process_group)
            self._config_checked = True

    @property
    def totals(self) -> StepStats:
        """:class:`~distk.stats.StepStats` of every buffer of the run."""
        raise NotImplementedError

    def metrics(self, prefix: str = "distk/") -> dict[str, float]:
        """The last step's statistics, the run totals (``<prefix>total_*``) and the step
        counter as ``{name: value}`` (what the loggers and DeepSpeed's monitor receive)."""
        return {**self.stats.to_metrics(prefix), **self.totals.to_metrics(prefix + "total_"),
                prefix + "iteration": float(self.iteration)}

    # -- checkpointing ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The owner's state with its origin: config, rank, world size, the counter, and
        what the subclass keeps (:meth:`_payload`). ``torch.save`` works."""
        self._late_bind(check=False)
        return {"config": self.cfg.to_dict(), "rank": self.rank,
                "world_size": self.world_size, "iteration": self.iteration,
                **self._payload()}

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Raise ValueError unless :meth:`load_state_dict` would accept ``state_dict``:
        written under this config, by this rank, under this world size. The one check of
        a checkpoint's origin (the frameworks' per-rank files use it too)."""
        self._late_bind(check=False)
        saved = state_dict.get("config")
        current = self.cfg.to_dict()
        if saved != current:
            saved = saved or {}
            diff = {k: (saved.get(k), current.get(k)) for k in set(saved) | set(current)
                    if saved.get(k) != current.get(k)}
            raise ValueError(
                f"distk checkpoint ({self.entry}) was written with a different "
                f"{type(self.cfg).__name__}; differing keys (checkpoint, current): {diff}")
        where = (state_dict.get("rank"), state_dict.get("world_size"))
        if where != (self.rank, self.world_size):
            raise ValueError(
                f"distk checkpoint was written by rank {where[0]} of world size {where[1]}; "
                f"this is rank {self.rank} of world size {self.world_size}. Residuals belong "
                "to the rank that kept them: resume with the same world size and rank order.")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, after :meth:`check_state_dict`.

        Raises ValueError when the checkpoint was written under another config, or by
        another rank or world size."""
        self.check_state_dict(state_dict)
        self.iteration = int(state_dict["iteration"])
        self._restore(state_dict)

    def _payload(self) -> dict[str, Any]:
        """What the subclass checkpoints beside the common fields."""
        return {}

    def _restore(self, state_dict: dict[str, Any]) -> None:
        """Restore the subclass's part of :meth:`state_dict` (already checked)."""
        del state_dict
