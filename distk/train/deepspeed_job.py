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

The optimizer is the DDP job's (``build_optimizer``: SGD by default, or AdamW) with its
schedule (``lr_at``), passed to DeepSpeed as a client optimizer, so a JSON
``"optimizer"`` block is refused; ``train.momentum_correction`` moves SGD momentum into
the ``"distk"`` block's compressor exactly as in the DDP job (``momentum_placement``).
As in the DDP job, a sparse ``"distk"`` block under AdamW gets at least
``train.adamw_dense_steps`` dense steps and a ``train.adamw_warmup_steps`` density
warm-up (``distk.train.placement.adamw_block_schedule``).
Without a ``"distk"`` block the run is plain DeepSpeed (no compression, no distk stats).

The loop is the DDP job's (:func:`distk.train.loop.run_loop`) over a
:class:`DeepSpeedBackend`, so ``--resume`` and ``--compare`` (each mode replaces the
block's ``method``) work the same way.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distk.config import SparsityConfig
from distk.integrations.deepspeed import get_state, initialize, split_config
from distk.train.config import TrainConfig
from distk.train.data import ByteCorpus, build_corpus, build_data
from distk.train.loop import (
    RunResult,
    RunState,
    StepBackend,
    StepOutput,
    build_optimizer,
    format_result,
    momentum_placement,
    run_loop,
    setup_distributed,
)
from distk.train.model import build_model
from distk.train.placement import adamw_block_schedule

__all__ = ["DeepSpeedBackend", "checkpoint_root", "deepspeed_config_for", "run"]


def checkpoint_root(run_dir: Path) -> Path:
    """Where the DeepSpeed job's checkpoints live (``engine.save_checkpoint`` folder)."""
    return Path(run_dir) / "ds_checkpoint"


def deepspeed_config_for(cfg: TrainConfig, ds_config: str | dict[str, Any],
                         method: str | None = None) -> tuple[dict[str, Any], str]:
    """The DeepSpeed config dict the job passes on, and the run's mode name.

    Fills the keys listed in the module docstring from ``cfg``; the ``"distk"`` block is
    validated here (a bad block raises ``ValueError`` before any process-group work) and
    kept for :func:`distk.deepspeed.initialize`; ``method`` (``--compare``) replaces its
    ``method``. The mode is ``zero<stage>-<method>`` (``zero<stage>-deepspeed`` without a
    block).

    Raises:
        ValueError: a bad ``"distk"`` block, an ``"optimizer"`` block (the job passes
            its own optimizer), or ``method`` without a ``"distk"`` block.
    """
    stripped, sparsity = split_config(ds_config)
    sparsity = adamw_block_schedule(cfg, sparsity)  # AdamW: dense start, longer warm-up
    config = dict(stripped)
    if "optimizer" in config:
        raise ValueError(
            'the DeepSpeed config for distk-train must not have an "optimizer" block: the '
            "job passes the DDP job's optimizer (train.optimizer, train.lr, train.beta1/"
            "beta2, train.weight_decay) so that runs are comparable; remove the block"
        )
    if method is not None:
        if sparsity is None:
            raise ValueError(f'comparing modes through DeepSpeed needs a "distk" block in '
                             f"the DeepSpeed config (got none; mode {method!r})")
        sparsity = sparsity.replace(method=method)
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


class DeepSpeedBackend(StepBackend):
    """A DeepSpeed engine (built by :func:`distk.deepspeed.initialize`) as the loop's step:
    ``gradient_accumulation_steps`` micro-batches per optimizer step, checkpoints through
    ``engine.save_checkpoint`` (distk's residuals included)."""

    def __init__(self, cfg: TrainConfig, ds_config: dict[str, Any], mode: str, run_dir: Path,
                 data: Any, device: torch.device) -> None:
        self.data = data
        self.rank = dist.get_rank()
        model = build_model(cfg, device)
        self.engine, _, _, _ = initialize(model=model, optimizer=build_optimizer(model, cfg),
                                          config=ds_config)
        self.module = self.engine.module
        self.state = get_state(self.engine)
        self.accumulation = int(ds_config["gradient_accumulation_steps"])
        self.mode = f"deepspeed-{mode}"
        self.label = f"deepspeed {mode}"
        self.log_config = {**cfg.to_dict(), "deepspeed": ds_config}
        self.checkpoints = checkpoint_root(run_dir)

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def train_step(self, step: int, want_magnitudes: bool) -> StepOutput:
        del want_magnitudes  # ZeRO partitions the update: no whole-update histogram
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.engine.device)
        for micro in range(self.accumulation):
            inputs, targets = self.data.train_batch(step * self.accumulation + micro)
            _, loss = self.engine(inputs, targets)
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += loss.detach().double()
        norm = self.engine.get_global_grad_norm()
        return StepOutput(loss_sum, self.accumulation, None if norm is None else float(norm))

    def fresh_start(self) -> None:
        if self.rank == 0:
            shutil.rmtree(self.checkpoints, ignore_errors=True)
        dist.barrier()

    def save(self, step: int, run: RunState) -> None:
        self.engine.save_checkpoint(str(self.checkpoints),
                                    client_state={"step": step, "run": run.to_dict()})

    def load(self) -> tuple[int, RunState] | None:
        load_path, client_state = self.engine.load_checkpoint(str(self.checkpoints))
        if load_path is None:
            return None
        return int(client_state["step"]), RunState.from_dict(client_state["run"])


