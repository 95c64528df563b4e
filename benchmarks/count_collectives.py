"""Diagnostic: every ``torch.distributed`` collective a ``distk-train`` run makes, counted.

Runs ``python -m distk.train`` with the given arguments in this process, with each
collective of ``torch.distributed`` (all-reduce, all-gather, broadcast, ...) wrapped so
that it is counted before it runs: calls and the bytes of the tensors handed to it (the
input of an all-gather, the tensor of an all-reduce), by collective and by the distk
function that called it. The collectives themselves run unchanged. Each rank writes
``<tally-dir>/rank<R>.json``; rank 0 prints its table. What this explains: the wire
carries the ring's bytes plus a fixed cost per call (docs/comm-and-compressor.md,
"Coalesced exchanges"), so the number of calls matters as well as the bytes.

    # the 4-rank outer row of the protocol (the command e2e.py --dry-run prints for it),
    # every rank in its own emulated host:
    sudo launchers/netem.sh run 4 none -- .venv/bin/python benchmarks/count_collectives.py \\
        --tally-dir runs/collectives --config runs/e2e/<out>/config.json --mode bucketed ...

Every argument but ``--tally-dir`` goes to ``distk.train``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import runpy
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
               "reduce_scatter_tensor", "broadcast", "all_gather_object",
               "broadcast_object_list", "barrier", "send", "recv", "isend", "irecv",
               "all_to_all_single", "gather", "scatter", "reduce")
GATHERS = ("all_gather", "all_gather_into_tensor", "all_gather_single",
           "reduce_scatter_tensor")  # (output, input, ...): the input is counted

tally: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])


def tensor_bytes(obj: Any) -> int:
    """Bytes of a tensor or of a list of them; 0 for anything else."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(o) for o in obj)
    return 0


def caller() -> str:
    """The innermost distk function on the stack (``file:function``)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if f"{os.sep}distk{os.sep}" in frame.filename:
            return f"{Path(frame.filename).name}:{frame.name}"
    return "?"


def counted(name: str, collective: Any) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        handed = args[1] if name in GATHERS and len(args) > 1 else (args[0] if args else None)
        entry = tally[f"{name} <- {caller()}"]
        entry[0] += 1
        entry[1] += tensor_bytes(handed)
        return collective(*args, **kwargs)
    return run


def write(tally_dir: Path) -> None:
    rank = int(os.environ.get("RANK", "0"))
    tally_dir.mkdir(parents=True, exist_ok=True)
    rows = {key: {"calls": calls, "bytes": nbytes} for key, (calls, nbytes) in tally.items()}
    (tally_dir / f"rank{rank}.json").write_text(json.dumps(rows, indent=1))
    if rank == 0:
        print("| collective <- caller | calls | tensor MB |\n|---|---|---|")
        for key, row in sorted(rows.items(), key=lambda kv: -kv[1]["bytes"]):
            print(f"| {key} | {row['calls']} | {row['bytes'] / 1e6:.3f} |")
        print(f"wrote {tally_dir}/rank*.json", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tally-dir", type=Path, required=True,
                        help="where each rank writes rank<R>.json")
    args, train_args = parser.parse_known_args()
    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, counted(name, getattr(dist, name)))
    # distk-train leaves through os._exit after a clean finish: write the tally first.
    leave = os._exit

    def write_then_leave(code: int) -> None:
        write(args.tally_dir)
        leave(code)

    os._exit = write_then_leave
    sys.argv = ["distk.train", *train_args]
    runpy.run_module("distk.train", run_name="__main__")
    write(args.tally_dir)


if __name__ == "__main__":
    main()
