"""The training loop of ``distk-train``: data-parallel GPT training through distk.

One loop (:func:`run_loop`) over a small step backend: :class:`DDPBackend` here (every
mode — ``dense``, ``exact``, ``bucketed`` (``SparsityConfig.method``) — goes through
``DistributedDataParallel`` + ``distk.ddp.enable``; "dense" is the plain all-reduce
baseline inside the same hook, so bytes and communication seconds are measured the same
way in every mode), :class:`OuterBackend` (``sparsity.sync_every > 1``: the model is not
wrapped in DDP; ranks take local steps and :mod:`distk.train.outer_mode` synchronises
them every ``sync_every`` steps) and ``distk.train.deepspeed_job.DeepSpeedBackend``. The
loop owns the schedule, logging, evaluation, checkpoint cadence and the
:class:`RunResult`; a typed :class:`RunState` travels in checkpoints.

Reusable pieces: :func:`setup_distributed`, :func:`resolve_device`, :func:`lr_at`,
:func:`build_optimizer`, :func:`train`, :func:`run_loop`.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from distk.integrations import ddp as distk_ddp
from distk.logging import StatsLogger
from distk.stats import StepStats
from distk.train.checkpoint import checkpoint_dir, load_checkpoint, restore_rng, save_checkpoint
from distk.train.config import TrainConfig
from distk.train.data import ByteCorpus, build_corpus, build_data
from distk.train.model import build_model, evaluate
from distk.train.outer_mode import (
    OUTER_MODE,
    OuterTrainState,
    outer_mode_config,
    outer_schedule,
    uses_outer_sync,
)
from distk.train.peer_hooks import enable_peer_hook, powersgd_start_iter
from distk.train.placement import adamw_schedule

__all__ = [
    "DDPBackend",
    "OuterBackend",
    "RunResult",
    "RunState",
    "StepBackend",
    "StepOutput",
    "build_optimizer",
    "format_result",
    "lr_at",
    "mode_config",
    "momentum_placement",
    "open_run_logger",
    "rebuild_ddp_buckets",
    "resolve_device",
    "run_loop",
    "setup_distributed",
    "train",
]

@dataclass
class RunResult:
    """Outcome of one training run (one mode), identical on every rank."""

    mode: str
    steps: int
    final_train_loss: float
    """Mean training loss over the last logging interval, across ranks."""
    final_val_loss: float
    wall_seconds: float
    """Seconds spent in training steps (forward, backward, exchange, optimizer); evaluation
    and checkpointing excluded."""
    selection_seconds: float
    comm_seconds: float
    bytes_sent: int
    """Bytes this rank sent over the run (rank 0's count; every rank sends alike)."""
    dense_bytes: int
    """Bytes a dense all-reduce would have sent for the same tensors."""
    mean_recall: float | None
    """``k``-weighted mean recall of the selection against exact top-k over the run's
    measured buffers (None when not measured)."""
    mean_global_recall: float | None = None
    """Shared masks: ``k``-weighted mean recall against the top-k of the summed
    accumulators over the run's measured buffers (None when not measured)."""
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    completed: bool = True
    """False when the run stopped early at ``train.stop_after``."""
    params: int = 0
    """Parameters of the model (0 in results written before it was recorded)."""

    @property
    def bits_per_param_per_step(self) -> float | None:
        """Bits this rank sent per parameter per training step (``None`` when ``params``
        was not recorded); the outer mode's syncs are spread over its inner steps."""
        if not self.params or not self.steps:
            return None
        return 8 * self.bytes_sent / (self.params * self.steps)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        return asdict(self)


def resolve_device(cfg: TrainConfig) -> torch.device:
    """``cuda:LOCAL_RANK`` when the config asks for (or "auto" finds) CUDA, else CPU."""
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but torch.cuda.is_available() is False")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """Join (or create) the default process group; returns ``(rank, world_size, device)``.

    Under ``torchrun`` the env:// variables are used. Started as a plain process (no
    ``RANK`` in the environment) it becomes a world of one, so the job also runs alone.
    The backend is ``train.backend`` ("auto": nccl for CUDA, gloo for CPU).
    """
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = resolve_device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        backend = cfg.train.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10),
                                device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), device


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of (0-based) ``step``: linear warm-up, then cosine decay to
    ``lr * min_lr_ratio`` at ``train.steps``."""
    opt = cfg.train
    if step < opt.lr_warmup_steps:
        return opt.lr * (step + 1) / opt.lr_warmup_steps
    span = max(1, opt.steps - opt.lr_warmup_steps)
    progress = min(1.0, (step - opt.lr_warmup_steps) / span)
    floor = opt.lr * opt.min_lr_ratio
    return floor + 0.5 * (opt.lr - floor) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (the default) or AdamW (``train.optimizer``); weight decay on matrices only (not
    on biases, norms or embeddings)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_matrix = param.dim() >= 2 and "embedding" not in name
        (decay if is_matrix else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.beta1,
                               nesterov=cfg.train.beta1 > 0)
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2))