def run(cfg: TrainConfig, ds_config_path: str | Path, *, resume: bool = False,
        method: str | None = None, run_dir: Path | None = None,
        corpus: ByteCorpus | None = None, wandb_group: str | None = None) -> RunResult:
    """Train ``cfg`` through DeepSpeed configured by ``ds_config_path``; every rank calls it.

    Writes ``metrics.jsonl`` and ``result.json`` (rank 0) under ``run_dir`` (default
    ``<run_root>/<name>/<json file stem>/``) and, when ``train.checkpoint_every`` or
    ``train.stop_after`` asks, DeepSpeed checkpoints (with distk's residuals) under its
    ``ds_checkpoint/``. With ``resume``, continues from the latest checkpoint there.
    ``method`` replaces the ``"distk"`` block's method (``--compare``).

    Returns:
        The :class:`~distk.train.loop.RunResult` (identical on every rank).
    """
    if cfg.train.comm_hook != "distk":
        raise ValueError(f"train.comm_hook={cfg.train.comm_hook!r} is invalid with --deepspeed: "
                         "allowed 'distk' (PyTorch's DDP hooks apply to the DDP job only)")
    created_group = not dist.is_initialized()
    ds_config, mode = deepspeed_config_for(cfg, str(ds_config_path), method)
    if "distk" in ds_config:
        # The DDP job's rule for where SGD momentum lives, applied to the block.
        placed = momentum_placement(replace(cfg, sparsity=SparsityConfig.from_dict(
            ds_config["distk"])))
        ds_config["distk"] = placed.sparsity.to_dict()
        cfg = replace(cfg, train=placed.train)
    rank, world, device = setup_distributed(cfg)
    micro_batch = int(ds_config.get("train_micro_batch_size_per_gpu", cfg.train.batch_size))
    if micro_batch != cfg.train.batch_size:
        cfg = replace(cfg, train=replace(cfg.train, batch_size=micro_batch))
    run_dir = Path(run_dir) if run_dir is not None else cfg.run_dir / Path(ds_config_path).stem

    data = build_data(cfg, rank, world, device, corpus=corpus if corpus else build_corpus(cfg))
    backend = DeepSpeedBackend(cfg, ds_config, mode, run_dir, data, device)
    result = run_loop(cfg, run_dir, backend, data, resume=resume, wandb_group=wandb_group)
    if rank == 0:
        print(format_result(result), flush=True)
    dist.barrier()
    if created_group:
        dist.destroy_process_group()
    return result
