"""Compact wire codecs: low-bit values with per-group ranges and bit-packed indices.

With ``SparsityConfig.value_bits`` set, a rank's selected entries travel as

* **ranges**: per group of ``group_size`` consecutive entries (a bucket's
  ``k_per_bucket`` entries when bucket ids are implicit), two floats ``lo <= hi``:
  bfloat16 for codes of 1, 2 and 4 bits (a range rounded by at most 2**-9 of its value
  moves a level by far less than the code's own cell of 1/2 to 1/8 of the range), float32
  for 8 bits;
* **value codes**: ``value_bits`` (1, 2, 4 or 8) bits per entry, sign-magnitude: the top
  bit is the sign, the other ``b - 1`` bits pick one of ``M = 2**(b-1)`` magnitudes, the
  centres of ``M`` equal cells of ``[lo, hi]``: ``lo + (j + 1/2) (hi - lo) / M``. For
  2..8 bits ``lo, hi`` are the group's least and largest magnitudes and ``j`` the cell
  of ``|v|`` (the nearest centre). For 1 bit (sign) ``lo = hi`` = the group's mean
  magnitude, the L2-optimal scale of a sign code. Selected top-k entries of a bucket
  have magnitudes in a narrow band, which this grid spends every code on. With
  ``levels="means"`` (1, 2 or 4 bits) the same cells are chosen, but the group sends,
  in place of ``lo, hi``, the ``M`` mean magnitudes of its entries in each cell (an
  empty cell: its centre), and a code decodes to its cell's mean: the least-squares
  reconstruction for that partition (SparseLoCo's per-bin means, arXiv 2508.15706).
  With ``levels="sigma"`` (2, 4 or 8 bits) the code is not sign-magnitude: ``2**b``
  signed cells of width ``SIGMA_RANGE * s / 2**b`` about the group's mean ``m`` (``s``
  the unbiased standard deviation), code ``round((v - m) / width) + 2**(b-1)`` clamped
  to ``[0, 2**b - 1]``, and the group sends its ``2**b`` cell means (an empty cell: its
  centre), the statistical quantizer of the field's low-bit pseudo-gradients (hivemind,
  SparseLoCo's trainer). The wire format makes the whole tensor one group, as they do;
* **index codes**: ``index_bits`` bits per entry, the offset inside the bucket
  (``ceil(log2(bucket size))`` bits, 12 for buckets of 4096) or the absolute position.

Bits are packed little-endian: code ``i`` occupies bits ``i*w .. i*w+w-1`` of the
section, bit ``j`` of a section is bit ``j % 8`` of its byte ``j // 8``.

:meth:`ValueCodec.roundtrip` returns exactly what receivers decode (decoding is a few
elementwise IEEE operations on the transmitted floats, so every device decodes the
same bits), which lets the compressor keep ``acc - decoded`` in the residual:
quantization error is delayed, not lost. Everything is plain tensor arithmetic on the
input's device (no host synchronisation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distk.config import VALUE_BITS, VALUE_LEVELS

__all__ = [
    "SIGMA_RANGE",
    "VALUE_BITS",
    "ValueCodec",
    "bits_for",
    "pack_bits",
    "packed_nbytes",
    "scale_dtype",
    "unpack_bits",
]


SIGMA_RANGE = 6.0
"""Width of the ``levels="sigma"`` grid in standard deviations of the group's values
(SparseLoCo's and hivemind's setting)."""


def scale_dtype(bits: int) -> torch.dtype:
    """Dtype of the per-group ranges on the wire for ``bits``-bit codes: bfloat16 up to
    4 bits, float32 for 8 (see the module docstring)."""
    return torch.bfloat16 if bits <= 4 else torch.float32


def bits_for(limit: int) -> int:
    """Bits of a code for integers in ``[0, limit)``: ``ceil(log2(limit))`` (0 for 1)."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return (limit - 1).bit_length()


def packed_nbytes(count: int, width: int) -> int:
    """Bytes holding ``count`` codes of ``width`` bits."""
    return (count * width + 7) // 8


