"""The training loop of ``distk-train``: data-parallel GPT training through distk's DDP hook.

With ``sparsity.sync_every > 1`` the model is not wrapped in DDP: ranks take local steps
and :mod:`distk.train.outer_mode` synchronises them every ``sync_every`` steps.

Every mode — ``dense``, ``exact``, ``bucketed`` (``SparsityConfig.method``) — goes through
the same code path: ``DistributedDataParallel`` + ``distk.ddp.enable``; "dense" is the
plain all-reduce baseline inside the hook, so bytes and communication seconds are
measured the same way in every mode.

Reusable pieces (also used by the DeepSpeed job): :func:`setup_distributed`,
:func:`resolve_device`, :func:`lr_at`, :func:`build_optimizer`, :func:`train`.
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

from distk.logging import StatsLogger
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

__all__ = [
    "RunResult",
    "build_optimizer",
    "format_result",
    "lr_at",
    "mode_config",
    "momentum_placement",
    "open_run_logger",
    "resolve_device",
    "setup_distributed",
    "train",
]

# Per-step statistics of distk's hook state copied into the logs (as distk/<name>).
_LOGGED_STATS = (
    "numel", "k", "density", "bytes_sent", "dense_bytes", "compression",
    "selection_seconds", "comm_seconds", "residual_norm",
)
# Summed over the steps of a run (the hook state's merged stats of every step, including
# the dense bucket-rebuild step): the run's totals in the logs and the compare table.
_LOGGED_TOTALS = ("bytes_sent", "dense_bytes", "selection_seconds", "comm_seconds")


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
    """Mean measured recall of the selection against exact top-k (None when not measured)."""
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    completed: bool = True
    """False when the run stopped early at ``train.stop_after``."""

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
    """AdamW or SGD (``train.optimizer``); weight decay on matrices only (not on biases,
    norms or embeddings)."""
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


def _rebuild_ddp_buckets(ddp_model: DistributedDataParallel, batch: tuple[torch.Tensor, ...]
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


def train(cfg: TrainConfig, run_dir: Path | str, *, resume: bool = False,
          corpus: ByteCorpus | None = None, wandb_group: str | None = None) -> RunResult:
    """Train one run of ``cfg`` (mode ``cfg.sparsity.method``) in the current process group.

    Every rank calls it. Writes ``metrics.jsonl`` (rank 0), checkpoints (every rank, when
    ``train.checkpoint_every`` or ``train.stop_after`` asks) and ``result.json`` (rank 0)
    under ``run_dir``. With ``resume``, continues from ``run_dir``'s checkpoint when there is
    one (bitwise identical to an uninterrupted run on CPU with dropout 0).
    """
    import distk

    cfg = outer_schedule(momentum_placement(cfg))
    outer = uses_outer_sync(cfg)
    run_dir = Path(run_dir)
    rank, world, device = dist.get_rank(), dist.get_world_size(), resolve_device(cfg)
    data = build_data(cfg, rank, world, device, corpus=corpus if corpus else build_corpus(cfg))
    val_batches = data.val_batches()

    model = build_model(cfg, device)
    if outer:  # local steps, synchronised every sync_every optimizer steps (no DDP)
        ddp_model = model
        optimizer = build_optimizer(model, cfg)
        hook_state = OuterTrainState(model, optimizer, cfg)
    else:
        ddp_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=cfg.train.bucket_cap_mb,
        )
        hook_state = distk.ddp.enable(ddp_model, cfg.sparsity)
        optimizer = build_optimizer(model, cfg)

    start_step = 0
    extra: dict[str, Any] = {"train_curve": [], "val_curve": [], "recalls": [],
                             "wall_seconds": 0.0, "loss_sum": 0.0, "loss_count": 0,
                             "totals": dict.fromkeys(_LOGGED_TOTALS, 0)}
    payload = None
    if resume:
        payload = load_checkpoint(run_dir, rank=rank, world_size=world, device=device)
    else:
        # A fresh run replaces the run directory's contents: a stale checkpoint left there
        # would otherwise be picked up by a later --resume.
        if rank == 0:
            shutil.rmtree(checkpoint_dir(run_dir), ignore_errors=True)
        dist.barrier()
    if payload is not None:
        if not outer:
            _rebuild_ddp_buckets(ddp_model, data.train_batch(payload["step"]))
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        hook_state.load_state_dict(payload["distk"])
        restore_rng(payload, device)
        start_step = int(payload["step"])
        extra = payload["extra"]

    mode = OUTER_MODE if outer else cfg.sparsity.method
    logger = open_run_logger(cfg, run_dir, start_step, rank, mode, f"mode={mode}", model,
                             data.corpus, world, device, wandb_group=wandb_group)

    stop = cfg.train.stop_after or cfg.train.steps
    loss_stats = torch.tensor([extra["loss_sum"], extra["loss_count"]], dtype=torch.float64,
                              device=device)
    step = start_step
    try:
        for step in range(start_step, stop):
            inputs, targets = data.train_batch(step)
            lr = lr_at(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            begin = time.perf_counter()
            _, loss = ddp_model(inputs, targets)
            loss.backward()
            grad_norm = None
            if cfg.train.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                           cfg.train.grad_clip)
            want_hist = (cfg.logging.wandb and cfg.logging.histogram_every
                         and (step + 1) % cfg.logging.histogram_every == 0)
            magnitudes = _update_magnitudes(model) if want_hist and rank == 0 else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            extra["wall_seconds"] += time.perf_counter() - begin
            loss_stats[0] += loss.detach().double()
            loss_stats[1] += 1

            metrics: dict[str, Any] = {}
            stats = hook_state.stats
            for key in _LOGGED_TOTALS:
                extra["totals"][key] += stats.get(key, 0) or 0
            if stats.get("recall") is not None:
                extra["recalls"].append(float(stats["recall"]))
                metrics["distk/recall"] = float(stats["recall"])
            done = step + 1
            if done % cfg.logging.log_every == 0 or done == stop:
                dist.all_reduce(loss_stats)
                mean_loss = float(loss_stats[0] / loss_stats[1])
                loss_stats.zero_()
                extra["train_curve"].append((done, mean_loss))
                metrics.update({"train/loss": mean_loss, "train/lr": lr,
                                "train/wall_seconds": extra["wall_seconds"]})
                if grad_norm is not None:
                    metrics["train/grad_norm"] = float(grad_norm)
                metrics.update({f"distk/{k}": stats[k] for k in _LOGGED_STATS if k in stats})
                metrics.update({f"distk/total_{k}": v for k, v in extra["totals"].items()})
            eval_every = cfg.train.eval_every
            if (eval_every and done % eval_every == 0) or done == cfg.train.steps:
                val_loss = evaluate(model, val_batches)
                extra["val_curve"].append((done, val_loss))
                metrics["val/loss"] = val_loss
            if metrics:
                logger.log(metrics, step=done)
            if magnitudes is not None:
                logger.log_histogram("distk/update_magnitude", magnitudes, step=done)
            logger.advance()
            every = cfg.train.checkpoint_every
            if (every and done % every == 0) or done == cfg.train.stop_after:
                extra["loss_sum"], extra["loss_count"] = float(loss_stats[0]), int(loss_stats[1])
                save_checkpoint(run_dir, step=done, model=model, optimizer=optimizer,
                                distk_state=hook_state.state_dict(), extra=extra, rank=rank,
                                world_size=world)
    finally:
        logger.close()

    totals = extra["totals"]
    final_val = extra["val_curve"][-1][1] if extra["val_curve"] else float("nan")
    result = RunResult(
        mode=mode,
        steps=stop,
        final_train_loss=extra["train_curve"][-1][1] if extra["train_curve"] else float("nan"),
        final_val_loss=final_val,
        wall_seconds=extra["wall_seconds"],
        selection_seconds=float(totals.get("selection_seconds", 0.0)),
        comm_seconds=float(totals.get("comm_seconds", 0.0)),
        bytes_sent=int(totals.get("bytes_sent", 0)),
        dense_bytes=int(totals.get("dense_bytes", 0)),
        mean_recall=(sum(extra["recalls"]) / len(extra["recalls"])
                     if extra["recalls"] else None),
        train_curve=[tuple(p) for p in extra["train_curve"]],
        val_curve=[tuple(p) for p in extra["val_curve"]],
        completed=stop == cfg.train.steps,
    )
    if rank == 0:
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
    ``train.momentum_correction`` asks (see its docstring); otherwise ``cfg``."""
    sparse = cfg.sparsity.method != "dense"
    if (not sparse or uses_outer_sync(cfg) or not cfg.train.momentum_correction
            or cfg.train.optimizer != "sgd"
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
