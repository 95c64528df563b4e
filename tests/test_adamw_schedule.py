"""AdamW's sparse schedule (docs/train.md, "Sparse training with AdamW").

Sparse modes under AdamW get at least ``train.adamw_dense_steps`` dense steps and a
``train.adamw_warmup_steps`` density warm-up; SGD and the dense mode are untouched. The
distributed test trains through the real DDP hook on 2 gloo processes and reads the
density each step actually exchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from distributed import run_distributed

from distk.train.config import load_config
from distk.train.placement import adamw_block_schedule, adamw_schedule

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.json"
ADAMW = ["train.optimizer=adamw", "train.lr=0.003", "train.weight_decay=0.1"]


def test_adamw_sparse_modes_get_the_schedule_and_nothing_else_does():
    for mode in ("exact", "bucketed"):
        cfg = load_config(None, [*ADAMW, f"sparsity.method={mode}"])
        scheduled = adamw_schedule(cfg)
        assert (scheduled.sparsity.dense_steps, scheduled.sparsity.warmup_steps) == (50, 150)
        # Only those two fields change; the optimizer stays AdamW.
        assert scheduled.sparsity.replace(dense_steps=cfg.sparsity.dense_steps,
                                          warmup_steps=cfg.sparsity.warmup_steps) == cfg.sparsity
        assert scheduled.train == cfg.train
    # Larger user values are kept; 0 turns the rule off.
    cfg = load_config(None, [*ADAMW, "sparsity.dense_steps=60", "sparsity.warmup_steps=160"])
    assert (adamw_schedule(cfg).sparsity.dense_steps,
            adamw_schedule(cfg).sparsity.warmup_steps) == (60, 160)
    for overrides in ([*ADAMW, "sparsity.method=dense"],
                      [*ADAMW, "train.adamw_dense_steps=0", "train.adamw_warmup_steps=0"],
                      ["sparsity.method=bucketed"]):            # SGD: the default config
        cfg = load_config(None, overrides)
        assert adamw_schedule(cfg).sparsity.dense_steps == cfg.sparsity.dense_steps
        assert adamw_schedule(cfg).sparsity.warmup_steps == cfg.sparsity.warmup_steps


def test_deepspeed_block_gets_the_schedule():
    from distk.config import SparsityConfig

    cfg = load_config(None, ADAMW)
    block = adamw_block_schedule(cfg, SparsityConfig(density=0.01))
    assert (block.dense_steps, block.warmup_steps) == (50, 150)
    assert adamw_block_schedule(cfg, None) is None
    sgd = load_config(None, [])
    assert adamw_block_schedule(sgd, SparsityConfig()) == SparsityConfig()


@pytest.mark.parametrize("key", ["train.adamw_dense_steps", "train.adamw_warmup_steps"])
def test_bad_values_name_key_value_and_allowed(key):
    with pytest.raises(ValueError, match=rf"{key}=-1 is invalid: allowed an int >= 0"):
        load_config(None, [f"{key}=-1"])


def _train_worker(rank: int, world: int, root: str, optimizer: str) -> None:
    from distk.train.loop import train

    overrides = [f"run_root={json.dumps(root)}", "train.steps=9", "logging.log_every=1",
                 "sparsity.method=bucketed", "train.adamw_dense_steps=3",
                 "train.adamw_warmup_steps=4", f"train.optimizer={optimizer}"]
    train(load_config(TINY, overrides), Path(root) / optimizer)


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_adamw_run_exchanges_dense_then_warms_up_through_the_ddp_hook(tmp_path: Path):
    run_distributed(_train_worker, 2, str(tmp_path), "adamw", timeout=200)
    run_distributed(_train_worker, 2, str(tmp_path), "sgd", timeout=200)
    density = {}
    for optimizer in ("adamw", "sgd"):
        rows = [json.loads(line) for line in (tmp_path / optimizer / "metrics.jsonl").open()]
        density[optimizer] = [r["distk/density"] for r in rows if "distk/density" in r]
    tiny = load_config(TINY, [])
    target, start = tiny.sparsity.density, tiny.sparsity.warmup_density
    # AdamW: 3 dense steps, then the density decays from warmup_density over 4 steps.
    adamw = density["adamw"]
    assert adamw[:3] == [1.0, 1.0, 1.0]
    expected = [start * (target / start) ** (t / 4) for t in range(4)] + [target, target]
    for got, want in zip(adamw[3:], expected, strict=True):
        assert math.isclose(got, want, rel_tol=0.15), (adamw, expected)
    # SGD (tiny.json's own schedule: warmup_steps 0): only DDP's bucket-rebuild step is
    # dense, then the target density straight away.
    sgd = density["sgd"]
    assert sgd[0] == 1.0 and all(math.isclose(d, target, rel_tol=0.15) for d in sgd[1:]), sgd
