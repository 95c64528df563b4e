"""Shared masks: how the ranks agree on one set of positions per buffer.

With a shared mask every rank sends its (residual-corrected) values at the *same* ``k``
positions, so one plain all-reduce sums them (the ``"shared"`` scheme of
:mod:`distk.comm.exchange`), no index travels with the values, and the bytes per rank
stay near ``2 k`` values at any number of ranks. What each rank leaves unsent stays in
its own residual, as with local masks. The policies differ in where the positions come
from:

* :class:`LeaderMask` (``mask_policy="leader"``; ScaleCom, Chen et al., NeurIPS 2020,
  "cyclic local top-k"): in turn, one rank (``step mod P``) selects the top-k of its own
  residual and broadcasts the positions, bit-packed (the offset inside each bucket). The
  leader of the next step selects from its residual right after this step's values are
  launched and broadcasts meanwhile, so the mask of every step after the first is known
  before its backward pass. Costs one packed position per entry, broadcast once.
* :class:`MomentMask` (``mask_policy="moment"``; after SCAPE, arXiv 2607.01678, which
  derives masks from Adam's first moment): every rank keeps the same exponential moving
  average of the *averaged updates* (bitwise identical on every rank, as the updates
  are), and the mask is its top entries: no collective at all. Positions outside the
  mask receive no update, so their moment only decays and a mask built from it alone
  would never change; a share ``mask_explore`` of the budget therefore sweeps the buffer
  (one interleaved bucket per step), visiting every position every
  ``numel / (mask_explore * k)`` steps and releasing what its residuals hold.
* :class:`SketchMask` (``mask_policy="sketch"``; after ARC-Top-K, Chen et al., arXiv
  2510.26709, which aligns masks through a summed sketch): every rank sums the magnitudes
  of its accumulator over contiguous chunks, one small all-reduce adds the ranks'
  chunk sums, and the mask is the whole chunks with the largest sums. Costs the sketch
  (``SKETCH_RATIO * k`` values) per call.

Every policy's positions are bitwise identical on every rank by construction; the
exchange compares their digest on verified steps and raises
:class:`~distk.comm.RankMismatchError` otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from distk.comm import WireFormat
from distk.comm.codec import bits_for, packed_nbytes
from distk.comm.group import (
    all_gather_flat,
    collective_device,
    collective_errors,
    rank_and_world,
    ring_allreduce_bytes,
)
from distk.compressor.plan import SelectionPlan

__all__ = ["MASK_POLICIES", "LeaderMask", "MaskContext", "MaskPolicy", "MomentMask",
           "SKETCH_RATIO", "SketchMask", "make_mask_policy"]

SKETCH_RATIO = 0.25
"""Sketch entries per selected entry of :class:`SketchMask` (chunks of
``numel / (SKETCH_RATIO * k)`` entries)."""


@dataclass
class MaskContext:
    """What a policy sees of one buffer's step.

    Attributes:
        key, step: the buffer and the owner's step.
        acc: this rank's accumulator (residual + gradient), flat; read only.
        plan, wire: the step's selection plan and its wire format (``k``, buckets).
        select: the compressor's own top-k of a flat tensor under a plan (bucketed or
            exact, as configured), returning positions in bucket order.
        plan_for: the compressor's selection plan and wire format for ``k`` entries of
            this buffer at a step (``(k, step) -> (plan, wire)``).
        next: the next step's plan and wire format when it will use a shared mask too
            (``None``: it will not, or it is not known); a policy may prepare the next
            mask for it.
    """

    key: Hashable
    step: int
    acc: torch.Tensor
    plan: SelectionPlan
    wire: WireFormat
    select: Callable[[torch.Tensor, SelectionPlan], torch.Tensor]
    plan_for: Callable[[int, int], tuple[SelectionPlan, WireFormat]]
    next: tuple[SelectionPlan, WireFormat] | None = None


class MaskPolicy:
    """Base of the shared-mask policies: stateless defaults.

    Attributes:
        spent: bytes this rank has transmitted for the policy's collectives so far (the
            compressor counts each step's share into ``bytes_sent``).
    """

    name = "base"

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.spent = 0

    def overhead_bytes(self, wire: WireFormat, world: int) -> int:
        """Bytes one rank is expected to transmit, per call, for the ranks to agree (the
        cost model's ``shared_overhead``; the statistics count what :attr:`spent`
        says)."""
        del wire, world
        return 0

    def positions(self, ctx: MaskContext) -> torch.Tensor:
        """The ``ctx.wire.k`` distinct positions every rank sends this step (int64, on
        ``ctx.acc``'s device); collective where the policy needs one."""
        raise NotImplementedError

    @property
    def looks_ahead(self) -> bool:
        """Whether :meth:`after_launch` agrees on the next step's mask (the compressor
        then hands it the next step's plan)."""
        return False

    def after_launch(self, ctx: MaskContext, positions: torch.Tensor) -> None:
        """Called once this step's values are launched (main thread, same order on every
        rank) when :attr:`looks_ahead`: the policy starts agreeing on the next mask."""
        del ctx, positions

    def observe(self, key: Hashable, step: int, update: torch.Tensor,
                positions: torch.Tensor | None) -> None:
        """The step's averaged update (identical on every rank), flat, in the state dtype;
        ``positions`` its support (``None``: dense)."""
        del key, step, update, positions

    def _keyed(self) -> tuple[dict[Hashable, Any], ...]:
        """The policy's tables of per-key state (what :meth:`forget` drops)."""
        return ()

    def forget(self, key: Hashable | None = None) -> None:
        """Drop what is kept for ``key`` (``None``: every key)."""
        for table in self._keyed():
            if key is None:
                table.clear()
            else:
                table.pop(key, None)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


@dataclass
class _Ahead:
    """A mask agreed for a later step: in flight, then received.

    ``wire`` is the step's own wire format (what the mask is for); ``proposal`` the wire
    format of what travelled (the leader's positions, or one rank's proposal)."""

    step: int
    wire: WireFormat
    proposal: WireFormat
    payload: torch.Tensor
    future: torch.futures.Future | None


class _AgreedMask(MaskPolicy):
    """Positions chosen from the ranks' own accumulators and sent to every rank, once per
    step, bit-packed: the shared machinery of :class:`LeaderMask` and :class:`UnionMask`.

    The mask of the next step is agreed as soon as this step's values are launched (from
    the residual they leave behind), so every step after a key's first finds its mask
    already received: selection leaves the critical path, and the exchange of a bucket
    can start as soon as its gradient is ready."""

    def __init__(self, group: Any = None, *, ahead: bool = True) -> None:
        super().__init__(group)
        self.ahead = ahead
        self._ahead: dict[Hashable, _Ahead] = {}

    # What each policy defines.
    def _proposal(self, ctx: MaskContext, plan: SelectionPlan, wire: WireFormat, step: int
                  ) -> tuple[SelectionPlan, WireFormat]:
        raise NotImplementedError

    def _send(self, payload: torch.Tensor, proposal: WireFormat, step: int, proposes: bool
              ) -> tuple[torch.Tensor, torch.futures.Future | None]:
        raise NotImplementedError

    def _decode(self, buffer: torch.Tensor, proposal: WireFormat) -> torch.Tensor:
        raise NotImplementedError

    def _proposes(self, step: int) -> bool:
        return True

    # The shared machinery.
    def _launch(self, ctx: MaskContext, plan: SelectionPlan, wire: WireFormat, step: int,
                source: torch.Tensor) -> _Ahead:
        proposal_plan, proposal = self._proposal(ctx, plan, wire, step)
        rank, world = rank_and_world(self.group)
        proposes = self._proposes(step)
        if proposes:
            payload = proposal.pack_positions(ctx.select(source, proposal_plan))
        else:
            payload = torch.empty(proposal.positions_nbytes, dtype=torch.uint8)
        if world == 1:
            return _Ahead(step, wire, proposal, payload, None)
        payload = payload.to(collective_device(self.group, payload))
        buffer, future = self._send(payload, proposal, step, proposes)
        return _Ahead(step, wire, proposal, buffer, future)

    def _received(self, ahead: _Ahead, device: torch.device) -> torch.Tensor:
        if ahead.future is not None:
            with collective_errors("the shared mask's agreement", self.group):
                ahead.future.wait()
            ahead.future = None
        return self._decode(ahead.payload, ahead.proposal).to(device)

    def positions(self, ctx: MaskContext) -> torch.Tensor:
        ahead = self._ahead.pop(ctx.key, None)
        device = ctx.acc.device
        if ahead is not None:
            positions = self._received(ahead, device)  # consumed on every rank alike
            if ahead.step == ctx.step and ahead.wire == ctx.wire:
                return positions
        # No mask prepared (first sparse step, a plan change, a resume): agree now.
        ahead = self._launch(ctx, ctx.plan, ctx.wire, ctx.step, ctx.acc)
        return self._received(ahead, device)

    @property
    def looks_ahead(self) -> bool:
        return self.ahead

    def after_launch(self, ctx: MaskContext, positions: torch.Tensor) -> None:
        if ctx.next is None:
            return
        next_plan, next_wire = ctx.next
        residual = ctx.acc
        if self._proposes(ctx.step + 1):
            residual = ctx.acc.clone()  # what stays after this step's values leave
            residual[positions] = 0
        self._ahead[ctx.key] = self._launch(ctx, next_plan, next_wire, ctx.step + 1, residual)

    def _keyed(self) -> tuple[dict[Hashable, Any], ...]:
        return (self._ahead,)

    def state_dict(self) -> dict[str, Any]:
        """The masks agreed for the next step (received first), per key."""
        prepared = {}
        for key, ahead in self._ahead.items():
            prepared[key] = {"step": ahead.step, "wire": _wire_fields(ahead.wire),
                             "positions": self._received(ahead, torch.device("cpu"))}
        return {"prepared": prepared}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ahead = {}
        for key, item in state.get("prepared", {}).items():
            wire = WireFormat(**item["wire"])
            positions = item["positions"].to(torch.int64)
            received = WireFormat(wire.numel, positions.numel(), wire.value_dtype)
            self._ahead[key] = _Ahead(int(item["step"]), wire, received,
                                      received.pack_positions(positions), None)


class LeaderMask(_AgreedMask):
    """The leader's top-k, broadcast (see the module docstring)."""

    name = "leader"

    def overhead_bytes(self, wire: WireFormat, world: int) -> int:
        # A broadcast delivers the packed positions once to each of the P - 1 other ranks;
        # over the leader's rotation every rank sends (P - 1) / P of them per step.
        return math.ceil(wire.positions_nbytes * (world - 1) / max(world, 1))

    def _proposes(self, step: int) -> bool:
        rank, world = rank_and_world(self.group)
        return rank == step % world

    def _proposal(self, ctx: MaskContext, plan: SelectionPlan, wire: WireFormat, step: int
                  ) -> tuple[SelectionPlan, WireFormat]:
        return plan, wire

    def _send(self, payload: torch.Tensor, proposal: WireFormat, step: int, proposes: bool
              ) -> tuple[torch.Tensor, torch.futures.Future | None]:
        group = self.group
        leader = step % rank_and_world(group)[1]
        source = dist.get_global_rank(group, leader) if group is not None else leader
        with collective_errors("the shared mask's broadcast", group):
            work = dist.broadcast(payload, src=source, group=group, async_op=True)
        self.spent += self.overhead_bytes(proposal, rank_and_world(group)[1])
        return payload, work.get_future()

    def _decode(self, buffer: torch.Tensor, proposal: WireFormat) -> torch.Tensor:
        return proposal.unpack_positions(buffer)


class UnionMask(_AgreedMask):
    """Every rank proposes its own top ``ceil(k / P)``; the mask is the union of the
    proposals (``mask_policy="union"``, the default shared policy). Where the leader's
    mask sees one rank's residual per step, this one takes each rank's strongest entries,
    so every rank's residual is flushed where it is largest, as with local masks, while
    the values still travel in one all-reduce. The proposals are bucketed selections with
    no second stage, so they travel as bucket offsets, bit-packed, in one all-gather:
    each rank receives ``(P - 1) ceil(k / P)`` offsets, about ``k`` at any ``P`` (as many
    as the leader's broadcast). Proposals may coincide: the union then holds fewer than
    ``k`` positions (sent as such; every rank knows its size)."""

    name = "union"

    def _proposal(self, ctx: MaskContext, plan: SelectionPlan, wire: WireFormat, step: int
                  ) -> tuple[SelectionPlan, WireFormat]:
        world = rank_and_world(self.group)[1]
        return ctx.plan_for(max(1, math.ceil(wire.k / world)), step)

    def overhead_bytes(self, wire: WireFormat, world: int) -> int:
        if world <= 1:
            return 0
        share = max(1, math.ceil(wire.k / world))
        # An upper bound of the proposal's packed size without its plan: the offsets of a
        # packed plan need at most the bits of a position.
        return (world - 1) * packed_nbytes(share, bits_for(wire.numel))

    def _send(self, payload: torch.Tensor, proposal: WireFormat, step: int, proposes: bool
              ) -> tuple[torch.Tensor, torch.futures.Future | None]:
        world = rank_and_world(self.group)[1]
        gathered = torch.empty(world * payload.numel(), dtype=torch.uint8,
                               device=payload.device)
        work = all_gather_flat(gathered, payload, self.group, async_op=True,
                               what="the shared mask's all-gather")
        self.spent += (world - 1) * payload.numel()
        return gathered, work.get_future()

    def _decode(self, buffer: torch.Tensor, proposal: WireFormat) -> torch.Tensor:
        if buffer.numel() == proposal.positions_nbytes:  # one process, or a checkpoint
            return proposal.unpack_positions(buffer)
        rows = buffer.view(-1, proposal.positions_nbytes)
        proposals = torch.cat([proposal.unpack_positions(row) for row in rows])
        return torch.unique(proposals)  # sorted: the same on every rank


def _wire_fields(wire: WireFormat) -> dict[str, Any]:
    return {"numel": wire.numel, "k": wire.k, "value_dtype": wire.value_dtype,
            "buckets": wire.buckets, "k_per_bucket": wire.k_per_bucket,
            "interleaved": wire.interleaved, "value_bits": wire.value_bits}


class MomentMask(MaskPolicy):
    """Top entries of a moving average of the averaged updates, plus a sweep (see the
    module docstring).

    Args:
        beta: decay of the average per step, in [0, 1) (0: the previous step's update).
        explore: share of ``k`` given to the sweep, in (0, 1).
        select_method: ``"bucketed"`` or ``"exact"`` top-k of the average.
    """

    name = "moment"

    def __init__(self, group: Any = None, *, beta: float = 0.9, explore: float = 0.25,
                 select_method: str = "bucketed", recall_target: float = 0.95) -> None:
        super().__init__(group)
        self.beta, self.explore = beta, explore
        self.select_method, self.recall_target = select_method, recall_target
        self._moments: dict[Hashable, torch.Tensor] = {}

    def sweep(self, numel: int, k: int, step: int, device: torch.device) -> torch.Tensor:
        """The exploring positions of ``step``: interleaved bucket ``step mod m`` of
        ``m = ceil(numel / k_explore)`` buckets (every position once per ``m`` steps)."""
        k_explore = min(k, max(1, round(self.explore * k)))
        stride = math.ceil(numel / k_explore)
        positions = torch.arange(k_explore, dtype=torch.int64, device=device) * stride
        positions += step % stride
        return positions[positions < numel]

    def positions(self, ctx: MaskContext) -> torch.Tensor:
        from distk.selection import topk

        acc, k = ctx.acc, ctx.wire.k
        numel = acc.numel()
        swept = self.sweep(numel, k, ctx.step, acc.device)
        moment = self._moments.get(ctx.key)
        if moment is None or moment.numel() != numel:
            moment = self._moments[ctx.key] = torch.zeros(numel, dtype=torch.float32,
                                                          device=acc.device)
        moment = moment.to(acc.device)
        score = moment.abs()
        score[swept] = -1.0  # below every magnitude: chosen by the sweep already
        exploit = k - swept.numel()
        if exploit == 0:
            return swept
        method = self.select_method if exploit < numel else "exact"
        _, chosen = topk(score, exploit, method=method, recall_target=self.recall_target)
        return torch.cat([chosen.to(torch.int64), swept])

    def observe(self, key: Hashable, step: int, update: torch.Tensor,
                positions: torch.Tensor | None) -> None:
        del step
        moment = self._moments.get(key)
        if moment is None or moment.numel() != update.numel():
            moment = self._moments[key] = torch.zeros(update.numel(), dtype=torch.float32,
                                                      device=update.device)
        elif moment.device != update.device:
            moment = self._moments[key] = moment.to(update.device)
        moment.mul_(self.beta)
        if positions is None:
            moment.add_(update.to(torch.float32))
        else:
            moment[positions] += update[positions].to(torch.float32)

    def _keyed(self) -> tuple[dict[Hashable, Any], ...]:
        return (self._moments,)

    def state_dict(self) -> dict[str, Any]:
        return {"moments": {k: v.detach().clone() for k, v in self._moments.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._moments = {k: v.detach().clone() for k, v in state.get("moments", {}).items()}


class SketchMask(MaskPolicy):
    """The chunks with the largest summed magnitudes (see the module docstring)."""

    name = "sketch"

    @staticmethod
    def chunk(numel: int, k: int) -> int:
        """Entries per chunk: ``numel / (SKETCH_RATIO * k)``, at least 1."""
        return max(1, math.ceil(numel / max(1, round(SKETCH_RATIO * k))))

    def overhead_bytes(self, wire: WireFormat, world: int) -> int:
        chunks = math.ceil(wire.numel / self.chunk(wire.numel, wire.k))
        return ring_allreduce_bytes(chunks, world, 4)

    def positions(self, ctx: MaskContext) -> torch.Tensor:
        acc, k = ctx.acc, ctx.wire.k
        numel = acc.numel()
        size = self.chunk(numel, k)
        chunks = math.ceil(numel / size)
        magnitudes = torch.zeros(chunks * size, dtype=torch.float32, device=acc.device)
        magnitudes[:numel] = acc.abs()
        summed = magnitudes.view(chunks, size).sum(dim=1)
        if rank_and_world(self.group)[1] > 1:
            summed = summed.to(collective_device(self.group, summed))
            with collective_errors("the sketch's all-reduce", self.group):
                dist.all_reduce(summed, group=self.group)
            self.spent += ring_allreduce_bytes(chunks, rank_and_world(self.group)[1], 4)
        # One chunk more than k needs: the last chunk may be short.
        order = torch.argsort(summed.to(acc.device), descending=True, stable=True)
        take = order[: min(chunks, math.ceil(k / size) + 1)]
        positions = (take[:, None] * size + torch.arange(size, device=acc.device)).reshape(-1)
        return positions[positions < numel][:k]


class OracleMask(MaskPolicy):
    """The exact top-k of the summed accumulators, found by a dense all-reduce of them: a
    diagnostic that costs more than a dense exchange, the upper bound of what any shared
    mask of ``k`` positions can recover (``mask_policy="oracle"``, never chosen by the
    cost model)."""

    name = "oracle"

    def overhead_bytes(self, wire: WireFormat, world: int) -> int:
        return ring_allreduce_bytes(wire.numel, world, 4)

    def positions(self, ctx: MaskContext) -> torch.Tensor:
        summed = ctx.acc.to(torch.float32, copy=True)
        if rank_and_world(self.group)[1] > 1:
            summed = summed.to(collective_device(self.group, summed))
            with collective_errors("the oracle's all-reduce", self.group):
                dist.all_reduce(summed, group=self.group)
            self.spent += ring_allreduce_bytes(summed.numel(), rank_and_world(self.group)[1],
                                               4)
        return torch.topk(summed.abs(), ctx.wire.k, sorted=False).indices.to(ctx.acc.device)


class PredictedMask(MaskPolicy):
    """The top-k of the summed residuals as predicted from what every rank already holds
    (``mask_policy="predicted"``): at each position, the rate its averaged update
    accumulated at (the value sent, over the steps since the position was sent before)
    times the steps since it was last sent. Error feedback sends a position once its
    accumulated value crosses the threshold, so positions return at a period inversely
    proportional to their rate; this policy predicts that schedule with no collective.
    A floor of a tenth of the mean rate keeps positions never sent (or sent when small)
    returning."""

    name = "predicted"

    def __init__(self, group: Any = None) -> None:
        super().__init__(group)
        self._rates: dict[Hashable, torch.Tensor] = {}
        self._last: dict[Hashable, torch.Tensor] = {}

    def _state(self, key: Hashable, numel: int, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
        rate = self._rates.get(key)
        if rate is None or rate.numel() != numel:
            rate = self._rates[key] = torch.zeros(numel, dtype=torch.float32, device=device)
            self._last[key] = torch.full((numel,), -1, dtype=torch.int64, device=device)
        return rate.to(device), self._last[key].to(device)

    def positions(self, ctx: MaskContext) -> torch.Tensor:
        from distk.selection import topk

        rate, last = self._state(ctx.key, ctx.acc.numel(), ctx.acc.device)
        age = (ctx.step - last).to(torch.float32)
        floor = 0.1 * rate.mean()
        score = (rate + floor) * age
        method = "bucketed" if ctx.wire.k < score.numel() else "exact"
        _, chosen = topk(score, ctx.wire.k, method=method)
        return chosen.to(torch.int64)

    def observe(self, key: Hashable, step: int, update: torch.Tensor,
                positions: torch.Tensor | None) -> None:
        rate, last = self._state(key, update.numel(), update.device)
        if positions is None:
            positions = torch.arange(update.numel(), device=update.device)
        age = (step - last[positions]).clamp(min=1).to(torch.float32)
        rate[positions] = update[positions].abs().to(torch.float32) / age
        last[positions] = step
        self._rates[key], self._last[key] = rate, last

    def _keyed(self) -> tuple[dict[Hashable, Any], ...]:
        return (self._rates, self._last)

    def state_dict(self) -> dict[str, Any]:
        return {"rates": {k: v.clone() for k, v in self._rates.items()},
                "last": {k: v.clone() for k, v in self._last.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rates = {k: v.clone() for k, v in state.get("rates", {}).items()}
        self._last = {k: v.clone() for k, v in state.get("last", {}).items()}


MASK_POLICIES: dict[str, type[MaskPolicy]] = {
    "leader": LeaderMask, "moment": MomentMask, "sketch": SketchMask,
    "predicted": PredictedMask, "union": UnionMask, "oracle": OracleMask}
"""Names accepted by ``SparsityConfig.mask_policy``."""


def make_mask_policy(cfg: Any, group: Any = None) -> MaskPolicy:
    """The policy ``cfg.mask_policy`` names, with its options from ``cfg``."""
    if cfg.mask_policy == "moment":
        return MomentMask(group, beta=cfg.mask_beta, explore=cfg.mask_explore,
                          select_method="exact" if cfg.method == "exact" else "bucketed",
                          recall_target=cfg.recall_target)
    if cfg.mask_policy in ("union", "leader"):
        return MASK_POLICIES[cfg.mask_policy](group, ahead=cfg.mask_ahead)
    return MASK_POLICIES[cfg.mask_policy](group)
