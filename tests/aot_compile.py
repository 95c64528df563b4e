"""Ahead-of-time compile of every Triton kernel variant the launch spec can produce.

Run by ``tests/test_triton_compile.py`` (CI, no GPU needed: ``triton.compile`` with a
``GPUTarget`` uses the ``ptxas`` shipped in the triton wheel; by default a representative
subset, :func:`representative_jobs`, and the full sweep with ``--runslow``) and usable
alone::

    python tests/aot_compile.py [default|flat]   # registers, shared memory, spills

Each variant is compiled for sm_80 and sm_90 with every input dtype it loads;
``cuobjdump --dump-resource-usage`` (same folder as ptxas) reports registers, stack
(spill) bytes and shared memory.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

TARGETS = (80, 90)


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def compile_one(job: tuple[int, int]) -> dict:
    """Compile variant ``index`` for compute capability ``cc``."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    index, cc = job
    import triton
    from triton.backends.compiler import GPUTarget

    from distk.selection import triton_kernel as tk

    launch = list(tk.all_launch_variants())[index]
    row = {"kernel": launch.kernel, "constexprs": dict(launch.constexprs),
           "num_warps": launch.num_warps, "dtype": str(launch.dtype).removeprefix("torch."),
           "sm": cc}
    try:
        source = triton.compiler.ASTSource(tk.KERNELS[launch.kernel],
                                           launch.signature(), dict(launch.constexprs))
        compiled = triton.compile(source, target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": launch.num_warps})
    except Exception as err:  # noqa: BLE001 - reported, and the test fails on it
        row["error"] = f"{type(err).__name__}: {err}"
        return row
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(compiled.asm["cubin"])
        handle.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", handle.name],
                               capture_output=True, text=True, check=True).stdout
    for name in ("REG", "STACK", "SHARED", "LOCAL"):
        match = re.search(rf"\b{name}:(\d+)", usage)
        row[name.lower()] = int(match.group(1)) if match else None
    return row


FAMILIES = ("default", "flat")
"""``default``: the kernels of the default launch spec (``triton_kernel.py``); ``flat``:
the flat kernels (``triton_flat.py``)."""


def _family_indices(family: str | None) -> list[int]:
    """Indices into ``all_launch_variants()`` of the variants of ``family`` (all when
    ``None``)."""
    from distk.selection import triton_kernel as tk
    from distk.selection.triton_flat import FLAT_KERNELS

    if family not in (None, *FAMILIES):
        raise ValueError(f"family must be one of {FAMILIES} or None, got {family!r}")
    return [index for index, launch in enumerate(tk.all_launch_variants())
            if family is None or (launch.kernel in FLAT_KERNELS) == (family == "flat")]


def jobs(family: str | None = None) -> list[tuple[int, int]]:
    """``(variant index, compute capability)`` of every compile of ``family`` (all when
    ``None``): the full sweep."""
    return [(index, cc) for index in _family_indices(family) for cc in TARGETS]


def _branches(launch) -> set[tuple]:
    """What selects code paths in a variant: its kernel's bool constexprs, ``SOURCE``
    (where the keys come from) and the input dtype."""
    chosen = {(launch.kernel, "dtype", str(launch.dtype))}
    for name, value in launch.constexprs:
        if isinstance(value, bool) or name == "SOURCE":
            chosen.add((launch.kernel, name, value))
    return chosen


def _size(launch) -> tuple[float, int]:
    """(the tile a program holds per thread, its largest size constexpr): what drives
    register use, hence spills. The launch spec bounds the first, so the second (e.g. the
    longest sort) breaks the ties."""
    sizes = [value for name, value in launch.constexprs
             if not isinstance(value, bool) and name != "SOURCE"]
    return math.prod(sizes) / (32 * launch.num_warps), max(sizes, default=0)


def representative_jobs(family: str | None = None) -> list[tuple[int, int]]:
    """A small subset of :func:`jobs` for the default test run.

    Each kernel's largest variant (:func:`_size`, the likeliest to spill) for both
    targets; then, greedily, the variants that add the most code paths not yet compiled
    (:func:`_branches`: every bool constexpr, ``SOURCE`` and dtype value of each kernel),
    for one target each, alternating, until every path is compiled once."""
    from distk.selection import triton_kernel as tk

    variants = list(tk.all_launch_variants())
    by_size = sorted(_family_indices(family), key=lambda i: _size(variants[i]), reverse=True)
    picked: list[int] = []
    covered: set[tuple] = set()
    for kernel in sorted({variants[i].kernel for i in by_size}):  # each kernel's largest
        largest = next(i for i in by_size if variants[i].kernel == kernel)
        picked.append(largest)
        covered |= _branches(variants[largest])
    while True:  # then greedily the variant adding most uncovered paths, larger first
        best = max(by_size, key=lambda i: len(_branches(variants[i]) - covered))
        if not _branches(variants[best]) - covered:
            break
        picked.append(best)
        covered |= _branches(variants[best])
    result, largest_done = [], set()
    for position, index in enumerate(picked):
        kernel = variants[index].kernel
        if kernel not in largest_done:
            largest_done.add(kernel)
            result += [(index, cc) for cc in TARGETS]
        else:
            result.append((index, TARGETS[position % len(TARGETS)]))
    return result


def compile_all(workers: int | None = None, selected: list[tuple[int, int]] | None = None,
                family: str | None = None) -> list[dict]:
    """Compile ``selected`` (variant index, target) jobs, by default every variant x
    dtype x target of ``family`` (all families when ``None``), in a process pool."""
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    selected = jobs(family) if selected is None else selected
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_one, selected, chunksize=1))


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'kernel':12} {'constexprs':58} {'warps':>5} {'dtype':9} {'sm':>3} "
             f"{'regs':>4} {'stack':>5} {'shared':>6}"]
    for row in rows:
        consts = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}"
                          for k, v in row["constexprs"].items())
        if "error" in row:
            lines.append(f"{row['kernel']:12} {consts:58} ERROR {row['error'][:200]}")
            continue
        lines.append(f"{row['kernel']:12} {consts:58} {row['num_warps']:>5} {row['dtype']:9} "
                     f"{row['sm']:>3} {row['reg']:>4} {row['stack']:>5} {row['shared']:>6}")
    return "\n".join(lines)


if __name__ == "__main__":
    results = compile_all(family=sys.argv[1] if len(sys.argv) > 1 else None)
    print(format_rows(results))
    bad = [r for r in results if "error" in r or r.get("stack") or r.get("local")]
    print(f"{len(results)} compiles, {len(bad)} with errors or spills")
    sys.exit(1 if bad else 0)
