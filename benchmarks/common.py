"""Shared pieces of the benchmark scripts: timing, result files, plots."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
NETEM_INTERFACE = "veth0"
"""The interface ``launchers/netem.sh`` gives every emulated host."""


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> dict[str, Any]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_results(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    return path


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Print rows as a Markdown table; ``columns`` is (key, header, format)."""
    header = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [header, rule]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("-" if value is None else format(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    return text


def tx_bytes(interface: str = NETEM_INTERFACE) -> int:
    """This host's transmitted bytes on ``interface`` (every frame: Ethernet, IP and TCP
    headers, ACKs)."""
    return int(Path(f"/sys/class/net/{interface}/statistics/tx_bytes").read_text())


def add_netem_part_args(parser: Any, out: str) -> None:
    """The options every netem sweep script shares: ``--timeout`` (seconds per world
    size), ``--out`` (the result name, default ``out``) and ``--part`` (run as one rank
    of a netem run)."""
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per world size")
    parser.add_argument("--out", default=out, help="result name under benchmarks/results")
    parser.add_argument("--part", default=None,
                        help="run as one rank of a netem run and write the world's rows here")