def pack_bits(codes: torch.Tensor, width: int) -> torch.Tensor:
    """``(..., n)`` integer codes in ``[0, 2**width)`` -> ``(..., packed_nbytes(n, width))``
    uint8, little-endian bit order (see the module docstring). ``width`` in 0..31."""
    if not 0 <= width <= 31:
        raise ValueError(f"width must be in [0, 31], got {width}")
    *lead, n = codes.shape
    nbytes = packed_nbytes(n, width)
    if nbytes == 0:
        return torch.zeros(*lead, 0, dtype=torch.uint8, device=codes.device)
    device = codes.device
    if 8 % width == 0:
        # Whole codes per byte: pad to a multiple of 8 // width and shift them in.
        per_byte = 8 // width
        padded = torch.nn.functional.pad(codes.to(torch.int32), (0, nbytes * per_byte - n))
        shifts = torch.arange(0, 8, width, dtype=torch.int32, device=device)
        byte = (padded.view(*lead, nbytes, per_byte) << shifts).sum(-1)
        return byte.to(torch.uint8)
    # Any width: code i, shifted to its bit offset inside its first byte, spans at most
    # `span` bytes; add each byte's share in (bit ranges of codes never overlap, so the
    # sums are ORs). Integer sums: exact and order-independent on every device.
    rows = codes.reshape(-1, n).to(torch.int64)
    start = torch.arange(n, dtype=torch.int64, device=device) * width
    first, shift = start >> 3, start & 7
    shifted = rows << shift
    span = (width + 7 + 7) // 8
    out = torch.zeros(rows.shape[0], nbytes + span, dtype=torch.int64, device=device)
    for m in range(span):
        out.index_add_(1, first + m, (shifted >> (8 * m)) & 0xFF)
    return out[:, :nbytes].to(torch.uint8).reshape(*lead, nbytes)


