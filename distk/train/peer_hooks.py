"""PyTorch's own DDP communication hooks as baselines of ``distk-train`` (``train.comm_hook``).

``enable_peer_hook(ddp_model, kind, ...)`` registers PyTorch's ``bf16_compress_hook`` or
``powerSGD_hook`` (optionally inside PyTorch's ``bf16_compress_wrapper``) behind a thin
timing wrapper and returns a :class:`PeerHookState` that looks to the training loop like
distk's state (``stats``, ``totals``, ``metrics()``, ``end_step()``), so the same loop,
data, model, timing and logging serve every method.

PowerSGD in bf16 (``bf16=True``) is PyTorch's ``bf16_compress_wrapper(powerSGD_hook)``:
the bucket is cast to bf16, PowerSGD runs in bf16 (its error feedback, P and Q, the
uncompressed tensors and the vanilla all-reduce before ``start_powerSGD_iter``), and the
result is cast back. DDP's ``register_comm_hook`` refuses a hook *named*
``bf16_compress_wrapper_hook`` unless CUDA with NCCL >= 2.10 (or XPU) is present, but the
wrapper itself runs on gloo, which all-reduces bf16: called from the timing wrapper here,
it applies the same rounding and sends the same 2-byte entries on either backend.

What the wrapper measures per bucket (one :class:`~distk.stats.StepStats` each):

- ``selection_seconds``: the hook's synchronous part, from the call until it returns its
  future (bf16: the cast; PowerSGD: error feedback, splitting the bucket, ``P = M Q``);
- ``comm_seconds``: from the call until the future completes (the collectives, and for
  PowerSGD the orthogonalisation and ``Q = M^T P`` between them), as distk measures its
  own exchanges;
- ``bytes_sent``: computed from the tensor sizes, the bytes one rank transmits in a ring
  all-reduce (``distk.comm.exchange.dense_allreduce_bytes``) of what the hook reduces:
  bf16: the bucket at 2 bytes per entry; PowerSGD before ``start_powerSGD_iter``: the
  bucket in fp32; after: the uncompressed tensors, the P matrices and the Q matrices, each
  in fp32 (a gradient viewed as ``n x m`` is compressed to ``P: n x r`` and ``Q: m x r``,
  ``r = min(n, m, rank)``, when ``(n + m) r * min_compression_rate < n m``, the rule
  documented in ``PowerSGDState``); PowerSGD in bf16: the same entries at 2 bytes each;
  ``dense_bytes``: the same bucket in fp32.
"""

# No ``from __future__ import annotations``: DDP's register_comm_hook compares the hook's
# annotations with dist.GradBucket / Future[Tensor] objects, not strings.
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from distk.comm.exchange import dense_allreduce_bytes
from distk.integrations.owner import StepOwner
from distk.stats import StepStats

__all__ = ["PeerHookConfig", "PeerHookState", "enable_peer_hook", "powersgd_bucket_entries",
           "powersgd_start_iter"]


