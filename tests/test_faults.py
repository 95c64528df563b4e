"""Process-level faults with real processes: killed and stalled ranks, torchrun restarts
with resume, and run-to-run determinism.

The faults are injected by ``tests/fault_job.py`` (a small DDP + distk job that uses the
training job's checkpoint helpers) at a fixed step, so every run is reproducible.
Determinism is checked on the main training job (``python -m distk.train``) itself.
Every test runs under a pytest timeout; processes left behind are killed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
FAULT_JOB = ROOT / "tests" / "fault_job.py"
COLLECTIVE_TIMEOUT = 10.0
"""Process-group timeout (seconds) of the fault job's ranks in these tests."""
MARGIN = 25.0
"""Slack for a survivor to notice the failure, unwind and exit on a loaded 2-core box."""


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}
    env.pop("WANDB_MODE", None)
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(world: int, args: list[str], log_dir: Path) -> list[subprocess.Popen]:
    """``world`` fault-job ranks as plain processes (env://), output in log files."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = _env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(
            [sys.executable, str(FAULT_JOB), *args], cwd=ROOT, env=env,
            stdout=(log_dir / f"rank{rank}.out").open("w"),
            stderr=(log_dir / f"rank{rank}.err").open("w")))
    return procs


def _kill_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()  # SIGKILL also ends a SIGSTOPped process
            proc.wait(timeout=10)


def _process_state(pid: int) -> str:
    """One-letter state from /proc (``T`` = stopped)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2]


def _wait_until(condition, deadline: float, what: str) -> float:
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return time.monotonic()


def _survivors_fail(procs: list[subprocess.Popen], faulty: int, since: float,
                    log_dir: Path) -> dict[int, tuple[int, float, str]]:
    """Wait for every rank but ``faulty``; ``{rank: (exit code, seconds after since, stderr)}``."""
    outcome = {}
    for rank, proc in enumerate(procs):
        if rank == faulty:
            continue
        remaining = since + COLLECTIVE_TIMEOUT + MARGIN - time.monotonic()
        try:
            proc.wait(timeout=max(remaining, 0.1))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"rank {rank} still running {COLLECTIVE_TIMEOUT + MARGIN:.0f}s "
                                 "after its peer failed: a hang") from None
        outcome[rank] = (proc.returncode, time.monotonic() - since,
                         (log_dir / f"rank{rank}.err").read_text())
    return outcome


FAULT_ARGS = ["--steps", "40", "--timeout", str(COLLECTIVE_TIMEOUT), "--fault-step", "5",
              "--fault-rank", "1"]


@pytest.mark.timeout(150)
def test_killed_rank_makes_every_survivor_exit_with_a_clear_error(tmp_path: Path) -> None:
    """SIGKILL of rank 1 of 3 mid-training: ranks 0 and 2 exit non-zero before the
    collective timeout (the broken connection is noticed at once), with distk's error."""
    procs = _launch(3, [*FAULT_ARGS, "--run-dir", str(tmp_path), "--fault", "kill"], tmp_path)
    try:
        killed_at = _wait_until(lambda: procs[1].poll() is not None,
                                time.monotonic() + 90, "rank 1 to kill itself")
        assert procs[1].returncode == -signal.SIGKILL
        for rank, (code, seconds, stderr) in _survivors_fail(procs, 1, killed_at,
                                                              tmp_path).items():
            assert code != 0, (rank, stderr[-3000:])
            # Closed sockets are noticed at once (measured: ~1 s to exit): no need to wait
            # for the collective timeout.
            assert seconds < COLLECTIVE_TIMEOUT, seconds
            assert "CollectiveError: distk.comm:" in stderr, stderr[-3000:]
            assert f"failed on rank {rank} of 3: a peer rank probably exited" in stderr
    finally:
        _kill_all(procs)


