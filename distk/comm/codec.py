"""Compact wire codecs: low-bit values with per-group scales and bit-packed indices.

With ``SparsityConfig.value_bits`` set, a rank's selected entries travel as

* **scales**: one float32 per group of ``group_size`` consecutive entries (a bucket's
  ``k_per_bucket`` entries when bucket ids are implicit);
* **value codes**: ``value_bits`` (1, 2, 4 or 8) bits per entry. Code ``q`` of a group
  with scale ``s`` decodes to ``s * (2q - L) / L`` with ``L = 2**bits - 1``: a symmetric
  grid without zero (top-k entries are never small), spanning ``[-s, s]``. For 2..8 bits
  ``s`` is the group's largest magnitude and codes round to the nearest level; for 1 bit
  (sign) ``s`` is the group's mean magnitude, the L2-optimal scale of a sign code;
* **index codes**: ``index_bits`` bits per entry, the offset inside the bucket
  (``ceil(log2(bucket size))`` bits, 12 for buckets of 4096) or the absolute position.

Bits are packed little-endian: code ``i`` occupies bits ``i*w .. i*w+w-1`` of the
section, bit ``j`` of a section is bit ``j % 8`` of its byte ``j // 8``.

:meth:`ValueCodec.roundtrip` returns exactly what receivers decode (the decoder is one
fp32 multiply per entry, so every device decodes the same bits), which lets the
compressor keep ``acc - decoded`` in the residual: quantization error is delayed, not
lost. Everything is plain tensor arithmetic on the input's device (no host sync).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "VALUE_BITS",
    "ValueCodec",
    "bits_for",
    "pack_bits",
    "packed_nbytes",
    "unpack_bits",
]

VALUE_BITS = (1, 2, 4, 8)
"""Widths of the value codes."""

SCALE_DTYPE = torch.float32
"""Dtype of the per-group scales on the wire."""


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
    codes = codes.to(torch.int32)
    if 8 % width == 0:
        # Whole codes per byte: pad to a multiple of 8 // width and shift them in.
        per_byte = 8 // width
        padded = torch.nn.functional.pad(codes, (0, nbytes * per_byte - n))
        shifts = torch.arange(0, 8, width, dtype=torch.int32, device=codes.device)
        byte = (padded.view(*lead, nbytes, per_byte) << shifts).sum(-1)
        return byte.to(torch.uint8)
    # Any width: spread every code into its bits, then regroup the bit stream by 8.
    shifts = torch.arange(width, dtype=torch.int32, device=codes.device)
    bits = ((codes.unsqueeze(-1) >> shifts) & 1).to(torch.uint8).reshape(*lead, n * width)
    bits = torch.nn.functional.pad(bits, (0, nbytes * 8 - n * width))
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.int32, device=codes.device)
    return (bits.view(*lead, nbytes, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``(..., nbytes)`` uint8 -> ``(..., count)`` int64."""
    if not 0 <= width <= 31:
        raise ValueError(f"width must be in [0, 31], got {width}")
    *lead, nbytes = packed.shape
    if nbytes != packed_nbytes(count, width):
        raise ValueError(f"{count} codes of {width} bits take {packed_nbytes(count, width)} "
                         f"bytes, got {nbytes}")
    if width == 0:
        return torch.zeros(*lead, count, dtype=torch.int64, device=packed.device)
    byte = packed.to(torch.int32)
    if 8 % width == 0:
        per_byte = 8 // width
        shifts = torch.arange(0, 8, width, dtype=torch.int32, device=packed.device)
        codes = (byte.unsqueeze(-1) >> shifts) & ((1 << width) - 1)
        return codes.reshape(*lead, nbytes * per_byte)[..., :count].to(torch.int64)
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    bits = ((byte.unsqueeze(-1) >> shifts) & 1).reshape(*lead, nbytes * 8)
    bits = bits[..., : count * width].reshape(*lead, count, width)
    weights = torch.tensor([1 << j for j in range(width)], dtype=torch.int32,
                           device=packed.device)
    return (bits * weights).sum(-1).to(torch.int64)


