"""Hook state shared by the DDP and FSDP integrations.

Both integrations are thin adapters: a framework hands over one flat gradient buffer at
a time (a DDP ``GradBucket``, an FSDP2 reduce-scatter input, an FSDP1 flat-parameter
gradient) and the adapter passes it through the one :class:`~distk.compressor.GradientCompressor`
under a stable key. What they share lives here:

- :class:`CompressionState`: the object ``enable`` returns. It owns the compressor, counts
  synchronised iterations, aggregates the per-buffer statistics of one iteration into
  :attr:`CompressionState.stats`, and is checkpointable (``state_dict`` /
  ``load_state_dict``) and picklable (the process group is not pickled; like PowerSGD's
  state, an unpickled state binds to the default group).
- :func:`aggregate_stats`: merges the compressor's per-call ``stats`` dicts.

A *step* here is one synchronised backward pass: every compressed buffer of the model
goes through the compressor exactly once. Accumulation micro-steps (``no_sync``,
``set_requires_gradient_sync(False)``) never reach the hooks and are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from distk.comm import dense_allreduce_bytes

# Per-buffer statistics that add up over the buffers of one step.
_SUMMED_STATS = (
    "numel", "k", "bytes_sent", "dense_bytes", "accumulate_seconds", "selection_seconds",
    "comm_seconds",
)


def aggregate_stats(per_buffer: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Merge the compressor's ``stats`` of every buffer of one step into one dict.

    Counts, bytes and seconds are summed; ``density`` is ``k / numel`` of the sums;
    ``residual_norm`` is the 2-norm over all buffers (square root of the summed
    squares; absent unless every buffer measured it); ``recall`` is the ``k``-weighted
    mean over the buffers where it was measured (absent when none was); ``scheme``
    counts buffers per exchange scheme, e.g. ``{"allgather": 3, "dense": 1}``;
    ``compression`` is ``dense_bytes / bytes_sent``; ``buffers`` is the number of
    buffers merged.
    """
    merged: dict[str, Any] = dict.fromkeys(_SUMMED_STATS, 0)
    schemes: dict[str, int] = {}
    residual_sq = 0.0
    residual_known = True
    recall_num = 0.0
    recall_den = 0
    buffers = 0
    step = None
    for stats in per_buffer:
        buffers += 1
        for key in _SUMMED_STATS:
            merged[key] += stats.get(key, 0) or 0
        scheme = str(stats.get("scheme", "unknown"))
        schemes[scheme] = schemes.get(scheme, 0) + 1
        if stats.get("residual_norm") is None:
            residual_known = False  # not measured this step (stats_interval)
        else:
            residual_sq += float(stats["residual_norm"]) ** 2
        if stats.get("recall") is not None:
            weight = max(int(stats.get("k", 0) or 0), 1)
            recall_num += float(stats["recall"]) * weight
            recall_den += weight
        if stats.get("step") is not None:
            step = stats["step"]
    merged["buffers"] = buffers
    merged["scheme"] = schemes
    merged["density"] = merged["k"] / merged["numel"] if merged["numel"] else 0.0
    merged["compression"] = (
        merged["dense_bytes"] / merged["bytes_sent"] if merged["bytes_sent"] else 1.0
    )
    if residual_known and buffers:
        merged["residual_norm"] = math.sqrt(residual_sq)
    if recall_den:
        merged["recall"] = recall_num / recall_den
    if step is not None:
        merged["step"] = step
    return merged


def dense_stats(numel: int, element_size: int, world_size: int,
                comm_seconds: float) -> dict[str, Any]:
    """Stats of a buffer that an adapter all-reduced densely without the compressor.

    Only the DDP hook does that, in the iteration where DDP's buckets are not final yet.
    Bytes follow the compressor's convention: ring all-reduce bytes one rank transmits,
    ``dense_bytes`` at fp32.
    """
    return {
        "numel": numel, "k": numel, "density": 1.0, "scheme": "dense",
        "bytes_sent": dense_allreduce_bytes(numel, world_size, element_size),
        "dense_bytes": dense_allreduce_bytes(numel, world_size, 4),
        "accumulate_seconds": 0.0, "selection_seconds": 0.0, "comm_seconds": comm_seconds,
    }


def refuse_outer_sync(cfg: Any, integration: str) -> None:
    """Raise for ``sync_every > 1``: these integrations exchange at every backward pass."""
    sync_every = getattr(cfg, "sync_every", 1)
    if sync_every == 1:
        return
    why = ("DeepSpeed's engine reduces (and under ZeRO partitions) gradients inside every "
           "backward/step, so ranks cannot take local steps without replacing its optimizer "
           "step" if "DeepSpeed" in integration else
           "DDP/FSDP all-reduce or reduce-scatter gradients at every backward pass")
    raise ValueError(
        f"SparsityConfig.sync_every={sync_every} (outer synchronisation) is not supported by "
        f"{integration}: {why}. Use distk.outer.enable(model, optimizer, cfg) on a plain "
        "(unwrapped) model under torchrun, or set sync_every=1.")


