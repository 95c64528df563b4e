"""The flat Triton kernels vs the reference, run as a script under TRITON_INTERPRET=1 (or
on CUDA with the argument ``cuda``).

``tests/test_triton_flat.py`` starts it in a fresh interpreter (the variable must be set
before Triton is imported). Every kernel of ``triton_flat.py`` runs: the device floor
(against the host floor on the same sample, and its reuse of last step's floor), the
flat first stage for packed selections and with a second stage, including each redo
path (short buckets, a full row buffer, an overflowing bucket list, rows left with fewer
than k candidates), the fused ``x += add``, the short-row kernel (and its flagged rows),
the sync-free packed selection, and ``distk.topk`` / ``per_bucket_topk`` with
``DISTK_TRITON_KERNEL=flat``; the packed cases again with the ``words`` first pass
(``DISTK_TRITON_FILTER=words``). Exact equality throughout: selection compares integer
keys and does no floating-point reduction (the fused add is one IEEE add per entry, as
``add_``). Prints ``OK <n> cases`` or exits non-zero at the first mismatch.

Rows are short here (the interpreter runs every program in Python): the floor's sample
is passed explicitly (``sample=``), with fewer blocks than the 64 that rows of 2^17
entries and more use on a GPU.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

CUDA = len(sys.argv) > 1 and sys.argv[1] == "cuda"
assert os.environ.get("TRITON_INTERPRET") == "1" or CUDA
sys.path.insert(0, str(Path(__file__).parent))
if not CUDA:
    import triton_interpreter  # noqa: E402

    triton_interpreter.vectorise_xor_reductions()

import torch  # noqa: E402
from parity_inputs import specials  # noqa: E402

import distk  # noqa: E402
from distk.compressor import GradientCompressor  # noqa: E402
from distk.config import SparsityConfig  # noqa: E402
from distk.selection import (  # noqa: E402
    _FLOOR_BLOCK,
    FloorSample,
    floor_sample_columns,
    per_bucket_topk,
)
from distk.selection import triton_flat as tf  # noqa: E402
from distk.selection.reference import (  # noqa: E402
    bucket_candidates_reference,
    bucketed_topk_reference,
    order_keys,
    positions_of,
    second_stage,
)
from distk.selection.syncfree import new_floor_state, select_packed  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
INT32_MAX = 2**31 - 1


class Mismatch(Exception):
    pass


def check(ok: bool, message: str) -> None:
    if not ok:
        raise Mismatch(message)


def sample_for(n: int, fraction: float, blocks: int = 8) -> FloorSample:
    """A floor sample of ``blocks`` blocks (as ``floor_sample``, which needs 2^17 entries
    on CUDA) for a short row."""
    samples = blocks * _FLOOR_BLOCK
    above = int(samples * fraction) + 16
    return FloorSample(blocks, samples, above, above / samples * (1 + 4 / math.sqrt(above)))


def host_floor(x: torch.Tensor, sample: FloorSample, by_magnitude: bool) -> torch.Tensor:
    """The host floor on the same sample: ``_score_floor``'s k-th value."""
    cols = floor_sample_columns(x.shape[1], sample.blocks)
    keys = order_keys(x.cpu()[:, cols], by_magnitude)
    return torch.kthvalue(keys, sample.samples - sample.above, dim=-1).values.int()


def packed_fraction(n: int, buckets: int, kept: int) -> float:
    return (kept + 6 * math.sqrt(kept) + 4) / (n / buckets)


