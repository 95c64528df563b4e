"""One-call GPU check: correctness of distk's CUDA paths, then timings, in one run.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json] [--full]
    python benchmarks/gpu_check.py --dry-run     # launch plans only; no GPU needed

Needs a CUDA machine with torch and triton (run from the repository root, or with distk
installed); FlashInfer's ``top_k`` is timed too when ``flashinfer-python`` is installed
(``pip install -e .[gpu-peers]``). On a machine without CUDA it prints "no CUDA device"
and exits 0. The default run is meant to take under 4 minutes on one H200: parts still
to run once ``--budget-s`` (220 s) have passed are skipped and listed in the JSON.

In order:

1. Correctness (fresh random data, outputs poisoned first so that an unwritten entry
   cannot pass): the default Triton first stage against ``reference.py`` (``--full``:
   every k_per_bucket 1..16 and dtype; default: a subset), on every kernel path of the
   launch spec; ``distk.topk`` end to end.
2. Timings (CUDA events, median after warm-up, inputs rotated so that no call reads the
   previous call's data from L2) on the shapes of the README's GPU table: copy of the
   same bytes (the bandwidth ceiling), ``torch.topk(|x|)``, FlashInfer's ``top_k(|x|)``, and
   ``distk.topk`` with the default and the flat kernels (``DISTK_TRITON_KERNEL``), the
   flat ones with each first pass (``DISTK_TRITON_FILTER`` ``scan`` and ``words``), on
   the same plan, whose outputs must be equal; on the Graphcore shape recall is the minimum
   over 5 inputs; on single rows also the compressor's packed selection
   (``per_bucket_topk`` vs the sync-free ``select_packed``, with each first pass).
   ``--full`` adds a (buckets, k_per_bucket) sweep on the Graphcore shape.
3. A compressor step on one 25 MB fp32 bucket through ``distk.GradientCompressor(cfg)
   .step``: time, host syncs, whether it runs under
   ``torch.cuda.set_sync_debug_mode("error")`` and inside a CUDA graph (failures are
   reported, not raised), and the same for ``select_packed`` beside one read.
4. The flat kernels against the reference on CUDA (``tests/triton_flat_parity.py cuda``),
   then ``GradientCompressor.step`` on CUDA against the same steps on the CPU (bitwise)
   and its conservation law, the exchange and the wire format on a 1-rank NCCL group.
5. CUDA graphs: whether ``select_packed`` and a compressor step can be captured (last,
   since a failed capture leaves the device's random generator unusable).

``--only PART ...`` runs the named parts alone (say, to rerun one that failed).

Prints a table and which kernels and which flat first pass should become the default
(``recommend``), writes JSON and a plot (``--out`` with ``.png``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import distk  # noqa: E402
from distk.compressor.plan import make_plans  # noqa: E402
from distk.selection import per_bucket_topk, resolve_buckets  # noqa: E402
from distk.selection.reference import (  # noqa: E402
    PAD_KEY,
    bucket_candidates_reference,
    order_keys,
    positions_of,
)
from distk.selection.syncfree import new_floor_state, select_packed  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
POISON = 0x5A5A5A5A5A5A5A5A  # an int64 that no composite key of these inputs takes
SHAPES = [
    # name, rows, n, dtype, k
    ("graphcore 256x2^20 fp16 k=1024", 256, 1 << 20, torch.float16, 1024),
    ("long row 2^26 fp32 k=n/1000", 1, 1 << 26, torch.float32, (1 << 26) // 1000),
    ("long row 2^26 bf16 k=n/100", 1, 1 << 26, torch.bfloat16, (1 << 26) // 100),
    ("activations 4096x32768 bf16 k=64", 4096, 32768, torch.bfloat16, 64),
]


def log(*args) -> None:
    print(*args, flush=True)


# -- correctness -----------------------------------------------------------------------------

def exact_floor(x: torch.Tensor, above: int, by_magnitude: bool) -> torch.Tensor:
    """Per-row score key that ``above`` entries of each row exceed (a floor for tests)."""
    keys = order_keys(x, by_magnitude)
    return torch.kthvalue(keys, x.shape[1] - above, dim=1).values


def check_first_stage(failures: list[str], quick: bool) -> int:
    from distk.selection.triton_kernel import bucket_candidates_triton, plan_launches

    checked = 0
    paths_seen: dict[str, int] = {}
    gen = torch.Generator(device="cuda")
    gen.manual_seed(int(time.time()))
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    k_values = range(1, 17)
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    for dtype in dtypes:
        for kb in k_values:
            if quick and kb not in (1, 3, 8, 16):
                continue
            if dtype != torch.float32 and kb not in (1, 2, 3, 5, 8, 13, 16):
                continue
            for rows, n in ((1, 1 << 20), (256, 1 << 14)):
                for bucket_len in (64 * kb + 7, 2048 + 3 * kb):
                    buckets = max(1, n // bucket_len)
                    for floored in (False, True):
                        interleaved = (checked % 3) != 2
                        by_magnitude = (checked % 4) != 3
                        x = torch.randn(rows, n, device="cuda", generator=gen).to(dtype)
                        if checked % 5 == 0:  # specials and ties
                            x[0, 3] = float("nan")
                            x[-1, 5] = float("inf")
                            x[0, 7] = -float("inf")
                            x[0, n // 3: n // 3 + 9] = 0.5
                        kept = min(kb, -(-n // buckets))
                        above = None
                        floor = None
                        if floored:
                            above = kept + 6 * math.sqrt(kept) + 4
                            floor = exact_floor(x, int(above * buckets), by_magnitude)
                        path = plan_launches(rows, n, buckets, kb, interleaved, by_magnitude,
                                             floored, sm, above).path
                        out = torch.full((rows, buckets, kept), POISON, dtype=torch.int64,
                                         device="cuda")
                        got = bucket_candidates_triton(x, buckets, kb, interleaved,
                                                       by_magnitude, floor, above, out=out)
                        want = bucket_candidates_reference(x, buckets, kb, interleaved,
                                                           by_magnitude, floor)
                        if floored and path == "compact":
                            # A row whose candidate list overflowed comes back all padding
                            # (callers redo it): allowed, but must not happen here.
                            overflowed = (got == PAD_KEY).all(dim=2).all(dim=1) & (
                                want != PAD_KEY).any(dim=2).any(dim=1)
                            if bool(overflowed.any()):
                                failures.append(f"overflow rows: {dtype} kb={kb} rows={rows}")
                        if not torch.equal(got, want):
                            bad = (got != want).sum().item()
                            failures.append(
                                f"first stage mismatch ({bad} keys): path={path} {dtype} "
                                f"rows={rows} n={n} b={buckets} kb={kb} floor={floored} "
                                f"interleaved={interleaved} by_magnitude={by_magnitude}")
                        paths_seen[path] = paths_seen.get(path, 0) + 1
                        checked += 1
    # A reference on the CPU for a few cases (the GPU reference uses torch ops on CUDA).
    for dtype in dtypes:
        x = torch.randn(3, 5000, device="cuda", generator=gen).to(dtype)
        got = bucket_candidates_triton(x, 37, 5, True, True).cpu()
        if not torch.equal(got, bucket_candidates_reference(x.cpu(), 37, 5, True, True)):
            failures.append(f"first stage != CPU reference for {dtype}")
        checked += 1
    log(f"  first stage: {checked} cases, paths {paths_seen}")
    return checked


def check_topk(failures: list[str]) -> int:
    from distk.selection.reference import bucketed_topk_reference

    checked = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for rows, n, k, target in ((1, 1 << 20, 1024, 0.99), (256, 1 << 16, 64, 0.95),
                                   (4, 1 << 18, 2621, 0.95), (8, 3000, 30, 0.9)):
            x = torch.randn(rows, n, device="cuda").to(dtype)
            values, indices = distk.topk(x, k, recall_target=target)
            buckets, kb = resolve_buckets(n, k, recall_target=target)
            want = bucketed_topk_reference(x, k, buckets, kb)
            if not torch.equal(indices, want):
                failures.append(f"distk.topk mismatch {dtype} rows={rows} n={n} k={k}")
            if not torch.equal(values, torch.gather(x, 1, want)):
                failures.append(f"distk.topk values mismatch {dtype} rows={rows} n={n}")
            checked += 1
        # the compressor's packed selection (per_bucket_topk, kept 64, floor path)
        x = torch.randn(1, 1 << 20, device="cuda").to(dtype)
        got = per_bucket_topk(x.clone(), 163, 64)
        want = bucket_candidates_reference(x, 163, 64)
        if not torch.equal(got, want):
            failures.append(f"per_bucket_topk (kept 64) mismatch {dtype}")
        checked += 1
    log(f"  distk.topk / per_bucket_topk: {checked} cases")
    return checked


def count_syncs(fn) -> int:
    """Device-to-host synchronisations during ``fn()``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def check_compressor_and_exchange(failures: list[str], report: dict) -> int:
    import torch.distributed as dist

    from distk.comm import WireFormat, sparse_allreduce

    checked = 0
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl", rank=0, world_size=1,
                                device_id=torch.device("cuda", 0))
    numel = 3 << 20
    grads = [torch.randn(numel) * (1 + i) for i in range(6)]
    for cfg in (distk.SparsityConfig(density=0.01),
                distk.SparsityConfig(density=0.01, value_dtype="bfloat16"),
                distk.SparsityConfig(density=0.001, method="exact")):
        gpu = distk.GradientCompressor(cfg)
        cpu_ref = distk.GradientCompressor(cfg)
        total_update = torch.zeros(numel, dtype=torch.float64)
        for step, grad in enumerate(grads):
            out = torch.full((numel,), float("nan"), device="cuda")
            update = gpu.step(grad.cuda(), "bucket0", out=out, step=step)
            want = cpu_ref.step(grad.clone(), "bucket0", step=step)
            if cfg.method == "bucketed" and not torch.equal(update.cpu(), want):
                failures.append(f"compressor step {step} on CUDA != CPU ({cfg.value_dtype})")
            total_update += update.cpu().double()
            checked += 1
        residual = gpu.residual("bucket0").cpu().double()
        mass = torch.stack(grads).double().sum(0)
        error = (total_update + residual - mass).abs().max().item()
        if error > 1e-4:
            failures.append(f"conservation broken on CUDA: max error {error}")
        grad = grads[0].cuda()
        report.setdefault("syncs_per_compressor_step", {})[
            f"{cfg.method}/{cfg.value_dtype}"] = count_syncs(
                lambda g=grad, c=gpu: c.step(g, "bucket0", step=len(grads)))
    x = torch.randn(1, 1 << 22, device="cuda")
    report["syncs_per_topk_call"] = count_syncs(lambda: distk.topk(x, 4096))
    report["syncs_per_packed_selection"] = count_syncs(lambda: per_bucket_topk(x, 4096, 16))
    # exchange and wire format on CUDA
    indices = torch.randperm(1 << 20, device="cuda")[:5000]
    values = torch.randn(5000, device="cuda")
    out = sparse_allreduce(indices, values, 1 << 20)
    want = torch.zeros(1 << 20, device="cuda").index_add_(0, indices, values)
    if out.device.type != "cuda" or not torch.equal(out, want):
        failures.append("sparse_allreduce on a 1-rank NCCL group is wrong")
    checked += 1
    wire = WireFormat(1 << 20, 4096, torch.bfloat16, 4096, 1, True)
    positions = torch.arange(4096, device="cuda") + 4096 * torch.randint(
        0, 256, (4096,), device="cuda")
    vals = torch.randn(4096, device="cuda")
    got_idx, got_val = wire.unpack(wire.pack(positions, vals))
    if not (torch.equal(got_idx, positions) and torch.equal(got_val, vals.bfloat16())):
        failures.append("wire pack/unpack round trip on CUDA is wrong")
    checked += 1
    log(f"  compressor / exchange / wire: {checked} checks; syncs: "
        f"{report['syncs_per_compressor_step']}, topk {report['syncs_per_topk_call']}")
    return checked


