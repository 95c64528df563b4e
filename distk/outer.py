"""Sparse outer synchronisation (DiLoCo / SparseLoCo style) for a plain model.

```python
model = build_model()                                  # no DDP wrapper
optimizer = torch.optim.AdamW(model.parameters())      # the inner optimizer
sync = distk.outer.enable(model, optimizer, distk.SparsityConfig(
    sync_every=30, density=64 / 4096, value_bits=2))   # under torchrun
for batch in loader:                                   # the loop does not change
    loss(model(batch)).backward(); optimizer.step(); optimizer.zero_grad()
```

Every rank trains on its own data with its own inner optimizer and no gradient
communication. After every ``sync_every``-th ``optimizer.step()`` (an optimizer step
post-hook), for each parameter::

    delta    = anchor - param                 pseudo-gradient (anchor: params at last sync)
    update   = compressor.step(delta, name)   residual + selection + codec + exchange,
                                              averaged over ranks (GradientCompressor)
    m        = outer_momentum * m + update    (outer_momentum > 0)
    step     = update + outer_momentum * m    (Nesterov) or m, or update (no momentum)
    anchor  -= outer_lr * step;  param = anchor

``update`` is bitwise the same on every rank (the all-gather scheme sums in rank order),
as are ``anchor`` and ``m``, so every rank ends a sync with bitwise identical parameters.
With ``outer_momentum=0`` the compressor's error feedback is the only memory of the
outer step (the SparseLoCo variant); with ``outer_momentum=0.9, outer_nesterov=True,
outer_lr=0.7`` it is DiLoCo's outer Nesterov SGD on the compressed pseudo-gradient.

Anchors and outer momenta are kept in float32 (float64 for fp64 parameters): with bf16
parameters the anchor is the master copy and parameters are its rounding.

**Inner optimizer state** stays local and is not touched at a sync: Adam's moments, step
counts and learning-rate schedules continue from their local values while the
parameters jump to the synchronised ones (as in DiLoCo). Buffers (e.g. BatchNorm
running statistics) are not synchronised.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.distributed as dist

from distk.comm import check_same_config, rank_and_world
from distk.comm.group import collective_device
from distk.compressor import GradientCompressor, as_sparsity_config
from distk.config import SparsityConfig
from distk.stats import StepStats

__all__ = ["OuterSync", "ParameterMismatchError", "check_same_parameters", "enable"]

STATE_VERSION = 1
"""Version of the :meth:`OuterSync.state_dict` layout."""

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_DIGEST_MULTIPLIER = 0x9E3779B1  # odd: position weights differ modulo 2^64


class ParameterMismatchError(ValueError):
    """Ranks hold different parameters at :func:`enable` (raised on every rank)."""


def _digest(tensor: torch.Tensor) -> torch.Tensor:
    """Exact-bits digest of a tensor as a 0-d int64, on its device: the bit patterns
    weighted by odd position-dependent factors, summed modulo 2^64."""
    flat = tensor.detach().contiguous().reshape(-1)
    bits = flat.view(_INT_OF_SIZE[flat.element_size()]).to(torch.int64)
    weights = torch.arange(flat.numel(), dtype=torch.int64, device=flat.device)
    return (bits * (weights * _DIGEST_MULTIPLIER + 1)).sum()


class OuterSync:
    """What :func:`enable` returns: the outer synchronisation of one model.

    Attributes:
        cfg: the :class:`~distk.SparsityConfig` (``sync_every``, ``outer_*``, and the
            selection/codec options applied to pseudo-gradients).
        compressor: the one :class:`~distk.GradientCompressor` (residuals keyed by
            parameter name).
        inner_steps: optimizer steps taken since :func:`enable` (restored from checkpoints).
        syncs: completed synchronisations.
        stats: the last sync's statistics summed over parameters (empty before the
            first): ``numel``, ``k``, ``density``, ``payload_bytes`` (this rank's packed
            pseudo-gradients), ``bytes_sent``, ``dense_bytes`` (one dense fp32 all-reduce
            of the parameters), ``compression``, ``bits_per_entry``, ``bits_per_param``
            (per sync), ``bits_per_param_per_step`` (divided by ``sync_every``), the
            compressor's ``*_seconds``, ``seconds`` (the whole sync); on the compressor's
            stats steps also ``residual_norm``, ``pseudo_grad_norm`` and ``update_norm``.
        step_stats: the last sync's buffers merged into one :class:`~distk.stats.StepStats`
            (empty before the first sync).
        totals: :class:`~distk.stats.StepStats` of every sync so far (the compressor's;
            checkpointed with it).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 cfg: SparsityConfig, group: Any = None) -> None:
        self.cfg = cfg
        self.group = group
        self.model = model
        self.optimizer = optimizer
        self.compressor = GradientCompressor(cfg, group)
        self.inner_steps = 0
        self.syncs = 0
        self.stats: dict[str, Any] = {}
        self.step_stats = StepStats()
        self._params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not self._params:
            raise ValueError("distk.outer.enable: the model has no parameter that requires grad")
        self._anchors = {name: self._master(p) for name, p in self._params}
        self._momenta: dict[str, torch.Tensor] = {}
        self._handle = optimizer.register_step_post_hook(self._after_step)

    @staticmethod
    def _master(param: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(param.dtype, torch.float32)
        return param.detach().reshape(-1).to(dtype, copy=True)

    # -- the sync ---------------------------------------------------------------------

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        del optimizer, args, kwargs
        self.inner_steps += 1
        if self.inner_steps % self.cfg.sync_every == 0:
            self.sync()

    @torch.no_grad()
    def sync(self) -> None:
        """Exchange the compressed pseudo-gradients and apply the outer step (collective;
        called by the optimizer hook every ``sync_every`` steps)."""
        cfg = self.cfg
        started = time.perf_counter()
        per_param = []
        merged = StepStats()
        pseudo_sq = torch.zeros((), dtype=torch.float64)
        update_sq = torch.zeros((), dtype=torch.float64)
        for name, param in self._params:
            anchor = self._anchors[name]
            if anchor.device != param.device:
                anchor = self._anchors[name] = anchor.to(param.device)
            delta = anchor - param.detach().reshape(-1).to(anchor.dtype)
            # The compressor's schedule (dense steps, warm-up, stats) counts syncs.
            work = self.compressor.launch(delta, name, step=self.syncs)
            update = work.wait()
            per_param.append(dict(self.compressor.stats))
            merged = merged.merge(work.stats)
            step = update
            if cfg.outer_momentum > 0:
                momentum = self._momenta.get(name)
                if momentum is None:
                    momentum = self._momenta[name] = torch.zeros_like(anchor)
                elif momentum.device != anchor.device:
                    momentum = self._momenta[name] = momentum.to(anchor.device)
                momentum.mul_(cfg.outer_momentum).add_(update)
                step = (update.add(momentum, alpha=cfg.outer_momentum) if cfg.outer_nesterov
                        else momentum)
            anchor.add_(step, alpha=-cfg.outer_lr)
            param.copy_(anchor.view_as(param))
            if self.compressor.stats.get("residual_norm") is not None:
                pseudo_sq += delta.double().square().sum().cpu()
                update_sq += update.double().square().sum().cpu()
        self.syncs += 1
        self.step_stats = merged
        self.stats = self._merge(per_param, time.perf_counter() - started, pseudo_sq, update_sq)

    def _merge(self, per_param: list[dict[str, Any]], seconds: float,
               pseudo_sq: torch.Tensor, update_sq: torch.Tensor) -> dict[str, Any]:
        total = {key: sum(s[key] for s in per_param)
                 for key in ("numel", "k", "payload_bytes", "bytes_sent", "dense_bytes",
                             "accumulate_seconds", "selection_seconds", "comm_seconds")}
        bits_per_param = 8 * total["payload_bytes"] / total["numel"]
        stats = {
            "sync": self.syncs,
            "inner_steps": self.inner_steps,
            **total,
            "density": total["k"] / total["numel"],
            "compression": (total["dense_bytes"] / total["bytes_sent"]
                            if total["bytes_sent"] else 1.0),
            "bits_per_entry": 8 * total["payload_bytes"] / max(total["k"], 1),
            "bits_per_param": bits_per_param,
            "bits_per_param_per_step": bits_per_param / self.cfg.sync_every,
            "seconds": seconds,
        }
        if all(s.get("residual_norm") is not None for s in per_param):
            stats["residual_norm"] = math.sqrt(sum(s["residual_norm"] ** 2 for s in per_param))
            stats["pseudo_grad_norm"] = float(pseudo_sq.sqrt())
            stats["update_norm"] = float(update_sq.sqrt())
        return stats

    @property
    def totals(self) -> StepStats:
        """Every exchanged buffer of the run (the compressor's totals)."""
        return self.compressor.totals

    # -- checkpointing ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Anchors, outer momenta, counters and the compressor's residuals (plain
        tensors/ints; ``torch.save`` works). Save it beside the model and the inner
        optimizer: the three together resume training bitwise."""
        return {
            "version": STATE_VERSION,
            "config": self.cfg.to_dict(),
            "inner_steps": self.inner_steps,
            "syncs": self.syncs,
            "anchors": {name: t.detach().clone() for name, t in self._anchors.items()},
            "momenta": {name: t.detach().clone() for name, t in self._momenta.items()},
            "compressor": self.compressor.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (refuses another config or parameter set)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"outer sync state version must be {STATE_VERSION}, got "
                             f"{state.get('version')!r}")
        saved, current = state.get("config"), self.cfg.to_dict()
        if saved != current:
            diff = {k: (saved.get(k), current.get(k)) for k in set(saved) | set(current)
                    if saved.get(k) != current.get(k)}
            raise ValueError("distk.outer checkpoint was written with a different "
                             f"SparsityConfig; differing keys (checkpoint, current): {diff}")
        names = [name for name, _ in self._params]
        if sorted(state["anchors"]) != sorted(names):
            raise ValueError(f"distk.outer checkpoint holds parameters {sorted(state['anchors'])},"
                             f" the model has {sorted(names)}")
        devices = {name: p.device for name, p in self._params}
        for name, _ in self._params:
            expected = self._anchors[name]
            anchor = state["anchors"][name]
            if anchor.shape != expected.shape:
                raise ValueError(f"distk.outer checkpoint: parameter {name!r} has "
                                 f"{anchor.numel()} entries, the model {expected.numel()}")
        self._anchors = {name: t.detach().to(devices[name], copy=True)
                         for name, t in state["anchors"].items()}
        self._momenta = {name: t.detach().to(devices[name], copy=True)
                         for name, t in state["momenta"].items()}
        self.inner_steps = int(state["inner_steps"])
        self.syncs = int(state["syncs"])
        self.compressor.load_state_dict(state["compressor"])

    def remove(self) -> None:
        """Detach from the optimizer (no more syncs)."""
        self._handle.remove()

    def __repr__(self) -> str:
        return (f"OuterSync(sync_every={self.cfg.sync_every}, density={self.cfg.density}, "
                f"value_bits={self.cfg.value_bits}, syncs={self.syncs})")


def check_same_parameters(params: list[tuple[str, torch.Tensor]], group: Any = None) -> None:
    """Raise :class:`ParameterMismatchError` on every rank unless every rank holds the
    same parameter bits (one all-gather of a digest per parameter)."""
    rank, world = rank_and_world(group)
    if world == 1:
        return
    digests = torch.stack([_digest(p) for _, p in params]).cpu()
    device = collective_device(group)
    gathered = torch.empty(world * digests.numel(), dtype=torch.int64, device=device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(gathered, digests.to(device), group=group)
    table = gathered.view(world, -1).cpu()
    differing = (table != table[0]).any(dim=0).nonzero().view(-1).tolist()
    if differing:
        names = [params[i][0] for i in differing]
        shown = ", ".join(repr(n) for n in names[:5]) + (" ..." if len(names) > 5 else "")
        raise ParameterMismatchError(
            f"distk.outer.enable: ranks hold different values of {len(names)} parameter(s) "
            f"({shown}); outer synchronisation averages pseudo-gradients, so every rank "
            "must start from the same parameters. Seed the model identically on every rank "
            "or pass broadcast=True (copies rank 0's parameters).")


def enable(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Any = None,
           group: Any = None, broadcast: bool = False) -> OuterSync:
    """Synchronise ``model`` every ``cfg.sync_every`` steps of ``optimizer``; collective.

    Args:
        model: a plain module (not wrapped in DDP/FSDP), the same on every rank.
        optimizer: the inner optimizer of ``model``'s parameters; the sync runs in its
            step post-hook, so the training loop does not change.
        cfg: a :class:`~distk.SparsityConfig` or a dict of its keys (``None``: defaults).
        group: process group (``None`` = default; no initialised group = one process).
        broadcast: copy rank 0's parameters to every rank first; otherwise the
            parameters are checked to be identical.

    Returns:
        The :class:`OuterSync` (checkpoint it with ``state_dict``).

    Raises:
        ParameterMismatchError: on every rank, when ranks start from different parameters.
        TypeError: for a DDP/FSDP-wrapped model or a bad ``cfg``.
    """
    cfg = as_sparsity_config(cfg)
    wrapper = type(model).__name__
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) or "FullyShard" in wrapper:
        raise TypeError(f"distk.outer.enable takes the plain model, got a {wrapper}: the "
                        "wrapper would all-reduce gradients at every backward pass. Build the "
                        "model without DDP/FSDP (every rank holds a full replica).")
    _, world = rank_and_world(group)
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if world > 1:
        check_same_config(cfg, group)
        if broadcast:
            source = dist.get_global_rank(group, 0) if group is not None else 0
            with torch.no_grad():
                for _, param in params:
                    dist.broadcast(param.data, src=source, group=group)
        else:
            check_same_parameters(params, group)
    return OuterSync(model, optimizer, cfg, group)