@dataclass(frozen=True)
class ValueCodec:
    """Quantizer of ``k`` values in groups of ``group_size`` consecutive entries.

    Args:
        bits: code width, one of :data:`VALUE_BITS` (1 = sign with a mean-magnitude scale).
        k: number of values.
        group_size: entries sharing one scale (the last group may be shorter).
    """

    bits: int
    k: int
    group_size: int

    def __post_init__(self) -> None:
        if self.bits not in VALUE_BITS:
            raise ValueError(f"value bits must be one of {VALUE_BITS}, got {self.bits!r}")
        if self.k < 0:
            raise ValueError(f"k must be >= 0, got {self.k}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")

    @property
    def groups(self) -> int:
        return math.ceil(self.k / self.group_size)

    @property
    def levels(self) -> int:
        """``L = 2**bits - 1``: the grid has ``L + 1`` levels ``(2q - L) / L``."""
        return (1 << self.bits) - 1

    @property
    def scale_bytes(self) -> int:
        return self.groups * SCALE_DTYPE.itemsize

    @property
    def code_bytes(self) -> int:
        return packed_nbytes(self.k, self.bits)

    @property
    def nbytes(self) -> int:
        """Bytes of the value section: scales and packed codes."""
        return self.scale_bytes + self.code_bytes

    def _grouped(self, values: torch.Tensor) -> torch.Tensor:
        """``(k,)`` -> ``(groups, group_size)`` zero-padded."""
        padded = torch.nn.functional.pad(values, (0, self.groups * self.group_size - self.k))
        return padded.view(self.groups, self.group_size)

    def encode(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k,)`` finite floats -> ``(codes (k,) int64, scales (groups,) float32)``."""
        if values.shape != (self.k,):
            raise ValueError(f"encode expects values of shape ({self.k},), got "
                             f"{tuple(values.shape)}")
        grouped = self._grouped(values.to(SCALE_DTYPE))
        magnitude = grouped.abs()
        if self.bits == 1:
            sizes = (self.k - torch.arange(self.groups, device=values.device)
                     * self.group_size).clamp(max=self.group_size)
            scales = magnitude.sum(-1) / sizes.to(SCALE_DTYPE)
            codes = (grouped >= 0).to(torch.int64)
        else:
            scales = magnitude.amax(-1)
            safe = torch.where(scales > 0, scales, torch.ones_like(scales))
            position = (grouped / safe.unsqueeze(-1) + 1) * (self.levels / 2)
            codes = position.round().clamp(0, self.levels).to(torch.int64)
        return codes.reshape(-1)[: self.k], scales

    def decode(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """``(..., k)`` codes and ``(..., groups)`` scales -> ``(..., k)`` float32 values.

        One multiply per entry (a table level times the scale): bitwise the same on any
        device."""
        table = (torch.arange(self.levels + 1, dtype=torch.float64, device=codes.device) * 2
                 - self.levels) / self.levels
        level = table.to(SCALE_DTYPE)[codes]
        group = torch.arange(self.k, device=codes.device) // self.group_size
        return level * scales.to(SCALE_DTYPE)[..., group]

    def roundtrip(self, values: torch.Tensor) -> torch.Tensor:
        """What receivers decode from :meth:`encode` of ``values`` (float32, ``(k,)``)."""
        return self.decode(*self.encode(values))

    def pack(self, values: torch.Tensor) -> torch.Tensor:
        """``(k,)`` values -> ``(nbytes,)`` uint8: scales, then packed codes."""
        codes, scales = self.encode(values)
        return torch.cat([scales.contiguous().view(torch.uint8), pack_bits(codes, self.bits)])

    def unpack(self, payload: torch.Tensor) -> torch.Tensor:
        """``(..., nbytes)`` uint8 -> ``(..., k)`` float32 decoded values."""
        if payload.shape[-1] != self.nbytes:
            raise ValueError(f"value section must hold {self.nbytes} bytes, got "
                             f"{payload.shape[-1]}")
        scale_part = payload[..., : self.scale_bytes].clone(
            memory_format=torch.contiguous_format)  # fresh, aligned for the float view
        scales = scale_part.view(SCALE_DTYPE)
        codes = unpack_bits(payload[..., self.scale_bytes:], self.k, self.bits)
        return self.decode(codes, scales)
