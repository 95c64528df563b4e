"""PyTorch's DDP hooks as distk-train baselines (``train.comm_hook``, distk.train.peer_hooks):
config errors, the PowerSGD byte count against PowerSGD's own counter, and real 2-rank
runs (gloo) through the training loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from distributed import run_distributed

from distk.train.config import load_config
from distk.train.peer_hooks import powersgd_bucket_entries, powersgd_start_iter

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.json"


@pytest.mark.parametrize("overrides, message", [
    (["train.comm_hook=fp16"], 'train.comm_hook=\'fp16\' is invalid: allowed "distk", "bf16"'),
    (["train.comm_hook=bf16", "sparsity.method=bucketed"], "sparsity.method='bucketed'"),
    (["train.comm_hook=powersgd", "train.checkpoint_every=5"], "when checkpointing"),
    (["train.powersgd_rank=0"], "train.powersgd_rank=0 is invalid"),
])
def test_comm_hook_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError) as err:
        load_config(TINY, overrides)
    assert message in str(err.value)


def test_powersgd_start_iter_follows_pytorch_advice() -> None:
    assert powersgd_start_iter(300, 20) == 30        # 10% of the steps
    assert powersgd_start_iter(100, 20) == 20        # no less than the warm-up
    assert powersgd_start_iter(5, 0) == 2            # DDP's minimum with error feedback


def test_powersgd_entries_by_shape() -> None:
    # 64x256 at rank 4: (64 + 256) * 4 * 2 < 16384 -> P 64x4, Q 256x4; a bias stays dense;
    # 4x4 at rank 4 does not pay off (r = 4: 32 * 2 > 16) -> dense.
    shapes = [torch.Size([64, 256]), torch.Size([256]), torch.Size([4, 4])]
    assert powersgd_bucket_entries(shapes, 4, 2) == (256 + 16, 64 * 4, 256 * 4)


def _run_worker(rank: int, world: int, root: str, hook: str) -> dict:
    from distk.train.loop import train

    overrides = [f"run_root={json.dumps(root)}", "sparsity.method=dense",
                 f"train.comm_hook={hook}", "train.steps=8", "train.eval_every=4",
                 "train.powersgd_rank=2", "train.lr_warmup_steps=2"]
    cfg = load_config(TINY, overrides)
    result = train(cfg, Path(root) / hook)
    return result.to_dict()


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("hook", ["bf16", "powersgd"])
def test_peer_hook_runs_through_the_loop(tmp_path: Path, hook: str) -> None:
    """8 steps on 2 ranks: finite losses, the mode name, and bytes from the tensor sizes
    (bf16: exactly half of fp32 on every step; PowerSGD: fp32 until start_powerSGD_iter,
    then fewer bytes, matching PowerSGD's own count of entries)."""
    results = run_distributed(_run_worker, 2, str(tmp_path), hook, timeout=200)
    res = results[0]
    assert res["mode"] == ("bf16" if hook == "bf16" else "powersgd_r2")
    assert math.isfinite(res["final_val_loss"]) and len(res["val_curve"]) == 2
    records = [json.loads(line) for line in (tmp_path / hook / "metrics.jsonl").open()]
    per_step = [(r["distk/bytes_sent"], r["distk/dense_bytes"]) for r in records]
    assert len(per_step) == 8 and all(d > 0 for _, d in per_step)
    if hook == "bf16":
        assert all(2 * b == d for b, d in per_step)
    else:
        start = powersgd_start_iter(8, 2)
        assert all(b == d for b, d in per_step[:start])          # vanilla all-reduce
        assert all(0 < b < d / 2 for b, d in per_step[start:])   # P and Q only
    assert res["comm_seconds"] > 0 and 0 < res["bytes_sent"] < res["dense_bytes"]


def _count_worker(rank: int, world: int) -> tuple[int, int]:
    """PowerSGD's own count of entries after compression vs ours, over 4 steps."""
    from torch.nn.parallel import DistributedDataParallel

    from distk.train.peer_hooks import enable_peer_hook

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 8))
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.005)   # several buckets
    state = enable_peer_hook(ddp, "powersgd", rank=3, start_iter=2)
    ours = 0
    for step in range(4):
        ddp(torch.randn(16, 48)).square().sum().backward()
        state.end_step()
        if step >= 2:
            ours += state.stats.sent
    return ours, state.hook_state.total_numel_after_compression


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_powersgd_entries_match_pytorchs_counter() -> None:
    for ours, theirs in run_distributed(_count_worker, 2, timeout=100):
        assert ours == theirs and ours > 0
