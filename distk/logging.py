"""``StatsLogger``: one sink for metric dicts — tqdm progress bar, JSONL file and wandb.

Only the reporting rank (rank 0 by default) does anything; on other ranks every method is
a no-op, so callers need no ``if rank == 0``. wandb is imported lazily, only when asked
for: not installed and not requested is silent; requested but not installed raises an
error naming the extra (``pip install distk[wandb]``). Without credentials (no
``WANDB_API_KEY`` and no netrc entry for the wandb host) and no ``WANDB_MODE``, wandb
runs offline and writes under ``./wandb`` (or ``$WANDB_DIR``); ``wandb sync`` uploads
them later.

Metric names use prefixes: ``train/*``, ``val/*`` and ``distk/*``; wandb gets every one of
them plotted against the step metric ``step`` (``define_metric``).

Example::

    logger = StatsLogger("runs/demo", total_steps=300, wandb=True, config=cfg.to_dict())
    for step in range(300):
        ...
        logger.log({"train/loss": loss, "distk/bytes_sent": n}, step=step + 1)
    logger.close()
"""

from __future__ import annotations

import json
import math
import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlparse

import torch
import torch.distributed as dist

__all__ = ["StatsLogger", "wandb_has_credentials"]

WANDB_EXTRA_HINT = "pip install distk[wandb]"
METRIC_PREFIXES = ("train", "val", "distk")


def _default_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _import_wandb() -> ModuleType:
    try:
        import wandb
    except ImportError as err:
        raise ImportError(
            "wandb logging was requested (logging.wandb=true or --wandb) but the wandb "
            f"package is not installed; install the extra: {WANDB_EXTRA_HINT}"
        ) from err
    return wandb


def wandb_has_credentials() -> bool:
    """True when wandb could log online: ``WANDB_API_KEY`` is set or a netrc file
    (``$NETRC`` or ``~/.netrc``) has an entry for the wandb host (``$WANDB_BASE_URL``,
    default api.wandb.ai)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host or "api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _to_number(value: Any) -> Any:
    """Plain Python numbers for JSON/wandb (tensors and numpy scalars become floats/ints)."""
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (ValueError, RuntimeError):
            return value
    return value


class StatsLogger:
    """Progress bar + JSONL + optional wandb sink for metric dicts (rank 0 only).

    Args:
        run_dir: directory of the run; ``metrics.jsonl`` goes there (None = no file).
        total_steps: length of the progress bar (None = no bar).
        initial_step: first step of the bar (when resuming).
        config: the whole run configuration, stored as the wandb run's config.
        wandb: log to wandb (see the module docstring for offline mode and errors).
        wandb_project, wandb_entity, wandb_run_name, wandb_group: passed to ``wandb.init``.
        progress: show a tqdm progress bar.
        jsonl: write ``metrics.jsonl``.
        resume_from: when resuming at this step, keep the records of an existing
            ``metrics.jsonl`` up to it (later ones were written after the checkpoint) and
            append; None starts the file afresh.
        rank: the process's rank (default: the default process group's, else $RANK, else
            0); only ``log_rank`` logs.
        log_rank: the rank that reports.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None,
        *,
        total_steps: int | None = None,
        initial_step: int = 0,
        config: Mapping[str, Any] | None = None,
        wandb: bool = False,
        wandb_project: str = "distk",
        wandb_entity: str | None = None,
        wandb_run_name: str | None = None,
        wandb_group: str | None = None,
        progress: bool = True,
        jsonl: bool = True,
        resume_from: int | None = None,
        rank: int | None = None,
        log_rank: int = 0,
    ) -> None:
        self.rank = _default_rank() if rank is None else rank
        self.active = self.rank == log_rank
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.jsonl_path: Path | None = None
        self.wandb_run: Any = None
        self._wandb: ModuleType | None = None
        self._jsonl: Any = None
        self._bar: Any = None
        if not self.active:
            return
        if wandb:
            # Imported (and failing with a clear message) before anything is written.
            self._wandb = _import_wandb()
        if self.run_dir is not None and jsonl:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl_path = self.run_dir / "metrics.jsonl"
            if resume_from is not None and self.jsonl_path.exists():
                kept = [line for line in self.jsonl_path.read_text().splitlines()
                        if line.strip() and json.loads(line)["step"] <= resume_from]
                self.jsonl_path.write_text("".join(line + "\n" for line in kept))
            mode = "a" if resume_from is not None else "w"
            self._jsonl = open(self.jsonl_path, mode)  # noqa: SIM115
        if progress and total_steps is not None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True,
                             desc=wandb_run_name or (self.run_dir.name if self.run_dir else None))
        if self._wandb is not None:
            self._init_wandb(config, wandb_project, wandb_entity, wandb_run_name, wandb_group)

    def _init_wandb(self, config: Mapping[str, Any] | None, project: str, entity: str | None,
                    name: str | None, group: str | None) -> None:
        assert self._wandb is not None
        mode = os.environ.get("WANDB_MODE") or (
            "online" if wandb_has_credentials() else "offline"
        )
        self.wandb_run = self._wandb.init(
            project=project, entity=entity, name=name, group=group,
            config=dict(config) if config is not None else None, mode=mode,
        )
        self.wandb_run.define_metric("step")
        for prefix in METRIC_PREFIXES:
            self.wandb_run.define_metric(f"{prefix}/*", step_metric="step")
        self.wandb_run.define_metric("distk/recall", step_metric="step", summary="mean")

    @property
    def wandb_mode(self) -> str | None:
        """"online"/"offline"/"disabled" of the wandb run, None without one."""
        if self.wandb_run is None:
            return None
        return "offline" if self.wandb_run.offline else "online"

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record ``metrics`` (name -> number) at ``step`` in every enabled sink."""
        if not self.active:
            return
        record = {"step": int(step)}
        record.update({k: _to_number(v) for k, v in metrics.items()})
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
            self._jsonl.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(record)
        if self._bar is not None:
            shown = {k.split("/", 1)[-1]: v for k, v in record.items()
                     if k in ("train/loss", "val/loss", "distk/recall")
                     and isinstance(v, float) and math.isfinite(v)}
            if shown:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def log_histogram(self, name: str, values: Any, step: int, max_samples: int = 10_000
                      ) -> None:
        """Log a wandb histogram of ``values`` (a tensor or array; at most ``max_samples``
        evenly strided entries are kept). A no-op without wandb."""
        if not self.active or self.wandb_run is None or self._wandb is None:
            return
        flat = torch.as_tensor(values).detach().flatten().float().cpu()
        if flat.numel() == 0:
            return
        if flat.numel() > max_samples:
            flat = flat[:: math.ceil(flat.numel() / max_samples)]
        self.wandb_run.log({"step": int(step), name: self._wandb.Histogram(flat.numpy())})

    def advance(self, steps: int = 1) -> None:
        """Move the progress bar forward."""
        if self._bar is not None:
            self._bar.update(steps)

    def write(self, text: str) -> None:
        """Print a line on the reporting rank without breaking the progress bar."""
        if not self.active:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        """Close the bar and the file and finish the wandb run (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def __enter__(self) -> StatsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
