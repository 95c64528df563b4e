"""Recall of the compressor's selection on real gradients (docs/selection.md, "Recall on
real gradients").

The recall model assumes the top entries land in buckets at random. Real training breaks
that two ways: error feedback keeps a bucket's unsent backlog in that bucket, step after
step (only a closed loop of steps shows it, hence the short training runs below), and
weight matrices repeat with power-of-two row strides. The fixture holds the vectors that
selection saw in the main job (``benchmarks/record_gradients.py``).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from script_module import load_script
from torch import nn

import distk
from distk.compressor import GradientCompressor
from distk.config import SparsityConfig
from distk.selection.recall import packed_bucket_counts

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "bytegpt_acc.pt"
TOLERANCE = 0.01


def _load_fixture() -> dict:
    module = load_script(ROOT / "benchmarks" / "record_gradients.py", "record_gradients")
    return module.load_fixture(FIXTURE)


@pytest.mark.parametrize("target", [0.95, 0.99])
def test_recall_on_recorded_bytegpt_vectors(target):
    """Each recorded vector, selected with the plan the compressor picks for its step."""
    fixture = _load_fixture()
    sparsity = {**fixture["config"]["sparsity"], "recall_target": target}
    for record in fixture["records"]:
        acc, step = record["acc"], record["step"]
        cfg = SparsityConfig.from_dict({**sparsity, "recall_interval": 1, "mask": "local"})
        # One process: the exchange returns what was selected; recall is measured against
        # exact top-k of the same accumulator, with the plan the compressor picks at `step`.
        work = GradientCompressor(cfg).launch(acc.clone(), "acc", step=step)
        work.wait()
        plan = work.plan.selection
        if target == 0.95:  # the plan the main job ran at this step
            assert (plan.buckets, plan.k_per_bucket) == (record["buckets"],
                                                         record["k_per_bucket"])
        recall = work.stats.recall
        assert recall >= target - TOLERANCE, (record["step"], plan, recall)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(128, 384), nn.GELU(), nn.Linear(384, 256), nn.GELU(),
                         nn.Linear(256, 16))


def _conv() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(64, 160, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(160, 16))


def _transformer() -> nn.Module:
    # A GPT-2-shaped block (pre-norm, 4x MLP) on 96-wide embeddings of 8 tokens.
    return nn.Sequential(
        nn.TransformerEncoderLayer(96, 4, 4 * 96, dropout=0.0, batch_first=True,
                                   norm_first=True, activation="gelu"),
        nn.Flatten(), nn.Linear(8 * 96, 16))


MODELS = {"mlp": (_mlp, (128,)), "conv": (_conv, (3, 8, 8)), "transformer":
          (_transformer, (8, 96))}


def _closed_loop_recall(model_name: str, target: float, steps: int = 32) -> tuple[float, int]:
    """Train ``model_name`` to fit random labels of 64 random inputs with the compressor
    in the loop (error feedback, DGC momentum 0.9, density 1%, one rank); mean recall measured by
    the compressor over the steps after the backlog has had time to form."""
    torch.manual_seed(0)
    build, shape = MODELS[model_name]
    model = build()
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    inputs = torch.randn(64, *shape)
    labels = torch.randint(0, 16, (64,))
    compressor = GradientCompressor(distk.SparsityConfig(
        density=0.01, momentum=0.9, recall_target=target, warmup_steps=0,
        recall_interval=1, stats_interval=1000))
    recalls = []
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        batch = torch.randint(0, 64, (16,))
        nn.functional.cross_entropy(model(inputs[batch]), labels[batch]).backward()
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        update = compressor.step(flat, "model", step=step)
        with torch.no_grad():
            offset = 0
            for p in params:
                p -= 0.05 * update[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
        if step >= steps // 3:
            recalls.append(compressor.last.recall)
    return sum(recalls) / len(recalls), numel


@pytest.mark.parametrize("target", [0.95, 0.99])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_closed_loop_recall_on_other_models(model_name, target):
    # At 0.99 the plan has a second stage: buckets keep more candidates than they send, so
    # no backlog forms (measured: the same recall with one fixed bucket count); fewer steps.
    recall, numel = _closed_loop_recall(model_name, target, 32 if target < 0.99 else 16)
    assert numel > 100_000  # enough buckets for the partition to matter
    assert recall >= target - TOLERANCE, (model_name, target, recall)


def test_packed_bucket_counts_are_coprime_free_of_2_and_3_and_meet_the_quota():
    assert packed_bucket_counts(8425, 64, 1024) == (131, 127)
    for k in (655, 8425, 40000, 671089):
        first, second = packed_bucket_counts(k, 64, 1024)
        assert math.gcd(first * second, 6) == 1 and math.gcd(first, second) == 1
        # numbers 6j +- 1: the largest lies within 3 of any bound, the next within 4 of it
        assert k // 64 - 3 <= first <= k // 64 and first - 4 <= second < first
        assert math.ceil(k / second) >= math.ceil(k / first) >= 64
    # exact: counts divide k; a pair exists for 8400 = 2^4 * 3 * 5^2 * 7 ...
    first, second = packed_bucket_counts(8400, 64, 256, exact=True)
    assert 8400 % first == 0 and 8400 % second == 0 and math.gcd(first, second) == 1
    assert 64 <= 8400 // second <= 256 and 64 <= 8400 // first <= 256
    # ... none for a power of two (every divisor in range is even): one count.
    assert packed_bucket_counts(8192, 64, 256, exact=True) == (128,)
    assert packed_bucket_counts(100, 64, 1024) == (1,)
    assert packed_bucket_counts(63, 64, 1024) == ()
