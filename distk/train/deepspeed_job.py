"""The main training job through DeepSpeed: ``distk-train --deepspeed DS_CONFIG.json``.

Launch with ``launchers/deepspeed.sh configs/deepspeed/bucketed_zero2.json [distk-train
args]`` (the ``deepspeed`` launcher, one process per rank). The training config (model,
data, steps, learning-rate schedule, logging) is the same as for the DDP job, so runs are
comparable; the DeepSpeed JSON decides the ZeRO stage, the dtype and, through its
``"distk"`` block, the compression (the training config's ``sparsity`` section is not used
here). Keys the JSON leaves out are filled from the training config:

- ``train_micro_batch_size_per_gpu`` <- ``train.batch_size`` (a value in the JSON wins and
  becomes the batch size of the data);
- ``gradient_clipping`` <- ``train.grad_clip``;
- ``gradient_accumulation_steps`` <- 1 (with ``N > 1`` one optimizer step consumes the
  micro-batches ``step * N ... step * N + N - 1`` of the data stream).

The optimizer is the DDP job's AdamW (``build_optimizer``) with its schedule (``lr_at``),
passed to DeepSpeed as a client optimizer, so a JSON ``"optimizer"`` block is refused.
As in the DDP job, a sparse ``"distk"`` block under AdamW gets at least
``train.adamw_dense_steps`` dense steps and a ``train.adamw_warmup_steps`` density
warm-up (``distk.train.placement.adamw_block_schedule``).
Without a ``"distk"`` block the run is plain DeepSpeed (no compression, no distk stats).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distk.integrations.deepspeed import initialize, split_config
from distk.train.config import TrainConfig
from distk.train.data import build_corpus, build_data
from distk.train.loop import (
    RunResult,
    build_optimizer,
    format_result,
    lr_at,
    open_run_logger,
    setup_distributed,
)
from distk.train.model import build_model, evaluate
from distk.train.placement import adamw_block_schedule

__all__ = ["checkpoint_root", "deepspeed_config_for", "run"]

def checkpoint_root(run_dir: Path) -> Path:
    """Where the DeepSpeed job's checkpoints live (``engine.save_checkpoint`` folder)."""
    return Path(run_dir) / "ds_checkpoint"


def deepspeed_config_for(cfg: TrainConfig, ds_config: str | dict[str, Any]
                         ) -> tuple[dict[str, Any], str]:
    """The DeepSpeed config dict the job passes on, and the run's mode name.

    Fills the keys listed in the module docstring from ``cfg``; the ``"distk"`` block is
    validated here (a bad block raises ``ValueError`` before any process-group work) and
    kept for :func:`distk.deepspeed.initialize`. The mode is ``zero<stage>-<method>``
    (``zero<stage>-deepspeed`` without a block).

    Raises:
        ValueError: a bad ``"distk"`` block, or an ``"optimizer"`` block (the job passes
            its own AdamW).
    """
    stripped, sparsity = split_config(ds_config)
    sparsity = adamw_block_schedule(cfg, sparsity)  # AdamW: dense start, longer warm-up
    config = dict(stripped)
    if "optimizer" in config:
        raise ValueError(
            'the DeepSpeed config for distk-train must not have an "optimizer" block: the '
            "job passes the DDP job's AdamW (train.lr, train.beta1/beta2, "
            "train.weight_decay) so that runs are comparable; remove the block"
        )
    if "train_micro_batch_size_per_gpu" not in config and "train_batch_size" not in config:
        config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    config.setdefault("gradient_accumulation_steps", 1)
    config.setdefault("gradient_clipping", cfg.train.grad_clip)
    if sparsity is not None:
        config["distk"] = sparsity.to_dict()
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    mode = f"zero{stage}-{sparsity.method if sparsity is not None else 'deepspeed'}"
    return config, mode


