"""benchmarks/e2e.py: the dilated time-to-quality protocol with PyTorch's hooks beside distk.

By default: the pure parts (the dilated rate, the learning-rate rule, method
declarations, stable and first crossings, losses at equal wall time and bytes, the
tuning's link clock and choice), the argument errors, and ``--dry-run``, which lists every
stage the protocol would run (tuning and measured seeds, every method's command line).
The pieces the quick run strings together are tested by default elsewhere: every
training mode and the peers' hooks on 2 real ranks (test_train.py, test_peer_hooks.py),
the emulated link (test_netem.py).

``--runslow`` adds ``--quick`` end to end (4 to 5 minutes on 2 cores; only as root with
iproute2 and ethtool, since it builds network namespaces), under a timeout and a namespace
prefix of its own; it checks the plumbing (every method present with finite losses and
bytes, sparse bytes below dense, every reported seed timed under netem, the tuning
stage's choice), not the speed.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from script_module import load_script
from test_netem import _NETNS_MISSING, _namespaces

ROOT = Path(__file__).resolve().parent.parent
E2E = ROOT / "benchmarks" / "e2e.py"


def _e2e_module():
    sys.path.insert(0, str(E2E.parent))  # e2e.py imports its sibling outer_long
    return load_script(E2E, "e2e_bench")


def _evals(*points):
    """Evaluations from (step, wall, loss, bytes) tuples; dense bytes = 10 x step."""
    return [{"step": s, "wall": w, "loss": loss, "bytes": b, "dense_bytes": 10 * s,
             "density": b / (10 * s), "step_density": 0.01} for s, w, loss, b in points]


def _tuning_run(*points):
    """A tuning run (``choose_setting``'s input) from (step, wall, loss, bytes) points: its
    final loss and bytes are the last point's."""
    return {"evals": _evals(*points), "final_val_loss": points[-1][2],
            "bytes_sent": points[-1][3]}


def test_dilated_rate_makes_dense_comm_r_times_compute():
    e2e = _e2e_module()
    # 1 MB per rank, compute 0.1 s: R=4 -> the all-reduce must take 0.4 s -> 20 Mbit/s.
    rate, bits = e2e.dilated_rate(1_000_000, 0.1, 4.0)
    assert rate == "20000kbit" and bits == pytest.approx(20e6)
    assert e2e.dilated_rate(1_000_000, 0.1, 16.0)[1] == pytest.approx(5e6)


def test_lr_rule():
    e2e = _e2e_module()
    sweep = {1e-3: {"final_val_loss": 2.5}, 2e-3: {"final_val_loss": 2.4},
             4e-3: {"final_val_loss": float("nan")}}
    assert e2e.select_lr(sweep) == 2e-3
    assert e2e.select_lr({0.1: {"final_val_loss": 2.0}, 0.3: {"final_val_loss": 2.0}}) == 0.1


def test_stable_and_first_crossing():
    e2e = _e2e_module()
    # One dip below the target at index 1, back above, then below for good from index 3:
    # the first crossing is the dip, the stable one is index 3.
    assert e2e.crossings([3.0, 2.49, 2.6, 2.5, 2.4], 2.5) == (1, 3)
    assert e2e.crossings([3.0, 2.4, 2.6], 2.5) == (1, None)   # ends above: never stable
    assert e2e.crossings([3.0, 2.9], 2.5) == (None, None)
    assert e2e.crossings([2.4, float("nan")], 2.5) == (0, None)
    assert e2e.crossings([], 2.5) == (None, None)
    evals = _evals((25, 10.0, 3.0, 100), (50, 20.0, 2.49, 150), (75, 30.0, 2.6, 200),
                   (100, 40.0, 2.5, 250), (125, 50.0, 2.4, 300))
    reached = e2e.at_target(evals, 2.5)
    assert (reached["first_s"], reached["first_step"]) == (20.0, 50)
    assert (reached["stable_s"], reached["stable_step"]) == (40.0, 100)
    # At the stable crossing: 250 bytes sent of dense fp32's 1000, effective density 0.25.
    assert reached["mb"] == pytest.approx(250 / 1e6)
    assert reached["bytes_fraction"] == pytest.approx(0.25)
    assert reached["density"] == pytest.approx(0.25) and reached["step_density"] == 0.01
    missed = e2e.at_target(evals, 1.0)
    assert missed["stable_s"] is None and missed["mb"] is None


def test_loss_at_equal_wall_and_bytes():
    e2e = _e2e_module()
    evals = _evals((4, 1.0, 3.0, 40), (8, 2.0, 2.5, 80), (12, 3.0, 2.4, 120))
    assert e2e.loss_at(evals, "wall", 2.5) == 2.5
    assert e2e.loss_at(evals, "wall", 0.5) is None
    assert e2e.loss_at(evals, "bytes", 120) == 2.4
    assert e2e.loss_at(evals, "bytes", 79) == 3.0
    no_bytes = [{**e, "bytes": None} for e in evals]
    assert e2e.loss_at(no_bytes, "bytes", 1e9) is None


def test_tuning_puts_unshaped_runs_on_the_link_clock_and_picks_the_earliest():
    e2e = _e2e_module()
    # Two candidates on the unshaped link: "small" sends 1 MB per evaluation and reaches
    # the target at its second evaluation; "big" sends 10 MB per evaluation and reaches it
    # at its first. On an unlimited link big is sooner; at 8 Mbit/s (1 MB = 1 s) each MB
    # costs a second, so small (2 s + 2 s) beats big (1 s + 10 s).
    small = _tuning_run((10, 1.0, 3.0, 1e6), (20, 2.0, 2.0, 2e6))
    big = _tuning_run((10, 1.0, 2.0, 1e7), (20, 2.0, 1.9, 2e7))
    clock = e2e.on_link_clock(small["evals"], 8e6)
    assert [e["wall"] for e in clock] == [pytest.approx(2.0), pytest.approx(4.0)]
    assert small["evals"][0]["wall"] == 1.0  # the input is not modified
    # One tuning seed: each candidate is a list of one run, one target.
    assert e2e.choose_setting([[small], [big]], [2.5], None)[0] == 1
    best, scores = e2e.choose_setting([[small], [big]], [2.5], 8e6)
    assert best == 0
    assert scores[0]["modelled_time_to_target_s"] == pytest.approx(4.0)
    assert scores[1]["modelled_time_to_target_s"] == pytest.approx(11.0)
    # Nobody reaches the target: the lowest final loss, then the fewest bytes.
    assert e2e.choose_setting([[small], [big]], [1.0], 8e6)[0] == 1
    tie = {**big, "final_val_loss": 2.0}
    assert e2e.choose_setting([[tie], [small]], [1.0], 8e6)[0] == 1
    with pytest.raises(ValueError, match="one run per tuning seed"):
        e2e.choose_setting([[small, big]], [2.5], None)


def test_choose_setting_over_several_tuning_seeds():
    # A lucky seed must not decide: "fast" reaches its target sooner on seed A but misses
    # seed B; "steady" reaches both, so it wins on the count of seeds reached, whatever
    # the times. Among candidates that reach every seed the mean time decides, and each
    # seed is held to its own target.
    e2e = _e2e_module()
    fast_a = _tuning_run((10, 1.0, 1.9, 1e6), (20, 2.0, 1.8, 2e6))
    fast_b = _tuning_run((10, 1.0, 3.2, 1e6), (20, 2.0, 3.1, 2e6))
    steady_a = _tuning_run((10, 1.0, 2.4, 1e6), (20, 2.0, 1.95, 2e6))
    steady_b = _tuning_run((10, 1.0, 3.2, 1e6), (20, 2.0, 2.9, 2e6))
    targets = [2.0, 3.0]  # seed B is the harder one: its dense run ended higher
    best, scores = e2e.choose_setting([[fast_a, fast_b], [steady_a, steady_b]], targets,
                                      None)
    assert best == 1
    assert [s["seeds_reached"] for s in scores] == [1, 2]
    assert scores[0]["modelled_per_seed_s"] == [pytest.approx(1.0), None]
    assert scores[1]["modelled_time_to_target_s"] == pytest.approx(2.0)
    assert scores[1]["final_val_loss"] == pytest.approx((1.95 + 2.9) / 2)
    # On seed A alone "fast" would have won: the old single-seed rule.
    assert e2e.choose_setting([[fast_a], [steady_a]], targets[:1], None)[0] == 0
    # Both reach both seeds: the earlier mean time wins (1.5 s against 2.0 s).
    quick_b = {**steady_b, "evals": _evals((10, 1.0, 2.8, 1e6), (20, 2.0, 2.9, 2e6))}
    best, scores = e2e.choose_setting([[steady_a, steady_b], [steady_a, quick_b]],
                                      targets, None)
    assert best == 1 and scores[1]["modelled_time_to_target_s"] == pytest.approx(1.5)


def _run(evals, steps=20):
    """A finished run's result for ``summarise`` from its evaluations."""
    return {"evals": evals, "final_val_loss": evals[-1]["loss"], "steps": steps,
            "wall_seconds": evals[-1]["wall"], "bytes_sent": evals[-1]["bytes"],
            "selection_seconds": 0.0, "comm_seconds": 0.0}


def test_lower_bound_is_what_the_link_allows_and_marks_its_speedups():
    e2e = _e2e_module()
    # Unshaped: 2 s and 10 s of wall time, 1 MB and 4 MB sent. At 1 Mbit/s the link alone
    # needs 8 s and 32 s, so the bound is the link's; at 100 Mbit/s it is the wall time.
    dense = _run(_evals((10, 2.0, 3.0, 1e6), (20, 10.0, 2.0, 4e6)))
    slow = e2e.lower_bound(dense, 1e6)
    assert [e["wall"] for e in slow["evals"]] == [pytest.approx(8.0), pytest.approx(32.0)]
    assert slow["wall_seconds"] == pytest.approx(32.0) and slow["timing"] == "bound"
    assert dense["evals"][0]["wall"] == 2.0 and "timing" not in dense  # input unchanged
    fast = e2e.lower_bound(dense, 1e8)
    assert [e["wall"] for e in fast["evals"]] == [2.0, 10.0]
    # A row measured under netem reaching the target at 4 s against the bound dense row
    # (32 s): the speed-up 8 is a lower bound; another bound row gets no speed-up at all.
    measured = _run(_evals((10, 2.0, 2.5, 1e3), (20, 4.0, 2.0, 2e3)))
    other = e2e.lower_bound(_run(_evals((10, 3.0, 2.5, 1e5), (20, 6.0, 2.0, 2e5))), 1e6)
    summary = e2e.summarise({"dense_fp32": {"1": slow}, "outer": {"1": measured},
                             "bucketed": {"1": other}}, 0.1, [0.01],
                            {"dense_fp32": 1e-3, "outer": 1e-3, "bucketed": 1e-3}, {
                                 "dense_fp32": {}, "outer": {}, "bucketed": {}})
    rows = {r["method"]: r for r in summary["rows"]}
    assert [rows[m]["timing"] for m in ("dense_fp32", "outer", "bucketed")] == [
        "bound", "netem", "bound"]
    outer = rows["outer"]["targets"]["0.01"]
    assert outer["speedup_vs_dense"] == pytest.approx(8.0) and outer["speedup_at_least"]
    assert rows["bucketed"]["targets"]["0.01"]["speedup_vs_dense"] is None
    assert not rows["bucketed"]["targets"]["0.01"]["speedup_at_least"]
    assert rows["dense_fp32"]["targets"]["0.01"]["speedup_vs_dense"] == pytest.approx(1.0)


def test_wire_counters_reach_the_rows(tmp_path):
    # netem.sh's wire.tsv (hosts in any order) -> each run's wire_tx_bytes in host order ->
    # each row's wire MB (mean over hosts, then seeds) beside distk's count.
    e2e = _e2e_module()
    (tmp_path / "wire.tsv").write_text("# host tx_bytes rx_bytes\nh1 3000000 10\n"
                                       "h0 1000000 20\n")
    assert e2e.read_wire(tmp_path / "wire.tsv") == [1000000, 3000000]
    assert e2e.read_wire(tmp_path / "missing.tsv") is None
    (tmp_path / "bad.tsv").write_text("h0 x y\n")
    assert e2e.read_wire(tmp_path / "bad.tsv") is None
    run = _run(_evals((10, 2.0, 3.0, 1e6), (20, 4.0, 2.0, 1.6e6)))
    seeds = {"1": {**run, "wire_tx_bytes": [1000000, 3000000]},
             "2": {**run, "wire_tx_bytes": [2000000, 2000000]}}
    summary = e2e.summarise({"dense_fp32": seeds, "other": {"1": run}}, 0.1, [0.01],
                            {"dense_fp32": 1e-3, "other": 1e-3},
                            {"dense_fp32": {}, "other": {}})
    rows = {r["method"]: r for r in summary["rows"]}
    assert rows["dense_fp32"]["wire_mb"] == pytest.approx(2.0)
    assert rows["dense_fp32"]["wire_vs_count"] == pytest.approx(2.0 / 1.6)
    assert rows["other"]["wire_mb"] is None and rows["other"]["wire_vs_count"] is None


def test_method_declarations():
    e2e = _e2e_module()
    psgd = e2e.METHODS["powersgd"]
    settings = psgd.settings()
    assert len(settings) == 16  # rank {1, 2, 4, 8} x start {10%, 25%} x bf16 {no, yes}
    assert settings[0] == {"train.powersgd_rank": 4, "train.powersgd_start_iter": "10%",
                           "train.powersgd_bf16": False}  # the learning-rate sweep's
    assert {s["train.powersgd_rank"] for s in settings} == {1, 2, 4, 8}
    argv = psgd.argv(settings[0], 300)
    assert argv[:2] == ["--mode", "dense"]
    assert "train.powersgd_start_iter=30" in argv and "train.comm_hook=\"powersgd\"" in argv
    assert "train.powersgd_bf16=false" in argv
    assert e2e.resolve("25%", 300) == 75 and e2e.resolve("10%", 8) == 1
    assert e2e.resolve("shared", 300) == "shared" and e2e.resolve(5, 300) == 5
    assert e2e.METHODS["bucketed"].settings() == [{}]
    # The outer row is the SparseLoCo preset (the same options as distk's own), H tuned.
    outer = e2e.METHODS["outer"]
    from distk.config import SparsityConfig
    recipe = SparsityConfig.sparseloco()
    for key, value in outer.set.items():
        if key.startswith("sparsity.") and key != "sparsity.warmup_steps":
            assert getattr(recipe, key.split(".", 1)[1]) == value, key
    # Every H divides the protocol's evaluation period: evaluations fall on syncs, where
    # the replicas agree.
    every = e2e.PRESETS["full"]["eval_every"]
    assert all(every % s["sparsity.sync_every"] == 0 for s in outer.settings())
    # A distk variant from the command line: fixed keys and a tuned knob.
    added = e2e.parse_method(["shared", "bucketed", "sparsity.exchange=shared",
                              "sparsity.value_dtype=bfloat16",
                              "tune:sparsity.warmup_steps=0,50"])
    assert (added.name, added.mode) == ("shared", "bucketed")
    assert added.set == {"sparsity.exchange": "shared", "sparsity.value_dtype": "bfloat16"}
    assert added.settings() == [{"sparsity.warmup_steps": 0}, {"sparsity.warmup_steps": 50}]
    assert e2e.setting_label(added.settings()[1]) == "warmup_steps=50"
    for tokens, message in ((["x"], "allowed NAME MODE"),
                            (["x", "sparse"], "mode='sparse' is invalid"),
                            (["X", "dense"], "method name 'X' is invalid"),
                            (["x", "dense", "oops"], "'oops' is invalid"),
                            (["x", "dense", "a.b=1", "tune:a.b=1,2"], "both fixed")):
        with pytest.raises(ValueError, match=message):
            e2e.parse_method(tokens)


def test_protocol_job_is_the_main_job():
    # The main job's SGD schedule (a 50-step density warm-up) reaches the protocol's runs;
    # the protocol changes only evaluation and logging.
    e2e = _e2e_module()
    main_job = json.loads((ROOT / "configs" / "default.json").read_text())
    job = e2e.job_config(e2e.PRESETS["full"])
    assert job["sparsity"]["warmup_steps"] == main_job["sparsity"]["warmup_steps"] == 50
    assert job["sparsity"]["density"] == 0.01 and job["model"] == main_job["model"]
    assert job["train"]["eval_windows"] == 1024
    assert e2e.PRESETS["full8"]["world"] == 8 and e2e.PRESETS["full8"]["ratios"] == [4, 16]


def test_arguments_are_named(capsys):
    # The script exits with argparse's status 2 and the message (one run of the script:
    # each costs seconds of imports); the other cases go through its parse_args in-process.
    proc = subprocess.run([sys.executable, str(E2E), "--dry-run", "--tuning-seed", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--tuning-seeds [1] is invalid" in proc.stderr, \
        proc.stderr
    e2e = _e2e_module()
    for argv, message in ((["--methods", "bucketed"], "must include dense_fp32"),
                          (["--methods", "dense_fp32", "nope"], "unknown"),
                          (["--slacks", "-0.1"], "--slacks [-0.1] is invalid"),
                          (["--tuning-seeds", "0", "0"], "--tuning-seeds [0, 0] is invalid"),
                          (["--tuning-seeds", "0", "2"], "--tuning-seeds [0, 2] is invalid"),
                          (["--method", "x", "sparse"], "mode='sparse' is invalid"),
                          (["--bound", "outer"], "--bound ['outer'] is invalid"),
                          (["--methods", "dense_fp32", "--bound", "dense_fp32"],
                           "at least one method must run under netem")):
        with pytest.raises(SystemExit) as exited:
            e2e.parse_args(["--dry-run", *argv])
        assert exited.value.code == 2, argv
        assert message in capsys.readouterr().err, argv
    args = e2e.parse_args(["--quick", "--method", "shared", "bucketed",
                           "sparsity.value_bits=2"])
    assert args.methods[-1] == "shared" and args.seeds == [1, 2] and args.tuning_seeds == [0]
    two = e2e.parse_args(["--quick", "--tuning-seeds", "0", "4"])
    assert two.tuning_seeds == [0, 4]
    # Every tuning run (PowerSGD's two candidates and dense fp32's reference) on each seed.
    assert e2e.plan(two)["tune_runs"] == 2 * e2e.plan(args)["tune_runs"] == 6


def test_tune_only_stops_after_the_tuning_and_tabulates_it(tmp_path, capsys):
    e2e = _e2e_module()
    argv = ["--quick", "--tuning-seeds", "0", "4", "--tune-only"]
    counts = e2e.plan(e2e.parse_args(argv))
    assert counts["netem_runs"] == counts["unshaped_runs"] == 0 and counts["tune_runs"] == 6
    with pytest.raises(SystemExit):
        e2e.parse_args(["--quick", "--methods", "dense_fp32", "bucketed", "--tune-only"])
    assert "--tune-only with --methods ['dense_fp32', 'bucketed'] runs nothing" in \
        capsys.readouterr().err
    # The table: each setting's loss per tuning seed against dense fp32's on that seed.
    tuning = {"seeds": [0, 4], "reference_per_seed": [2.0, 4.0], "methods": {"outer": {
        "candidates": [
            {"label": "density=0.25", "final_val_loss_per_seed": [2.02, 3.96],
             "by_link": {"4": {"mb": 35.3}}},
            {"label": "density=0.015625", "final_val_loss_per_seed": [2.04, 4.12],
             "by_link": {"4": {"mb": 18.2}}}]}}}
    rows = e2e.tuning_rows(tuning)
    assert [r["setting"] for r in rows] == ["density=0.25", "density=0.015625"]
    assert rows[0]["gap_0"] == pytest.approx(0.01) and rows[0]["gap_4"] == pytest.approx(-0.01)
    assert rows[0]["gap_mean"] == pytest.approx(0.0) and rows[0]["gap_worst"] == \
        pytest.approx(0.01)
    assert rows[1]["gap_mean"] == pytest.approx(0.025) and rows[1]["mb"] == 18.2
    text = e2e.print_table(rows, e2e.tuning_columns(tuning))
    assert "| outer | density=0.25 | +1.00% | -1.00% | +0.00% | +1.00% | 35.3 |" in text
    png = tmp_path / "tuning.png"
    e2e.plot_tuning({"adamw": {"tuning": tuning}}, png)
    assert png.stat().st_size > 0


def test_dry_run_lists_every_stage_without_root():
    proc = subprocess.run([sys.executable, str(E2E), "--quick", "--dry-run",
                           "--compute-seconds", "0.01", "--out", "e2e_test_dry"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "tuning 3 x 8 steps (unshaped), measured 10 x 8 steps (netem)" in out
    for piece in ("train.comm_hook=\"bf16\"", "train.powersgd_rank=1",
                  "train.powersgd_rank=2", "--mode exact", "--mode bucketed", "seed=1",
                  "seed=2", "tune/powersgd-1"):
        assert piece in out, piece
    # The tuning seed trains only on the unshaped link.
    assert all(" none -- " in line for line in out.splitlines() if "seed=0" in line)


@pytest.mark.slow
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
    table = payload["results"]["adamw"]
    block = table["ratios"]["4"]
    # Every reported seed of every method ran under netem (the run's rate in its logs).
    for method, seeds in block["runs"].items():
        assert sorted(seeds) == ["1", "2"], method
    log = ROOT / "runs" / "e2e" / "e2e_quick_test" / "adamw" / "R4" / "bucketed-s2" / "logs"
    assert (log / "h0.log").exists()
    # PowerSGD's two candidates ran on the tuning seed; the chosen one is the row.
    tuning = table["tuning"]["methods"]["powersgd"]
    assert [c["label"] for c in tuning["candidates"]] == ["powersgd_rank=2",
                                                           "powersgd_rank=1"]
    assert block["settings"]["powersgd"] in [c["setting"] for c in tuning["candidates"]]
    assert set(tuning["model_check"]["4"]) == {"modelled_s_per_step", "measured_s_per_step"}
    summary = block["summary"]
    assert set(summary["targets"]) == {"0.01", "0.02"}
    rows = {row["method"]: row for row in summary["rows"]}
    assert set(rows) == {"dense_fp32", "dense_bf16", "powersgd", "exact", "bucketed"}
    for method, row in rows.items():
        assert math.isfinite(row["final_val_loss"]), method
        assert row["mb_per_step"] > 0 and math.isfinite(row["mb_per_step"]), method
        assert row["s_per_step"] > 0, method
        assert set(row["targets"]) == {"0.01", "0.02"}
    dense = rows["dense_fp32"]
    assert dense["targets"]["0.02"]["reached"] == 2  # its own final loss is within 2%
    assert dense["targets"]["0.02"]["bytes_fraction_at_target"] == pytest.approx(1.0, rel=1e-3)
    for sparse in ("exact", "bucketed"):
        assert rows[sparse]["mb_per_step"] < dense["mb_per_step"], sparse
        # Also on the wire (netem.sh's link counters), set-up and evaluations included.
        assert 0 < rows[sparse]["wire_mb"] < dense["wire_mb"], sparse
    assert dense["wire_vs_count"] > 1.0  # headers and set-up come on top of the count
    # bf16 sends half of fp32's payload; distk's dense mode adds its verified metadata
    # exchange (a few dozen bytes on some steps), hence the tolerance.
    assert rows["dense_bf16"]["mb_per_step"] == pytest.approx(dense["mb_per_step"] / 2,
                                                              rel=1e-3)
    assert math.isfinite(summary["targets"]["0.01"]) and block["rate"].endswith("kbit")
    evals = block["runs"]["bucketed"]["1"]["evals"]
    assert [e["step"] for e in evals] == [4, 8] and evals[-1]["bytes"] > 0
