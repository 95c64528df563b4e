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
    delta   *= min(1, median / norm)          outer_clip="median" (norm of every delta)
    update   = compressor.step(delta, name)   error_decay * residual + delta, selection,
                                              codec, exchange, averaged over ranks or
                                              each position's senders (GradientCompressor)
    m        = outer_momentum * m + update    (outer_momentum > 0)
    step     = update + outer_momentum * m    (Nesterov) or m, or update (no momentum)
    anchor  -= outer_lr * step;  param = anchor

``update`` is bitwise the same on every rank (the all-gather scheme sums in rank order),
as are ``anchor`` and ``m``, so every rank ends a sync with bitwise identical parameters.
With ``outer_momentum=0`` the compressor's error feedback is the only memory of the
outer step (the SparseLoCo variant); with ``outer_momentum=0.9, outer_nesterov=True,
outer_lr=0.7`` it is DiLoCo's outer Nesterov SGD on the compressed pseudo-gradient.
``SparsityConfig.sparseloco()`` is SparseLoCo's published recipe (docs/outer.md).

Anchors and outer momenta are kept in float32 (float64 for fp64 parameters): with bf16
parameters the anchor is the master copy and parameters are its rounding.

**Inner optimizer state** stays local and is not touched at a sync: Adam's moments, step
counts and learning-rate schedules continue from their local values while the
parameters jump to the synchronised ones (as in DiLoCo). Buffers (e.g. BatchNorm
running statistics) are not synchronised.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from distk.comm import check_same_config, rank_and_world
from distk.comm.coalesce import coalesced
from distk.comm.group import all_gather_flat, collective_device, tensor_digest
from distk.compressor import GradientCompressor, as_sparsity_config
from distk.config import TILE_SIDE, SparsityConfig, optimizer_chain
from distk.integrations.owner import StepOwner
from distk.stats import StepStats

__all__ = ["OuterSync", "ParameterMismatchError", "check_same_parameters", "enable",
           "sparseloco"]

STATE_VERSION = 2
"""Version of the :meth:`OuterSync.state_dict` layout."""


def sparseloco(**overrides: Any) -> SparsityConfig:
    """SparseLoCo's published recipe (:meth:`SparsityConfig.sparseloco
    <distk.config.SparsityConfig.sparseloco>`): ``distk.outer.enable(model, optimizer,
    distk.outer.sparseloco())``; ``overrides`` replace any of its options."""
    return SparsityConfig.sparseloco(**overrides)


class ParameterMismatchError(ValueError):
    """Ranks hold different parameters at :func:`enable` (raised on every rank)."""