@pytest.mark.timeout(150)
def test_stalled_rank_makes_every_survivor_exit_after_the_collective_timeout(
        tmp_path: Path) -> None:
    """SIGSTOP of rank 1 of 3 (alive, sockets open, silent): ranks 0 and 2 give up after
    the process group's timeout and exit non-zero with distk's error, never hang."""
    procs = _launch(3, [*FAULT_ARGS, "--run-dir", str(tmp_path), "--fault", "stop"], tmp_path)
    try:
        stopped_at = _wait_until(lambda: _process_state(procs[1].pid) == "T",
                                 time.monotonic() + 90, "rank 1 to stop itself")
        for rank, (code, seconds, stderr) in _survivors_fail(procs, 1, stopped_at,
                                                              tmp_path).items():
            assert code != 0, (rank, stderr[-3000:])
            # They waited for the timeout (minus the time already spent inside the
            # collective before rank 1 was seen stopped), not failing for another reason.
            assert COLLECTIVE_TIMEOUT - 2 < seconds < COLLECTIVE_TIMEOUT + MARGIN, seconds
            assert "CollectiveError: distk.comm:" in stderr, stderr[-3000:]
            assert "Timed out" in stderr
    finally:
        _kill_all(procs)


RESTART_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
"""Needed for torchrun restarts (torch 2.13): by default the workers share the rendezvous
TCPStore, which keeps the previous attempt's gloo addresses, so restarted ranks connect
to dead peers and fail or hang in init_process_group (pytorch/pytorch#135712)."""


def _torchrun(args: list[str], *, max_restarts: int = 0,
              timeout: float = 150) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "--max-restarts", str(max_restarts), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(**RESTART_ENV),
                          cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _losses(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "losses.jsonl").open()]


@pytest.mark.timeout(300)
def test_torchrun_restart_resumes_from_the_checkpoint_and_matches_the_uninterrupted_run(
        tmp_path: Path) -> None:
    """Rank 1 crashes at step 12 (checkpoints every 5 steps); torchrun --max-restarts 1
    restarts both ranks, which resume from step 10: every loss equals the uninterrupted
    run's bitwise (same data, parameters, optimizer state and distk residuals)."""
    common = [str(FAULT_JOB), "--steps", "24", "--checkpoint-every", "5",
              "--timeout", "30"]
    _torchrun([*common, "--run-dir", str(tmp_path / "full")])
    proc = _torchrun([*common, "--run-dir", str(tmp_path / "crashed"), "--resume",
                      "--fault", "crash", "--fault-step", "12", "--fault-rank", "1"],
                     max_restarts=1)
    assert "fault_job: rank 1 injects 'crash' at step 12" in proc.stderr
    assert "fault_job: resumed from step 10" in proc.stderr

    full = {entry["step"]: entry["loss"] for entry in _losses(tmp_path / "full")}
    assert sorted(full) == list(range(1, 25))
    crashed = _losses(tmp_path / "crashed")
    first = [e["step"] for e in crashed if e["attempt"] == 0]
    second = [e["step"] for e in crashed if e["attempt"] == 1]
    assert first == list(range(1, 13)) and second == list(range(11, 25))
    for entry in crashed:  # both attempts, including the steps redone after the restart
        assert entry["loss"] == full[entry["step"]], entry


@pytest.mark.timeout(300)
def test_same_seed_gives_bitwise_identical_losses_across_runs(tmp_path: Path) -> None:
    """Two separate 2-rank torchrun launches of the training job (bucketed, CPU, gloo)."""
    runs = []
    for name in ("first", "second"):
        _torchrun(["-m", "distk.train", "--config", str(ROOT / "configs" / "tiny.json"),
                   "--mode", "bucketed", "--steps", "12", "--name", name,
                   "--set", f"run_root={json.dumps(str(tmp_path))}"])
        metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
        runs.append([(m["step"], m["train/loss"], m.get("val/loss"), m.get("distk/k"))
                     for m in metrics if "train/loss" in m])
    assert len(runs[0]) == 12
    assert runs[0] == runs[1]
