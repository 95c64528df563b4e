"""The main training job: config, data, model, and real 2-rank runs (torchrun and gloo).

Every distributed run uses configs/tiny.json (a 1-layer, 32-wide model on 200 kB of
text, 30 steps), so each takes seconds. By default the resume test runs the bucketed
mode; ``--runslow`` adds it for exact selection.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed import run_distributed

from distk.train.config import TrainConfig, apply_overrides, load_config
from distk.train.data import build_corpus, build_data, is_validation_file, list_corpus_files
from distk.train.model import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.json"


def tiny_config(tmp_path: Path, *overrides: str) -> TrainConfig:
    return load_config(TINY, [f"run_root={json.dumps(str(tmp_path))}", *overrides])


# -- config ---------------------------------------------------------------------------

def test_default_json_matches_builtin_defaults() -> None:
    """configs/default.json is what `distk-train` runs without --config; keep them equal."""
    saved = json.loads((ROOT / "configs" / "default.json").read_text())
    assert TrainConfig.from_dict(saved).to_dict() == TrainConfig().to_dict()
    assert saved == TrainConfig().to_dict()


def test_config_round_trip_and_overrides() -> None:
    cfg = load_config(TINY, ["train.steps=7", "sparsity.density=0.02", "sparsity.method=exact",
                             "logging.wandb=true", "name=x"])
    assert (cfg.train.steps, cfg.sparsity.density, cfg.sparsity.method) == (7, 0.02, "exact")
    assert cfg.logging.wandb is True and cfg.name == "x"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    # Ints are accepted for floats; strings stay strings when not JSON.
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0
    assert apply_overrides({}, ["sparsity.nonfinite=skip"]) == {"sparsity": {"nonfinite": "skip"}}
    assert load_config(None, ["sparsity.nonfinite=skip"]).sparsity.nonfinite == "skip"


def test_momentum_correction_moves_sgd_momentum_into_sparse_compressors() -> None:
    from distk.train.loop import momentum_placement

    for mode in ("exact", "bucketed"):
        cfg = momentum_placement(load_config(None, [f"sparsity.method={mode}"]))
        assert (cfg.sparsity.momentum, cfg.train.beta1) == (0.9, 0.0)
    unchanged = [load_config(None, ["sparsity.method=dense"]),
                 load_config(None, ["train.optimizer=adamw", "train.lr=0.002"]),
                 load_config(None, ["train.momentum_correction=false"]),
                 load_config(None, ["sparsity.momentum=0.5"])]
    for cfg in unchanged:
        assert momentum_placement(cfg) == cfg


@pytest.mark.parametrize(("override", "message"), [
    ("train.stpes=3", r"unknown config key 'train.stpes'; did you mean 'train.steps'"),
    ("trian.steps=3", r"unknown config key 'trian'; did you mean 'train'"),
    ("train.steps=0", r"train.steps=0 is invalid: allowed an int >= 1"),
    ("train.steps=1.5", r"train.steps=1.5 is invalid: expected int"),
    ("model.n_head=3", r"model.n_head=3 is invalid: allowed a positive divisor"),
    ("train.device=tpu", r"train.device='tpu' is invalid"),
    ("logging.wandb=yes", r"logging.wandb='yes' is invalid: expected bool"),
    ("sparsity.densty=0.1", r"did you mean 'density'"),
    ("sparsity.density=2", r"density must be a number in \(0, 1\]"),
])
def test_config_errors_name_key_value_and_allowed(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(TINY, [override])


def test_cli_print_config_and_bad_key() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "distk.train", "--config", str(TINY), "--mode", "exact",
         "--steps", "5", "--print-config"],
        capture_output=True, text=True, env=env, timeout=60, check=True,
    )
    resolved = json.loads(out.stdout)
    assert resolved["sparsity"]["method"] == "exact" and resolved["train"]["steps"] == 5
    bad = subprocess.run([sys.executable, "-m", "distk.train", "--set", "train.stpes=5"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "did you mean 'train.steps'" in bad.stderr


# -- data and model ------------------------------------------------------------------

def test_corpus_is_deterministic_and_split_by_file(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    first, second = build_corpus(cfg), build_corpus(cfg)
    assert first.fingerprint == second.fingerprint
    assert torch.equal(first.train, second.train) and torch.equal(first.val, second.val)
    assert first.train.numel() == cfg.data.max_train_bytes
    assert first.val.numel() == cfg.data.max_val_bytes
    files = list_corpus_files(None, "*.py", cfg.data.exclude_dirs)
    assert files == sorted(files, key=lambda p: p.as_posix())
    assert not any("site-packages" in p.parts or "test" in p.parts for p in files)
    held_out = [p for p in files if is_validation_file(p, cfg.data.val_fraction)]
    # A hash split: some but few files are held out (expected 5%, allow 2%..10%).
    assert 0.02 < len(held_out) / len(files) < 0.10


def test_batches_depend_only_on_seed_step_and_rank(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    corpus = build_corpus(cfg)
    rank0, rank1 = (build_data(cfg, r, 2, corpus=corpus) for r in (0, 1))
    x, y = rank0.train_batch(5)
    assert x.shape == (cfg.train.batch_size, cfg.model.context) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one byte
    assert torch.equal(x, build_data(cfg, 0, 2, corpus=corpus).train_batch(5)[0])
    assert not torch.equal(x, rank0.train_batch(6)[0])
    assert not torch.equal(x, rank1.train_batch(5)[0])
    # Validation windows are dealt out across ranks without overlap.
    v0 = torch.cat([b[0] for b in rank0.val_batches()])
    v1 = torch.cat([b[0] for b in rank1.val_batches()])
    assert v0.shape[0] + v1.shape[0] == cfg.train.eval_windows


def test_model_starts_near_uniform_and_is_seeded(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    model = build_model(cfg)
    x, y = build_data(cfg, 0, 1).train_batch(0)
    logits, loss = model(x, y)
    assert logits.shape == (*x.shape, 256)
    # Small init: the loss starts near the uniform byte distribution's ln(256) = 5.55
    # (within 0.25 nats: the tied head makes the input byte's own logit slightly larger).
    assert abs(loss.item() - math.log(256)) < 0.25
    again = build_model(cfg)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


# -- distributed runs ----------------------------------------------------------------

def _torchrun(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_MODE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "distk.train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return proc


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_compare_trains_every_mode_and_writes_json_and_png(tmp_path: Path) -> None:
    """Real torchrun, 2 gloo ranks: all three modes train (loss falls), table + JSON + PNG."""
    proc = _torchrun(["--config", str(TINY), "--compare", "--set",
                      f"run_root={json.dumps(str(tmp_path))}"], cwd=tmp_path)
    run_dir = tmp_path / "tiny"
    payload = json.loads((run_dir / "compare.json").read_text())
    results = payload["results"]
    assert list(results) == ["dense", "exact", "bucketed"] and payload["world_size"] == 2
    for mode, result in results.items():
        first = result["train_curve"][0][1]
        # From ~ln(256) = 5.55 nats: 30 steps must at least reach the unigram level (< 4.5).
        assert result["final_train_loss"] < first - 1.0, (mode, result["train_curve"])
        assert result["final_val_loss"] < 4.5, (mode, result["final_val_loss"])
        assert result["bytes_sent"] > 0 and result["completed"]
        assert (run_dir / mode / "metrics.jsonl").exists()
    # The sparse modes send a fraction of dense bytes; bucketed reports its recall.
    assert results["bucketed"]["bytes_sent"] < 0.5 * results["dense"]["bytes_sent"]
    assert results["exact"]["bytes_sent"] < 0.5 * results["dense"]["bytes_sent"]
    # The default exchange on 2 ranks is a shared mask (the union of the ranks' top k/2):
    # its recall against the top-k of the summed accumulators, k-weighted over the run.
    # Positions picked at random would score the density (0.05 in tiny.json).
    for mode in ("exact", "bucketed"):
        assert results[mode]["mean_global_recall"] >= 0.2, results[mode]
    png = (run_dir / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "bucketed" in proc.stdout and "recall" in proc.stdout


def _resume_worker(rank: int, world_size: int, root: str, mode: str) -> list[float]:
    from distk.train.loop import train

    cfg = tiny_config(Path(root), f"sparsity.method={mode}", "train.steps=16",
                      "train.eval_every=8")
    full = train(cfg, Path(root) / "full")
    stopped = load_config(TINY, [f"run_root={json.dumps(root)}", f"sparsity.method={mode}",
                                 "train.steps=16", "train.eval_every=8", "train.stop_after=7"])
    partial = train(stopped, Path(root) / "resumed")
    assert not partial.completed
    resumed = train(cfg, Path(root) / "resumed", resume=True)
    assert resumed.val_curve == full.val_curve, (resumed.val_curve, full.val_curve)
    return [resumed.final_val_loss, full.final_val_loss]


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", [
    "bucketed",
    # The same checkpoint and resume code with another selection (exact selection trains
    # by default in the compare test): the slow run.
    pytest.param("exact", marks=pytest.mark.slow),
])
def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path, mode: str) -> None:
    """Stop at step 7 (checkpoint: model, optimizer, RNG, step, residuals), resume: every
    logged loss equals the uninterrupted run's bitwise (CPU, gloo, 2 ranks, dropout 0)."""
    run_distributed(_resume_worker, 2, str(tmp_path), mode, timeout=200)
    full = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").open()]
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").open()]
    assert [r["step"] for r in resumed] == list(range(1, 17))
    losses = [(r["step"], r["train/loss"], r.get("val/loss")) for r in full]
    assert [(r["step"], r["train/loss"], r.get("val/loss")) for r in resumed] == losses
    # The residuals really were in play (else resume would be trivially exact).
    assert any(r.get("distk/residual_norm", 0) > 0 for r in resumed)