class OuterSync(StepOwner):
    """What :func:`enable` returns: the outer synchronisation of one model.

    A :class:`~distk.integrations.owner.StepOwner`: its one counter,
    :attr:`iteration`, counts the inner optimizer steps since :func:`enable`; a sync runs
    after every ``sync_every``-th, and the compressor's schedule (dense steps, warm-up,
    stats) follows the number of syncs.

    Attributes:
        cfg: the :class:`~distk.SparsityConfig` (``sync_every``, ``outer_*``, and the
            selection/codec options applied to pseudo-gradients).
        compressor: the one :class:`~distk.GradientCompressor` (residuals keyed by
            parameter name).
        iteration: inner optimizer steps taken (restored from checkpoints).
        stats: the last sync's :class:`~distk.stats.StepStats` (every parameter merged;
            on the compressor's stats steps also ``input_norm``, the pseudo-gradient's,
            and ``update_norm``); empty before the first sync.
        sync_seconds: wall time of the last sync.
        clip_scale: ``outer_clip="median"``: the factor this rank's pseudo-gradient was
            scaled by at the last sync (1.0: at or below the median norm).
    """

    __slots__ = ("model", "optimizer", "compressor", "sync_seconds", "clip_scale", "_params",
                 "_anchors", "_momenta", "_handle")

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 cfg: SparsityConfig, group: Any = None,
                 entry: str = "distk.outer.enable") -> None:
        super().__init__(as_sparsity_config(cfg), group, entry=entry)
        if self.cfg.density == "auto":
            self.cfg = self.cfg.for_world(self.world_size)
            if self.rank == 0:
                print(f"[distk] {entry}: density='auto', so each rank sends "
                      f"{self.cfg.density:g} of every tensor at a sync "
                      f"({round(self.cfg.density * TILE_SIDE ** 2)} of each {TILE_SIDE} x "
                      f"{TILE_SIDE} tile; distk.config.outer_density({self.world_size}): "
                      "1/world_size^2 within 1/64..1/4, the share that matched dense AdamW "
                      "at 2, 4 and 8 ranks; docs/outer.md). Set density to fix it.",
                      file=sys.stderr, flush=True)
        self.model = model
        self.optimizer = optimizer
        self.compressor = GradientCompressor(self.cfg, group)
        self.sync_seconds = 0.0
        self.clip_scale = 1.0
        self._params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not self._params:
            raise ValueError(f"{entry}: the model has no parameter that requires grad")
        self._anchors = {name: self._master(p) for name, p in self._params}
        self._momenta: dict[str, torch.Tensor] = {}
        self._handle = optimizer.register_step_post_hook(self._after_step)

    @property
    def syncs(self) -> int:
        """Completed synchronisations."""
        return self.iteration // self.cfg.sync_every

    @property
    def inner_steps(self) -> int:
        """Inner optimizer steps taken (:attr:`iteration`)."""
        return self.iteration

    @property
    def totals(self) -> StepStats:
        """Every exchanged buffer of the run (the compressor's totals)."""
        return self.compressor.totals

    def metrics(self, prefix: str = "distk/") -> dict[str, float]:
        """The common metrics plus ``syncs``, ``sync_seconds`` and
        ``bits_per_param_per_step`` (the last sync's bits per parameter over
        ``sync_every``); with ``outer_clip``, ``clip_scale``."""
        metrics = super().metrics(prefix)
        metrics[prefix + "syncs"] = float(self.syncs)
        if self.cfg.outer_clip != "none":
            metrics[prefix + "clip_scale"] = self.clip_scale
        if self.stats.buffers:
            metrics[prefix + "sync_seconds"] = self.sync_seconds
            metrics[prefix + "bits_per_param_per_step"] = (self.stats.bits_per_param
                                                           / self.cfg.sync_every)
        return metrics

    def _median_clip(self, deltas: list[torch.Tensor]) -> float:
        """``outer_clip="median"``: scale this rank's pseudo-gradient (every parameter's
        together) down to the lower median of the ranks' L2 norms, in place; one
        all-gather of one float64 per rank. Returns the scale applied (1.0: unchanged)."""
        world, group = self.world_size, self.process_group
        if world == 1:
            return 1.0
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(d, dtype=torch.float64) for d in deltas]))
        device = collective_device(group)
        norms = torch.empty(world, dtype=torch.float64, device=device)
        all_gather_flat(norms, norm.reshape(1).to(device), group,
                        what="the median clip's all-gather of norms")
        median = float(norms.cpu().median())  # the lower median: the same on every rank
        own = float(norm)
        if own <= median or own == 0.0:
            return 1.0
        scale = median / own
        for delta in deltas:
            delta.mul_(scale)
        return scale

    @staticmethod
    def _master(param: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(param.dtype, torch.float32)
        return param.detach().reshape(-1).to(dtype, copy=True)

    # -- the sync ---------------------------------------------------------------------

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        del optimizer, args, kwargs
        self.iteration += 1
        if self.iteration % self.cfg.sync_every == 0:
            self.sync()

    @torch.no_grad()
    def sync(self) -> None:
        """Exchange the compressed pseudo-gradients and apply the outer step (collective;
        called by the optimizer hook every ``sync_every`` steps)."""
        self._late_bind(check=True)
        cfg = self.cfg
        started = time.perf_counter()
        merged = StepStats()
        step = max(self.syncs - 1, 0)  # the compressor's schedule counts syncs
        deltas = []
        for name, param in self._params:
            anchor = self._anchors[name]
            if anchor.device != param.device:
                anchor = self._anchors[name] = anchor.to(param.device)
            deltas.append(anchor - param.detach().reshape(-1).to(anchor.dtype))
        if cfg.outer_clip == "median":
            self.clip_scale = self._median_clip(deltas)
        # Every exchange is selected and encoded (in the parameter's shape:
        # bucket_layout="tile" follows its 2-D layout) before the first is waited on, in
        # the same order on every rank, and they go out together (coalesced): one
        # all-gather (dense syncs: one all-reduce) instead of one per parameter, each of
        # which costs a round of messages and a few KB on the wire.
        with coalesced(self.compressor.group):
            works = [self.compressor.launch(delta.view(param.shape), name, step=step)
                     for (name, param), delta in zip(self._params, deltas, strict=True)]
        for (name, param), work in zip(self._params, works, strict=True):
            anchor = self._anchors[name]
            update = work.wait().reshape(-1)
            merged = merged.merge(work.stats)
            outer_step = update
            if cfg.outer_momentum > 0:
                momentum = self._momenta.get(name)
                if momentum is None:
                    momentum = self._momenta[name] = torch.zeros_like(anchor)
                elif momentum.device != anchor.device:
                    momentum = self._momenta[name] = momentum.to(anchor.device)
                momentum.mul_(cfg.outer_momentum).add_(update)
                outer_step = (update.add(momentum, alpha=cfg.outer_momentum)
                              if cfg.outer_nesterov else momentum)
            anchor.add_(outer_step, alpha=-cfg.outer_lr)
            param.copy_(anchor.view_as(param))
        merged.step = step
        merged.target_density = cfg.density
        self.stats = merged
        self.sync_seconds = time.perf_counter() - started

    # -- checkpointing ----------------------------------------------------------------

    def _payload(self) -> dict[str, Any]:
        """Anchors, outer momenta and the compressor's residuals (plain tensors/ints).
        Save it beside the model and the inner optimizer: the three together resume
        training bitwise."""
        return {
            "version": STATE_VERSION,
            "anchors": {name: t.detach().clone() for name, t in self._anchors.items()},
            "momenta": {name: t.detach().clone() for name, t in self._momenta.items()},
            "compressor": self.compressor.state_dict(),
        }

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The common origin check (config, rank, world size), then the layout: the
        version and the parameter set."""
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"distk.outer checkpoint version must be {STATE_VERSION}, got "
                             f"{state_dict.get('version')!r} (version 1 did not record the "
                             "rank that wrote it, so its residuals cannot be checked)")
        super().check_state_dict(state_dict)
        names = [name for name, _ in self._params]
        if sorted(state_dict["anchors"]) != sorted(names):
            raise ValueError(f"distk.outer checkpoint holds parameters "
                             f"{sorted(state_dict['anchors'])}, the model has {sorted(names)}")
        for name, _ in self._params:
            expected, anchor = self._anchors[name], state_dict["anchors"][name]
            if anchor.shape != expected.shape:
                raise ValueError(f"distk.outer checkpoint: parameter {name!r} has "
                                 f"{anchor.numel()} entries, the model {expected.numel()}")

    def _restore(self, state_dict: dict[str, Any]) -> None:
        devices = {name: p.device for name, p in self._params}
        self._anchors = {name: t.detach().to(devices[name], copy=True)
                         for name, t in state_dict["anchors"].items()}
        self._momenta = {name: t.detach().to(devices[name], copy=True)
                         for name, t in state_dict["momenta"].items()}
        self.compressor.load_state_dict(state_dict["compressor"])

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
    digests = torch.stack([tensor_digest(p) for _, p in params]).cpu()
    device = collective_device(group)
    gathered = torch.empty(world * digests.numel(), dtype=torch.int64, device=device)
    all_gather_flat(gathered, digests.to(device), group, what="the replicas' digest check")
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
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError("distk.outer.enable takes the plain model, got a "
                        "DistributedDataParallel: its hook would all-reduce gradients at every "
                        "backward pass. For a DDP model use distk.ddp.enable(ddp_model, cfg, "
                        "optimizer=optimizer), which switches that all-reduce off.")
    if "FullyShard" in wrapper:
        raise TypeError(f"distk.outer.enable takes the plain model, got a {wrapper}: FSDP "
                        "shards the parameters, so no rank holds a replica to step locally. "
                        "Build the model without FSDP (every rank holds a full replica).")
    return attach(model, optimizer, cfg, group, broadcast, "distk.outer.enable")


def inner_optimizer(optimizer: Any, entry: str) -> torch.optim.Optimizer:
    """The innermost ``torch.optim.Optimizer`` of ``optimizer`` (itself, or what a
    wrapper holds); TypeError naming ``entry`` otherwise. Local, so every rank raises
    alike before any collective."""
    inner = optimizer_chain(optimizer)[-1] if optimizer is not None else None
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"{entry}: optimizer must be a torch.optim.Optimizer (or a wrapper "
                        f"of one), the optimizer whose steps outer synchronisation counts; "
                        f"got {type(optimizer).__name__}")
    return inner


def attach(model: torch.nn.Module, optimizer: Any, cfg: SparsityConfig, group: Any,
           broadcast: bool, entry: str) -> OuterSync:
    """:func:`enable` past its wrapper check, for the entry points that hand over a
    replica whose gradients are not averaged (``distk.ddp.enable`` after switching DDP's
    all-reduce off); collective. The sync hooks the innermost optimizer of ``optimizer``
    (Accelerate's and Lightning's wrappers hand their steps down to it), so steps a
    wrapper skips (gradient accumulation, an AMP overflow) are not counted."""
    inner = inner_optimizer(optimizer, entry)
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
    return OuterSync(model, inner, cfg, group, entry=entry)
