"""Local Adam: exchange Adam's update instead of the raw gradient (``local_optimizer="adam"``).

Why: error feedback delivers a rarely selected coordinate its accumulated gradient in one
burst. SGD moves a parameter in proportion to what it receives, so nothing is lost; Adam
divides each coordinate by its own running RMS, and a burst inflates that RMS, so a
coordinate sent once per ~1/density steps moves a few ``lr`` per selection instead of
~1/density ``lr`` (measured: +11.9% validation loss on the main job at density 1%, see
docs/train.md, "Sparse training with AdamW").

What this does instead (the scheme of "quantized Adam with error feedback", Chen et al.
2021: each worker runs Adam's moments on its own gradient and sends a compressed update
with error feedback): per compressor key, on every rank,

    m = beta1 * m + (1 - beta1) * g            (g: this rank's local gradient)
    v = beta2 * v + (1 - beta2) * g * g
    u = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)

and ``u`` (not ``g``) enters error feedback, selection and the exchange. The residual then
holds Adam steps, so a coordinate that is sent late still moves as far as under dense
Adam, and top-k picks coordinates by the size of their Adam step rather than their raw
gradient. ``m`` and ``v`` stay local (they differ across ranks); parameters stay
identical because every rank applies the same exchanged update.

The optimizer after the exchange must apply the update as it comes: momentum-free SGD
with AdamW's learning rate and weight decay (``torch.optim.SGD(params, lr=adam_lr,
momentum=0, weight_decay=adamw_weight_decay)`` is AdamW's decoupled decay exactly:
``p -= lr * (u + wd * p)``). Clip the local gradient with ``SparsityConfig.clip_norm`` if
wanted; a global-norm clip after the exchange would clip the update, not the gradient.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any

import torch

__all__ = ["AdamMomentExchange", "AdamPreconditioned", "AdamTrackedVariance", "LocalAdam",
           "check_update_optimizer", "stateless_first_update_"]


def stateless_first_update_(grad: torch.Tensor, eps: float) -> torch.Tensor:
    """In place: Adam's bias-corrected first step ``g / (|g| + eps)`` (its moments start at
    zero, so step 1 needs no state). Used where an integration exchanges densely before
    the compressor's key-indexed state exists (the DDP hook's bucket-rebuild iteration),
    so that the optimizer receives an update there too, not a raw gradient."""
    return grad.div_(grad.abs().add_(eps))


def check_update_optimizer(optimizer: Any) -> None:
    """Refuse an optimizer that would transform the exchanged Adam update again.

    Under ``local_optimizer="adam"`` the exchanged tensor is already Adam's step; an
    Adam-family optimizer (param groups with ``betas``) would normalise it a second time
    and an SGD momentum would add a second momentum. ``None`` is accepted (unknown).

    Raises:
        ValueError: naming the optimizer and what to use instead.
    """
    if optimizer is None:
        return
    for group in getattr(optimizer, "param_groups", []):
        if "betas" in group or float(group.get("momentum", 0.0) or 0.0) > 0:
            raise ValueError(
                f"SparsityConfig.local_optimizer='adam' exchanges Adam updates, but the "
                f"optimizer {type(optimizer).__name__} would apply "
                f"{'Adam' if 'betas' in group else 'momentum'} to them again; use "
                "torch.optim.SGD(params, lr=<AdamW lr>, momentum=0, weight_decay=<AdamW "
                "weight decay>), or set local_optimizer='none'")


class LocalAdam:
    """Per-key Adam moments of the local gradient; :meth:`update` turns a gradient into an
    Adam update. Owned by :class:`~distk.compressor.GradientCompressor` when
    ``cfg.local_optimizer == "adam"``.

    Args:
        beta1, beta2, eps: Adam's hyper-parameters (``SparsityConfig.adam_beta1`` ...).
    """

    def __init__(self, beta1: float, beta2: float, eps: float) -> None:
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
        self._exp_avg: dict[Hashable, torch.Tensor] = {}
        self._exp_avg_sq: dict[Hashable, torch.Tensor] = {}
        self._steps: dict[Hashable, int] = {}

    def update(self, grad: torch.Tensor, key: Hashable, dtype: torch.dtype,
               commit: bool = True) -> tuple[torch.Tensor, Any]:
        """Adam update of ``grad`` (flat) for ``key``, in ``dtype`` (float32 or float64).

        With ``commit`` the moments advance in place. Without it they are left untouched
        and the second return value is a token for :meth:`commit` (used when the step
        may still be dropped on every rank: ``nonfinite="skip"``); otherwise it is None.
        """
        numel = grad.numel()
        g = grad.to(dtype)
        m = self._exp_avg.get(key)
        v = self._exp_avg_sq.get(key)
        if m is None:
            m = torch.zeros(numel, dtype=dtype, device=g.device)
            v = torch.zeros(numel, dtype=dtype, device=g.device)
        elif m.numel() != numel:
            raise ValueError(
                f"key {key!r} had {m.numel()} entries in an earlier step and has {numel} now; "
                f"keys must name tensors of fixed size (call reset({key!r}) after a layout "
                f"change)")
        else:
            m = m.to(device=g.device, dtype=dtype)
            v = v.to(device=g.device, dtype=dtype)
        if not commit:
            m, v = m.clone(), v.clone()
        t = self._steps.get(key, 0) + 1
        m.mul_(self.beta1).add_(g, alpha=1.0 - self.beta1)
        v.mul_(self.beta2).addcmul_(g, g, value=1.0 - self.beta2)
        denom = (v / (1.0 - self.beta2 ** t)).sqrt_().add_(self.eps)
        update = (m / (1.0 - self.beta1 ** t)).div_(denom)
        token = (key, m, v, t)
        if commit:
            self.commit(token)
            token = None
        return update, token

    def moments(self, key: Hashable, numel: int, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The current ``(m, v)`` of ``key`` (zeros before its first update); not copies."""
        m = self._exp_avg.get(key)
        if m is None or m.numel() != numel:
            zeros = torch.zeros(numel, dtype=dtype, device=device)
            return zeros, zeros
        return (m.to(device=device, dtype=dtype),
                self._exp_avg_sq[key].to(device=device, dtype=dtype))

    def commit(self, token: Any) -> None:
        """Store the moments an uncommitted :meth:`update` computed."""
        key, m, v, t = token
        self._exp_avg[key] = m
        self._exp_avg_sq[key] = v
        self._steps[key] = t

    def reset(self, key: Hashable | None = None) -> None:
        """Forget the moments of ``key`` (``None``: of every key)."""
        keys = list(self._steps) if key is None else [key]
        for name in keys:
            for table in (self._exp_avg, self._exp_avg_sq, self._steps):
                table.pop(name, None)

    def state_dict(self) -> dict[str, Any]:
        """Moments and step counts per key (plain tensors/ints)."""
        return {"exp_avg": {k: v.detach().clone() for k, v in self._exp_avg.items()},
                "exp_avg_sq": {k: v.detach().clone() for k, v in self._exp_avg_sq.items()},
                "steps": dict(self._steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self._exp_avg = {k: v.detach().clone() for k, v in state.get("exp_avg", {}).items()}
        self._exp_avg_sq = {k: v.detach().clone()
                            for k, v in state.get("exp_avg_sq", {}).items()}
        self._steps = {k: int(v) for k, v in state.get("steps", {}).items()}


class AdamMomentExchange:
    """``local_optimizer="adam_moments"``: ranks share Adam's moments, not gradient bursts.

    Each rank keeps Adam's moments ``m``, ``v`` of its own gradient. Their averages over
    ranks are what dense Adam of the averaged gradient would use for ``m`` (exactly: it is
    linear) and, up to the ranks' gradient noise, for ``v``. Every rank also keeps shared
    estimates ``M``, ``V`` of those averages (identical on every rank) and each step sends
    a top-k correction of each (EF21, Richtarik et al. 2021, with momentum as in
    EF21-SGDM): the increments ``m_t - m_(t-1)`` and ``v_t - v_(t-1)`` go through the
    ordinary compressor (error feedback, selection, exchange; keys ``(key, "m")`` and
    ``(key, "v")``), and the averaged sparse increments are added to ``M`` and ``V``. With
    error feedback on increments, ``m - residual`` is exactly what this rank has sent in
    total, so ``M`` tracks the average ``m`` with the residual as its only error. The
    update is Adam's, from the shared estimates, dense::

        u = m_hat / (sqrt(max(V / (1 - beta2^t), m_hat^2)) + eps),  m_hat = M / (1 - beta1^t)

    with ``V / (1 - beta2^t)`` floored at ``(M / (1 - beta1^t))^2`` (a second moment is at least
    the squared mean), so an entry whose ``v`` increments were not sent yet, or a tracking
    error in ``V``, moves a parameter by at most ``lr``. Every coordinate moves at every
    step, by a smoothly tracked momentum, so no burst ever reaches the normaliser; the cost
    is two sparse exchanges per tensor (``m`` and ``v``).

    The optimizer applies ``u`` as it comes (momentum-free SGD with AdamW's lr and weight
    decay; see the module docstring).
    """

    def __init__(self, cfg: Any, group: Any = None) -> None:
        from distk.compressor import GradientCompressor

        self.cfg = cfg
        self.inner = GradientCompressor(cfg.replace(local_optimizer="none", clip_norm=None),
                                        group=group)
        self.adam = LocalAdam(cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps)
        self._shared_m: dict[Hashable, torch.Tensor] = {}
        self._shared_v: dict[Hashable, torch.Tensor] = {}
        self.stats: dict[str, Any] = {}

    @property
    def totals(self) -> dict[str, Any]:
        return self.inner.totals

    def step(self, grad: torch.Tensor, key: Hashable,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Advance the local moments, exchange their sparse increments, return Adam's update
        from the shared estimates (shape and dtype of ``grad``; written into ``out`` if
        given). Collective, like :meth:`GradientCompressor.step`."""
        cfg = self.cfg
        flat = grad.detach().reshape(-1)
        dtype = torch.promote_types(grad.dtype, torch.float32)
        g = flat.to(dtype)
        if cfg.nonfinite == "zero":
            g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        if cfg.clip_norm is not None:
            norm = torch.linalg.vector_norm(g)
            if bool(torch.isfinite(norm)):
                g = g * torch.clamp(cfg.clip_norm / (norm + 1e-12), max=1.0)
        old_m, old_v = self.adam.moments(key, g.numel(), dtype, g.device)
        _, token = self.adam.update(g, key, dtype, commit=False)
        _, new_m, new_v, t = token
        sent_m = self.inner.step(new_m - old_m, (key, "m"))
        stats_m = dict(self.inner.stats)
        sent_v = self.inner.step(new_v - old_v, (key, "v"))
        stats_v = dict(self.inner.stats)
        self.stats = self._merge(stats_m, stats_v, flat.numel())
        if stats_m.get("skipped") or stats_v.get("skipped"):
            update = torch.zeros_like(flat)  # the step is dropped on every rank
        else:
            self.adam.commit(token)
            shared_m = self._shared(self._shared_m, key, sent_m)
            shared_v = self._shared(self._shared_v, key, sent_v)
            m_hat = shared_m / (1 - cfg.adam_beta1 ** t)
            # v_hat >= m_hat^2 (a second moment is at least the squared mean): an entry
            # whose v increments have not been sent yet moves by at most lr, not lr / eps.
            v_hat = torch.maximum(shared_v / (1 - cfg.adam_beta2 ** t), m_hat * m_hat)
            update = m_hat.div_(v_hat.sqrt_().add_(cfg.adam_eps)).to(grad.dtype)
        update = update.view(grad.shape)
        return update if out is None else out.copy_(update)

    @staticmethod
    def _shared(table: dict, key: Hashable, increment: torch.Tensor) -> torch.Tensor:
        current = table.get(key)
        if current is None or current.numel() != increment.numel():
            table[key] = current = torch.zeros_like(increment)
        return current.add_(increment)

    @staticmethod
    def _merge(stats_m: dict[str, Any], stats_v: dict[str, Any], numel: int) -> dict[str, Any]:
        """One stats dict for the two exchanges, against a dense exchange of the gradient."""
        merged = dict(stats_m)
        for name in ("k", "bytes_sent", "payload_bytes", "accumulate_seconds",
                     "selection_seconds", "comm_seconds"):
            merged[name] = (stats_m.get(name) or 0) + (stats_v.get(name) or 0)
        merged["numel"] = numel
        merged["density"] = merged["k"] / max(numel, 1)
        merged["skipped"] = bool(stats_m.get("skipped") or stats_v.get("skipped"))
        merged["compression"] = (merged["dense_bytes"] / merged["bytes_sent"]
                                 if merged["bytes_sent"] else 1.0)
        merged["key"] = stats_m["key"][0] if isinstance(stats_m.get("key"), tuple) else \
            stats_m.get("key")
        if "residual_norm" in stats_m and "residual_norm" in stats_v:
            merged["residual_norm"] = math.hypot(stats_m["residual_norm"],
                                                 stats_v["residual_norm"])
        if stats_v.get("recall") is not None and stats_m.get("recall") is not None:
            merged["recall"] = 0.5 * (stats_m["recall"] + stats_v["recall"])
        return merged

    def reset(self, key: Hashable | None = None) -> None:
        self.adam.reset(key)
        if key is None:
            self.inner.reset()
            self._shared_m.clear()
            self._shared_v.clear()
        else:
            self.inner.reset((key, "m"))
            self.inner.reset((key, "v"))
            self._shared_m.pop(key, None)
            self._shared_v.pop(key, None)

    def state_dict(self) -> dict[str, Any]:
        return {"moments": self.adam.state_dict(), "inner": self.inner.state_dict(),
                "shared_m": {k: v.clone() for k, v in self._shared_m.items()},
                "shared_v": {k: v.clone() for k, v in self._shared_v.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adam.load_state_dict(state["moments"])
        self.inner.load_state_dict(state["inner"])
        self._shared_m = {k: v.clone() for k, v in state["shared_m"].items()}
        self._shared_v = {k: v.clone() for k, v in state["shared_v"].items()}


class AdamTrackedVariance(AdamMomentExchange):
    """``local_optimizer="adam"``: the gradient is exchanged as usual (error feedback,
    top-k), Adam's first moment is built from the exchanged gradient (identical on every
    rank), and Adam's second moment comes from the ranks' *local* gradients, never from
    the exchanged bursts.

    Per key, on every rank::

        D = exchange of the gradient (the ordinary compressor: residual, top-k, average)
        M = beta1 * M + (1 - beta1) * D                        (shared: D is)
        v = beta2 * v + (1 - beta2) * g * g                    (local, dense, burst-free)
        L += exchange of the increment of log(v / (1 - beta2^t))   (EF21: L tracks the
                                                                 ranks' mean log-variance)
        m_hat = M / (1 - beta1^t),   v_hat = max(exp(L), m_hat^2)
        u = m_hat / (sqrt(v_hat) + eps)

    Error feedback keeps the integral of the gradient (a coordinate sent once per ``tau``
    steps receives ``tau`` steps of gradient), and the normaliser is the variance of the
    per-step gradient, so that burst moves the parameter ``tau`` Adam steps, as dense Adam
    would; AdamW on the exchanged gradient instead divides the burst by its own size.
    The log-variance is tracked in relative units, so every coordinate's normaliser is
    corrected alike whatever its scale. The log-variance's first step per tensor is
    exchanged dense (its exact starting point); later ones sparse, like the gradient.
    """

    _FLOOR = 1e-30  # inside the log: v = 0 (an unused embedding row) stays finite

    def __init__(self, cfg: Any, group: Any = None) -> None:
        from distk.compressor import GradientCompressor

        super().__init__(cfg, group)
        self._log_v: dict[Hashable, torch.Tensor] = {}
        # The log-variance channel's first step is dense: every entry starts from its
        # exact mean log-variance (then only corrections travel).
        self.inner_v = GradientCompressor(
            self.inner.cfg.replace(dense_steps=max(1, self.inner.cfg.dense_steps)),
            group=group)

    @property
    def totals(self) -> dict[str, Any]:
        a, b = self.inner.totals, self.inner_v.totals
        return {name: a[name] + b[name] for name in a}

    def step(self, grad: torch.Tensor, key: Hashable,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Exchange the gradient and the log-variance increments; return Adam's update."""
        cfg = self.cfg
        flat = grad.detach().reshape(-1)
        dtype = torch.promote_types(grad.dtype, torch.float32)
        g = flat.to(dtype)
        if cfg.nonfinite == "zero":
            g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        if cfg.clip_norm is not None:
            norm = torch.linalg.vector_norm(g)
            if bool(torch.isfinite(norm)):
                g = g * torch.clamp(cfg.clip_norm / (norm + 1e-12), max=1.0)
        _, old_v = self.adam.moments(key, g.numel(), dtype, g.device)
        _, token = self.adam.update(g, key, dtype, commit=False)
        _, _, new_v, t = token
        log_v = (new_v / (1 - cfg.adam_beta2 ** t)).clamp_(min=self._FLOOR).log_()
        old_log_v = self._log_v.get(key)
        if old_log_v is None or old_log_v.numel() != log_v.numel():
            old_log_v = torch.zeros_like(log_v)
        delivered = self.inner.step(g, (key, "g"))
        stats_g = dict(self.inner.stats)
        increment = self.inner_v.step(log_v - old_log_v.to(log_v), (key, "logv"))
        stats_v = dict(self.inner_v.stats)
        self.stats = self._merge(stats_g, stats_v, flat.numel())
        if stats_g.get("skipped") or stats_v.get("skipped"):
            update = torch.zeros_like(flat)  # the step is dropped on every rank
        else:
            self.adam.commit(token)
            self._log_v[key] = log_v
            shared_m = self._shared_m.get(key)
            if shared_m is None or shared_m.numel() != delivered.numel():
                shared_m = self._shared_m[key] = torch.zeros_like(delivered)
            shared_m.mul_(cfg.adam_beta1).add_(delivered, alpha=1 - cfg.adam_beta1)
            shared_log_v = self._shared(self._shared_v, key, increment)
            m_hat = shared_m / (1 - cfg.adam_beta1 ** t)
            v_hat = torch.maximum(shared_log_v.exp(), m_hat * m_hat)
            update = m_hat.div_(v_hat.sqrt_().add_(cfg.adam_eps)).to(grad.dtype)
        update = update.view(grad.shape)
        return update if out is None else out.copy_(update)

    def reset(self, key: Hashable | None = None) -> None:
        super().reset(key)
        if key is None:
            self._log_v.clear()
        else:
            self._log_v.pop(key, None)
        if key is None:
            self.inner_v.reset()
        else:
            self.inner.reset((key, "g"))
            self.inner_v.reset((key, "logv"))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["log_v"] = {k: v.clone() for k, v in self._log_v.items()}
        state["inner_v"] = self.inner_v.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._log_v = {k: v.clone() for k, v in state["log_v"].items()}
        self.inner_v.load_state_dict(state["inner_v"])


class AdamPreconditioned(AdamMomentExchange):
    """``local_optimizer="adam_precond"``: each rank divides its gradient by its own Adam
    RMS before error feedback; momentum is applied to the exchanged result.

    Per key, on every rank::

        v = beta2 * v + (1 - beta2) * g * g                 (local: no burst enters it)
        x = g / (sqrt(v / (1 - beta2^t)) + eps)             (an Adam-sized step per entry)
        D = exchange of x (the ordinary compressor: residual, top-k, average)
        M = beta1 * M + (1 - beta1) * D                     (shared: D is)
        u = M / (1 - beta1^t)

    The residual then holds each entry's pending parameter displacement in Adam units, so
    top-k picks the entries whose parameters are furthest behind, whatever their gradient
    scale, and a late entry still moves as far as under dense training (error feedback
    keeps the integral; the momentum after the exchange spreads it over ~1/(1 - beta1)
    steps). Dense, this is RMSprop with Adam-scaled momentum and bias corrections. One
    exchange per tensor, as for the gradient.
    """

    def step(self, grad: torch.Tensor, key: Hashable,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Precondition locally, exchange, apply momentum; return the update."""
        cfg = self.cfg
        flat = grad.detach().reshape(-1)
        dtype = torch.promote_types(grad.dtype, torch.float32)
        g = flat.to(dtype)
        if cfg.nonfinite == "zero":
            g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        if cfg.clip_norm is not None:
            norm = torch.linalg.vector_norm(g)
            if bool(torch.isfinite(norm)):
                g = g * torch.clamp(cfg.clip_norm / (norm + 1e-12), max=1.0)
        _, token = self.adam.update(g, key, dtype, commit=False)
        _, _, new_v, t = token
        scaled = g / (new_v / (1 - cfg.adam_beta2 ** t)).sqrt_().add_(cfg.adam_eps)
        delivered = self.inner.step(scaled, (key, "g"))
        self.stats = dict(self.inner.stats)
        self.stats["key"] = key if isinstance(key, (str, int, float)) else repr(key)
        if self.stats.get("skipped"):
            update = torch.zeros_like(flat)  # the step is dropped on every rank
        else:
            self.adam.commit(token)
            shared_m = self._shared_m.get(key)
            if shared_m is None or shared_m.numel() != delivered.numel():
                shared_m = self._shared_m[key] = torch.zeros_like(delivered)
            shared_m.mul_(cfg.adam_beta1).add_(delivered, alpha=1 - cfg.adam_beta1)
            update = (shared_m / (1 - cfg.adam_beta1 ** t)).to(grad.dtype)
        update = update.view(grad.shape)
        return update if out is None else out.copy_(update)