def rebuild_ddp_buckets(ddp_model: DistributedDataParallel, batch: tuple[torch.Tensor, ...]
                         ) -> None:
    """Run one discarded forward/backward so that DDP rebuilds its buckets now.

    DDP buckets parameters in registration order for its first iteration and rebuilds
    them in gradient-ready order before the second forward. A resumed run must compress
    the same bucket layout that the uninterrupted run compressed (residuals are keyed by
    bucket), so it performs this rebuild iteration — a dense all-reduce in distk's hook,
    whose gradients are thrown away — before loading the checkpointed distk state.
    """
    _, loss = ddp_model(*batch)
    loss.backward()
    for param in ddp_model.parameters():
        param.grad = None


def _update_magnitudes(model: torch.nn.Module) -> torch.Tensor:
    """|entries| of the exchanged (averaged) update that are non-zero: the union of the
    ranks' selected entries."""
    flat = torch.cat([p.grad.detach().flatten() for p in model.parameters()
                      if p.grad is not None])
    return flat[flat != 0].abs()


@dataclass
class RunState:
    """What a run accumulates besides the model: carried by its checkpoints, identical on
    every rank."""

    train_curve: list[tuple[int, float]] = field(default_factory=list)
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    wall_seconds: float = 0.0
    loss_sum: float = 0.0
    """Training loss summed over the micro-batches of the current logging interval."""
    loss_count: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers (``torch.save`` with ``weights_only`` loads them)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunState:
        """Inverse of :meth:`to_dict`."""
        return cls(train_curve=[tuple(p) for p in data["train_curve"]],
                   val_curve=[tuple(p) for p in data["val_curve"]],
                   wall_seconds=float(data["wall_seconds"]),
                   loss_sum=float(data["loss_sum"]), loss_count=int(data["loss_count"]))


@dataclass
class StepOutput:
    """What one optimizer step of a :class:`StepBackend` reports to the loop."""

    loss_sum: torch.Tensor
    """Sum of the micro-batch losses (0-d, on the device; not synchronised)."""
    micro_batches: int
    grad_norm: float | None = None
    magnitudes: torch.Tensor | None = None
    """|entries| of the exchanged update (for the wandb histogram), when asked for."""


class StepBackend:
    """One way to run an optimizer step of the job: :class:`DDPBackend` here,
    ``distk.train.deepspeed_job.DeepSpeedBackend`` for DeepSpeed. :func:`run_loop` is the
    one loop around either (schedule, logging, evaluation, checkpoints, result).

    Attributes:
        mode: the run's mode name (``RunResult.mode``).
        label: what the opening log line calls the run.
        module: the plain model (evaluation, parameter count).
        state: the distk :class:`~distk.integrations.CompressionState` (``None`` for a
            run without distk).
        log_config: the config dict given to the logger.
    """

    mode: str
    label: str
    module: torch.nn.Module
    state: Any
    log_config: dict[str, Any]

    def set_lr(self, lr: float) -> None:
        raise NotImplementedError

    def train_step(self, step: int, want_magnitudes: bool) -> StepOutput:
        raise NotImplementedError

    def fresh_start(self) -> None:
        """Remove a stale checkpoint of an earlier run (collective)."""
        raise NotImplementedError

    def save(self, step: int, run: RunState) -> None:
        """Checkpoint after ``step`` optimizer steps (collective)."""
        raise NotImplementedError

    def load(self) -> tuple[int, RunState] | None:
        """Restore the latest checkpoint: ``(step, run state)``, or ``None`` (collective)."""
        raise NotImplementedError