def flat(x, buckets, kb, interleaved=True, by_magnitude=True, fraction=None, k=None,
         add=None, sample=None, floor_state=None):
    n = x.shape[1]
    kept = min(kb, -(-n // buckets))
    if fraction is None:
        fraction = packed_fraction(n, buckets, kept) if k is None else 2 * k / n
    result = tf.flat_candidates(x.to(DEVICE), buckets, kb, interleaved, by_magnitude,
                                fraction, k=k, add=None if add is None else add.to(DEVICE),
                                floor_state=floor_state,
                                sample=sample or sample_for(n, fraction), sm_count=2)
    check(result is not None, f"flat kernels did not apply: n={n} b={buckets} kb={kb}")
    return result


def floor_cases() -> int:
    checked = 0
    torch.manual_seed(1)
    for dtype, by_magnitude, blocks in ((F32, True, 8), (BF16, False, 16), (F16, True, 64)):
        n = max(20_000, blocks * 8 * _FLOOR_BLOCK + 77)
        x = specials(torch.randn(3, n)).to(dtype)
        sample = sample_for(n, 0.01, blocks)
        want = host_floor(x, sample, by_magnitude)
        got = tf.device_floor(x.to(DEVICE), sample, by_magnitude).cpu()
        check(torch.equal(got, want), f"device floor {dtype} blocks={blocks}: {got} {want}")
        # of x + add (x not written by the floor kernel)
        add = torch.randn(3, n).to(dtype)
        got = tf.device_floor(x.to(DEVICE), sample, by_magnitude, add=add.to(DEVICE)).cpu()
        check(torch.equal(got, host_floor(x + add, sample, by_magnitude)), "floor of x + add")
        checked += 2
    # Reuse: last step's floor is kept inside the band, recomputed outside it.
    x = torch.randn(2, 20_000)
    sample = sample_for(20_000, 0.02)
    exact = host_floor(x, sample, True)
    nearby = host_floor(x, sample._replace(above=sample.above + 3), True)  # in the band
    state = torch.stack([nearby[0], torch.tensor(INT32_MAX, dtype=torch.int32)])
    got = tf.device_floor(x.to(DEVICE), sample, True, floor_state=state.to(DEVICE)).cpu()
    check(torch.equal(got, torch.stack([nearby[0], exact[1]])), f"reuse {got} {nearby} {exact}")
    low = torch.zeros(2, dtype=torch.int32)  # every entry above it: far outside the band
    got = tf.device_floor(x.to(DEVICE), sample, True, floor_state=low.to(DEVICE)).cpu()
    check(torch.equal(got, exact), "a floor outside the band was reused")
    return checked + 2


def packed_cases() -> int:
    checked = 0
    torch.manual_seed(2)
    for rows, n, buckets, kb, dtype, interleaved, by_magnitude in (
            (2, 20_000, 50, 4, F32, True, True), (2, 20_001, 37, 3, BF16, False, False),
            (1, 30_000, 100, 1, F16, True, True), (1, 20_000, 20, 200, F32, True, True)):
        x = specials(torch.randn(rows, n)).to(dtype)
        got = flat(x, buckets, kb, interleaved, by_magnitude).candidates.cpu()
        want = bucket_candidates_reference(x, buckets, kb, interleaved, by_magnitude)
        check(torch.equal(got, want), f"packed {dtype} n={n} b={buckets} kb={kb}")
        checked += 1
    # Redo paths, each against the reference with no floor.
    n, buckets, kb = 20_000, 40, 3
    cols = floor_sample_columns(n, 8)
    unsampled = torch.ones(n, dtype=torch.bool)
    unsampled[cols] = False
    x = torch.randn(3, n)
    x[0] = 0.0
    x[0, ::997] = 1.0  # row 0: most buckets end short of kb above the floor
    x[1, unsampled] *= 100  # row 1: the sample misses the large entries: buffer overflows
    got = flat(x, buckets, kb, False).candidates.cpu()
    check(torch.equal(got, bucket_candidates_reference(x, buckets, kb, False)),
          "packed redo (short buckets, full row buffer)")
    x = torch.randn(1, n)
    x[0, 500:1000] = 50 * torch.sign(x[0, 500:1000])  # one contiguous bucket's list overflows
    got = flat(x, buckets, kb, False).candidates.cpu()
    check(torch.equal(got, bucket_candidates_reference(x, buckets, kb, False)),
          "packed redo (bucket list overflow)")
    # Fused x += add: x ends as x + add bitwise, selection on the sum.
    for dtype in (F32, BF16):
        x = torch.randn(2, n).to(dtype)
        add = specials(torch.randn(2, n)).to(dtype)
        summed = x + add
        fused = x.to(DEVICE)
        got = tf.flat_candidates(fused, buckets, kb, True, True,
                                 packed_fraction(n, buckets, kb), add=add.to(DEVICE),
                                 sample=sample_for(n, packed_fraction(n, buckets, kb)),
                                 sm_count=2).candidates.cpu()
        check(torch.equal(fused.cpu().nan_to_num(), summed.nan_to_num())
              and torch.equal(fused.cpu().isnan(), summed.isnan()), f"fused add {dtype}")
        check(torch.equal(got, bucket_candidates_reference(summed, buckets, kb)),
              f"selection of the fused sum {dtype}")
    return checked + 5


def topk_cases() -> int:
    checked = 0
    torch.manual_seed(3)
    for rows, n, buckets, kb, k, dtype, interleaved, by_magnitude in (
            (2, 20_000, 200, 2, 100, F32, True, True), (1, 20_000, 64, 8, 300, BF16, False, True),
            # kept = 200 above the lists' expected fill: width from p2(kept) (issue 22)
            (1, 40_000, 40, 200, 1024, F32, True, True)):
        x = specials(torch.randn(rows, n)).to(dtype)
        candidates = flat(x, buckets, kb, interleaved, by_magnitude, k=k).candidates.cpu()
        want = bucketed_topk_reference(x, k, buckets, kb, interleaved, by_magnitude)
        check(torch.equal(second_stage(candidates, k), want),
              f"topk {dtype} n={n} b={buckets} kb={kb} k={k}")
        checked += 1
    # A row where fewer than k candidates clear the floor: large entries only inside the
    # sampled blocks put the floor above all but a few; the row is redone.
    n, buckets, kb, k = 20_000, 100, 2, 150
    x = torch.randn(2, n)
    x[1, floor_sample_columns(n, 8)] *= 100
    candidates = flat(x, buckets, kb, k=k).candidates.cpu()
    check(torch.equal(second_stage(candidates, k), bucketed_topk_reference(x, k, buckets, kb)),
          "topk row redo")
    return checked + 1


def words_cases() -> int:
    """The packed cases again with the ``words`` first pass (``DISTK_TRITON_FILTER=words``;
    the kernels after it are the same), and a row whose word list overflows."""
    os.environ["DISTK_TRITON_FILTER"] = "words"
    try:
        checked = packed_cases()
        # Every 32-entry word of row 1 holds hits: more words than the row's buffer.
        n, buckets, kb = 140_000, 10, 3
        unsampled = torch.ones(n, dtype=torch.bool)
        unsampled[floor_sample_columns(n, 8)] = False
        x = torch.randn(2, n)
        x[1, unsampled] *= 100
        result = flat(x, buckets, kb)
        plan = tf.plan_flat(2, n, buckets, kb, True, True, 2,
                            tuple(sample_for(n, packed_fraction(n, buckets, kb))), None,
                            F32, False, False, "words")
        check(plan.launches[1].kernel == "filter_words" and plan.row_cap < n // 32,
              f"no word-list overflow in this case: row_cap {plan.row_cap}")
        check(torch.equal(result.candidates.cpu(),
                          bucket_candidates_reference(x, buckets, kb)),
              "words filter: word list overflow")
    finally:
        del os.environ["DISTK_TRITON_FILTER"]
    return checked + 1


def row_cases() -> int:
    checked = 0
    torch.manual_seed(4)
    for rows, n, k, buckets, kb, dtype, interleaved, by_magnitude, pool in (
            (3, 2000, 64, 100, 2, F32, True, True, "specials"),
            (2, 5000, 64, 100, 2, BF16, False, False, "normal"),
            (2, 8192, 128, 1, 128, F16, True, True, "normal"),  # one bucket: exact top-k
            (1, 1000, 50, 10, 5, F32, True, True, "normal"),  # no second stage: m = n
            (2, 3000, 40, 50, 2, F32, True, False, "ties")):
        if pool == "ties":
            x = torch.randint(-3, 4, (rows, n)).float()
        else:
            x = torch.randn(rows, n)
            x = specials(x) if pool == "specials" else x
        x = x.to(dtype)
        result = tf.row_topk(x.to(DEVICE), k, buckets, kb, interleaved, by_magnitude)
        check(result is not None, f"row kernel did not apply: n={n} k={k}")
        positions, flag = (t.cpu() for t in result)
        want = bucketed_topk_reference(x, k, buckets, kb, interleaved, by_magnitude)
        check(not bool(flag.any()), f"row kernel flagged a row: n={n} k={k}")
        check(torch.equal(positions, want), f"row {dtype} n={n} k={k} b={buckets} kb={kb}")
        checked += 1
    # Adversarial: every large entry in one interleaved bucket, so fewer than k of the m
    # best survive the cut: the row is flagged, and distk.topk redoes it.
    x = torch.randn(2, 2000)
    x[1, ::50] *= 1000
    positions, flag = tf.row_topk(x.to(DEVICE), 40, 50, 2)
    check(flag.cpu().tolist() == [0, 1], f"flags {flag.tolist()}")
    check(torch.equal(positions.cpu()[0], bucketed_topk_reference(x, 40, 50, 2)[0]),
          "row next to a flagged one")
    return checked + 1


def entry_point_cases() -> int:
    checked = 0
    torch.manual_seed(5)
    os.environ["DISTK_TOPK_BACKEND"] = "triton" if not CUDA else "auto"
    os.environ["DISTK_TRITON_KERNEL"] = "flat"
    # The sync-free packed selection on a row long enough for a floor (2^17 entries on
    # CUDA: 64 sampled blocks), two steps sharing a floor state, with the fused add.
    n, buckets, kb = (1 << 17) + 77, 128, 8
    state = new_floor_state(DEVICE)
    acc = torch.randn(n)
    for step in range(2):
        grad = torch.randn(n)
        summed = acc + grad
        want = positions_of(bucket_candidates_reference(summed.view(1, -1), buckets, kb))
        acc_device = acc.to(DEVICE)
        got = select_packed(acc_device, buckets, kb, add=grad.to(DEVICE), floor_state=state)
        check(torch.equal(got.cpu(), want.reshape(-1)), f"select_packed step {step}")
        check(torch.equal(acc_device.cpu(), summed), "select_packed did not add in place")
        check(int(state.item()) != INT32_MAX, "the floor state was not written")
        acc = summed
        checked += 1
    # The compressor with DISTK_TRITON_KERNEL=flat selects packed plans through
    # select_packed: the same updates as with the default kernels, a floor state per key.
    # On CUDA also with DISTK_CUDA_GRAPHS=1: the selection replayed from a CUDA graph.
    cfg = SparsityConfig(density=0.01, recall_interval=0)
    grads = [torch.randn(n) for _ in range(4)]
    updates = {}
    runs = [("default", "0"), ("flat", "0")] + ([("flat", "1")] if CUDA else [])
    for kernel, graphs in runs:
        os.environ["DISTK_TRITON_KERNEL"] = kernel
        os.environ["DISTK_CUDA_GRAPHS"] = graphs
        compressor = GradientCompressor(cfg)
        updates[kernel, graphs] = [compressor.step(g.to(DEVICE), "w", step=s).cpu()
                                   for s, g in enumerate(grads)]
        check(compressor.last.sent == 17 * 78, f"compressor sent {compressor.last.sent}")
        if kernel == "flat":
            selector = compressor._selectors.get("w")
            check(selector is not None
                  and int(selector.floor_state.item()) != INT32_MAX, "no floor state for 'w'")
            check(graphs == "0" or selector.captures >= 1, "no CUDA graph recorded")
    os.environ["DISTK_CUDA_GRAPHS"] = "0"
    for run in runs[1:]:
        check(all(torch.equal(a, b) for a, b in zip(updates[runs[0]], updates[run],
                                                     strict=True)),
              f"compressor updates differ: {run} against {runs[0]}")
    checked += 1
    # distk.topk and per_bucket_topk with DISTK_TRITON_KERNEL=flat: short and long rows.
    x = specials(torch.randn(3, 3000))
    _, got = distk.topk(x.to(DEVICE), 50, buckets=200, k_per_bucket=3)
    check(torch.equal(got.cpu(), bucketed_topk_reference(x, 50, 200, 3)), "topk short row")
    x = torch.randn(2, 2000)
    x[1, ::50] *= 1000  # flagged by the row kernel, redone by the default path
    _, got = distk.topk(x.to(DEVICE), 40, buckets=50, k_per_bucket=2)
    check(torch.equal(got.cpu(), bucketed_topk_reference(x, 40, 50, 2)), "topk flagged row")
    x = torch.randn(1, (1 << 17) + 5)
    _, got = distk.topk(x.to(DEVICE), 300, buckets=150, k_per_bucket=4)
    check(torch.equal(got.cpu(), bucketed_topk_reference(x, 300, 150, 4)), "topk long row")
    got = per_bucket_topk(x.to(DEVICE), 150, 4)
    check(torch.equal(got.cpu(), bucket_candidates_reference(x, 150, 4)), "per_bucket_topk")
    return checked + 4


def main() -> int:
    started = time.time()
    checked = 0
    try:
        for part in (floor_cases, packed_cases, topk_cases, words_cases, row_cases,
                     entry_point_cases):
            part_started = time.time()
            checked += part()
            print(f"  {part.__name__}: {time.time() - part_started:.1f} s", file=sys.stderr)
    except Mismatch as err:
        print(f"MISMATCH {err}")
        return 1
    print(f"OK {checked} cases ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
