"""Triton kernel vs the reference, run as a script under TRITON_INTERPRET=1.

``tests/test_triton.py`` starts it in a fresh interpreter because the variable must be
set before Triton is imported. Exits non-zero with a description of the first mismatch.
"""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1" or len(sys.argv) > 1 and sys.argv[1] == "cuda"
import torch  # noqa: E402

import distk  # noqa: E402
from distk.selection.reference import (  # noqa: E402
    bucket_candidates_reference,
    bucketed_topk_reference,
    order_keys,
)
from distk.selection.triton_kernel import bucket_candidates_triton  # noqa: E402

DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cpu"
# rows, n, buckets, k_per_bucket, dtype, interleaved, by_magnitude. Small, and chosen so
# that every branch is hit at least once (the interpreter runs each loop step in Python):
# n a multiple of buckets or not, one slot or many (non-power-of-two), buckets smaller
# than k_per_bucket, every dtype and both layouts and score modes.
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
CASES = [
    (3, 1000, 100, 3, F32, True, True), (2, 1001, 91, 5, F32, False, False),
    (1, 10, 4, 3, F32, True, True), (1, 10, 4, 3, F32, False, True),
    (2, 500, 50, 16, F32, True, False), (1, 17, 17, 2, F32, False, True),
    (1, 300, 300, 1, F32, True, True), (2, 777, 111, 9, BF16, True, True),
    (1, 64, 2, 40, F16, False, False), (2, 400, 80, 2, F64, True, False),
    (1, 401, 40, 6, BF16, False, True), (1, 256, 64, 1, F16, True, True),
]


def specials(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    n = x.shape[1]
    x[0, 3 % n] = float("nan")
    x[-1, 5 % n] = float("inf")
    x[0, 7 % n] = -float("inf")
    x[0, (n // 3):(n // 3 + 9)] = 0.5  # ties
    return x


def main() -> int:
    torch.manual_seed(0)
    checked = 0
    for rows, n, buckets, kb, dtype, interleaved, by_magnitude in CASES:
        x = specials(torch.randn(rows, n)).to(dtype)
        want = bucket_candidates_reference(x, buckets, kb, interleaved, by_magnitude)
        got = bucket_candidates_triton(x.to(DEVICE), buckets, kb, interleaved,
                                       by_magnitude).cpu()
        if not torch.equal(got, want):
            print(f"MISMATCH {dtype} rows={rows} n={n} b={buckets} kb={kb} "
                  f"interleaved={interleaved} by_magnitude={by_magnitude}")
            return 1
        checked += 1
    # floors
    x = torch.randn(2, 1500)
    floor = order_keys(x, True).kthvalue(1400, dim=1).values
    for interleaved in (True, False):
        want = bucket_candidates_reference(x, 150, 3, interleaved, True, floor)
        got = bucket_candidates_triton(x.to(DEVICE), 150, 3, interleaved, True,
                                       floor.to(DEVICE)).cpu()
        if not torch.equal(got, want):
            print(f"MISMATCH with floor, interleaved={interleaved}")
            return 1
        checked += 1
    # end to end through distk.topk with the backend chosen for the device
    os.environ["DISTK_TOPK_BACKEND"] = "triton" if DEVICE == "cpu" else "auto"
    x = specials(torch.randn(3, 2000))
    _, got = distk.topk(x.to(DEVICE), 50, buckets=200, k_per_bucket=3)
    if not torch.equal(got.cpu(), bucketed_topk_reference(x, 50, 200, 3)):
        print("MISMATCH distk.topk")
        return 1
    checked += 1
    print(f"OK {checked} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
