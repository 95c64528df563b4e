"""``distk-train`` in outer-synchronisation mode (``sparsity.sync_every > 1``), on real
2-rank gloo groups with configs/tiny.json (30 steps, seconds per run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from distributed import run_distributed

from distk.config import ADAMW_OUTER, SparsityConfig
from distk.train.config import load_config
from distk.train.loop import mode_config, momentum_placement
from distk.train.outer_mode import outer_schedule
from distk.train.placement import adamw_schedule

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.json"


def test_mode_configs() -> None:
    cfg = load_config(TINY, ["sparsity.sync_every=30", "sparsity.warmup_steps=50",
                             "sparsity.dense_steps=1"])
    assert mode_config(cfg, "bucketed").sparsity.sync_every == 1  # per-step modes stay so
    assert mode_config(cfg, "outer").sparsity.sync_every == 30
    # A per-step config compares against the setting that matched dense AdamW: SparseLoCo's
    # recipe every 5 steps, 50 dense bf16 steps (10 syncs) first, each rank's share by the
    # number of ranks, without the per-step AdamW schedule; the config's stats, recall and
    # non-finite options kept.
    tiny = load_config(TINY, ["sparsity.stats_interval=3", "sparsity.nonfinite=skip"])
    outer = mode_config(tiny, "outer")
    assert outer.sparsity == SparsityConfig.sparseloco(
        sync_every=5, dense_steps=50, value_dtype="bfloat16", density="auto", stats_interval=3,
        recall_interval=tiny.sparsity.recall_interval, nonfinite="skip")
    assert (outer.train.adamw_dense_steps, outer.train.adamw_warmup_steps) == (0, 0)
    assert ADAMW_OUTER["dense_steps"] * ADAMW_OUTER["sync_every"] == 50
    scheduled = outer_schedule(adamw_schedule(outer)).sparsity
    assert (scheduled.sync_every, scheduled.dense_steps, scheduled.warmup_steps,
            scheduled.value_dtype, scheduled.value_bits) == (5, 10, 0, "bfloat16", 2)
    # Step-counted schedules become sync counts: 50 steps = 2 syncs of 30, 1 step = 1 sync.
    converted = outer_schedule(cfg).sparsity
    assert (converted.warmup_steps, converted.dense_steps) == (2, 1)
    sgd = load_config(TINY, ["sparsity.sync_every=4", "train.optimizer=sgd"])
    assert momentum_placement(sgd) == sgd  # momentum stays in the inner optimizer


def _resume_worker(rank: int, world_size: int, root: str) -> None:
    from distk.train.loop import train

    common = [f"run_root={json.dumps(root)}", "sparsity.sync_every=4", "sparsity.value_bits=2",
              "train.steps=16", "train.eval_every=8", "sparsity.stats_interval=1"]
    full = train(load_config(TINY, common), Path(root) / "full")
    # Stop between syncs (inner step 7 of 4-step intervals): anchors and residuals matter.
    partial = train(load_config(TINY, [*common, "train.stop_after=7"]), Path(root) / "resumed")
    assert not partial.completed and partial.mode == "outer"
    resumed = train(load_config(TINY, common), Path(root) / "resumed", resume=True)
    assert resumed.val_curve == full.val_curve, (resumed.val_curve, full.val_curve)


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_outer_mode_resumes_bitwise(tmp_path: Path) -> None:
    run_distributed(_resume_worker, 2, str(tmp_path), timeout=200)
    full = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").open()]
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").open()]
    losses = [(r["step"], r["train/loss"], r.get("val/loss")) for r in full]
    assert [(r["step"], r["train/loss"], r.get("val/loss")) for r in resumed] == losses
    synced = [r for r in full if r["step"] % 4 == 0]
    assert all(r["distk/residual_norm"] > 0 for r in synced)  # residuals were in play
    assert not any("distk/bytes_sent" in r for r in full if r["step"] % 4)  # no sync: no bytes


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_compare_with_an_outer_mode(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_MODE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "distk.train", "--config", str(TINY), "--compare",
           "--modes", "dense,outer", "--set", "sparsity.value_bits=2",
           "--set", "sparsity.sync_every=8",
           "--set", f"run_root={json.dumps(str(tmp_path))}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=280)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    results = json.loads((tmp_path / "tiny" / "compare.json").read_text())["results"]
    assert list(results) == ["dense", "outer"] and results["outer"]["mode"] == "outer"
    outer, dense = results["outer"], results["dense"]
    assert outer["final_train_loss"] < outer["train_curve"][0][1] - 1.0  # it trains
    # 3 syncs of 30 steps at 5% density and ~15 bits per entry, against 30 dense steps.
    assert outer["bytes_sent"] < 0.01 * dense["bytes_sent"]
    assert "outer" in proc.stdout
    assert "runs SparseLoCo's recipe at distk.config.ADAMW_OUTER" not in proc.stdout
    # A per-step config: the outer mode runs ADAMW_OUTER, and says so on rank 0.
    per_step = [*cmd[:cmd.index("--modes")], "--modes", "outer", "--name", "per_step",
                "--set", f"run_root={json.dumps(str(tmp_path))}"]
    proc = subprocess.run(per_step, capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=280)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert proc.stdout.count("runs SparseLoCo's recipe at distk.config.ADAMW_OUTER") == 1
    assert "mode=outer sync_every=5" in proc.stdout


def test_cli_rejects_unknown_modes() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bad = subprocess.run([sys.executable, "-m", "distk.train", "--compare", "--modes",
                          "dense,outr"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "unknown mode(s) ['outr']" in bad.stderr
