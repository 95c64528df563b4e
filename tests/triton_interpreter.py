"""Faster ``TRITON_INTERPRET=1`` runs for the parity scripts.

The interpreter evaluates a reduction whose combine function it does not recognise one
element at a time in Python. ``tl.sort`` (a bitonic network) reduces with
``_xor_combine`` at every compare-and-swap step, so a sort of a few thousand keys took
tens of seconds. :func:`vectorise_xor_reductions` lets the interpreter run that one
combine function as ``numpy.bitwise_xor.reduce`` (the same associative operation over the
same axis), after checking both agree on a sample. The kernels' code is untouched.
"""

from __future__ import annotations

import numpy as np


def vectorise_xor_reductions() -> None:
    """Patch the interpreter (call before any kernel runs; idempotent)."""
    from triton.language import standard
    from triton.runtime import interpreter

    ops = interpreter.ReduceOps
    if getattr(ops, "_distk_vectorised", False):
        return
    generic = ops.apply_impl

    def apply_impl(self, input):
        if self.combine_fn is standard._xor_combine and len(input) == 1:
            data = input[0].handle.data
            return self.to_tensor(np.bitwise_xor.reduce(data, axis=self.axis,
                                                        keepdims=self.keep_dims), input[0].dtype)
        return generic(self, input)

    ops.apply_impl = apply_impl
    ops._distk_vectorised = True
    _check_sort()


def _check_sort() -> None:
    """A kernel's ``tl.sort`` of random int64 keys, descending, equals numpy's sort."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def sort_rows(src, dst, WIDTH: tl.constexpr):
        offs = tl.program_id(0) * WIDTH + tl.arange(0, WIDTH)
        tl.store(dst + offs, tl.sort(tl.load(src + offs), descending=True))

    keys = torch.randint(-2**62, 2**62, (3, 256), generator=torch.Generator().manual_seed(0))
    out = torch.empty_like(keys)
    sort_rows[(3,)](keys, out, WIDTH=256)
    want = torch.from_numpy(-np.sort(-keys.numpy(), axis=1))
    assert torch.equal(out, want), "tl.sort under the vectorised interpreter is wrong"
