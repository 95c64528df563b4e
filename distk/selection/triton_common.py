"""Pieces shared by the Triton kernels of the first stage.

* Score keys: an int32 per entry whose integer order is the score order (NaN largest),
  and the int64 composite key (score key in the high 32 bits, ``2^32 - 1 - position`` in
  the low 32) that makes every entry unique, as in ``reference.py``.
* The *ordered* form of a score key, a uint32 whose unsigned order is the score order:
  radix selection reads it eight bits at a time from the top.
* :class:`KernelLaunch`: one launch as data (kernel name, constexprs, grid, warps, runtime
  arguments), so that the launchers and the ahead-of-time compile test share one spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

__all__ = ["INPUT_DTYPES", "KernelLaunch", "TRITON_TYPES", "p2", "run_launch"]

PAD = tl.constexpr(-(2**63))
"""Composite key of an empty slot (``reference.PAD_KEY``)."""
KEY_MAX = tl.constexpr(2**63 - 1)
POSITION_MASK = tl.constexpr(4294967295)

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Input dtypes the kernels load (fp64 is converted to fp32 first: scores compare at
fp32 precision, as in the reference)."""
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def p2(value: int) -> int:
    """The smallest power of two at least ``value`` (and at least 1)."""
    return triton.next_power_of_2(max(1, int(value)))


@triton.jit
def score_key(value, by_magnitude):
    """int32 key whose integer order is the score order; NaN ranks largest."""
    bits = value.to(tl.float32).to(tl.int32, bitcast=True)
    abs_bits = bits & 0x7FFFFFFF
    signed = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = tl.where(by_magnitude != 0, abs_bits, signed)
    return tl.where(abs_bits > 0x7F800000, 0x7FFFFFFF, key)


@triton.jit
def composite(key, pos):
    """int64 composite key of score key ``key`` at position ``pos``."""
    return (key.to(tl.int64) << 32) | (4294967295 - pos.to(tl.int64))


@triton.jit
def position_of(composite_key):
    """Position encoded in a composite key (int64)."""
    return 4294967295 - (composite_key & 4294967295)


@triton.jit
def ordered(key):
    """uint32 whose unsigned order is the order of the int32 score key ``key``."""
    return (key ^ -2147483648).to(tl.uint32, bitcast=True)


@triton.jit
def unordered(value):
    """Inverse of :func:`ordered`: the int32 score key."""
    return value.to(tl.int32, bitcast=True) ^ -2147483648


@triton.jit
def add_rounded(a, b, dtype: tl.constexpr):
    """``a + b`` in fp32, rounded to ``dtype`` to nearest even, bitwise as ``torch``'s
    ``add_`` on that dtype. The bf16 rounding is done on the fp32 bits (after which the
    conversion is exact): the interpreter truncates a plain fp32-to-bf16 conversion."""
    total = a.to(tl.float32) + b.to(tl.float32)
    if dtype == tl.bfloat16:
        bits = total.to(tl.int32, bitcast=True)
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        bits = tl.where(nan, bits | 0x400000, bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True).to(dtype)
    else:
        return total.to(dtype)


@triton.jit
def radix_select(u, valid, rank, MASKED: tl.constexpr = True):
    """The ``rank``-th largest (1-based) of the ``valid`` entries of the 1-D uint32 tensor
    ``u``, found eight bits at a time from the top (four 256-bin histograms over the
    tensor, which stays in registers), and how many entries equal to it are needed to
    make ``rank`` together with those above it: ``(threshold, need)``, ``need >= 1``.
    ``rank`` must be in ``[1, count of valid]``. ``MASKED=False`` ignores ``valid``: the
    caller has set invalid entries to 0, below every rank it asks for (fewer registers;
    ``need`` then counts those zeros too)."""
    bins = tl.arange(0, 256)
    prefix = (rank * 0).to(tl.uint32)
    for step in tl.static_range(4):
        if step == 0:
            match = valid if MASKED else u == u
        elif MASKED:
            match = valid & ((u >> (32 - 8 * step)) == (prefix >> (32 - 8 * step)))
        else:
            match = (u >> (32 - 8 * step)) == (prefix >> (32 - 8 * step))
        digit = ((u >> (24 - 8 * step)) & 255).to(tl.int32)
        hist = tl.histogram(digit, 256, mask=match)
        # at_least[d]: matching entries whose digit is d or more (non-increasing in d)
        at_least = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
        chosen = tl.max(tl.where(at_least >= rank, bins, 0), 0)
        rank -= tl.sum(tl.where(bins > chosen, hist, 0), 0)
        prefix = prefix | (chosen.to(tl.uint32) << (24 - 8 * step))
    return prefix, rank


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch: which kernel, its constexprs, grid and warps.

    ``params`` are the kernel's runtime arguments and their Triton types (``*x`` is the
    input's element type); ``args`` holds the runtime values of the non-pointer ones
    (filled by the launch spec). Pointers are named by role (``"x"``, ``"cand"``, ...,
    the parameter name without ``_ptr``) and bound by the launcher."""

    kernel: str
    constexprs: tuple[tuple[str, int | bool], ...]
    grid: tuple[int, ...]
    num_warps: int
    dtype: torch.dtype
    """Input dtype (``float32`` for kernels that do not read the input)."""
    args: tuple[tuple[str, int | str], ...] = field(default=(), compare=False)
    params: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def signature(self) -> dict[str, str]:
        """Triton signature for an ahead-of-time compile."""
        sig = {name: (f"*{TRITON_TYPES[self.dtype]}" if kind == "*x" else kind)
               for name, kind in self.params}
        sig.update({name: "constexpr" for name, _ in self.constexprs})
        return sig

    def variant(self) -> tuple:
        """What makes a distinct compiled kernel."""
        return (self.kernel, self.constexprs, self.num_warps, self.dtype)


def run_launch(kernel, spec: KernelLaunch, tensors: dict[str, torch.Tensor]) -> None:
    """Run ``spec`` with ``kernel`` (a ``triton.jit`` function), binding pointer
    parameters to ``tensors`` by role."""
    values = dict(spec.args)
    args = []
    for name, kind in spec.params:
        if kind.startswith("*"):
            args.append(tensors[name.removesuffix("_ptr")])
        else:
            args.append(values[name])
    kernel[spec.grid](*args, **dict(spec.constexprs), num_warps=spec.num_warps)