def unpack_bits(packed: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``(..., nbytes)`` uint8 -> ``(..., count)`` int64."""
    if not 0 <= width <= 31:
        raise ValueError(f"width must be in [0, 31], got {width}")
    *lead, nbytes = packed.shape
    if nbytes != packed_nbytes(count, width):
        raise ValueError(f"{count} codes of {width} bits take {packed_nbytes(count, width)} "
                         f"bytes, got {nbytes}")
    device = packed.device
    if width == 0:
        return torch.zeros(*lead, count, dtype=torch.int64, device=device)
    if 8 % width == 0:
        per_byte = 8 // width
        shifts = torch.arange(0, 8, width, dtype=torch.int32, device=device)
        codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << width) - 1)
        return codes.reshape(*lead, nbytes * per_byte)[..., :count].to(torch.int64)
    span = (width + 7 + 7) // 8
    byte = torch.nn.functional.pad(packed.to(torch.int64), (0, span))
    start = torch.arange(count, dtype=torch.int64, device=device) * width
    first, shift = start >> 3, start & 7
    word = torch.zeros(*lead, count, dtype=torch.int64, device=device)
    for m in range(span):
        word |= byte[..., first + m] << (8 * m)
    return (word >> shift) & ((1 << width) - 1)


@dataclass(frozen=True)
class ValueCodec:
    """Quantizer of ``k`` values in groups of ``group_size`` consecutive entries.

    Args:
        bits: code width, one of :data:`VALUE_BITS` (1 = sign with a mean-magnitude scale).
        k: number of values.
        group_size: entries sharing one range (the last group may be shorter).
        levels: ``"centres"`` (a ``(lo, hi)`` range per group), ``"means"`` (``M``
            per-cell mean magnitudes per group; 1, 2 or 4 bits) or ``"sigma"`` (``2**bits``
            signed cells over :data:`SIGMA_RANGE` standard deviations, their means sent;
            2, 4 or 8 bits).
    """

    bits: int
    k: int
    group_size: int
    levels: str = "centres"

    def __post_init__(self) -> None:
        if self.bits not in VALUE_BITS:
            raise ValueError(f"value bits must be one of {VALUE_BITS}, got {self.bits!r}")
        if (self.levels not in VALUE_LEVELS or (self.levels == "means" and self.bits > 4)
                or (self.levels == "sigma" and self.bits == 1)):
            raise ValueError(f"levels must be one of {VALUE_LEVELS} ('means' at 1, 2 or 4 "
                             f"bits, 'sigma' at 2, 4 or 8), got {self.levels!r} at "
                             f"{self.bits} bits")
        if self.k < 0:
            raise ValueError(f"k must be >= 0, got {self.k}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")

    @property
    def groups(self) -> int:
        return math.ceil(self.k / self.group_size)

    @property
    def magnitudes(self) -> int:
        """``M = 2**(bits - 1)``: magnitude levels per group."""
        return 1 << (self.bits - 1)

    @property
    def scale_dtype(self) -> torch.dtype:
        """Dtype of the ranges on the wire (:func:`scale_dtype`)."""
        return scale_dtype(self.bits)

    @property
    def signed(self) -> bool:
        """Whether codes are signed cells (``"sigma"``) rather than sign-magnitude."""
        return self.levels == "sigma"

    @property
    def sends_means(self) -> bool:
        """Whether groups send per-cell means (``"means"`` over 1 bit; at 1 bit the one
        level is the mean either way)."""
        return self.levels == "means" and self.bits > 1

    @property
    def scales_per_group(self) -> int:
        """Floats per group on the wire: ``(lo, hi)``, ``M`` means
        (:attr:`sends_means`) or ``2**bits`` signed cell means (:attr:`signed`)."""
        if self.signed:
            return 1 << self.bits
        return self.magnitudes if self.sends_means else 2

    @property
    def scale_bytes(self) -> int:
        """Bytes of the groups' ranges (or means) in :attr:`scale_dtype`."""
        return self.scales_per_group * self.groups * self.scale_dtype.itemsize

    @property
    def code_bytes(self) -> int:
        return packed_nbytes(self.k, self.bits)

    @property
    def nbytes(self) -> int:
        """Bytes of the value section: ranges and packed codes."""
        return self.scale_bytes + self.code_bytes

    def _grouped(self, values: torch.Tensor, fill: float) -> torch.Tensor:
        """``(k,)`` -> ``(groups, group_size)``, padded with ``fill``."""
        padded = torch.nn.functional.pad(values, (0, self.groups * self.group_size - self.k),
                                         value=fill)
        return padded.view(self.groups, self.group_size)

    def _group_of_entry(self, device: torch.device) -> torch.Tensor:
        return torch.arange(self.k, device=device) // self.group_size

    def encode(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k,)`` finite floats -> ``(codes (k,) int64, scales (groups,
        scales_per_group))``: ``(lo, hi)`` ranges in :attr:`scale_dtype` with the codes
        chosen against those rounded ranges, or (``"means"``) each cell's mean."""
        if values.shape != (self.k,):
            raise ValueError(f"encode expects values of shape ({self.k},), got "
                             f"{tuple(values.shape)}")
        values = values.to(torch.float32)
        wire = self.scale_dtype
        if self.signed:
            return self._encode_sigma(values)
        magnitude = values.abs()
        negative = (values < 0).to(torch.int64)
        if self.bits == 1:
            sizes = (self.k - torch.arange(self.groups, device=values.device)
                     * self.group_size).clamp(max=self.group_size)
            # Summed in float64: a CUDA gradient packed on the CPU (gloo) then gets the
            # same float32 mean as its own device computes for the residual, except at
            # a float32 rounding tie.
            total = self._grouped(magnitude.double(), 0.0).sum(-1)
            mean = (total / sizes.double()).to(torch.float32).to(wire)
            return negative, torch.stack([mean, mean], dim=-1)
        lo = self._grouped(magnitude, math.inf).amin(-1).to(wire)
        hi = self._grouped(magnitude, 0.0).amax(-1).to(wire)
        ranges = torch.stack([lo, hi], dim=-1)
        lo, hi = lo.to(torch.float32), hi.to(torch.float32)
        group = self._group_of_entry(values.device)
        width = hi - lo
        safe = torch.where(width > 0, width, torch.ones_like(width))
        cell = ((magnitude - lo[group]) / safe[group] * self.magnitudes).floor()
        level = cell.clamp(0, self.magnitudes - 1).to(torch.int64)
        if self.sends_means:
            ranges = self._cell_means(self._grouped(magnitude.double(), 0.0),
                                      self._grouped(level, -1),
                                      [self._centre(lo, hi, j)
                                       for j in range(self.magnitudes)]).to(wire)
        return level + negative * self.magnitudes, ranges

    def _encode_sigma(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``levels="sigma"``: signed cells over :data:`SIGMA_RANGE` standard deviations
        about each group's mean; the scales are the ``2**bits`` cell means (an empty
        cell: its centre). Statistics and sums in float64 over the grouped view: the same
        bits on every call."""
        cells = 1 << self.bits
        v = self._grouped(values.double(), math.nan)
        present = ~v.isnan()
        count = present.sum(-1, keepdim=True)
        mean = torch.where(present, v, 0.0).sum(-1, keepdim=True) / count.clamp(min=1)
        centred = torch.where(present, v - mean, 0.0)
        std = (centred.square().sum(-1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
        width = SIGMA_RANGE * std / cells
        width = torch.where(width > 0, width, torch.ones_like(width))
        code = (centred / width).round() + cells // 2
        code = torch.where(present, code.clamp(0, cells - 1), -1).to(torch.int64)
        centres = [(mean + (j - cells // 2) * width).squeeze(-1).to(torch.float32)
                   for j in range(cells)]
        table = self._cell_means(v, code, centres).to(self.scale_dtype)
        return code.flatten()[: self.k], table

    def _centre(self, lo: torch.Tensor, hi: torch.Tensor,
                level: torch.Tensor | int) -> torch.Tensor:
        """The centre of cell ``level`` of ``[lo, hi]``, one IEEE operation at a time
        (``(level + 1/2) / M`` is exact: M is a power of two)."""
        return lo + ((level + 0.5) / self.magnitudes) * (hi - lo)

    @staticmethod
    def _cell_means(values: torch.Tensor, codes: torch.Tensor,
                    empty: list[torch.Tensor]) -> torch.Tensor:
        """``(groups, len(empty))`` float32: per group, the mean of the ``(groups, size)``
        float64 ``values`` whose code is ``j`` (``codes`` grouped alike, padding -1), or
        ``empty[j]`` (float32, per group) where none is. Masked sums, no atomics: the same
        bits on every call (the residual's round trip and the packed payload agree)."""
        means = []
        for j, fallback in enumerate(empty):
            inside = codes == j
            total = torch.where(inside, values, 0.0).sum(-1)
            count = inside.sum(-1)
            means.append(torch.where(count > 0, (total / count.clamp(min=1)).to(torch.float32),
                                     fallback))
        return torch.stack(means, dim=-1)

    def decode(self, codes: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
        """``(..., k)`` codes and ``(..., groups, scales_per_group)`` ranges (or means) ->
        ``(..., k)`` float32.

        Elementwise IEEE operations on transmitted floats, one at a time (no fused
        multiply-add): bitwise the same on any device."""
        ranges = ranges.to(torch.float32)  # exact from bfloat16
        group = self._group_of_entry(codes.device)
        if self.signed:  # the code's cell mean, sign included
            return torch.gather(ranges.flatten(-2), -1, group * (1 << self.bits) + codes)
        if self.sends_means:
            cell = group * self.magnitudes + codes % self.magnitudes
            magnitude = torch.gather(ranges.flatten(-2), -1, cell)
        else:
            lo, hi = ranges[..., 0][..., group], ranges[..., 1][..., group]
            magnitude = self._centre(lo, hi, (codes % self.magnitudes).to(torch.float32))
        return torch.where(codes >= self.magnitudes, -magnitude, magnitude)

    def roundtrip(self, values: torch.Tensor) -> torch.Tensor:
        """What receivers decode from :meth:`encode` of ``values`` (float32, ``(k,)``)."""
        return self.decode(*self.encode(values))

    def pack(self, values: torch.Tensor) -> torch.Tensor:
        """``(k,)`` values -> ``(nbytes,)`` uint8: ranges, then packed codes."""
        codes, ranges = self.encode(values)
        return torch.cat([ranges.contiguous().view(torch.uint8).reshape(-1),
                          pack_bits(codes, self.bits)])

    def unpack(self, payload: torch.Tensor) -> torch.Tensor:
        """``(..., nbytes)`` uint8 -> ``(..., k)`` float32 decoded values."""
        if payload.shape[-1] != self.nbytes:
            raise ValueError(f"value section must hold {self.nbytes} bytes, got "
                             f"{payload.shape[-1]}")
        range_part = payload[..., : self.scale_bytes].clone(
            memory_format=torch.contiguous_format)  # fresh, aligned for the float view
        ranges = range_part.view(self.scale_dtype).unflatten(
            -1, (self.groups, self.scales_per_group))
        codes = unpack_bits(payload[..., self.scale_bytes:], self.k, self.bits)
        return self.decode(codes, ranges)