class DDPBackend(StepBackend):
    """``DistributedDataParallel`` + ``distk.ddp.enable``: every mode (``dense``, ``exact``,
    ``bucketed``) goes through the same hook, so bytes and seconds are measured alike.
    With ``train.comm_hook`` "bf16" or "powersgd", PyTorch's hook replaces distk's behind a
    timing wrapper (:mod:`distk.train.peer_hooks`); mode ``bf16`` / ``powersgd_r<rank>``."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, data: Any, device: torch.device
                 ) -> None:
        self.cfg, self.run_dir, self.data, self.device = cfg, run_dir, data, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.module = build_model(cfg, device)
        self.ddp_model = DistributedDataParallel(
            self.module, device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=cfg.train.bucket_cap_mb)
        hook = cfg.train.comm_hook
        if hook == "distk":
            self.state = distk_ddp.enable(self.ddp_model, cfg.sparsity)
            self.mode = cfg.sparsity.method
        else:  # PyTorch's own hook as a baseline (train.comm_hook; distk.train.peer_hooks)
            start_iter = cfg.train.powersgd_start_iter or powersgd_start_iter(
                cfg.train.steps, cfg.train.lr_warmup_steps)
            self.state = enable_peer_hook(
                self.ddp_model, hook, rank=cfg.train.powersgd_rank, start_iter=start_iter,
                bf16=cfg.train.powersgd_bf16 and hook == "powersgd")
            self.mode = f"powersgd_r{cfg.train.powersgd_rank}" if hook == "powersgd" else hook
        self.optimizer = build_optimizer(self.module, cfg)
        self.label = f"mode={self.mode}"
        self.log_config = cfg.to_dict()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train_step(self, step: int, want_magnitudes: bool) -> StepOutput:
        inputs, targets = self.data.train_batch(step)
        _, loss = self.ddp_model(inputs, targets)
        loss.backward()
        self.state.end_step()  # no-op for distk (its autograd callback ended the step)
        grad_norm = None
        if self.cfg.train.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(),
                                                             self.cfg.train.grad_clip))
        magnitudes = _update_magnitudes(self.module) if want_magnitudes else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutput(loss.detach().double(), 1, grad_norm, magnitudes)

    def fresh_start(self) -> None:
        if self.rank == 0:
            shutil.rmtree(checkpoint_dir(self.run_dir), ignore_errors=True)
        dist.barrier()

    def save(self, step: int, run: RunState) -> None:
        save_checkpoint(self.run_dir, step=step, model=self.module, optimizer=self.optimizer,
                        distk_state=self.state.state_dict(), extra=run.to_dict(),
                        rank=self.rank, world_size=self.world)

    def load(self) -> tuple[int, RunState] | None:
        payload = load_checkpoint(self.run_dir, rank=self.rank, world_size=self.world)
        if payload is None:
            return None
        self._before_load(int(payload["step"]))
        self.module.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.state.load_state_dict(payload["distk"])
        restore_rng(payload, self.device)
        return int(payload["step"]), RunState.from_dict(payload["extra"])

    def _before_load(self, step: int) -> None:
        rebuild_ddp_buckets(self.ddp_model, self.data.train_batch(step))


class OuterBackend(DDPBackend):
    """Outer synchronisation (``sparsity.sync_every > 1``, mode ``outer``): the plain model
    (no DDP wrapper) trains with local optimizer steps, and
    :class:`~distk.train.outer_mode.OuterTrainState` (an optimizer step post-hook)
    exchanges the compressed pseudo-gradients every ``sync_every`` steps. Steps, logging,
    checkpoints and resume are :class:`DDPBackend`'s."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, data: Any, device: torch.device
                 ) -> None:
        self.cfg, self.run_dir, self.data, self.device = cfg, run_dir, data, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.module = build_model(cfg, device)
        self.ddp_model = self.module  # local steps: nothing reduces gradients
        self.optimizer = build_optimizer(self.module, cfg)
        self.state = OuterTrainState(self.module, self.optimizer, cfg)
        self.mode = OUTER_MODE
        self.label = f"mode={self.mode} sync_every={cfg.sparsity.sync_every}"
        self.log_config = cfg.to_dict()

    def train_step(self, step: int, want_magnitudes: bool) -> StepOutput:
        # Gradients here are local, not the exchanged update: no histogram of them.
        del want_magnitudes
        return super().train_step(step, False)

    def _before_load(self, step: int) -> None:
        del step  # no DDP buckets to rebuild


