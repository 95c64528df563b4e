""":class:`DeepSpeedCompressionState`: the shared :class:`CompressionState` plus the
DeepSpeed seam in use and the gradient buckets whose exchange is in flight.

A DeepSpeed seam hands over a bucket of gradients (one parameter per compressor key) and
returns before the exchange is done: :meth:`DeepSpeedCompressionState.launch` starts the
exchange of every gradient (``reduce_async``) and keeps the bucket, with what DeepSpeed
does next with the averaged values (its ``finish``), until a wait point of DeepSpeed's
calls :meth:`DeepSpeedCompressionState.wait`. Buckets finish in launch order, on the
thread that waits, so DeepSpeed's own bookkeeping (partition offsets, fp32 partition
buffers) sees them in the order it would have.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from distk.config import SparsityConfig
from distk.integrations.state import CompressionState

__all__ = ["MONITOR_PREFIX", "DeepSpeedCompressionState"]

MONITOR_PREFIX = "distk/"
"""Prefix of the event names written to ``engine.monitor`` and to ``state.logger``."""


class _LaunchedBucket:
    """One bucket whose exchange is in flight: its futures, the tensors that will hold
    the averages, and what DeepSpeed does with them once they are there."""

    __slots__ = ("futures", "targets", "finish")

    def __init__(self, futures: list[torch.futures.Future], targets: list[torch.Tensor],
                 finish: Callable[[], None] | None) -> None:
        self.futures = futures
        self.targets = targets
        self.finish = finish


class DeepSpeedCompressionState(CompressionState):
    """What ``engine.distk`` holds: the shared state plus the seam in use.

    See :class:`~distk.integrations.CompressionState` for ``cfg``, ``compressor``,
    ``stats``, ``totals``, ``iteration``, ``state_dict`` and ``load_state_dict``.
    Residuals are keyed by parameter name (``model.named_parameters()``). One step
    (``iteration``) is one optimizer step: it ends at the gradient accumulation boundary
    (``engine.step``), under every ZeRO stage; ZeRO 2, which reduces after every
    micro-batch as DeepSpeed itself does, exchanges each gradient once per micro-batch
    within it.

    Exchanges are asynchronous (``reduce_async``): a bucket's exchange travels while
    backward computes the next bucket, and finishes at DeepSpeed's own wait points (see
    :mod:`distk.integrations.deepspeed.seams`). An error of an exchange (a non-finite
    gradient under ``nonfinite="raise"``, ranks that disagree) is raised by ``engine.step``
    on every rank, before the optimizer step, which is then not taken.

    Attributes:
        seam: which DeepSpeed reduction was replaced: ``"engine"`` (ZeRO 0 and the
            BF16 optimizer) or ``"zero"`` (ZeRO 1/2 optimizer).
        zero_stage: the engine's ZeRO stage.
        logger: optional sink with ``log(metrics: dict, step: int)`` (e.g.
            :class:`~distk.logging.StatsLogger`); receives ``distk/*`` metrics after
            every optimizer step that exchanged gradients. ``None`` = only the monitor.
        sum_gradients: True when DeepSpeed is configured to sum, not average, gradients
            (``gradient_average`` false); the average is then scaled by the world size.
        overlap: True (default): a bucket's exchange finishes at DeepSpeed's next wait
            point. False: every bucket is waited for where it was launched (no overlap
            with backward; the same results, for comparisons and debugging).
    """

    __slots__ = ("seam", "zero_stage", "logger", "sum_gradients", "overlap", "_launched")

    STEP_ENDS_WITH_BACKWARD = False

    def __init__(self, cfg: SparsityConfig | dict[str, Any],
                 process_group: dist.ProcessGroup | None, seam: str, zero_stage: int,
                 sum_gradients: bool = False, model: torch.nn.Module | None = None, *,
                 overlap: bool = True) -> None:
        super().__init__(cfg, process_group, model=model, entry="distk.deepspeed")
        self.seam = seam
        self.zero_stage = zero_stage
        self.logger: Any = None
        self.sum_gradients = sum_gradients
        self.overlap = overlap
        self._launched: deque[_LaunchedBucket] = deque()

    # -- exchanges -----------------------------------------------------------------------
    def launch(self, gradients: Sequence[tuple[torch.Tensor, str, torch.Tensor | None]],
               finish: Callable[[], None] | None = None) -> None:
        """Start the exchange of one bucket: ``(gradient, key, out)`` triples.

        Each gradient's average over ranks (``out``, or the gradient itself when ``out``
        is None) is written once its exchange is done; the gradient itself may be
        overwritten as soon as this returns. ``finish`` runs after every average of the
        bucket is written (scaled by the world size under ``sum_gradients``), on the
        thread that calls :meth:`wait`. With :attr:`overlap` off, waits here.
        """
        futures, targets = [], []
        for gradient, key, out in gradients:
            futures.append(self.reduce_async(gradient, key, out))
            targets.append(gradient if out is None else out)
        self._launched.append(_LaunchedBucket(futures, targets, finish))
        if not self.overlap:
            self.wait()

    def wait(self, keep: int = 0) -> None:
        """Finish launched buckets in launch order until at most ``keep`` (the newest)
        are still in flight. Errors of the exchanges are kept for ``end_step``."""
        while len(self._launched) > keep:
            bucket = self._launched.popleft()
            torch.futures.wait_all(bucket.futures)
            if self.sum_gradients:
                for target in bucket.targets:
                    target.mul_(self.world_size)
            if bucket.finish is not None:
                bucket.finish()

    @property
    def buckets_in_flight(self) -> int:
        """Buckets launched whose exchange has not been finished yet (0 after every wait
        point; at most one while backward runs under ZeRO 2)."""
        return len(self._launched)

    def exchange(self, grad: torch.Tensor, key: str) -> None:
        """Replace ``grad`` in place by its sparse, error-compensated average over ranks,
        synchronously (one gradient launched and waited for)."""
        self.launch([(grad, key, None)])
        self.wait()

    def end_step(self) -> bool:
        """Finish what is still in flight, then :meth:`CompressionState.end_step`."""
        self.wait()
        return super().end_step()

    # -- reporting -----------------------------------------------------------------------
    def report(self, engine: Any) -> None:
        """Send the last step's statistics to ``engine.monitor`` and :attr:`logger`."""
        metrics = self.metrics(MONITOR_PREFIX)
        monitor = getattr(engine, "monitor", None)
        if monitor is not None and monitor.enabled:
            # DeepSpeed's own events use the sample count as their x axis.
            monitor.write_events([(name, value, engine.global_samples)
                                  for name, value in metrics.items()])
        if self.logger is not None:
            self.logger.log(metrics, step=engine.global_steps)

    # -- pickling ------------------------------------------------------------------------
    def _extra_getstate(self) -> dict[str, Any]:
        return {"seam": self.seam, "zero_stage": self.zero_stage,
                "sum_gradients": self.sum_gradients, "overlap": self.overlap}

    def _extra_setstate(self, state: dict[str, Any]) -> None:
        self.seam = state["seam"]
        self.zero_stage = state["zero_stage"]
        self.sum_gradients = state["sum_gradients"]
        self.overlap = state.get("overlap", True)
        self.logger = None
        self._launched = deque()
