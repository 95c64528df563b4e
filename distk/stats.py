"""Typed statistics: one :class:`StepStats` for a buffer, a step and a run.

The compressor records one ``StepStats`` per exchanged buffer; a
:class:`~distk.integrations.CompressionState` merges a step's buffers into
``state.stats``; the compressor's ``totals`` merge every buffer of the run (the one owner
of run totals, checkpointed with the residuals). Loggers, the training loop and
DeepSpeed's monitor read them through :meth:`StepStats.to_metrics`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["StepStats"]

_MEASURED = ("residual_sq", "input_sq", "update_sq")  # None unless measured on every buffer


@dataclass
class StepStats:
    """Counts, bytes and seconds of exchanged gradient buffers; :meth:`merge` adds them.

    ``numel`` counts every gradient entry that went through the exchange, small dense
    tensors included; ``sent`` counts the entries sent (``numel`` for a dense buffer), so
    :attr:`density` is the effective density of what crossed the wire.
    """

    buffers: int = 0
    """Buffers (exchange calls) merged."""
    numel: int = 0
    sent: int = 0
    """Entries this rank sent (the selected ``k``; all entries of a dense buffer)."""
    bytes_sent: int = 0
    """Bytes this rank transmitted (metadata included)."""
    payload_bytes: int = 0
    """Bytes of this rank's own packed entries (ranges, values and indices; no metadata,
    nothing counted twice for the collective's fan-out); 0 for skipped buffers."""
    dense_bytes: int = 0
    """Bytes a dense fp32 ring all-reduce of the same buffers would transmit."""
    accumulate_seconds: float = 0.0
    selection_seconds: float = 0.0
    comm_seconds: float = 0.0
    """Launch to finish of the exchanges (overlapped with backward where asynchronous)."""
    skipped: int = 0
    """Buffers whose update was dropped for a non-finite gradient (``nonfinite="skip"``)."""
    schemes: dict[str, int] = field(default_factory=dict)
    """Buffers per exchange scheme, e.g. ``{"allgather": 3, "dense": 1}``."""
    residual_sq: float | None = None
    """Sum of squared residual norms; ``None`` unless measured on every buffer."""
    input_sq: float | None = None
    """Sum of squared norms of what the owner handed over (gradients, or outer
    synchronisation's pseudo-gradients); ``None`` unless measured on every buffer."""
    update_sq: float | None = None
    """Sum of squared norms of the averaged updates; ``None`` unless measured on every
    buffer."""
    recall_sum: float = 0.0
    """Sum of ``recall * k`` over buffers whose recall was measured."""
    recall_weight: int = 0
    global_recall_sum: float = 0.0
    """Sum of ``global_recall * k`` over shared-mask buffers where it was measured: the
    share of the top-k of the *summed* accumulators (all ranks) that the shared mask
    covered (estimated; :meth:`GradientCompressor._shared_recall
    <distk.compressor.GradientCompressor._shared_recall>`)."""
    global_recall_weight: int = 0
    step: int | None = None
    """Training step (of the owning state) of the last merged buffer."""
    target_density: float | None = None
    """The configured density (``cfg.density``) next to the effective :attr:`density`;
    set on a step's stats by the owning state, ``None`` on a buffer's and the totals."""

    @property
    def density(self) -> float:
        """Effective density: entries sent / all gradient entries."""
        return self.sent / self.numel if self.numel else 0.0

    @property
    def compression(self) -> float:
        """``dense_bytes / bytes_sent`` (1.0 when nothing was sent)."""
        return self.dense_bytes / self.bytes_sent if self.bytes_sent else 1.0

    @property
    def bits_per_entry(self) -> float:
        """Payload bits per sent entry (index, value and the codec's amortised ranges)."""
        return 8 * self.payload_bytes / self.sent if self.sent else 0.0

    @property
    def bits_per_param(self) -> float:
        """Payload bits per gradient entry (``bits_per_entry * density``)."""
        return 8 * self.payload_bytes / self.numel if self.numel else 0.0

    @property
    def residual_norm(self) -> float | None:
        """2-norm over every merged residual (``None`` when not measured)."""
        return None if self.residual_sq is None else math.sqrt(self.residual_sq)

    @property
    def input_norm(self) -> float | None:
        """2-norm over every merged input (``None`` when not measured)."""
        return None if self.input_sq is None else math.sqrt(self.input_sq)

    @property
    def update_norm(self) -> float | None:
        """2-norm over every merged averaged update (``None`` when not measured)."""
        return None if self.update_sq is None else math.sqrt(self.update_sq)

    @property
    def recall(self) -> float | None:
        """``k``-weighted mean recall of the buffers where it was measured: each rank's
        selection against the exact top-k of its own accumulator (local masks)."""
        return self.recall_sum / self.recall_weight if self.recall_weight else None

    @property
    def global_recall(self) -> float | None:
        """``k``-weighted mean recall of shared masks against the top-k of the summed
        accumulators, where it was measured."""
        return (self.global_recall_sum / self.global_recall_weight
                if self.global_recall_weight else None)

    def merge(self, other: StepStats) -> StepStats:
        """A new ``StepStats`` holding both (an empty one is the identity)."""
        if not self.buffers:
            return StepStats(**{**asdict(other), "schemes": dict(other.schemes)})
        if not other.buffers:
            return StepStats(**{**asdict(self), "schemes": dict(self.schemes)})
        schemes = dict(self.schemes)
        for name, count in other.schemes.items():
            schemes[name] = schemes.get(name, 0) + count
        measured = {name: (None if getattr(self, name) is None or getattr(other, name) is None
                           else getattr(self, name) + getattr(other, name))
                    for name in _MEASURED}
        summed = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)
                  if f.name not in ("schemes", "step", "target_density", *_MEASURED)}
        return StepStats(**summed, schemes=schemes, **measured,
                         step=other.step if other.step is not None else self.step,
                         target_density=(other.target_density
                                         if other.target_density is not None
                                         else self.target_density))

    def to_metrics(self, prefix: str = "distk/") -> dict[str, float]:
        """Scalar metrics ``{prefix + name: value}`` (unmeasured ones left out)."""
        values: dict[str, Any] = {
            "buffers": self.buffers, "numel": self.numel, "k": self.sent,
            "density": self.density, "compression": self.compression,
            "bytes_sent": self.bytes_sent, "dense_bytes": self.dense_bytes,
            "payload_bytes": self.payload_bytes, "bits_per_entry": self.bits_per_entry,
            "bits_per_param": self.bits_per_param,
            "accumulate_seconds": self.accumulate_seconds,
            "selection_seconds": self.selection_seconds, "comm_seconds": self.comm_seconds,
            "skipped": self.skipped, "residual_norm": self.residual_norm,
            "input_norm": self.input_norm, "update_norm": self.update_norm,
            "recall": self.recall, "global_recall": self.global_recall,
            "target_density": self.target_density,
        }
        return {prefix + name: float(value) for name, value in values.items()
                if value is not None}

    def to_dict(self) -> dict[str, Any]:
        """Plain fields (``torch.save`` / JSON friendly); :meth:`from_dict` inverts it."""
        return {**asdict(self), "schemes": dict(self.schemes)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepStats:
        """Inverse of :meth:`to_dict`; unknown keys are refused (ValueError)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"StepStats.from_dict: unknown keys {unknown}; allowed: "
                             f"{sorted(known)}")
        return cls(**data)