# -- timing --------------------------------------------------------------------------------

def time_cuda(fn, inputs: list, warmup: int = 3, repeats: int = 20) -> float:
    """Median milliseconds of ``fn(inputs[i % len(inputs)])`` with CUDA events."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    times = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(inputs[i % len(inputs)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measured_recall(x: torch.Tensor, indices: torch.Tensor, k: int) -> float:
    exact = torch.topk(x.abs(), k, dim=-1).indices
    chosen = torch.zeros_like(x, dtype=torch.bool).scatter_(1, indices, True)
    return chosen.gather(1, exact).float().mean().item()


KERNELS = ("default", "flat", "flat-words")
"""Kernel settings timed side by side (see docs/selection.md): ``DISTK_TRITON_KERNEL``
``default`` and ``flat``, and ``flat`` with the ``words`` first pass
(``DISTK_TRITON_FILTER=words``)."""
SETTINGS = {"default": {"DISTK_TRITON_KERNEL": "default"},
            "flat": {"DISTK_TRITON_KERNEL": "flat", "DISTK_TRITON_FILTER": "scan"},
            "flat-words": {"DISTK_TRITON_KERNEL": "flat", "DISTK_TRITON_FILTER": "words"}}
"""The environment of each of ``KERNELS``."""
RECALL_INPUTS = 5
"""Inputs the Graphcore shape's recall is measured on (its minimum is reported)."""


