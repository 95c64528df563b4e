"""One-call GPU check: correctness of distk's CUDA path, then timings, in one run.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json] [--quick]

Needs only a CUDA machine with torch and triton (run from the repository root, or with
distk installed). On a machine without CUDA it prints "no CUDA device" and exits 0.

1. Correctness (fresh random data, outputs poisoned first so that an unwritten entry
   cannot pass): the Triton first stage against ``reference.py`` for fp32/bf16/fp16,
   k_per_bucket 1..16, with and without a score floor, 1 and 256 rows, interleaved and
   contiguous buckets, by magnitude and signed, on every kernel path of the launch spec
   (compact, direct, stream); ``distk.topk`` end to end; ``GradientCompressor.step`` on
   CUDA against the same steps on the CPU (bitwise) and its conservation law; the
   exchange and the wire format on a 1-rank NCCL group; host syncs per call counted with
   ``torch.cuda.set_sync_debug_mode``.
2. Timings (CUDA events, median after warm-up, inputs rotated so that no call reads the
   previous call's data from L2): ``distk.topk`` bucketed at recall targets 0.95 and
   0.99, ``torch.topk`` on ``|x|``, the compressor's packed selection
   (``per_bucket_topk``) and a device-to-device copy of the same bytes (the bandwidth
   ceiling), at the shapes of issue 11; a (buckets, k_per_bucket) sweep on the Graphcore
   shape. Prints a table (time, GB/s of input read, fraction of copy bandwidth, measured
   recall) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import distk  # noqa: E402
from distk.selection import per_bucket_topk, resolve_buckets  # noqa: E402
from distk.selection.reference import (  # noqa: E402
    PAD_KEY,
    bucket_candidates_reference,
    order_keys,
)

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
            update = gpu.step(grad.cuda(), "bucket0", out=out)
            want = cpu_ref.step(grad.clone(), "bucket0")
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
                lambda g=grad, c=gpu: c.step(g, "bucket0"))
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


def run_timings(report: dict, quick: bool) -> list[dict]:
    rows_out = []
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    for name, rows, n, dtype, k in SHAPES:
        nbytes = rows * n * torch.tensor([], dtype=dtype).element_size()
        copies = max(2, math.ceil(3 * l2 / nbytes))
        inputs = [torch.randn(rows, n, device="cuda").to(dtype) for _ in range(copies)]
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
            log(f"  {name:36} {method:26} {ms * 1000:9.1f} us  {row['GBps']:7.0f} GB/s  "
                f"{row['fraction_of_copy_bw']:5.2f} of copy  recall "
                f"{'-' if recall is None else f'{recall:.4f}'}  {plan or ''}")

        add("copy (read+write)", copy_ms)
        exact_ms = time_cuda(lambda x: torch.topk(x.abs(), k, dim=-1), inputs,
                             repeats=5 if rows * n >= 1 << 26 else 20)
        add("torch.topk(|x|)", exact_ms, 1.0)
        for target in (0.95, 0.99):
            plan = resolve_buckets(n, k, recall_target=target)
            ms = time_cuda(lambda x, t=target: distk.topk(x, k, recall_target=t), inputs)
            _, idx = distk.topk(inputs[0], k, recall_target=target)
            add(f"distk bucketed r={target}", ms, measured_recall(inputs[0], idx, k),
                f"b={plan[0]} kb={plan[1]}")
        if rows == 1:
            # the compressor's packed plan at this density (kept 64, no second stage)
            buckets = max(1, k // 64)
            ms = time_cuda(lambda x: per_bucket_topk(x, buckets, 64), inputs)
            add("compressor per_bucket_topk", ms, None, f"b={buckets} kb=64")
        if name.startswith("graphcore") and not quick:
            for kb in (2, 4, 6, 8, 12, 16):
                buckets, kb = distk.choose_buckets(n, k, 0.99, k_per_bucket=kb)
                ms = time_cuda(lambda x, b=buckets, q=kb: distk.topk(
                    x, k, buckets=b, k_per_bucket=q), inputs)
                _, idx = distk.topk(inputs[0], k, buckets=buckets, k_per_bucket=kb)
                add("distk sweep r>=0.99", ms, measured_recall(inputs[0], idx, k),
                    f"b={buckets} kb={kb}")
        del inputs, dst
        torch.cuda.empty_cache()
    return rows_out


def run_profile(quick: bool) -> list[dict]:
    """Per-kernel CUDA time of one call of each timed configuration (torch.profiler),
    and the host time of a call (synchronised wall clock)."""
    from torch.profiler import ProfilerActivity, profile

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
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            kernels = sorted(((e.key, e.device_time_total, e.count)
                              for e in prof.key_averages() if e.device_time_total > 0),
                             key=lambda r: -r[1])
            total = sum(t for _, t, _ in kernels)
            log(f"  {name:34} {label:24} wall {wall_us:8.1f} us, kernels {total:8.1f} us")
            for key, t, count in kernels[:6]:
                log(f"      {t:8.1f} us x{count:<3} {key[:90]}")
            out.append({"shape": name, "call": label, "wall_us": wall_us,
                        "kernel_us": total, "kernels": kernels[:12]})
        torch.cuda.empty_cache()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS / "gpu_check.json"))
    parser.add_argument("--quick", action="store_true", help="fewer correctness cases")
    parser.add_argument("--skip-timings", action="store_true")
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="also print per-kernel times of each timed call")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing to check (exit 0)")
        return 0
    started = time.time()
    props = torch.cuda.get_device_properties(0)
    import triton

    report: dict = {"device": props.name, "sm_count": props.multi_processor_count,
                    "torch": torch.__version__, "triton": triton.__version__,
                    "python": platform.python_version()}
    log(f"gpu_check on {props.name} ({props.multi_processor_count} SMs), torch "
        f"{torch.__version__}, triton {triton.__version__}")
    failures: list[str] = []
    checks = 0
    parts = [] if args.skip_correctness else [
        lambda: check_first_stage(failures, args.quick), lambda: check_topk(failures),
        lambda: check_compressor_and_exchange(failures, report)]
    for part in parts:
        try:
            checks += part()
        except Exception:  # noqa: BLE001 - reported and counted as a failure
            failures.append(traceback.format_exc())
            log(failures[-1])
    report["correctness"] = {"checks": checks, "failures": failures,
                             "seconds": time.time() - started}
    log(f"correctness: {checks} checks, {len(failures)} failures "
        f"({time.time() - started:.0f} s)")
    for failure in failures[:20]:
        log("  FAIL", failure.splitlines()[-1] if failure else failure)
    if args.profile:
        report["profile"] = run_profile(args.quick)
    if not args.skip_timings:
        report["timings"] = run_timings(report, args.quick)
    report["seconds"] = time.time() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    log(f"wrote {out} ({report['seconds']:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
