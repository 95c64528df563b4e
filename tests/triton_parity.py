"""Triton kernels vs the reference, run as a script under TRITON_INTERPRET=1 (or on CUDA).

``tests/test_triton.py`` starts it in a fresh interpreter because the variable must be
set before Triton is imported. Every case names the launch-spec path it targets
(``compact``, ``direct``, ``stream``, ``reference``), and the script checks that the
launch spec really chose that path, so that each kernel is exercised. Exits non-zero with
a description of the first mismatch.

``--quick`` (the default test run under the interpreter, about half the time) still
runs every path with every dtype, segmented streams, an overflowing candidate list and
the dispatcher; it leaves out what repeats a covered path at a higher interpreter cost:
the float32 stream over two long buckets, the 16-segment split (the 4- and 32-segment
ones stay) and ``per_bucket_topk``'s sampled floor on a 2^18-entry row.
"""

from __future__ import annotations

import math
import os
import sys

QUICK = "--quick" in sys.argv[1:]
ARGS = [arg for arg in sys.argv[1:] if arg != "--quick"]
assert os.environ.get("TRITON_INTERPRET") == "1" or ARGS[:1] == ["cuda"]
if os.environ.get("TRITON_INTERPRET") == "1":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import triton_interpreter  # noqa: E402

    triton_interpreter.vectorise_xor_reductions()  # tl.sort at numpy speed
import torch  # noqa: E402
from parity_inputs import specials  # noqa: E402

import distk  # noqa: E402
from distk.selection import _score_floor, per_bucket_topk  # noqa: E402
from distk.selection.reference import (  # noqa: E402
    PAD_KEY,
    bucket_candidates_reference,
    bucketed_topk_reference,
    order_keys,
)
from distk.selection.triton_kernel import bucket_candidates_triton, plan_launches  # noqa: E402

DEVICE = ARGS[0] if ARGS else "cpu"
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
POISON = 0x5A5A5A5A5A5A5A5A  # an int64 that no composite key of these inputs takes

# path, rows, n, buckets, k_per_bucket, dtype, interleaved, by_magnitude, floored.
# Small (the interpreter runs each loop step in Python), and chosen so that every path
# and layout is hit: n a multiple of buckets or not, one slot or many (non-power-of-two),
# buckets shorter than k_per_bucket, every dtype, both score modes, floors.
CASES = [
    ("stream", 3, 1000, 100, 3, F32, True, True, False),
    ("direct", 2, 1001, 91, 5, F32, False, False, False),
    ("direct", 1, 10, 4, 3, F32, True, True, False),
    ("direct", 1, 10, 4, 3, F32, False, True, False),
    ("direct", 2, 500, 50, 16, F32, True, False, False),
    ("direct", 1, 17, 17, 2, F32, False, True, False),
    ("direct", 2, 777, 111, 9, BF16, True, True, False),
    ("direct", 1, 64, 2, 40, F16, False, False, False),
    ("stream", 2, 400, 80, 2, F64, True, False, False),
    ("stream", 2, 2100, 2, 3, F32, True, True, False),  # left out by --quick (8 s)
    ("stream", 1, 2300, 2, 5, BF16, False, False, False),
    ("stream", 1, 4200, 3, 1, F16, True, True, False),
    ("reference", 1, 2050, 1, 40, F32, True, False, False),
    ("compact", 2, 1500, 30, 3, F32, True, True, True),
    ("compact", 2, 1500, 30, 3, F32, False, True, True),
    ("compact", 1, 3001, 7, 12, BF16, True, False, True),
    ("compact", 3, 2000, 13, 1, F16, False, True, True),
    ("reference", 1, 2000, 1, 100, F32, True, True, False),
]


def fail(message: str) -> int:
    print(f"MISMATCH {message}")
    return 1


