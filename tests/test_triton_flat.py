"""The flat Triton kernels (``distk/selection/triton_flat.py``) and the sync-free packed
selection (``distk/selection/syncfree.py``).

Held to the reference by ``tests/triton_flat_parity.py``, run here under
``TRITON_INTERPRET=1`` in a child interpreter (and compiled kernels on CUDA); their
ahead-of-time compile is in ``tests/test_triton_compile.py``. The host-side launch specs,
the CPU path of the sync-free entry point and its argument errors are tested directly.
On CUDA, the sync-free selection runs under ``torch.cuda.set_sync_debug_mode("error")``
and inside a CUDA graph.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="the triton extra is not installed")

import distk  # noqa: E402
from distk.selection import (  # noqa: E402
    flat_kernels_for,
    flat_kernels_selected,
    floor_sample,
    per_bucket_topk,
    triton_kernel_choice,
)
from distk.selection import triton_flat as tf  # noqa: E402
from distk.selection.reference import (  # noqa: E402
    bucket_candidates_reference,
    positions_of,
)
from distk.selection.syncfree import new_floor_state, select_packed  # noqa: E402

SCRIPT = Path(__file__).with_name("triton_flat_parity.py")


def _run(env_extra: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=900)


@pytest.mark.triton
def test_flat_kernels_match_reference_under_interpreter():
    result = _run({"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("OK"), result.stdout


@pytest.mark.gpu
def test_flat_kernels_on_cuda_match_reference():
    result = _run({}, "cuda")
    assert result.returncode == 0, result.stdout + result.stderr


# --- launch specs (host only) -------------------------------------------------------------


def test_flat_lists_hold_kept_and_buffers_are_static_capacities():
    # Every plan's per-bucket lists hold at least kept keys (the finish kernel writes
    # kept slots from them), and the filter's chunks are whole tiles (aligned loads).
    for n, buckets, kb, k, upper, dtype in itertools.product(
            (1 << 17, (1 << 20) + 3, 1 << 26), (7, 388, 1000, 48517), (1, 3, 65, 200, 1024),
            (None, 1024), (0.001, 0.02), (torch.float32, torch.float16)):
        if buckets * min(kb, -(-n // buckets)) < (k or 0):
            continue
        plan = tf.plan_flat(1, n, buckets, kb, True, True, 132, (64, 16384, 100, upper), k,
                            dtype)
        if plan is None:
            continue
        assert plan.width >= min(kb, -(-n // buckets)), (n, buckets, kb)
        assert plan.width & (plan.width - 1) == 0
        assert plan.row_cap >= upper * n
        filter_ = plan.launches[1]
        chunk, block = dict(filter_.args)["chunk"], dict(filter_.constexprs)["BLOCK"]
        assert chunk % block == 0 and filter_.grid[1] * chunk >= n
    # The case (n = 2^20, k = 1024, b = 1000, k_b = 200) on the flat path.
    plan = tf.plan_flat(1, 1 << 20, 1000, 200, True, True, 132, (64, 16384, 48, 0.0046), 1024)
    assert plan.width >= 200


def test_typical_flat_plans_are_compiled_variants():
    from distk.selection import triton_kernel as tk

    known = {v.variant() for v in tk.all_launch_variants()}
    cases = [  # Graphcore, long row, compressor's 25 MB bucket (packed, fused add)
        (256, 1 << 20, 388, 6, 1024, torch.float16, False),
        (1, 1 << 26, 48517, 3, (1 << 26) // 1000, torch.float32, False),
        (1, 6_250_000, 973, 65, None, torch.float32, True),
    ]
    for rows, n, buckets, kb, k, dtype, has_add in cases:
        kept = min(kb, -(-n // buckets))
        fraction = (2 * k / n) if k else (kept + 6 * math.sqrt(kept) + 4) / (n / buckets)
        sample = floor_sample(n, fraction, "cuda")
        for has_previous in (False, True):
            plan = tf.plan_flat(rows, n, buckets, kb, True, True, 132, tuple(sample), k, dtype,
                                has_add, has_previous)
            assert plan is not None, (rows, n)
            for launch in plan.launches:
                assert launch.variant() in known, launch
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        launch = tf.plan_row(4096, 32768, 64, 99, 2, True, False, dtype)  # activations
        assert launch is not None and launch.variant() in known, launch


def test_row_candidates_leave_k_survivors_under_the_recall_model():
    for n, k, buckets, kept in [(32768, 64, 99, 2), (2000, 64, 100, 2), (8192, 128, 1, 128),
                                (1000, 50, 10, 5)]:
        m = tf.row_candidates(n, k, buckets, kept)
        assert k <= m <= n
        expected = m * distk.expected_recall(n, m, buckets, kept)
        assert m == n or expected >= k


# --- the sync-free packed selection -------------------------------------------------------


def test_select_packed_on_cpu_equals_per_bucket_topk():
    torch.manual_seed(0)
    n = (1 << 18) + 11
    for interleaved in (True, False):
        acc = torch.randn(n)
        add = torch.randn(n)
        want_acc = acc + add
        want = positions_of(per_bucket_topk(want_acc.clone().view(1, -1), 131, 16,
                                            interleaved)).reshape(-1)
        got = select_packed(acc, 131, 16, interleaved, add=add)
        assert torch.equal(acc, want_acc)
        assert torch.equal(got, want)
        assert torch.equal(got.view(131, 16), positions_of(
            bucket_candidates_reference(want_acc.view(1, -1), 131, 16, interleaved))[0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(acc=torch.zeros(2, 8)), r"acc must be a 1-D tensor, got shape \(2, 8\)"),
    (dict(buckets=0), r"buckets must be an integer in \[1, n=64\], got 0"),
    (dict(buckets=65), r"buckets must be an integer in \[1, n=64\], got 65"),
    (dict(k_per_bucket=0), r"k_per_bucket must be an integer >= 1, got 0"),
])
def test_select_packed_names_bad_arguments(kwargs, match):
    args = {"acc": torch.zeros(64), "buckets": 4, "k_per_bucket": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        select_packed(**args)


def test_kernel_switch_refuses_unknown_values(monkeypatch):
    monkeypatch.setenv("DISTK_TRITON_KERNEL", "fast")
    with pytest.raises(ValueError, match=r"DISTK_TRITON_KERNEL must be one of "
                                         r"\('auto', 'default', 'flat'\), got 'fast'"):
        distk.topk(torch.randn(1, 100), 5)


@pytest.mark.parametrize("is_cuda,rows,choice,backend,want", [
    # auto: the flat kernels on single CUDA rows only (the shapes measured faster)
    (True, 1, "auto", "auto", True),
    (True, 256, "auto", "auto", False),
    (False, 1, "auto", "auto", False),
    (False, 1, "auto", "triton", False),  # the interpreter keeps the launch spec
    (True, 1, "auto", "reference", False),
    # flat: wherever the Triton backend runs; default: never
    (True, 256, "flat", "auto", True),
    (False, 4, "flat", "triton", True),
    (False, 1, "flat", "auto", False),
    (True, 1, "default", "auto", False),
    (False, 1, "default", "triton", False),
])
def test_kernel_choice_per_shape(is_cuda, rows, choice, backend, want):
    assert flat_kernels_for(is_cuda, rows, choice, backend) is want


def test_cuda_graph_switch_refuses_unknown_values_and_cpu_selectors_run_eagerly(monkeypatch):
    from distk.selection.syncfree import PackedSelector, cuda_graphs_enabled

    monkeypatch.setenv("DISTK_CUDA_GRAPHS", "yes")
    with pytest.raises(ValueError, match=r"DISTK_CUDA_GRAPHS must be '0' or '1', got 'yes'"):
        cuda_graphs_enabled()
    monkeypatch.setenv("DISTK_CUDA_GRAPHS", "1")
    acc = torch.randn(20_000)
    selector = PackedSelector("cpu")
    got = selector(acc.clone(), 50, 4)
    assert torch.equal(got, select_packed(acc.clone(), 50, 4))
    assert selector.captures == 0  # graphs are CUDA's: the CPU runs eagerly


def test_kernel_choice_reads_the_environment(monkeypatch):
    monkeypatch.delenv("DISTK_TRITON_KERNEL", raising=False)
    assert triton_kernel_choice() == "auto"
    monkeypatch.setenv("DISTK_TRITON_KERNEL", "flat")
    monkeypatch.setenv("DISTK_TOPK_BACKEND", "triton")
    assert flat_kernels_selected(torch.zeros(3, 8))
    monkeypatch.setenv("DISTK_TRITON_KERNEL", "auto")
    assert not flat_kernels_selected(torch.zeros(8))  # a CPU tensor


def test_floor_state_of_the_wrong_shape_is_refused():
    x = torch.randn(2, 20_000)
    sample = (8, 2048, 40, 0.03)
    with pytest.raises(ValueError, match=r"floor_state must be an int32 tensor of shape "
                                         r"\(2,\).*got torch.int64 \(2,\)"):
        tf.flat_candidates(x, 40, 3, floor_state=torch.zeros(2, dtype=torch.int64),
                           sample=sample)


@pytest.mark.gpu
def test_select_packed_on_cuda_needs_no_sync_and_captures_in_a_cuda_graph():
    torch.manual_seed(1)
    n, buckets, kb = 6_250_000, 973, 65  # the compressor's plan for a 25 MB fp32 bucket
    acc = torch.randn(n, device="cuda")
    grad = torch.randn(n, device="cuda")
    state = new_floor_state("cuda")
    want = positions_of(bucket_candidates_reference((acc + grad).view(1, -1), buckets,
                                                    kb)).reshape(-1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = select_packed(acc, buckets, kb, add=grad, floor_state=state)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got, want)
    static_acc = torch.randn(n, device="cuda")
    reference_acc = static_acc.clone()
    select_packed(static_acc.clone(), buckets, kb, floor_state=state)  # warm up (compile)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        positions = select_packed(static_acc, buckets, kb, floor_state=state)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(positions, positions_of(
        bucket_candidates_reference(reference_acc.view(1, -1), buckets, kb)).reshape(-1))


# --- benchmarks/gpu_check.py without a GPU ------------------------------------------------


def _gpu_check():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_check

    return gpu_check


def test_filter_probe_kernels_equal_their_reference_under_the_interpreter():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "filter_probe.py"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 kernels equal the reference on cpu" in result.stdout


def test_gpu_check_dry_run_plans_every_shape_without_a_gpu(capsys):
    gpu_check = _gpu_check()
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for name, *_ in gpu_check.SHAPES:
        assert name in out
    assert "compressor step" in out and "flashinfer top_k" in out


def test_gpu_check_recommends_flat_only_when_equal_and_faster():
    # Synthetic rows (not measurements): the decision rule alone.
    gpu_check = _gpu_check()

    def row(shape, kernel, ms, equal=True):
        return {"shape": shape, "pair": "r=0.99", "kernel": kernel, "ms": ms, "recall": 0.99,
                "equal_to_default": equal}

    rows = [row("a", "default", 1.0), row("a", "flat", 0.5),
            row("b", "default", 1.0), row("b", "flat", 0.97),
            row("c", "default", 1.0), row("c", "flat", 0.5, equal=False)]
    verdict = gpu_check.recommend(rows)
    picks = {key.split(" /")[0]: v["pick"] for key, v in verdict["per_shape"].items()}
    assert picks == {"a": "flat", "b": "default", "c": "default"}
    assert verdict["overall"].startswith("per shape")
    assert gpu_check.recommend(rows[:2])["overall"] == "flat"
    assert verdict["filter"] == "not measured"
    # The flat kernels' first pass: words replaces scan only when equal and faster.
    rows += [row("a", "flat-words", 0.3), row("b", "flat-words", 0.96),
             row("c", "flat-words", 0.1, equal=False)]
    verdict = gpu_check.recommend(rows)
    filters = {key.split(" /")[0]: v["filter_pick"] for key, v in verdict["per_shape"].items()}
    assert filters == {"a": "words", "b": "scan", "c": "scan"}
    assert verdict["filter"].startswith("per shape")
    assert gpu_check.recommend(rows[:2] + rows[6:7])["filter"] == "words"


def test_words_filter_plans_two_first_pass_launches_and_refuses_unknown_kinds(monkeypatch):
    sample = (64, 16384, 100, 0.001)
    scan = tf.plan_flat(1, 1 << 26, 48517, 3, True, True, 132, sample, 67108)
    words = tf.plan_flat(1, 1 << 26, 48517, 3, True, True, 132, sample, 67108,
                         filter_kind="words")
    assert [s.kernel for s in scan.launches][1:3] == ["filter", "scatter"]
    assert [s.kernel for s in words.launches][1:4] == ["filter_words", "expand", "scatter"]
    assert words.launches[1].grid == scan.launches[1].grid
    assert words.row_cap == scan.row_cap and words.launches[3:] == scan.launches[2:]
    known = {v.variant() for v in tf.all_flat_variants()}
    assert all(launch.variant() in known for launch in words.launches)
    with pytest.raises(ValueError, match="filter_kind must be one of"):
        tf.plan_flat(1, 1 << 20, 1000, 3, True, True, 132, sample, None, filter_kind="bits")
    monkeypatch.setenv("DISTK_TRITON_FILTER", "bits")
    from distk.selection import flat_filter_choice

    with pytest.raises(ValueError, match="DISTK_TRITON_FILTER must be one of"):
        flat_filter_choice()