def run(cfg: TrainConfig, ds_config_path: str | Path, *, resume: bool = False) -> RunResult:
    """Train ``cfg`` through DeepSpeed configured by ``ds_config_path``; every rank calls it.

    Writes ``metrics.jsonl`` and ``result.json`` (rank 0) under
    ``<run_root>/<name>/<json file stem>/`` and, when ``train.checkpoint_every`` or
    ``train.stop_after`` asks, DeepSpeed checkpoints (with distk's residuals) under its
    ``ds_checkpoint/``. With ``resume``, continues from the latest checkpoint there.

    Returns:
        The :class:`~distk.train.loop.RunResult` (identical on every rank).
    """
    created_group = not dist.is_initialized()
    ds_config, mode = deepspeed_config_for(cfg, str(ds_config_path))
    rank, world, device = setup_distributed(cfg)
    micro_batch = int(ds_config.get("train_micro_batch_size_per_gpu", cfg.train.batch_size))
    accumulation = int(ds_config["gradient_accumulation_steps"])
    if micro_batch != cfg.train.batch_size:
        cfg = replace(cfg, train=replace(cfg.train, batch_size=micro_batch))
    run_dir = cfg.run_dir / Path(ds_config_path).stem

    data = build_data(cfg, rank, world, device, corpus=build_corpus(cfg))
    val_batches = data.val_batches()
    model = build_model(cfg, device)
    engine, _, _, _ = initialize(model=model, optimizer=build_optimizer(model, cfg),
                                 config=ds_config)
    state = engine.__dict__.get("distk")

    start_step = 0
    extra: dict[str, Any] = {"train_curve": [], "val_curve": [], "recalls": [],
                             "wall_seconds": 0.0}
    ckpt = checkpoint_root(run_dir)
    if resume:
        load_path, client_state = engine.load_checkpoint(str(ckpt))
        if load_path is not None:
            start_step = int(client_state["step"])
            extra = client_state["extra"]
    else:
        if rank == 0:
            shutil.rmtree(ckpt, ignore_errors=True)
        dist.barrier()

    logger = open_run_logger(cfg, run_dir, start_step, rank, mode, f"deepspeed {mode}", model,
                             data.corpus, world, device,
                             config={**cfg.to_dict(), "deepspeed": ds_config})

    stop = cfg.train.stop_after or cfg.train.steps
    loss_stats = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for step in range(start_step, stop):
            lr = lr_at(cfg, step)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            begin = time.perf_counter()
            for micro in range(accumulation):
                inputs, targets = data.train_batch(step * accumulation + micro)
                _, loss = engine(inputs, targets)
                engine.backward(loss)
                engine.step()
                loss_stats[0] += loss.detach().double()
                loss_stats[1] += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            extra["wall_seconds"] += time.perf_counter() - begin

            metrics: dict[str, Any] = {}
            if state is not None and state.stats.get("recall") is not None:
                extra["recalls"].append(float(state.stats["recall"]))
            done = step + 1
            if done % cfg.logging.log_every == 0 or done == stop:
                dist.all_reduce(loss_stats)
                mean_loss = float(loss_stats[0] / loss_stats[1])
                loss_stats.zero_()
                extra["train_curve"].append((done, mean_loss))
                metrics.update({"train/loss": mean_loss, "train/lr": lr,
                                "train/wall_seconds": extra["wall_seconds"]})
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None:
                    metrics["train/grad_norm"] = float(grad_norm)
                if state is not None:
                    # Last exchange's stats and the compressor's run totals (distk/total_*),
                    # which the checkpoint carries across a resume.
                    metrics.update(state.metrics())
            if (cfg.train.eval_every and done % cfg.train.eval_every == 0) or \
                    done == cfg.train.steps:
                val_loss = evaluate(engine.module, val_batches)
                extra["val_curve"].append((done, val_loss))
                metrics["val/loss"] = val_loss
            if metrics:
                logger.log(metrics, step=done)
            logger.advance()
            every = cfg.train.checkpoint_every
            if (every and done % every == 0) or done == cfg.train.stop_after:
                # Unlogged loss of a partial interval is dropped on resume (a logging detail).
                engine.save_checkpoint(str(ckpt), client_state={"step": done, "extra": extra})
    finally:
        logger.close()

    totals = state.compressor.totals if state is not None else {}
    result = RunResult(
        mode=f"deepspeed-{mode}",
        steps=stop,
        final_train_loss=extra["train_curve"][-1][1] if extra["train_curve"] else float("nan"),
        final_val_loss=extra["val_curve"][-1][1] if extra["val_curve"] else float("nan"),
        wall_seconds=extra["wall_seconds"],
        selection_seconds=float(totals.get("selection_seconds", 0.0)),
        comm_seconds=float(totals.get("comm_seconds", 0.0)),
        bytes_sent=int(totals.get("bytes_sent", 0)),
        dense_bytes=int(totals.get("dense_bytes", 0)),
        mean_recall=(sum(extra["recalls"]) / len(extra["recalls"]) if extra["recalls"]
                     else None),
        train_curve=[tuple(p) for p in extra["train_curve"]],
        val_curve=[tuple(p) for p in extra["val_curve"]],
        completed=stop == cfg.train.steps,
    )
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(format_result(result), flush=True)
    dist.barrier()
    if created_group:
        dist.destroy_process_group()
    return result
