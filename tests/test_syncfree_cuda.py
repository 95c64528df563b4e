"""A compressor step with no host synchronisation, on CUDA (skipped without a GPU).

One DDP bucket (25 MB of fp32) through ``GradientCompressor.step`` on one process, at a
plain step (no stats or recall diagnostics, which synchronise by design) and with the
default kernels (``DISTK_TRITON_KERNEL=auto``: ``select_packed`` for the packed plan):

* with ``nonfinite="zero"`` it runs under ``torch.cuda.set_sync_debug_mode("error")``
  and can be captured in a CUDA graph, whose replay gives the eager step's update;
* with the default ``nonfinite="raise"`` the one sync left is the non-finite check;
  with ``defer_checks=True`` (what the integrations set) it stays on the device until
  ``raise_deferred``, once per step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import distk
from distk.compressor import NonFiniteGradientError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gpu_check import count_syncs, plain_steps  # noqa: E402  (as gpu_check.py measures)

pytestmark = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)

NUMEL = 25_000_000 // 4
"""One DDP bucket (DDP's default ``bucket_cap_mb``) of fp32."""


def test_step_has_no_host_sync_and_is_captured_in_a_cuda_graph(monkeypatch):
    monkeypatch.delenv("DISTK_TRITON_KERNEL", raising=False)
    cfg = distk.SparsityConfig(density=0.01, nonfinite="zero")
    gen = torch.Generator(device="cuda").manual_seed(0)
    grads = [torch.randn(NUMEL, device="cuda", generator=gen) for _ in range(3)]
    compressor = distk.GradientCompressor(cfg)
    steps = plain_steps(cfg)
    for grad in grads[:2]:  # warm-up: plans, kernels, residual, verified layout
        compressor.step(grad, "bucket", step=next(steps))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        update = compressor.step(grads[2], "bucket", step=next(steps))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    sent = int((update != 0).sum())
    assert 0 < sent <= 2 * cfg.k_at(NUMEL, 10)

    # The same step captured: its replay gives what the eager step gives from the same
    # state (the floor state may differ; the selection does not depend on it).
    eager = distk.GradientCompressor(cfg)
    eager.load_state_dict(compressor.state_dict())
    step = next(steps)
    static_grad = grads[0].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_update = compressor.step(static_grad, "bucket", step=step)
    graph.replay()
    want = eager.step(grads[0], "bucket", step=step)
    torch.cuda.synchronize()
    assert torch.equal(static_update, want)
    assert torch.equal(compressor.residual("bucket"), eager.residual("bucket"))


def test_default_step_syncs_only_for_the_nonfinite_check(monkeypatch):
    monkeypatch.delenv("DISTK_TRITON_KERNEL", raising=False)
    cfg = distk.SparsityConfig(density=0.01)
    assert cfg.nonfinite == "raise"
    grads = [torch.randn(NUMEL, device="cuda") for _ in range(3)]
    compressor = distk.GradientCompressor(cfg)
    steps = plain_steps(cfg)
    for grad in grads[:2]:
        compressor.step(grad, "bucket", step=next(steps))
    assert count_syncs(lambda: compressor.step(grads[2], "bucket", step=next(steps))) == 1


def test_deferred_check_leaves_the_step_without_sync(monkeypatch):
    # defer_checks (what the integrations set): the non-finite check of the default
    # nonfinite="raise" stays on the device until raise_deferred, once per step.
    monkeypatch.delenv("DISTK_TRITON_KERNEL", raising=False)
    cfg = distk.SparsityConfig(density=0.01)
    grads = [torch.randn(NUMEL, device="cuda") for _ in range(3)]
    compressor = distk.GradientCompressor(cfg, defer_checks=True)
    steps = plain_steps(cfg)
    for grad in grads[:2]:
        compressor.step(grad, "bucket", step=next(steps))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        update = compressor.launch(grads[2], "bucket", step=next(steps)).wait()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(update).all()
    compressor.raise_deferred()  # finite: nothing raised
    bad = grads[0].clone()
    bad[17] = float("nan")
    assert (compressor.launch(bad, "bucket", step=next(steps)).wait() == 0).all()
    with pytest.raises(NonFiniteGradientError, match=r"on rank\(s\) \[0\]"):
        compressor.raise_deferred()


def test_graphed_selection_equals_the_eager_steps(monkeypatch):
    # DISTK_CUDA_GRAPHS=1: the packed selection replayed from a CUDA graph, re-recorded
    # when the gradient's buffer moves, gives the eager compressor's updates bitwise.
    monkeypatch.delenv("DISTK_TRITON_KERNEL", raising=False)
    cfg = distk.SparsityConfig(density=0.01)
    gen = torch.Generator(device="cuda").manual_seed(1)
    buffers = [torch.empty(NUMEL, device="cuda") for _ in range(2)]
    grads = [torch.randn(NUMEL, device="cuda", generator=gen) for _ in range(6)]
    updates = {}
    for graphs in ("0", "1"):
        monkeypatch.setenv("DISTK_CUDA_GRAPHS", graphs)
        compressor = distk.GradientCompressor(cfg)
        steps = plain_steps(cfg)
        out = []
        for i, grad in enumerate(grads):
            buffer = buffers[i // 4]  # the same buffer for 4 steps, then another one
            buffer.copy_(grad)
            out.append(compressor.step(buffer, "bucket", step=next(steps)).clone())
        updates[graphs] = out
        if graphs == "1":
            # Recorded at the first step (a fresh accumulator, nothing to fuse), at the
            # second (the residual, with the buffer fused in) and when the buffer moved;
            # replayed at the other three.
            assert compressor._selectors["bucket"].captures == 3
    for eager, graphed in zip(updates["0"], updates["1"], strict=True):
        assert torch.equal(eager, graphed)
