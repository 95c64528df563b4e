"""The Triton kernel, held to the reference.

On this CPU-only machine it runs under ``TRITON_INTERPRET=1`` in a child interpreter
(the variable must be set before Triton is imported); on a CUDA machine the ``gpu`` test
runs the compiled kernel and checks that CUDA tensors pick it automatically.

By default the interpreter runs ``triton_parity.py --quick``: every launch path with
every dtype, segmented streams, an overflowing candidate list and the dispatcher (about
half the interpreter time). ``--runslow`` adds the full script (see its docstring for
what ``--quick`` leaves out); the ``gpu`` test always runs the full script.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("triton_parity.py")

pytest.importorskip("triton", reason="the triton extra is not installed")


def _run(env_extra: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, env=env, timeout=600)


@pytest.mark.triton
def test_triton_kernel_matches_reference_under_interpreter():
    result = _run({"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}, "--quick")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("OK")


@pytest.mark.triton
@pytest.mark.slow
def test_triton_kernel_matches_reference_under_interpreter_every_case():
    result = _run({"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("OK") and "quick" not in result.stdout


@pytest.mark.gpu
def test_triton_kernel_on_cuda_matches_reference():
    result = _run({}, "cuda")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.gpu
def test_cuda_tensors_select_the_triton_backend(monkeypatch):
    import distk.selection.triton_kernel as triton_kernel

    calls = []
    original = triton_kernel.bucket_candidates_triton

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(triton_kernel, "bucket_candidates_triton", counting)
    import distk

    distk.topk(torch.randn(4, 4096, device="cuda"), 64, buckets=64, k_per_bucket=2)
    assert calls, "a CUDA tensor did not go through the Triton kernel"