class CompressionState:
    """What ``distk.ddp.enable`` / ``distk.fsdp.enable`` return.

    Attributes:
        cfg: the :class:`~distk.config.SparsityConfig` in use (identical on every rank).
        compressor: the one :class:`~distk.compressor.GradientCompressor` every buffer
            goes through; its residuals are keyed by bucket index (DDP) or module
            name (FSDP).
        process_group: the group gradients are averaged over (``None`` = default group).
        iteration: number of completed synchronised backward passes.
        stats: the merged statistics (see :func:`aggregate_stats`) of the last completed
            step; empty before the first one.
    """

    __slots__ = (
        "cfg", "compressor", "process_group", "iteration", "stats",
        "_pending", "_seen_keys", "_expected_keys",
    )

    def __init__(self, cfg: Any, process_group: dist.ProcessGroup | None = None,
                 expected_keys: Iterable[Hashable] | None = None) -> None:
        refuse_outer_sync(cfg, type(self).__name__)
        self.cfg = cfg
        self.process_group = process_group
        self.compressor = self._make_compressor()
        self.iteration = 0
        self.stats: dict[str, Any] = {}
        self._pending: list[dict[str, Any]] = []
        self._seen_keys: set[Hashable] = set()
        self._expected_keys = frozenset(expected_keys) if expected_keys is not None else None

    # -- step bookkeeping ------------------------------------------------------------
    def _begin_buffer(self, key: Hashable) -> bool:
        """Note that buffer ``key`` is about to be reduced; True if it opens a new step.

        A key seen twice means the previous step ended (some expected buffer never
        came, e.g. a module whose parameters got no gradient).
        """
        if key in self._seen_keys:
            self._finish_step()
        opens = not self._seen_keys
        if opens:
            self.compressor.begin_step()
        self._seen_keys.add(key)
        return opens

    def _end_buffer(self, stats: dict[str, Any], last: bool = False) -> None:
        """Record the stats of one reduced buffer; ``last`` (or all keys seen) ends the step."""
        self._pending.append(dict(stats))
        if last or (self._expected_keys is not None and self._seen_keys >= self._expected_keys):
            self._finish_step()

    def _finish_step(self) -> None:
        if not self._seen_keys:
            return
        self.stats = aggregate_stats(self._pending)
        self.stats["iteration"] = self.iteration
        self._pending = []
        self._seen_keys = set()
        self.iteration += 1

    # -- checkpointing ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Residuals, momenta and counters as plain tensors/ints (``torch.save`` works).

        The config travels too (as a dict) so that :meth:`load_state_dict` can refuse a
        checkpoint written under different settings.
        """
        return {
            "config": self.cfg.to_dict(),
            "iteration": self.iteration,
            "compressor": self.compressor.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (residuals included).

        Raises ValueError when the checkpoint's config differs from this state's config:
        residuals computed under another density or method are not meaningful here.
        """
        saved = state_dict.get("config")
        current = self.cfg.to_dict()
        if saved is not None and saved != current:
            diff = {k: (saved.get(k), current.get(k)) for k in set(saved) | set(current)
                    if saved.get(k) != current.get(k)}
            raise ValueError(
                "distk checkpoint was written with a different SparsityConfig; differing "
                f"keys (checkpoint, current): {diff}"
            )
        self.iteration = int(state_dict["iteration"])
        self.compressor.load_state_dict(state_dict["compressor"])
        self._pending = []
        self._seen_keys = set()

    def __getstate__(self) -> dict[str, Any]:
        # The process group cannot be pickled; everything else goes through state_dict.
        return {
            "state_dict": self.state_dict(),
            "expected_keys": self._expected_keys,
            "stats": self.stats,
            **self._extra_getstate(),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        from distk.config import SparsityConfig

        self.cfg = SparsityConfig.from_dict(state["state_dict"]["config"])
        self.process_group = None  # the default group, as PowerSGDState does
        self.compressor = self._make_compressor()
        self.stats = state["stats"]
        self._expected_keys = state["expected_keys"]
        self._pending = []
        self._seen_keys = set()
        self._extra_setstate(state)
        self.load_state_dict(state["state_dict"])

    def _make_compressor(self) -> Any:
        from distk.compressor import GradientCompressor

        return GradientCompressor(self.cfg, group=self.process_group)

    def _extra_getstate(self) -> dict[str, Any]:
        return {}

    def _extra_setstate(self, state: dict[str, Any]) -> None:
        del state

    # -- helpers -------------------------------------------------------------------
    def world_size(self) -> int:
        """Number of ranks gradients are averaged over."""
        return dist.get_world_size(self.process_group)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(method={self.cfg.method!r}, density={self.cfg.density}, "
                f"iteration={self.iteration})")


def as_flat(tensor: torch.Tensor) -> torch.Tensor:
    """The 1-D view of a contiguous buffer (the compressor works on flat tensors)."""
    if not tensor.is_contiguous():
        raise ValueError("distk expected a contiguous gradient buffer from the framework")
    return tensor.view(-1)