class kernel_choice:
    """The environment of a kernel setting (one of ``KERNELS``, or a
    ``DISTK_TRITON_KERNEL`` value) and, given, ``DISTK_CUDA_GRAPHS``, for the duration of
    a ``with`` block."""

    def __init__(self, kernel: str, graphs: str | None = None):
        self.values = dict(SETTINGS.get(kernel, {"DISTK_TRITON_KERNEL": kernel}))
        if graphs is not None:
            self.values["DISTK_CUDA_GRAPHS"] = graphs

    def __enter__(self):
        self.saved = {name: os.environ.get(name) for name in self.values}
        os.environ.update(self.values)

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def flashinfer_top_k():
    """FlashInfer's ``top_k(input, k, sorted=False)`` when ``flashinfer-python`` is
    installed (the ``gpu-peers`` extra), else ``None``."""
    try:
        import flashinfer
    except Exception:  # noqa: BLE001 - any import failure means: not available
        return None
    return getattr(flashinfer, "top_k", None)


def run_timings(report: dict, full: bool, deadline: float) -> list[dict]:
    """Every method on every shape of ``SHAPES``, in one run: copy (the bandwidth
    ceiling), ``torch.topk(|x|)``, FlashInfer's ``top_k(|x|)`` when importable, and
    ``distk.topk`` with the default and the flat kernels on the same plan (their outputs
    compared: they must be equal). Recall is the minimum over the inputs it is measured
    on (``RECALL_INPUTS`` for the Graphcore shape). Shapes left when ``deadline`` (a
    ``time.time()``) has passed are skipped and listed in ``report["skipped"]``."""
    rows_out = []
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    peer = flashinfer_top_k()
    report["flashinfer"] = None if peer is None else _version("flashinfer-python")
    for name, rows, n, dtype, k in SHAPES:
        if time.time() > deadline:
            report.setdefault("skipped", []).append(f"timings: {name}")
            log(f"  skipped {name}: time budget spent")
            continue
        nbytes = rows * n * torch.tensor([], dtype=dtype).element_size()
        copies = max(2, math.ceil(3 * l2 / nbytes))
        recall_inputs = RECALL_INPUTS if name.startswith("graphcore") else 1
        inputs = [torch.randn(rows, n, device="cuda").to(dtype)
                  for _ in range(max(copies, recall_inputs))]
        dst = torch.empty_like(inputs[0])
        copy_ms = time_cuda(lambda x, d=dst: d.copy_(x), inputs)
        copy_gbs = 2 * nbytes / copy_ms / 1e6
        base = {"shape": name, "rows": rows, "n": n, "dtype": str(dtype), "k": k,
                "input_bytes": nbytes, "copy_ms": copy_ms, "copy_GBps": copy_gbs}

        def add(method, ms, recall=None, plan=None, **extra):
            row = {**base, "method": method, "ms": ms, "GBps": nbytes / ms / 1e6,
                   "fraction_of_copy_bw": (nbytes / ms) / (2 * nbytes / copy_ms),
                   "recall": recall, "plan": plan, **extra}
            rows_out.append(row)
            log(f"  {name:36} {method:30} {ms * 1000:9.1f} us  {row['GBps']:7.0f} GB/s  "
                f"{row['fraction_of_copy_bw']:5.2f} of copy  recall "
                f"{'-' if recall is None else f'{recall:.4f}'}  {plan or ''}")

        add("copy (read+write)", copy_ms)
        heavy = rows * n >= 1 << 26
        exact_ms = time_cuda(lambda x: torch.topk(x.abs(), k, dim=-1), inputs,
                             repeats=5 if heavy else 20)
        add("torch.topk(|x|)", exact_ms, 1.0)
        if peer is not None:
            try:
                ms = time_cuda(lambda x: peer(x.abs(), k), inputs, repeats=5 if heavy else 20)
                _, idx = peer(inputs[0].abs(), k)
                add("flashinfer.top_k(|x|)", ms, measured_recall(inputs[0], idx.long(), k))
            except Exception as err:  # noqa: BLE001 - a peer failing is reported, not fatal
                report.setdefault("peer_errors", []).append(f"{name}: {err!r}")
        targets = (0.99,) if name.startswith("graphcore") and not full else (0.95, 0.99)
        for target in targets:
            plan = resolve_buckets(n, k, recall_target=target)
            results = {}
            for kernel in KERNELS:
                with kernel_choice(kernel):
                    ms = time_cuda(lambda x, t=target: distk.topk(x, k, recall_target=t),
                                   inputs)
                    chosen = [distk.topk(x, k, recall_target=target)[1]
                              for x in inputs[:recall_inputs]]
                results[kernel] = chosen
                recall = min(measured_recall(x, idx, k) for x, idx in zip(inputs, chosen))
                add(f"distk {kernel} r={target}", ms, recall, f"b={plan[0]} kb={plan[1]}",
                    kernel=kernel, pair=f"distk.topk r={target}")
            for kernel, row in zip(KERNELS[1:], rows_out[-len(KERNELS) + 1:], strict=True):
                same = all(torch.equal(a, b) for a, b in zip(results["default"],
                                                              results[kernel]))
                row["equal_to_default"] = same
                if not same:
                    report.setdefault("failures", []).append(
                        f"{kernel} != default on {name} r={target}")
        if rows == 1:
            # The compressor's packed plan at this density (kept 64, no second stage):
            # per_bucket_topk (default kernels, one sync) and select_packed (flat, none).
            buckets = max(1, k // 64)
            ms = time_cuda(lambda x: per_bucket_topk(x, buckets, 64), inputs)
            add("packed per_bucket_topk (default)", ms, None, f"b={buckets} kb=64",
                kernel="default", pair="packed kb=64")
            want = positions_of(per_bucket_topk(inputs[0], buckets, 64)).reshape(-1)
            for kernel in KERNELS[1:]:  # select_packed runs the flat kernels: each first pass
                with kernel_choice(kernel):
                    state = new_floor_state("cuda")
                    ms = time_cuda(lambda x, s=state: select_packed(x.view(-1), buckets, 64,
                                                                    floor_state=s), inputs)
                    got = select_packed(inputs[0].view(-1), buckets, 64)
                add(f"packed select_packed ({kernel})", ms, None, f"b={buckets} kb=64",
                    kernel=kernel, pair="packed kb=64")
                if not torch.equal(got, want):
                    report.setdefault("failures", []).append(
                        f"select_packed ({kernel}) != per_bucket_topk on {name}")
        if name.startswith("graphcore") and full:
            for kb in (2, 4, 6, 8, 12, 16):
                buckets, kb = distk.choose_buckets(n, k, 0.99, k_per_bucket=kb)
                for kernel in KERNELS:
                    with kernel_choice(kernel):
                        ms = time_cuda(lambda x, b=buckets, q=kb: distk.topk(
                            x, k, buckets=b, k_per_bucket=q), inputs)
                        recall = min(measured_recall(x, distk.topk(
                            x, k, buckets=buckets, k_per_bucket=kb)[1], k)
                            for x in inputs[:recall_inputs])
                    add(f"distk {kernel} sweep r>=0.99", ms, recall, f"b={buckets} kb={kb}",
                        kernel=kernel, pair=f"sweep b={buckets} kb={kb}")
        del inputs, dst
        torch.cuda.empty_cache()
    return rows_out


def plain_steps(cfg: distk.SparsityConfig) -> Iterator[int]:
    """Step numbers from 1 on that are neither stats nor recall steps of ``cfg`` (those
    measure diagnostics, which read from the device by design)."""
    return (s for s in itertools.count(1)
            if s % cfg.stats_interval and s % cfg.recall_interval)


def run_compressor_step(report: dict) -> dict:
    """A bucketed compressor step on one 25 MB fp32 bucket through the public API
    (``distk.GradientCompressor(cfg).step``): its time, its host syncs (counted), whether
    it runs under ``torch.cuda.set_sync_debug_mode("error")`` and whether it can be
    captured in a CUDA graph; each failure is reported, not raised. The same for the
    sync-free selection the compressor is to call (``select_packed``), beside one read
    of the bucket (half a copy's time)."""
    numel = COMPRESSOR_BUCKET_BYTES // 4
    cfg = distk.SparsityConfig(density=0.01)
    out: dict = report.setdefault("compressor_step", {})  # filled as it goes
    out.update(numel=numel, density=cfg.density)
    grads = [torch.randn(numel, device="cuda") for _ in range(3)]
    # Plain steps only (no stats or recall diagnostics, which sync by design), with each
    # set of kernels (DISTK_TRITON_KERNEL; "auto" is the default).
    plain = plain_steps(cfg)
    # The same gradient buffer at every step, as DDP's bucket: with DISTK_CUDA_GRAPHS=1
    # the selection is then replayed from its CUDA graph.
    bucket = torch.empty(numel, device="cuda")
    for kernel, graphs in (("default", "0"), ("auto", "0"), ("auto", "1")):
        with kernel_choice(kernel, graphs):
            compressor = distk.GradientCompressor(cfg)

            def step(grad: torch.Tensor, compressor=compressor) -> torch.Tensor:
                return compressor.step(bucket.copy_(grad), "bucket", step=next(plain))

            for grad in grads:  # warm-up: plans, kernels, residual, graph
                step(grad)
            suffix = {"default": "_default", "auto": ""}[kernel] + (
                "_graphs" if graphs == "1" else "")
            out[f"step_ms{suffix}"] = time_cuda(step, grads)
            out[f"step_syncs{suffix}"] = count_syncs(lambda: step(grads[0]))
            out[f"step_under_sync_error{suffix}"] = _attempt(
                lambda: _under_sync_error(lambda: step(grads[1])))
    plan = make_plans(cfg, numel, cfg.k_at(numel, 0))[0]
    out["plan"] = f"b={plan.buckets} kb={plan.k_per_bucket} packed={plan.packed}"
    acc = torch.randn(numel, device="cuda")
    dst = torch.empty_like(acc)
    out["one_read_ms"] = time_cuda(lambda x: dst.copy_(x), [acc, grads[0], grads[1]]) / 2
    if plan.packed:
        state = new_floor_state("cuda")
        inputs = [torch.randn(numel, device="cuda") for _ in range(3)]
        out["select_packed_ms"] = time_cuda(lambda x: select_packed(
            x, plan.buckets, plan.k_per_bucket, floor_state=state), inputs)
        out["per_bucket_topk_ms"] = time_cuda(lambda x: per_bucket_topk(
            x.view(1, -1), plan.buckets, plan.k_per_bucket), inputs)
        out["select_packed_syncs"] = count_syncs(lambda: select_packed(
            inputs[0], plan.buckets, plan.k_per_bucket, floor_state=state))
        out["select_packed_under_sync_error"] = _attempt(lambda: _under_sync_error(
            lambda: select_packed(inputs[1], plan.buckets, plan.k_per_bucket,
                                  floor_state=state)))
        out["select_packed_vs_one_read"] = out["select_packed_ms"] / out["one_read_ms"]
    for key, value in out.items():
        log(f"  compressor {key:32} {value}")
    return out


def run_breakdown(report: dict) -> list[dict]:
    """Where the time of the compressor's selection and of the Graphcore shape goes: per
    call, the host's enqueue time (``fn()`` returning, no sync), the synchronised wall
    time, the CUDA events' time, each kernel's device time (``torch.profiler``) and, for
    ``select_packed``, the time of a CUDA-graph replay of the same call (the device's
    time with no host in the way). Graph captures run after every other call."""

    out: list[dict] = report.setdefault("breakdown", [])
    cases = []  # (shape, call, kernels, fn, capturable)
    for shape, n, buckets, kb in (("bucket 25 MB fp32", COMPRESSOR_BUCKET_BYTES // 4, 973, 65),
                                  ("long row 2^26 fp32", 1 << 26, 1048, 64)):
        x = torch.randn(n, device="cuda")
        state = new_floor_state("cuda")
        cases += [
            (shape, f"select_packed b={buckets} kb={kb}", "flat",
             lambda x=x, b=buckets, kb=kb, s=state: select_packed(x, b, kb, floor_state=s), True),
            (shape, f"per_bucket_topk b={buckets} kb={kb}", "default",
             lambda x=x, b=buckets, kb=kb: per_bucket_topk(x.view(1, -1), b, kb), False)]
    g = torch.randn(256, 1 << 20, device="cuda").to(torch.float16)
    for kernel in KERNELS:
        cases.append(("graphcore 256x2^20 fp16 k=1024", "distk.topk r=0.99", kernel,
                      lambda g=g: distk.topk(g, 1024, recall_target=0.99), False))
    graphs = []
    for shape, call, kernel, fn, capturable in cases:
        row = {"shape": shape, "call": call, "kernels_set": kernel}
        try:
            with kernel_choice(kernel):
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
                started = time.perf_counter()
                fn()
                row["enqueue_us"] = (time.perf_counter() - started) * 1e6
                torch.cuda.synchronize()
                row["wall_us"] = (time.perf_counter() - started) * 1e6
                row["event_us"] = time_cuda(lambda _: fn(), [None]) * 1000
                kernels = kernel_times(fn)
            row["kernel_us"] = sum(t for _, t, _ in kernels)
            row["kernels"] = [[key[:90], t, c] for key, t, c in kernels[:10]]
        except Exception as err:  # noqa: BLE001 - reported, the other cases still run
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        out.append(row)
        if capturable:
            graphs.append((row, kernel, fn))
        log(f"  {shape:32} {call:34} {kernel:7} enqueue {row.get('enqueue_us', 0):8.1f} us, "
            f"wall {row.get('wall_us', 0):8.1f}, events {row.get('event_us', 0):8.1f}, "
            f"kernels {row.get('kernel_us', 0):8.1f} {row.get('error', '')}")
        for key, t, count in row.get("kernels", [])[:8]:
            log(f"      {t:8.1f} us x{count:<3} {key}")
    for row, kernel, fn in graphs:  # last: a failed capture breaks later random draws
        try:
            with kernel_choice(kernel):
                fn()
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                row["graph_replay_us"] = time_cuda(lambda _: graph.replay(), [None]) * 1000
        except Exception as err:  # noqa: BLE001
            row["graph_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        log(f"  {row['shape']:32} {row['call']:34} graph replay "
            f"{row.get('graph_replay_us', float('nan')):8.1f} us {row.get('graph_error', '')}")
    return out


def run_cuda_graphs(report: dict) -> None:
    """Whether a compressor step on the 25 MB bucket and ``select_packed`` can be captured
    in a CUDA graph. Run last: a capture that fails part-way leaves the default CUDA
    generator marked as capturing, and every later ``torch.randn`` on the device fails."""
    numel = COMPRESSOR_BUCKET_BYTES // 4
    cfg = distk.SparsityConfig(density=0.01)
    out: dict = report.setdefault("compressor_step", {})
    grads = [torch.randn(numel, device="cuda") for _ in range(3)]  # all inputs first
    compressor = distk.GradientCompressor(cfg)
    steps = plain_steps(cfg)  # stats steps sync by design
    for grad in grads[:2]:
        compressor.step(grad, "bucket", step=next(steps))
    plan = make_plans(cfg, numel, cfg.k_at(numel, 0))[0]
    if plan.packed:
        state = new_floor_state("cuda")
        out["select_packed_cuda_graph"] = _attempt(lambda: _capture(lambda: select_packed(
            grads[0], plan.buckets, plan.k_per_bucket, floor_state=state)))
    out["step_cuda_graph"] = _attempt(lambda: _capture(
        lambda: compressor.step(grads[2], "bucket", step=next(steps))))
    for key in ("select_packed_cuda_graph", "step_cuda_graph"):
        if key in out:
            log(f"  compressor {key:32} {out[key]}")


COMPRESSOR_BUCKET_BYTES = 25_000_000
"""One DDP bucket (DDP's default ``bucket_cap_mb``)."""


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def _attempt(fn) -> str:
    """``"ok"``, or the exception it raised (reported, not fatal)."""
    try:
        fn()
        torch.cuda.synchronize()
        return "ok"
    except Exception as err:  # noqa: BLE001 - the point is to report it
        torch.cuda.synchronize()
        return f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"


def _under_sync_error(fn) -> None:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _capture(fn) -> None:
    """Capture ``fn`` in a CUDA graph and replay it once."""
    fn()  # warm-up outside the capture (kernel compiles, caches)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()


def _faster(base: dict, other: dict) -> bool:
    """Whether ``other`` should replace ``base``: equal outputs and at least 5% faster
    (about the spread between runs)."""
    return other.get("equal_to_default", True) and other["ms"] <= 0.95 * base["ms"]


def _overall(picks: set[str], new: str, old: str) -> str:
    return ((new if picks == {new} else old if picks == {old} else "per shape (see per_shape)")
            if picks else "not measured")


def recommend(rows: list[dict]) -> dict:
    """Which kernels should become the default: for each shape and call timed with both
    (``pair``), the faster of ``default`` and ``flat`` (flat only when its output equalled
    the default's and it was at least 5% faster: ``_faster``), and overall: ``flat`` when
    it wins every comparison, ``default`` when it wins none. The same for the flat
    kernels' first pass (``DISTK_TRITON_FILTER``): ``words`` against ``scan``."""
    verdict = {}
    pairs = dict.fromkeys((r["shape"], r["pair"]) for r in rows if r.get("pair"))
    for shape, pair in pairs:
        timed = {r["kernel"]: r for r in rows if r["shape"] == shape and r.get("pair") == pair}
        if not {"default", "flat"} <= set(timed):
            continue
        default, flat = timed["default"], timed["flat"]
        row = {"default_us": default["ms"] * 1000, "flat_us": flat["ms"] * 1000,
               "speedup": default["ms"] / flat["ms"],
               "outputs_equal": flat.get("equal_to_default", True),
               "recall_default": default["recall"], "recall_flat": flat["recall"],
               "pick": "flat" if _faster(default, flat) else "default"}
        words = timed.get("flat-words")
        if words is not None:
            row.update(flat_words_us=words["ms"] * 1000, words_speedup=flat["ms"] / words["ms"],
                       words_outputs_equal=words.get("equal_to_default", True),
                       filter_pick="words" if _faster(flat, words) else "scan")
        verdict[f"{shape} / {pair}"] = row
    return {"per_shape": verdict,
            "overall": _overall({v["pick"] for v in verdict.values()}, "flat", "default"),
            "filter": _overall({v["filter_pick"] for v in verdict.values()
                                if "filter_pick" in v}, "words", "scan")}


def plot(report: dict, path: Path) -> None:
    """Bars of microseconds per method, one panel per shape, the one-read time as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.get("timings", [])
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    if not shapes:
        return
    fig, axes = plt.subplots(len(shapes), 1, figsize=(10, 3.2 * len(shapes)), squeeze=False)
    for ax, shape in zip(axes[:, 0], shapes):
        mine = [r for r in rows if r["shape"] == shape and r["method"] != "copy (read+write)"]
        ax.barh([r["method"] for r in mine], [r["ms"] * 1000 for r in mine],
                color=[{"flat": "tab:orange", "flat-words": "tab:green",
                        "default": "tab:blue"}.get(r.get("kernel"), "tab:gray")
                       for r in mine])
        ax.axvline(mine[0]["copy_ms"] * 500, color="k", linestyle="--", label="one read")
        ax.set_title(shape)
        ax.set_xlabel("microseconds (median)")
        ax.legend(loc="lower right")
    fig.suptitle(f"{report.get('device', '')}, torch {report.get('torch', '')}, triton "
                 f"{report.get('triton', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dry_run() -> int:
    """What a run would do, without a GPU: the shapes, each kernel's launch plan (an
    H200's 132 SMs assumed), and whether FlashInfer is importable."""
    from distk.selection import floor_sample
    from distk.selection.triton_flat import plan_flat, plan_row
    from distk.selection.triton_kernel import plan_launches

    log("gpu_check --dry-run: plans for an H200 (132 SMs); nothing is timed")
    for name, rows, n, dtype, k in SHAPES:
        for target in (0.95, 0.99):
            buckets, kb = resolve_buckets(n, k, recall_target=target)
            recall = max(distk.expected_recall(n, k, buckets, kb), 0.05)
            sample = floor_sample(n, 2 * k / (recall * n), "cuda")
            above = None if sample is None else sample.upper_fraction * -(-n // buckets)
            default = plan_launches(rows, n, buckets, kb, True, True, sample is not None, 132,
                                    above, dtype)
            row = plan_row(rows, n, k, buckets, kb, True, True, dtype)
            flat = None if sample is None else plan_flat(rows, n, buckets, kb, True, True, 132,
                                                          tuple(sample), k, dtype)
            flat_desc = (f"row kernel {dict(row.constexprs)}" if row is not None else
                         "not applicable" if flat is None else
                         f"{[s.kernel for s in flat.launches]} row_cap={flat.row_cap} "
                         f"width={flat.width}")
            log(f"  {name:36} r={target} b={buckets} kb={kb}: default {default.path} "
                f"{[s.kernel for s in default.launches]}; flat {flat_desc}")
    numel = COMPRESSOR_BUCKET_BYTES // 4
    cfg = distk.SparsityConfig(density=0.01)
    plan = make_plans(cfg, numel, cfg.k_at(numel, 0))[0]
    log(f"  compressor step: {numel} fp32 entries, plan b={plan.buckets} "
        f"kb={plan.k_per_bucket} packed={plan.packed}")
    peer = flashinfer_top_k()
    log(f"  flashinfer top_k: {'importable' if peer is not None else 'not installed'}")
    return 0


def kernel_times(fn) -> list[tuple[str, float, int]]:
    """``(kernel, device microseconds, launches)`` of one call of ``fn``, slowest first
    (``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted(((e.key, e.device_time_total, e.count)
                   for e in prof.key_averages() if e.device_time_total > 0),
                  key=lambda r: -r[1])


def run_profile(quick: bool) -> list[dict]:
    """Per-kernel CUDA time of one call of each timed configuration (torch.profiler),
    and the host time of a call (synchronised wall clock)."""

    out = []
    for name, rows, n, dtype, k in SHAPES:
        x = torch.randn(rows, n, device="cuda").to(dtype)
        calls = [(f"distk r={t}", lambda t=t: distk.topk(x, k, recall_target=t))
                 for t in (0.95, 0.99)]
        if rows == 1:
            calls.append(("per_bucket_topk kb=64",
                          lambda: per_bucket_topk(x, max(1, k // 64), 64)))
            cand = torch.randint(0, 1 << 62, (1, 2 * k), device="cuda")
            calls.append(("stage2 torch.topk", lambda c=cand: torch.topk(c, k, dim=-1)))
            calls.append(("stage2 torch.sort", lambda c=cand: torch.sort(
                c, dim=-1, descending=True).values[:, :k]))
        for label, fn in calls:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            started = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            wall_us = (time.perf_counter() - started) * 1e6
            kernels = kernel_times(fn)
            total = sum(t for _, t, _ in kernels)
            log(f"  {name:34} {label:24} wall {wall_us:8.1f} us, kernels {total:8.1f} us")
            for key, t, count in kernels[:6]:
                log(f"      {t:8.1f} us x{count:<3} {key[:90]}")
            out.append({"shape": name, "call": label, "wall_us": wall_us,
                        "kernel_us": total, "kernels": kernels[:12]})
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS / "gpu_check.json"))
    parser.add_argument("--full", action="store_true",
                        help="every correctness case and the Graphcore plan sweep (longer than "
                             "the 4-minute default run)")
    parser.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # the default
    parser.add_argument("--skip-timings", action="store_true")
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="also print per-kernel times of each timed call")
    parser.add_argument("--budget-s", type=float, default=220.0,
                        help="parts (and timed shapes) still to run once this many seconds "
                             "have passed are skipped and listed in the JSON")
    parser.add_argument("--only", nargs="+", metavar="PART",
                        help="run only these parts, by name: 'first stage', 'distk.topk', "
                             "'timings', 'compressor step', 'flat kernels', 'compressor and "
                             "exchange', 'cuda graphs' (with --profile also 'profile' and "
                             "'breakdown')")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the launch plans of every timed configuration and exit "
                             "(no GPU needed)")
    args = parser.parse_args(argv)
    if args.dry_run:
        return dry_run()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing to check (exit 0)")
        return 0
    started = time.time()
    props = torch.cuda.get_device_properties(0)
    import triton

    report: dict = {"device": props.name, "sm_count": props.multi_processor_count,
                    "torch": torch.__version__, "triton": triton.__version__,
                    "python": platform.python_version(), "command": " ".join(sys.argv)}
    log(f"gpu_check on {props.name} ({props.multi_processor_count} SMs), torch "
        f"{torch.__version__}, triton {triton.__version__}")
    failures: list[str] = []
    checks = 0
    quick = not args.full
    deadline = started + args.budget_s
    # Order: what the figures need first; every part after the first is skipped
    # (and listed in report["skipped"]) once the budget is spent.
    parts = []
    if not args.skip_correctness:
        parts += [("first stage", lambda: check_first_stage(failures, quick)),
                  ("distk.topk", lambda: check_topk(failures))]
    if args.profile:
        parts.append(("profile", lambda: report.__setitem__("profile", run_profile(quick))))
    if not args.skip_timings:
        parts += [("timings", lambda: report.__setitem__(
                      "timings", run_timings(report, args.full, deadline))),
                  ("compressor step", lambda: run_compressor_step(report))]
    if not args.skip_correctness:
        parts += [("flat kernels", lambda: check_flat(failures)),
                  ("compressor and exchange",
                   lambda: check_compressor_and_exchange(failures, report))]
    if args.profile:
        parts.append(("breakdown", lambda: run_breakdown(report)))
    if not args.skip_timings:  # last: a failed capture breaks later random draws
        parts.append(("cuda graphs", lambda: run_cuda_graphs(report)))
    if args.only:
        unknown = sorted(set(args.only) - {name for name, _ in parts})
        if unknown:
            parser.error(f"--only: unknown part(s) {unknown}; the parts are "
                         f"{[name for name, _ in parts]}")
        parts = [(name, part) for name, part in parts if name in args.only]
    for index, (name, part) in enumerate(parts):
        if index > 0 and time.time() > deadline:
            report.setdefault("skipped", []).append(name)
            log(f"skipped {name}: the {args.budget_s:.0f} s budget is spent")
            continue
        part_started = time.time()
        try:
            result = part()
            checks += result if isinstance(result, int) else 0  # parts that check count
        except Exception:  # noqa: BLE001 - reported and counted as a failure
            failures.append(f"{name}: {traceback.format_exc()}")
            log(failures[-1])
        log(f"{name}: {time.time() - part_started:.0f} s")
    report["correctness"] = {"checks": checks, "failures": failures}
    if report.get("timings"):
        report["recommendation"] = recommend(report["timings"])
        print_summary(report)
    log(f"correctness: {checks} checks, {len(failures)} failures")
    for failure in failures[:20]:
        log("  FAIL", failure.splitlines()[-1] if failure else failure)
    failures.extend(report.get("failures", []))
    report["seconds"] = time.time() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    if report.get("timings"):
        plot(report, out.with_suffix(".png"))
    log(f"wrote {out} ({report['seconds']:.0f} s)")
    return 1 if failures else 0


def print_summary(report: dict) -> None:
    """The table of timings, the compressor step, and the recommendation."""
    log("")
    log(f"{'shape':36} {'method':34} {'us':>9} {'GB/s':>7} {'of copy':>7} {'recall':>7}")
    for r in report["timings"]:
        recall = "-" if r["recall"] is None else f"{r['recall']:.4f}"
        log(f"{r['shape']:36} {r['method']:34} {r['ms'] * 1000:9.1f} {r['GBps']:7.0f} "
            f"{r['fraction_of_copy_bw']:7.2f} {recall:>7}")
    verdict = report["recommendation"]
    for shape, v in verdict["per_shape"].items():
        log(f"  {shape:58} default {v['default_us']:8.1f} us, flat {v['flat_us']:8.1f} us "
            f"(x{v['speedup']:.2f}, outputs equal: {v['outputs_equal']}): {v['pick']}")
        if "filter_pick" in v:
            log(f"  {'':58} flat-words {v['flat_words_us']:8.1f} us (x{v['words_speedup']:.2f} "
                f"of flat, outputs equal: {v['words_outputs_equal']}): {v['filter_pick']}")
    step = report.get("compressor_step", {})
    for key in ("step_ms_default", "step_syncs_default", "step_ms", "step_syncs",
                "step_ms_graphs", "step_syncs_graphs",
                "step_under_sync_error", "step_cuda_graph",
                "select_packed_ms", "one_read_ms", "select_packed_vs_one_read",
                "select_packed_syncs", "select_packed_under_sync_error",
                "select_packed_cuda_graph"):
        if key in step:
            log(f"  compressor step (25 MB bucket) {key}: {step[key]}")
    log(f"default kernel recommendation: {verdict['overall']} (DISTK_TRITON_KERNEL; see "
        f"docs/selection.md)")
    log(f"flat first pass recommendation: {verdict.get('filter', 'not measured')} "
        f"(DISTK_TRITON_FILTER)")


def check_flat(failures: list[str]) -> int:
    """The flat kernels against the reference on CUDA: ``tests/triton_flat_parity.py``
    (every kernel and redo path), run in a child process."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "tests" / "triton_flat_parity.py"
    if not script.exists():
        log("  flat kernels: tests/triton_flat_parity.py not found, skipped")
        return 0
    root = str(script.parents[1])  # the child imports distk from this checkout
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    result = subprocess.run([sys.executable, str(script), "cuda"], capture_output=True,
                            text=True, timeout=300, env=env)
    log(f"  flat kernels: {result.stdout.strip().splitlines()[-1] if result.stdout else ''}")
    if result.returncode != 0:
        failures.append(f"flat kernels: {result.stdout[-2000:]}{result.stderr[-2000:]}")
        return 0
    return int(result.stdout.split()[1])


if __name__ == "__main__":
    sys.exit(main())