def main() -> int:
    torch.manual_seed(0)
    checked = 0
    for path, rows, n, buckets, kb, dtype, interleaved, by_magnitude, floored in CASES:
        if QUICK and (path, n, dtype) == ("stream", 2100, F32):
            continue
        x = specials(torch.randn(rows, n)).to(dtype)
        kept = min(kb, -(-n // buckets))
        floor = above = None
        if floored:
            above = kept + 6 * math.sqrt(kept) + 4
            keys = order_keys(x, by_magnitude)
            floor = keys.kthvalue(n - int(above * buckets), dim=1).values
        chosen = plan_launches(rows, n, buckets, kb, interleaved, by_magnitude, floored, 1,
                               above).path
        if chosen != path:
            return fail(f"case meant for path {path} got {chosen}")
        want = bucket_candidates_reference(x, buckets, kb, interleaved, by_magnitude, floor)
        out = torch.full((rows, buckets, kept), POISON, dtype=torch.int64, device=DEVICE)
        got = bucket_candidates_triton(x.to(DEVICE), buckets, kb, interleaved, by_magnitude,
                                       None if floor is None else floor.to(DEVICE), above,
                                       sm_count=1, out=out).cpu()
        if not torch.equal(got, want):
            return fail(f"{path} {dtype} rows={rows} n={n} b={buckets} kb={kb} "
                        f"interleaved={interleaved} by_magnitude={by_magnitude}")
        checked += 1

    # Segments: the same stream input split into 32, 16 and 4 segments per row.
    x = torch.randn(2, 4096)
    want = bucket_candidates_reference(x, 2, 4)
    for sm_count in (1000, 1) if QUICK else (1000, 4, 1):
        got = bucket_candidates_triton(x.to(DEVICE), 2, 4, sm_count=sm_count).cpu()
        if not torch.equal(got, want):
            return fail(f"stream with sm_count={sm_count}")
        checked += 1

    # A candidate list that overflows turns its row into padding (callers redo it).
    x = torch.randn(2, 1200)
    x[1, ::4] *= 100  # row 1: far more entries above the floor than expected
    keys = order_keys(x, True)
    floor = keys[0].kthvalue(1200 - 60).values.repeat(2)
    got = bucket_candidates_triton(x.to(DEVICE), 12, 2, floor=floor.to(DEVICE),
                                   above_per_bucket=0.5, sm_count=1).cpu()
    if not (bool((got[1] == PAD_KEY).all()) and bool((got[0] != PAD_KEY).any())):
        return fail("an overflowing row was not turned into padding")
    want = bucket_candidates_reference(x, 12, 2, floor=floor)
    if not torch.equal(got[0], want[0]):
        return fail("the row next to an overflowing one changed")
    checked += 1

    # Issue 22: lists narrower than kept (n = 2^20, k = 1024, b = 1000, k_b = 200, the
    # floor distk.topk samples) left slots of the output unwritten. The poisoned output
    # must come back equal to the reference, and distk.topk equal to the reference.
    issue_x = x = torch.randn(1, 1 << 20)
    floor, fraction = _score_floor(x, 2 * 1024 / (1 << 20), True)
    above = fraction * 1049
    chosen = plan_launches(1, 1 << 20, 1000, 200, True, True, True, 1, above)
    if chosen.path != "compact":
        return fail(f"the issue's case planned {chosen.path}, not compact")
    out = torch.full((1, 1000, 200), POISON, dtype=torch.int64, device=DEVICE)
    got = bucket_candidates_triton(x.to(DEVICE), 1000, 200, floor=floor.to(DEVICE),
                                   above_per_bucket=above, sm_count=1, out=out).cpu()
    if not torch.equal(got, bucket_candidates_reference(x, 1000, 200, floor=floor)):
        return fail("compact with kept = 200 above its list capacity")
    checked += 1

    # End to end through the dispatcher with the backend chosen for the device.
    os.environ["DISTK_TOPK_BACKEND"] = "triton" if DEVICE == "cpu" else "auto"
    x = specials(torch.randn(3, 2000))
    _, got = distk.topk(x.to(DEVICE), 50, buckets=200, k_per_bucket=3)
    if not torch.equal(got.cpu(), bucketed_topk_reference(x, 50, 200, 3)):
        return fail("distk.topk")
    checked += 1
    if QUICK:
        print(f"OK {checked} cases (quick)")
        return 0
    # per_bucket_topk on a row long enough for a sampled floor (compact path + redo check)
    x = torch.randn(1, 1 << 18)
    got = per_bucket_topk(x.to(DEVICE).clone(), 262, 4).cpu()
    if not torch.equal(got, bucket_candidates_reference(x, 262, 4)):
        return fail("per_bucket_topk with a floor")
    checked += 1
    _, got = distk.topk(issue_x.to(DEVICE), 1024, buckets=1000, k_per_bucket=200)
    if not torch.equal(got.cpu(), bucketed_topk_reference(issue_x, 1024, 1000, 200)):
        return fail("distk.topk n=2^20 k=1024 b=1000 k_b=200")
    checked += 1
    print(f"OK {checked} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