def train(cfg: TrainConfig, run_dir: Path | str, *, resume: bool = False,
          corpus: ByteCorpus | None = None, wandb_group: str | None = None) -> RunResult:
    """Train one run of ``cfg`` (mode ``cfg.sparsity.method``) through DDP in the current
    process group: :func:`run_loop` over a :class:`DDPBackend`; with
    ``sparsity.sync_every > 1`` (mode ``outer``) over an :class:`OuterBackend`.

    Every rank calls it. Writes ``metrics.jsonl`` (rank 0), checkpoints (every rank, when
    ``train.checkpoint_every`` or ``train.stop_after`` asks) and ``result.json`` (rank 0)
    under ``run_dir``. With ``resume``, continues from ``run_dir``'s checkpoint when there is
    one (bitwise identical to an uninterrupted run on CPU with dropout 0).
    """
    cfg = outer_schedule(adamw_schedule(momentum_placement(cfg)))
    run_dir = Path(run_dir)
    rank, world, device = dist.get_rank(), dist.get_world_size(), resolve_device(cfg)
    data = build_data(cfg, rank, world, device, corpus=corpus if corpus else build_corpus(cfg))
    backend = (OuterBackend if uses_outer_sync(cfg) else DDPBackend)(cfg, run_dir, data, device)
    return run_loop(cfg, run_dir, backend, data, resume=resume, wandb_group=wandb_group)