def powersgd_start_iter(steps: int, warmup_steps: int, fraction: float = 0.1) -> int:
    """``start_powerSGD_iter`` as PyTorch's PowerSGD docs recommend: ``fraction`` (10%) of
    the training steps, no less than the learning-rate warm-up, and at least 2 (the
    minimum PowerSGD allows with error feedback or warm start)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r} is invalid: allowed a float in [0, 1]")
    return max(2, warmup_steps, math.ceil(fraction * steps))


def powersgd_bucket_entries(shapes: list[torch.Size], rank: int,
                            min_compression_rate: float) -> tuple[int, int, int]:
    """(uncompressed entries, P entries, Q entries) PowerSGD all-reduces for one bucket
    holding gradients of ``shapes`` once compression has started."""
    plain = p_entries = q_entries = 0
    for shape in shapes:
        rows = shape[0] if len(shape) else 1
        numel = math.prod(shape)
        cols = numel // rows if rows else 0
        r = min(rows, cols, rank)
        if (rows + cols) * r * min_compression_rate < rows * cols:
            p_entries += rows * r
            q_entries += cols * r
        else:
            plain += numel
    return plain, p_entries, q_entries


@dataclass(frozen=True)
class PeerHookConfig:
    """What the peer-hook state is configured by (compared across ranks, and recorded in
    its checkpoint form like distk's own :class:`~distk.SparsityConfig`).

    Attributes:
        kind: ``"bf16"`` or ``"powersgd"``.
        rank: PowerSGD's ``matrix_approximation_rank``.
        start_iter: PowerSGD's ``start_powerSGD_iter``.
        bf16: PowerSGD inside ``bf16_compress_wrapper`` (2-byte entries).
    """

    kind: str
    rank: int = 1
    start_iter: int = 2
    bf16: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PeerHookState(StepOwner):
    """State of a PyTorch hook run through ``distk-train``: a
    :class:`~distk.integrations.owner.StepOwner` (one counter, the step's and the run's
    :class:`~distk.stats.StepStats`, the checkpoint form) around the hook's own state
    (see the module docstring).

    Attributes:
        kind: "bf16" or "powersgd".
        hook_state: what PyTorch's hook receives (the process group for bf16, the
            ``PowerSGDState`` for PowerSGD).
        powersgd_bf16: PowerSGD runs inside ``bf16_compress_wrapper`` (2-byte entries).
        stats, totals: the last completed step's stats and the run's.
        iteration: completed steps.
    """

    def __init__(self, cfg: PeerHookConfig, hook_state: Any,
                 process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__(cfg, process_group, entry=f"train.comm_hook={cfg.kind!r}")
        self.kind, self.hook_state, self.powersgd_bf16 = cfg.kind, hook_state, cfg.bf16
        self._hook = _pytorch_hook(cfg.kind, cfg.bf16)
        self._totals = StepStats()
        self._pending: list[StepStats] = []
        self._futures: list[torch.futures.Future] = []

    @property
    def totals(self) -> StepStats:
        """Every bucket of the run."""
        return self._totals

    def bucket_bytes(self, bucket: dist.GradBucket) -> tuple[int, int, str]:
        """(entries sent, bytes sent, scheme) of ``bucket`` at the current step; read before
        the hook runs (PowerSGD advances its iteration counter inside)."""
        numel = bucket.buffer().numel()
        if self.kind == "bf16":
            return numel, dense_allreduce_bytes(numel, self.world_size, 2), "bf16"
        ps = self.hook_state
        width, suffix = (2, "_bf16") if self.powersgd_bf16 else (4, "")
        if ps.iter < ps.start_powerSGD_iter:
            nbytes = dense_allreduce_bytes(numel, self.world_size, width)
            return numel, nbytes, "allreduce" + suffix
        parts = powersgd_bucket_entries([g.shape for g in bucket.gradients()],
                                        ps.matrix_approximation_rank, ps.min_compression_rate)
        sent = sum(dense_allreduce_bytes(n, self.world_size, width) for n in parts if n)
        return sum(parts), sent, "powersgd" + suffix

    def end_step(self) -> bool:
        """Close the step: wait for its buckets, merge their stats into :attr:`stats` and
        :attr:`totals`. Returns False when no bucket was reduced since the last call."""
        if not self._futures:
            return False
        torch.futures.wait_all(self._futures)
        merged = StepStats()
        for item in self._pending:
            merged = merged.merge(item)
        self._pending, self._futures = [], []
        merged.step = self.iteration
        self.stats = merged
        self._totals = self._totals.merge(merged)
        self.iteration += 1
        return True

    def _payload(self) -> dict[str, Any]:
        """The run totals and PowerSGD's own state (error feedback, warm-start factors,
        its iteration; ``PowerSGDState.__getstate__``, which leaves the group out)."""
        hook = self.hook_state.__getstate__() if self.kind == "powersgd" else None
        return {"totals": self._totals.to_dict(), "hook": hook}

    def _restore(self, state_dict: dict[str, Any]) -> None:
        self._totals = StepStats.from_dict(state_dict["totals"])
        if self.kind == "powersgd" and state_dict.get("hook") is not None:
            self.hook_state.__setstate__(state_dict["hook"])  # binds the default group


def _pytorch_hook(kind: str, powersgd_bf16: bool) -> Any:
    """PyTorch's hook function for ``kind`` (see the module docstring for bf16)."""
    if kind == "bf16":
        return default_hooks.bf16_compress_hook
    if powersgd_bf16:
        return default_hooks.bf16_compress_wrapper(powerSGD_hook.powerSGD_hook)
    return powerSGD_hook.powerSGD_hook


def _timed_peer_hook(
    state: PeerHookState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """Run PyTorch's hook on ``bucket``, recording its bytes and seconds."""
    numel = bucket.buffer().numel()
    sent, nbytes, scheme = state.bucket_bytes(bucket)
    begin = time.perf_counter()
    future = state._hook(state.hook_state, bucket)
    launched = time.perf_counter()

    def record(done: torch.futures.Future) -> torch.Tensor:
        state._pending.append(StepStats(
            buffers=1, numel=numel, sent=sent, bytes_sent=nbytes,
            dense_bytes=dense_allreduce_bytes(numel, state.world_size, 4),
            selection_seconds=launched - begin,
            comm_seconds=time.perf_counter() - begin, schemes={scheme: 1}))
        return done.value()

    chained = future.then(record)
    state._futures.append(chained)
    return chained


def enable_peer_hook(ddp_model: DistributedDataParallel, kind: str, *, rank: int = 1,
                     start_iter: int = 2, bf16: bool = False) -> PeerHookState:
    """Register PyTorch's ``kind`` hook ("bf16" or "powersgd") on ``ddp_model`` behind the
    timing wrapper; PowerSGD with ``matrix_approximation_rank=rank``,
    ``start_powerSGD_iter=start_iter`` (>= 2), error feedback and warm start, inside
    PyTorch's ``bf16_compress_wrapper`` when ``bf16`` (PowerSGD only)."""
    group = ddp_model.process_group
    if kind == "bf16":
        if bf16:
            raise ValueError("bf16=True is invalid with kind='bf16': allowed only with "
                             "kind='powersgd' (the bf16 hook already sends bf16)")
        hook_state: Any = group
    elif kind == "powersgd":
        if rank < 1:
            raise ValueError(f"rank={rank!r} is invalid: allowed an int >= 1")
        if start_iter < 2:
            raise ValueError(f"start_iter={start_iter!r} is invalid: allowed an int >= 2 "
                             "(PowerSGD's minimum with error feedback and warm start)")
        hook_state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=rank,
            start_powerSGD_iter=start_iter, use_error_feedback=True, warm_start=True)
    else:
        raise ValueError(f"comm hook {kind!r} is invalid: allowed 'bf16' or 'powersgd'")
    state = PeerHookState(PeerHookConfig(kind, rank, start_iter, bf16), hook_state, group)
    ddp_model.register_comm_hook(state, _timed_peer_hook)
    return state
