"""StatsLogger: JSONL records, rank gating, resume truncation, and real offline wandb runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from distk.logging import StatsLogger, wandb_has_credentials


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_records_every_logged_step(tmp_path: Path) -> None:
    with StatsLogger(tmp_path, total_steps=3, rank=0, progress=True) as logger:
        for step in range(1, 4):
            logger.log({"train/loss": torch.tensor(5.0 - step), "distk/k": step * 10}, step)
            logger.advance()
    records = _records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    # Tensors are turned into plain numbers (exactly: 5 - step is representable).
    assert [r["train/loss"] for r in records] == [4.0, 3.0, 2.0]
    assert [r["distk/k"] for r in records] == [10, 20, 30]


def test_non_reporting_rank_writes_nothing(tmp_path: Path) -> None:
    with StatsLogger(tmp_path / "run", total_steps=3, rank=1) as logger:
        logger.log({"train/loss": 1.0}, 1)
        logger.log_histogram("distk/x", torch.ones(3), 1)
        logger.write("not printed")
    assert not (tmp_path / "run").exists()


def test_resume_keeps_records_up_to_the_checkpoint(tmp_path: Path) -> None:
    with StatsLogger(tmp_path, rank=0, progress=False) as logger:
        for step in range(1, 6):
            logger.log({"train/loss": float(step)}, step)
    # The interrupted run logged steps 4 and 5 after its checkpoint at step 3.
    with StatsLogger(tmp_path, rank=0, progress=False, resume_from=3) as logger:
        logger.log({"train/loss": 40.0}, 4)
    records = _records(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["train/loss"]) for r in records] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)
    ]


def test_wandb_requested_but_missing_names_the_extra(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(ImportError, match=r"pip install distk\[wandb\]"):
        StatsLogger(tmp_path, rank=0, wandb=True, progress=False)
    # Not requested: silent, and the JSONL record is still written.
    with StatsLogger(tmp_path, rank=0, wandb=False, progress=False) as logger:
        assert logger.wandb_run is None
        logger.log({"train/loss": 1.0}, 1)
        logger.log_histogram("distk/x", torch.ones(3), 1)
    assert _records(tmp_path / "metrics.jsonl") == [{"step": 1, "train/loss": 1.0}]


def test_credentials_detection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc_path = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc_path))
    assert not wandb_has_credentials()
    netrc_path.write_text("machine example.org login a password b\n")
    assert not wandb_has_credentials()
    netrc_path.write_text("machine api.wandb.ai login user password secret\n")
    netrc_path.chmod(0o600)
    assert wandb_has_credentials()
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_has_credentials()


@pytest.mark.timeout(180)
def test_wandb_offline_run_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real wandb run: no credentials and no WANDB_MODE -> offline, files under WANDB_DIR."""
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    config = {"train": {"steps": 3}, "sparsity": {"density": 0.01, "method": "bucketed"}}
    logger = StatsLogger(tmp_path / "run", rank=0, wandb=True, config=config, progress=False,
                         wandb_project="distk-test", wandb_run_name="offline-check")
    assert logger.wandb_mode == "offline"
    run_id = logger.wandb_run.id
    for step in range(1, 4):
        logger.log({"train/loss": 3.0 / step, "distk/bytes_sent": 100 * step,
                    "distk/recall": 0.9}, step)
    logger.log_histogram("distk/update_magnitude", torch.rand(50_000), 3)
    logger.close()
    runs = list((tmp_path / "wb" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1, list((tmp_path / "wb").rglob("*"))
    run_files = list(runs[0].glob("run-*.wandb"))
    assert run_files and run_files[0].stat().st_size > 0
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])[
        "step"] == 3