def run_loop(cfg: TrainConfig, run_dir: Path, backend: StepBackend, data: Any, *,
             resume: bool = False, wandb_group: str | None = None) -> RunResult:
    """The training loop of every backend: learning-rate schedule, steps, logging (loss,
    distk's :class:`~distk.stats.StepStats` and run totals), evaluation, checkpoints, and
    the :class:`RunResult` (written to ``run_dir/result.json`` by rank 0)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = resolve_device(cfg)
    val_batches = data.val_batches()
    start_step, run = 0, RunState()
    loaded = backend.load() if resume else None
    if loaded is not None:
        start_step, run = loaded
    elif not resume:
        # A fresh run replaces the run directory's checkpoint: a stale one left there
        # would otherwise be picked up by a later --resume.
        backend.fresh_start()
    state = backend.state
    logger = open_run_logger(cfg, run_dir, start_step, rank, backend.mode, backend.label,
                             backend.module, data.corpus, world, device,
                             config=backend.log_config, wandb_group=wandb_group)

    stop = cfg.train.stop_after or cfg.train.steps
    loss_stats = torch.tensor([run.loss_sum, run.loss_count], dtype=torch.float64,
                              device=device)
    try:
        for step in range(start_step, stop):
            lr = lr_at(cfg, step)
            backend.set_lr(lr)
            want_hist = bool(cfg.logging.wandb and cfg.logging.histogram_every
                             and (step + 1) % cfg.logging.histogram_every == 0 and rank == 0)
            begin = time.perf_counter()
            output = backend.train_step(step, want_hist)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            run.wall_seconds += time.perf_counter() - begin
            loss_stats[0] += output.loss_sum
            loss_stats[1] += output.micro_batches

            metrics: dict[str, Any] = {}
            if state is not None:
                for name in ("recall", "global_recall"):
                    if getattr(state.stats, name) is not None:
                        metrics[f"distk/{name}"] = getattr(state.stats, name)
            done = step + 1
            if done % cfg.logging.log_every == 0 or done == stop:
                dist.all_reduce(loss_stats)
                mean_loss = float(loss_stats[0] / loss_stats[1])
                loss_stats.zero_()
                run.train_curve.append((done, mean_loss))
                metrics.update({"train/loss": mean_loss, "train/lr": lr,
                                "train/wall_seconds": run.wall_seconds})
                if output.grad_norm is not None:
                    metrics["train/grad_norm"] = output.grad_norm
                if state is not None:
                    # The last step's stats and the run totals (distk/total_*), which the
                    # checkpoint carries across a resume.
                    metrics.update(state.metrics())
            eval_every = cfg.train.eval_every
            if (eval_every and done % eval_every == 0) or done == cfg.train.steps:
                val_loss = evaluate(backend.module, val_batches)
                run.val_curve.append((done, val_loss))
                metrics["val/loss"] = val_loss
            if metrics:
                logger.log(metrics, step=done)
            if output.magnitudes is not None:
                logger.log_histogram("distk/update_magnitude", output.magnitudes, step=done)
            logger.advance()
            every = cfg.train.checkpoint_every
            if (every and done % every == 0) or done == cfg.train.stop_after:
                run.loss_sum, run.loss_count = float(loss_stats[0]), int(loss_stats[1])
                backend.save(done, run)
    finally:
        logger.close()

    totals = state.totals if state is not None else StepStats()
    result = RunResult(
        mode=backend.mode,
        steps=stop,
        final_train_loss=run.train_curve[-1][1] if run.train_curve else float("nan"),
        final_val_loss=run.val_curve[-1][1] if run.val_curve else float("nan"),
        wall_seconds=run.wall_seconds,
        selection_seconds=totals.selection_seconds,
        comm_seconds=totals.comm_seconds,
        bytes_sent=totals.bytes_sent,
        dense_bytes=totals.dense_bytes,
        mean_recall=totals.recall,
        mean_global_recall=totals.global_recall,
        train_curve=[tuple(p) for p in run.train_curve],
        val_curve=[tuple(p) for p in run.val_curve],
        completed=stop == cfg.train.steps,
        params=sum(p.numel() for p in backend.module.parameters()),
    )
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def open_run_logger(cfg: TrainConfig, run_dir: Path, start_step: int, rank: int, mode: str,
                    label: str, model: torch.nn.Module, corpus: ByteCorpus, world: int,
                    device: torch.device, *, config: dict[str, Any] | None = None,
                    wandb_group: str | None = None) -> StatsLogger:
    """The run's :class:`StatsLogger` (wandb run ``<name>-<mode>``), with the opening line
    ``[distk-train] <label> ranks=... params=... corpus=...`` on a fresh start."""
    logger = StatsLogger(
        run_dir, total_steps=cfg.train.steps, initial_step=start_step,
        config=cfg.to_dict() if config is None else config,
        wandb=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
        wandb_entity=cfg.logging.wandb_entity, wandb_run_name=f"{cfg.name}-{mode}",
        wandb_group=wandb_group, progress=cfg.logging.progress, jsonl=cfg.logging.jsonl,
        resume_from=start_step if start_step > 0 else None, rank=rank,
    )
    if start_step == 0:
        logger.write(
            f"[distk-train] {label} ranks={world} device={device} "
            f"params={sum(p.numel() for p in model.parameters()):,} "
            f"corpus={corpus_summary(corpus)}"
        )
    return logger


def corpus_summary(corpus: ByteCorpus) -> str:
    """One line describing the corpus (sizes, files, fingerprint)."""
    return (f"{corpus.train.numel():,}B train ({corpus.train_files} files) / "
            f"{corpus.val.numel():,}B val ({corpus.val_files} files) from {corpus.root} "
            f"[{corpus.fingerprint}]")


def momentum_placement(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with SGD momentum moved into the compressor for sparse modes, when
    ``train.momentum_correction`` asks (see its docstring); otherwise ``cfg`` (also with
    ``sparsity.feedback="estimate"``: EF21 hands back a dense update, and the optimizer
    keeps its momentum)."""
    sparse = cfg.sparsity.method != "dense"
    if (not sparse or uses_outer_sync(cfg) or not cfg.train.momentum_correction
            or cfg.train.optimizer != "sgd" or cfg.sparsity.feedback == "estimate"
            or cfg.sparsity.momentum > 0 or cfg.train.beta1 == 0):
        return cfg
    return replace(cfg, sparsity=cfg.sparsity.replace(momentum=cfg.train.beta1),
                   train=replace(cfg.train, beta1=0.0))


def mode_config(cfg: TrainConfig, mode: str) -> TrainConfig:
    """``cfg`` for ``mode``: ``sparsity.method`` set to ``mode`` with per-step exchange
    (``sync_every=1``), or the outer-synchronisation mode for ``"outer"``."""
    if mode == OUTER_MODE:
        return outer_mode_config(cfg)
    return replace(cfg, sparsity=cfg.sparsity.replace(method=mode, sync_every=1))


def format_result(result: RunResult) -> str:
    """One-paragraph summary of a run."""
    recall = f"{result.mean_recall:.4f}" if result.mean_recall is not None else "-"
    state = "completed" if result.completed else "stopped early (resume with --resume)"
    return (f"[distk-train] {result.mode}: {result.steps} steps {state}; train loss "
            f"{result.final_train_loss:.4f}, val loss {result.final_val_loss:.4f}, "
            f"wall {result.wall_seconds:.1f}s (selection {result.selection_seconds:.2f}s, "
            f"comm {result.comm_seconds:.2f}s), sent {result.bytes_sent / 1e6:.2f} MB "
            f"(dense {result.dense_bytes / 1e6:.2f} MB), recall {recall}")
