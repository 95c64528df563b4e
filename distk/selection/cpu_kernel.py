"""CPU fast path of the first stage: an OpenMP C++ kernel (``csrc/bucket_topk.cpp``).

The kernel is compiled on first use and loaded by :mod:`distk._native` (the one loader
of distk's native library). Where it cannot be built (no compiler),
:func:`bucket_candidates_cpu` returns ``None`` and the caller uses the reference, after a
one-time warning.
"""

from __future__ import annotations

import torch

from distk._native import load

__all__ = ["bucket_candidates_cpu", "can_fuse_add", "load"]

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


def can_fuse_add(x: torch.Tensor, add: torch.Tensor) -> bool:
    """Whether the kernel can add ``add`` to ``x`` in place while selecting."""
    return (x.dtype == add.dtype == torch.float32 and x.shape == add.shape
            and x.device.type == add.device.type == "cpu"
            and x.is_contiguous() and add.is_contiguous())


def bucket_candidates_cpu(x: torch.Tensor, buckets: int, k_per_bucket: int,
                          interleaved: bool = True, by_magnitude: bool = True,
                          floor: torch.Tensor | None = None,
                          refill: bool = False,
                          add: torch.Tensor | None = None) -> torch.Tensor | None:
    """First stage on a contiguous 2-D CPU tensor; same result as
    ``reference.bucket_candidates_reference``. ``None`` when the kernel is unavailable
    (then ``x`` is untouched).
    ``refill``: a bucket left with an empty slot under ``floor`` is redone without it
    (then the result is that of no floor at all).
    ``add``: fuse error feedback: ``x += add`` in place in the same pass, selecting on
    the sum (``x`` and ``add`` contiguous fp32 of one shape; see :func:`can_fuse_add`)."""
    library = load()
    if library is None:
        return None
    if add is not None and not can_fuse_add(x, add):
        raise ValueError(f"add needs x and add contiguous fp32 CPU tensors of one shape, got "
                         f"x {x.dtype} {tuple(x.shape)}, add {add.dtype} {tuple(add.shape)}")
    if x.dtype not in _DTYPE_CODES:
        # fp16 converts to fp32 exactly; fp64 scores are compared at fp32 precision, as
        # in the reference.
        x = x.float()
    x = x.contiguous()
    rows, n = x.shape
    kept = min(k_per_bucket, -(-n // buckets))
    out = torch.empty(rows, buckets, kept, dtype=torch.int64)
    if floor is not None:
        floor = floor.to(torch.int32).contiguous()
    # Small inputs: thread start-up costs more than the work.
    threads = 1 if rows * n < (1 << 16) else torch.get_num_threads()
    code = library.distk_bucket_candidates(
        x.data_ptr(), _DTYPE_CODES[x.dtype], rows, n, n, buckets, kept,
        int(interleaved), int(by_magnitude), None if floor is None else floor.data_ptr(),
        int(refill), out.data_ptr(), threads, None if add is None else add.data_ptr())
    if code != 0:
        raise RuntimeError(f"distk CPU kernel failed with code {code}")
    return out
