"""benchmarks/e2e.py: the dilated time-to-quality protocol with PyTorch's hooks beside distk.

The pure parts (the dilated rate, the lr selection rule, time to target, loss at equal
wall time) run everywhere. ``--quick`` runs end to end only as root with iproute2 (it
builds network namespaces), under a timeout and a namespace prefix of its own; it checks
the plumbing (every method present with finite losses and bytes, sparse bytes below
dense), not the speed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_netem import _NETNS_MISSING, _namespaces

ROOT = Path(__file__).resolve().parent.parent
E2E = ROOT / "benchmarks" / "e2e.py"


def _e2e_module():
    sys.path.insert(0, str(E2E.parent))
    spec = importlib.util.spec_from_file_location("e2e_bench", E2E)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dilated_rate_makes_dense_comm_r_times_compute():
    e2e = _e2e_module()
    # 1 MB per rank, compute 0.1 s: R=4 -> the all-reduce must take 0.4 s -> 20 Mbit/s.
    rate, bits = e2e.dilated_rate(1_000_000, 0.1, 4.0)
    assert rate == "20000kbit" and bits == pytest.approx(20e6)
    assert e2e.dilated_rate(1_000_000, 0.1, 16.0)[1] == pytest.approx(5e6)


def test_lr_rule_time_to_target_and_equal_wall():
    e2e = _e2e_module()
    sweep = {1e-3: {"final_val_loss": 2.5}, 2e-3: {"final_val_loss": 2.4},
             4e-3: {"final_val_loss": float("nan")}}
    assert e2e.select_lr(sweep) == 2e-3
    assert e2e.select_lr({0.1: {"final_val_loss": 2.0}, 0.3: {"final_val_loss": 2.0}}) == 0.1
    curve = [[4, 1.0, 3.0], [8, 2.0, 2.5], [12, 3.0, 2.4]]
    assert e2e.time_to_target(curve, 2.5) == (2.0, 8)
    assert e2e.time_to_target(curve, 2.0) == (None, None)
    assert e2e.loss_at_wall(curve, 2.5) == 2.5 and e2e.loss_at_wall(curve, 0.5) is None


def test_compose_places_an_unshaped_seed_on_the_netem_clock():
    e2e = _e2e_module()
    # The netem seed logged steps 0..8 at uneven times (a slow dense start); the unshaped
    # seed has its own losses and a fast clock, which must be replaced.
    timing = {"steps": 8, "wall_seconds": 10.0, "selection_seconds": 1.0,
              "comm_seconds": 3.0,
              "train_vs_wall": [[4, 6.0, 3.1], [8, 10.0, 2.9]],
              "val_vs_wall": [[4, 6.0, 3.2], [8, 10.0, 3.0]]}
    loss_run = {"steps": 8, "wall_seconds": 2.0, "selection_seconds": 0.5,
                "comm_seconds": 0.1, "final_val_loss": 2.8,
                "train_vs_wall": [[2, 0.5, 3.3], [8, 2.0, 2.7]],
                "val_vs_wall": [[4, 1.0, 3.0], [8, 2.0, 2.8]]}
    out = e2e.compose(loss_run, timing, timing_seed=0)
    assert out["val_vs_wall"] == [(4, 6.0, 3.0), (8, 10.0, 2.8)]
    assert out["train_vs_wall"] == [(2, 3.0, 3.3), (8, 10.0, 2.7)]  # step 2: 0..6 s linear
    assert (out["wall_seconds"], out["selection_seconds"], out["comm_seconds"]) == (10.0, 1.0,
                                                                                      3.0)
    assert out["final_val_loss"] == 2.8 and out["timing_from_seed"] == 0
    assert loss_run["wall_seconds"] == 2.0  # the input is not modified


def test_dry_run_lists_every_method_without_root(tmp_path):
    proc = subprocess.run([sys.executable, str(E2E), "--quick", "--dry-run",
                           "--compute-seconds", "0.01", "--out", "e2e_test_dry"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for hook in ("train.comm_hook=bf16", "train.powersgd_rank=1", "train.powersgd_rank=4",
                 "--mode exact", "--mode bucketed"):
        assert hook in proc.stdout


@pytest.mark.skipif(_NETNS_MISSING is not None, reason=f"--quick {_NETNS_MISSING}")
@pytest.mark.timeout(1500)
def test_quick_runs_every_method(tmp_path):
    prefix = f"distk-e2et{os.getpid()}"
    env = {**os.environ, "DISTK_NETEM_PREFIX": prefix, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(E2E), "--quick", "--out", "e2e_quick_test",
                             "--results-dir", str(tmp_path), "--timeout", "600"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=1400)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"e2e.py --quick did not finish in 1400 s:\n{err[-3000:]}")
    finally:
        subprocess.run(["bash", str(ROOT / "launchers" / "netem.sh"), "down"], env=env,
                       capture_output=True, timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert _namespaces(prefix) == []
    payload = json.loads((tmp_path / "e2e_quick_test.json").read_text())
    assert (tmp_path / "e2e_quick_test.png").stat().st_size > 0
    assert payload["results"]["adamw"]["netem_seeds"] == [0]
    assert payload["results"]["adamw"]["unshaped_seeds"] == [1]
    block = payload["results"]["adamw"]["ratios"]["4"]
    # seed 1 ran on the unshaped link and carries seed 0's netem clock
    assert block["runs"]["bucketed"]["1"]["timing_from_seed"] == 0
    assert (block["runs"]["bucketed"]["1"]["wall_seconds"]
            == block["runs"]["bucketed"]["0"]["wall_seconds"])
    rows = {row["method"]: row for row in block["rows"]}
    assert set(rows) == {"dense_fp32", "dense_bf16", "powersgd_r1", "powersgd_r4", "exact",
                         "bucketed"}
    for method, row in rows.items():
        assert math.isfinite(row["final_val_loss"]), method
        assert row["mb_per_step"] > 0 and math.isfinite(row["mb_per_step"]), method
        assert row["s_per_step"] > 0, method
    dense = rows["dense_fp32"]["mb_per_step"]
    for sparse in ("exact", "bucketed"):
        assert rows[sparse]["mb_per_step"] < dense, (sparse, rows[sparse], dense)
    # bf16 sends half of fp32's payload; distk's dense mode adds its verified metadata
    # exchange (a few dozen bytes on some steps), hence the tolerance.
    assert rows["dense_bf16"]["mb_per_step"] == pytest.approx(dense / 2, rel=1e-3)
    assert rows["dense_bf16"]["mb_per_step"] < dense / 2
    assert math.isfinite(block["target"]) and block["rate"].endswith("kbit")
