"""Wire format of selected entries: how ``(indices, values)`` become bytes and back.

A rank's payload is one flat ``uint8`` buffer holding two sections, the one with the
larger element size first, so that both can be viewed in place without copies:

* **values**: in the wire value dtype (the tensor's dtype, or a configured bf16/fp16);
* **indices**, in one of three encodings (:class:`WireFormat` picks the smallest):

  - ``"absolute"``: the position itself, as int32 (int64 once ``numel >= 2^31``, 16-bit
    while ``numel <= 65536``);
  - ``"bucket_offset"``: when the selection is bucketed with no second stage, every
    bucket sends exactly ``k_per_bucket`` entries, in bucket order, so entry ``j``
    belongs to bucket ``j // k_per_bucket`` and only its offset inside the bucket travels
    (16-bit while buckets hold at most 65536 elements). Interleaved buckets: position
    ``p`` is offset ``p // buckets`` of bucket ``p % buckets``; contiguous buckets:
    bucket ``j`` starts at ``j * numel // buckets`` (the balanced split of
    ``distk.selection.reference.bucket_positions``); tiles (``tiles=(rows, cols)``):
    bucket ``j`` is the ``j``-th ``T x T`` tile (``T = 64``) of the row-major
    ``rows x cols`` view, in row-major tile order, and the offset of entry ``(r, c)``
    inside it is ``(r % T) * T + c % T`` (:func:`to_tile_order`).

16-bit indices are stored as int16 holding ``index - 32768`` (torch has no general
uint16 arithmetic), covering 0..65535.

With ``value_bits`` set (the compact codec of :mod:`distk.comm.codec`), the payload is
instead: ranges (two per group of :func:`codec_group_size` entries, bfloat16 up to 4
bits and float32 at 8), values packed at ``value_bits`` bits each, then indices packed at
``index_bits`` bits each (``ceil(log2(bucket size))`` for bucket offsets,
``ceil(log2(numel))`` for positions, none when every entry is sent in order), or, with
contiguous buckets (tiles included) where it is smaller, a **bitmap** of ``numel`` bits,
one per position in bucket order (:attr:`WireFormat.bitmap`: when a bucket's entries
cost more offset bits than the bucket has entries, e.g. above 1/12 of each 4096-entry
tile). With the bitmap, each bucket's entries travel in ascending offset order: the
codec's ranges cover whole buckets, so every entry decodes to the same value as in
selection order. Values then decode to float32; :meth:`WireFormat.decoded` gives exactly
what receivers decode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distk.comm.codec import VALUE_BITS, ValueCodec, bits_for, pack_bits, packed_nbytes, unpack_bits
from distk.config import TILE_SIDE

__all__ = [
    "CODEC_GROUP",
    "DTYPE_CODES",
    "WireFormat",
    "bucket_offsets",
    "codec_group_size",
    "decode_indices",
    "encode_indices",
    "index_dtype_for",
    "from_tile_order",
    "positions_from_offsets",
    "to_tile_order",
]

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float64: 2,
    torch.float16: 3,
    torch.bfloat16: 4,
}
"""Small integer codes of the value dtypes, exchanged in metadata to check agreement."""

CODEC_GROUP = 64
"""Entries sharing one range in the compact codec when bucket ids are not implicit (and
the least a group of whole buckets holds: see :func:`codec_group_size`)."""


_UINT16_LIMIT = 1 << 16
_INT16_BIAS = 1 << 15
_INT32_LIMIT = 1 << 31


def codec_group_size(k_per_bucket: int | None) -> int:
    """Entries per range group of the compact codec: whole buckets (one bucket when it
    sends at least :data:`CODEC_GROUP` entries, else as many buckets as fit in
    :data:`CODEC_GROUP`, so the 8-byte range never costs more than 1 bit per entry);
    :data:`CODEC_GROUP` consecutive entries without implicit buckets."""
    if k_per_bucket is None:
        return CODEC_GROUP
    return k_per_bucket * max(1, CODEC_GROUP // k_per_bucket)


def index_dtype_for(limit: int) -> torch.dtype:
    """Narrowest index dtype for values in ``[0, limit)``."""
    if limit <= _UINT16_LIMIT:
        return torch.int16
    if limit <= _INT32_LIMIT:
        return torch.int32
    return torch.int64


def encode_indices(indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int64 indices in range for ``dtype`` -> ``dtype`` (16-bit: biased by -32768)."""
    if dtype == torch.int16:
        return (indices - _INT16_BIAS).to(torch.int16)
    return indices.to(dtype)


def decode_indices(encoded: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_indices`, as int64."""
    if encoded.dtype == torch.int16:
        return encoded.to(torch.int64) + _INT16_BIAS
    return encoded.to(torch.int64)


def _bucket_starts(numel: int, buckets: int, device: torch.device) -> torch.Tensor:
    bucket = torch.arange(buckets, device=device, dtype=torch.int64)
    return bucket * numel // buckets


def bucket_offsets(positions: torch.Tensor, numel: int, buckets: int, k_per_bucket: int,
                   interleaved: bool) -> torch.Tensor:
    """Offsets inside their buckets of ``positions`` listed in bucket order (``... , k``)."""
    if interleaved:
        return positions // buckets
    k = positions.shape[-1]
    bucket = torch.arange(k, device=positions.device) // k_per_bucket
    return positions - _bucket_starts(numel, buckets, positions.device)[bucket]


def positions_from_offsets(offsets: torch.Tensor, numel: int, buckets: int,
                           k_per_bucket: int, interleaved: bool) -> torch.Tensor:
    """Inverse of :func:`bucket_offsets` (int64 positions, same shape)."""
    k = offsets.shape[-1]
    bucket = torch.arange(k, device=offsets.device) // k_per_bucket
    if interleaved:
        return offsets * buckets + bucket
    return offsets + _bucket_starts(numel, buckets, offsets.device)[bucket]


def to_tile_order(positions: torch.Tensor, cols: int, side: int = TILE_SIDE) -> torch.Tensor:
    """Row-major positions of a ``(rows, cols)`` view -> positions in tile order: tile
    ``t`` (row-major over the tile grid) holds ``t * side**2 .. (t + 1) * side**2 - 1``,
    each tile's entries row-major inside it. ``cols`` must divide by ``side``."""
    row, col = positions // cols, positions % cols
    tile = (row // side) * (cols // side) + col // side
    return tile * (side * side) + (row % side) * side + col % side


def from_tile_order(positions: torch.Tensor, cols: int, side: int = TILE_SIDE) -> torch.Tensor:
    """Inverse of :func:`to_tile_order`."""
    tile, offset = positions // (side * side), positions % (side * side)
    per_row = cols // side
    row = (tile // per_row) * side + offset // side
    col = (tile % per_row) * side + offset % side
    return row * cols + col


@dataclass(frozen=True)
class WireFormat:
    """Layout of one rank's ``k`` selected entries of a tensor of ``numel`` entries.

    Args:
        numel: entries in the (flat) tensor.
        k: entries each rank sends.
        value_dtype: dtype of values on the wire.
        buckets, k_per_bucket: set both to use implicit bucket ids (requires
            ``buckets * k_per_bucket == k`` and at least ``k_per_bucket`` entries in every
            bucket, i.e. a bucketed selection with no second stage); ``None`` = absolute
            indices.
        interleaved: bucket layout (see the module docstring).
        value_bits: ``None`` (values in ``value_dtype``, byte-aligned indices) or 1, 2, 4,
            8: the compact codec (values quantized in per-group ranges and
            decoded to ``value_dtype``, which must then be float32; bit-packed indices).
        tiles: ``(rows, cols)``: the buckets are the ``64 x 64`` tiles of the row-major
            ``rows x cols`` view (``bucket_layout="tile"``; contiguous buckets of the
            tile order, see :func:`to_tile_order`); ``None``: flat buckets.
        value_levels: with ``value_bits``, what codes decode to: ``"centres"`` of the
            range's cells, per-cell ``"means"``, or the means of ``"sigma"`` cells (one
            group for the whole tensor) (:class:`~distk.comm.codec.ValueCodec`).
    """

    numel: int
    k: int
    value_dtype: torch.dtype
    buckets: int | None = None
    k_per_bucket: int | None = None
    interleaved: bool = True
    value_bits: int | None = None
    tiles: tuple[int, int] | None = None
    value_levels: str = "centres"

    def __post_init__(self) -> None:
        if self.numel < 1:
            raise ValueError(f"numel must be >= 1, got {self.numel}")
        if not 0 <= self.k <= self.numel:
            raise ValueError(f"k must be in [0, numel={self.numel}], got {self.k}")
        if self.value_dtype not in DTYPE_CODES:
            raise ValueError(f"value_dtype must be one of {list(DTYPE_CODES)}, "
                             f"got {self.value_dtype}")
        if (self.buckets is None) != (self.k_per_bucket is None):
            raise ValueError("set both buckets and k_per_bucket (bucket-offset indices) "
                             f"or neither, got buckets={self.buckets}, "
                             f"k_per_bucket={self.k_per_bucket}")
        if self.buckets is not None and not self.bucket_packable(
                self.numel, self.k, self.buckets, self.k_per_bucket):
            raise ValueError(
                f"bucket-offset indices need buckets * k_per_bucket == k and at least "
                f"k_per_bucket entries per bucket: numel={self.numel}, k={self.k}, "
                f"buckets={self.buckets}, k_per_bucket={self.k_per_bucket}")
        if self.tiles is not None:
            rows, cols = self.tiles
            if (self.buckets is None or self.interleaved or rows * cols != self.numel
                    or rows % TILE_SIDE or cols % TILE_SIDE
                    or self.buckets != self.numel // TILE_SIDE**2):
                raise ValueError(
                    f"tiles={self.tiles} need contiguous (interleaved=False) buckets, one per "
                    f"{TILE_SIDE}x{TILE_SIDE} tile of a rows x cols = numel view with both sides "
                    f"multiples of {TILE_SIDE}: numel={self.numel}, buckets={self.buckets}, "
                    f"interleaved={self.interleaved}")
        if self.value_bits is not None:
            if self.value_dtype != torch.float32:
                raise ValueError(f"the compact codec (value_bits={self.value_bits}) decodes "
                                 f"to float32; got value_dtype={self.value_dtype}")
            if self.value_bits not in VALUE_BITS:
                raise ValueError(f"value_bits must be None or one of {VALUE_BITS}, got "
                                 f"{self.value_bits!r}")

    @staticmethod
    def bucket_packable(numel: int, k: int, buckets: int, k_per_bucket: int) -> bool:
        """Whether a bucketed selection with these parameters has no second stage, so
        that its entries can travel with implicit bucket ids."""
        return (buckets >= 1 and k_per_bucket >= 1 and buckets * k_per_bucket == k
                and numel // buckets >= k_per_bucket)

    @property
    def bucketed(self) -> bool:
        """Whether indices travel as offsets inside implicit buckets."""
        return self.buckets is not None

    @property
    def bucket_size(self) -> int:
        """Largest number of entries in one bucket (``numel`` when not bucketed)."""
        return math.ceil(self.numel / self.buckets) if self.bucketed else self.numel

    @property
    def codec(self) -> ValueCodec | None:
        """The value codec (``None`` without ``value_bits``)."""
        if self.value_bits is None:
            return None
        group = (max(self.k, 1) if self.value_levels == "sigma"  # one table per tensor
                 else codec_group_size(self.k_per_bucket))
        return ValueCodec(self.value_bits, self.k, group, self.value_levels)

    @property
    def implicit(self) -> bool:
        """Whether positions are left off the wire: with the codec, a rank that sends
        every entry (``k == numel``, no buckets) sends its values in position order."""
        return self.value_bits is not None and self.k == self.numel and not self.bucketed

    @property
    def index_bits(self) -> int:
        """Bits of one index on the wire (bit-packed with the codec, else the dtype's; 0
        when :attr:`implicit`); with :attr:`bitmap`, the offset bits the bitmap replaces."""
        if self.value_bits is None:
            return 8 * self.index_dtype.itemsize
        return 0 if self.implicit else bits_for(self.bucket_size)

    @property
    def bitmap(self) -> bool:
        """Whether positions travel as a bitmap of ``numel`` bits (codec, contiguous
        buckets, and fewer bits than ``k`` offsets of :attr:`index_bits` each)."""
        return (self.value_bits is not None and self.bucketed and not self.interleaved
                and not self.implicit and self.numel < self.k * self.index_bits)

    @property
    def index_nbytes(self) -> int:
        """Bytes of the codec's index section: the bitmap or the packed offsets."""
        if self.bitmap:
            return packed_nbytes(self.numel, 1)
        return packed_nbytes(self.k, self.index_bits)

    @property
    def bits_per_entry(self) -> float:
        """Payload bits per selected entry (index, value and amortised ranges)."""
        return 8 * self.payload_bytes / self.k if self.k else 0.0

    @property
    def position_bits(self) -> int:
        """Bits of one position sent without a value (a shared mask's positions, bit
        packed): the offset inside its bucket with implicit bucket ids, else the position."""
        return bits_for(self.bucket_size)

    @property
    def positions_nbytes(self) -> int:
        """Bytes of ``k`` positions packed at :attr:`position_bits` each."""
        return packed_nbytes(self.k, self.position_bits)

    def _offsets(self, positions: torch.Tensor) -> torch.Tensor:
        """Bucket offsets of ``positions`` listed in bucket order."""
        if self.tiles is not None:
            positions = to_tile_order(positions, self.tiles[1])
        return bucket_offsets(positions, self.numel, self.buckets, self.k_per_bucket,
                              self.interleaved)

    def _positions(self, offsets: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_offsets`."""
        positions = positions_from_offsets(offsets, self.numel, self.buckets,
                                           self.k_per_bucket, self.interleaved)
        if self.tiles is not None:
            positions = from_tile_order(positions, self.tiles[1])
        return positions

    def _bucket_order(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions in the coordinates of contiguous buckets (tile order with tiles)."""
        return to_tile_order(positions, self.tiles[1]) if self.tiles is not None else positions

    def _from_bitmap(self, packed: torch.Tensor) -> torch.Tensor:
        """``(..., numel / 8)`` bitmaps -> ``(..., k)`` int64 positions, ascending in bucket
        order. Without a host sync: the ``j``-th set bit is where the running count of set
        bits first reaches ``j + 1``. A bitmap that does not hold exactly ``k`` set bits
        raises on the CPU (on a GPU that check would stall the stream)."""
        # unpack_bits' width-1 path, kept in uint8: its int64 codes would take 8 bytes a
        # position of the tensor, per rank.
        shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
        bits = ((packed.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., :self.numel]
        counts = torch.cumsum(bits, dim=-1, dtype=torch.int32)
        if not counts.is_cuda and bool((counts[..., -1] != self.k).any()):
            raise ValueError(f"a bitmap of {self.numel} positions must hold exactly "
                             f"k={self.k} set bits, got {counts[..., -1].tolist()}")
        wanted = torch.arange(1, self.k + 1, dtype=torch.int32, device=packed.device).expand(
            *counts.shape[:-1], self.k).contiguous()
        order = torch.searchsorted(counts, wanted)
        if self.tiles is not None:
            return from_tile_order(order, self.tiles[1])
        return order

    def pack_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """``(k,)`` int64 positions (in bucket order with implicit bucket ids) ->
        ``(positions_nbytes,)`` uint8, bit-packed."""
        if positions.shape != (self.k,):
            raise ValueError(f"pack_positions expects ({self.k},) positions, got "
                             f"{tuple(positions.shape)}")
        if self.bucketed:
            positions = self._offsets(positions)
        return pack_bits(positions, self.position_bits)

    def unpack_positions(self, payload: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`pack_positions`: int64 positions, ``(k,)``."""
        codes = unpack_bits(payload, self.k, self.position_bits)
        if self.bucketed:
            return self._positions(codes)
        return codes

    def decoded(self, values: torch.Tensor) -> torch.Tensor:
        """Exactly what receivers decode from ``values`` (in ``value_dtype``): the codec's
        round trip, or the cast to the wire dtype."""
        codec = self.codec
        return values.to(self.value_dtype) if codec is None else codec.roundtrip(values)

    @property
    def index_dtype(self) -> torch.dtype:
        """Dtype of indices on the wire."""
        return index_dtype_for(self.bucket_size)

    @property
    def index_bytes(self) -> int | float:
        """Bytes of one index (with the codec: ``index_bits / 8``, a fraction)."""
        if self.value_bits is not None:
            return self.index_nbytes / self.k if self.bitmap else self.index_bits / 8
        return self.index_dtype.itemsize

    @property
    def value_bytes(self) -> int | float:
        """Bytes of one value (with the codec: its bits and its share of the ranges,
        over 8)."""
        codec = self.codec
        if codec is not None:
            return codec.nbytes / self.k if self.k else 0.0
        return self.value_dtype.itemsize

    @property
    def entry_bytes(self) -> int | float:
        """Bytes per selected entry (index + value)."""
        return self.index_bytes + self.value_bytes

    @property
    def payload_bytes(self) -> int:
        """Bytes of one rank's packed entries."""
        codec = self.codec
        if codec is not None:
            return codec.nbytes + self.index_nbytes
        return self.k * self.entry_bytes

    @property
    def index_code(self) -> int:
        """Small integer describing the index and value encoding (exchanged to check
        agreement)."""
        code = (2 if self.bucketed else 0) * 8 + self.index_dtype.itemsize
        if self.tiles is not None:
            code += 1 << 24
        if self.value_bits is not None:
            code += (self.value_bits << 8) + (self.index_bits << 16)
            if self.value_levels == "means":
                code += 1 << 25
            elif self.value_levels == "sigma":
                code += 1 << 26
            if self.bitmap:
                code += 1 << 27
        return code

    def _sections(self) -> tuple[tuple[str, int, int], ...]:
        value_len = self.k * self.value_bytes
        index_len = self.k * self.index_bytes
        if self.value_bytes >= self.index_bytes:
            return (("values", 0, value_len), ("indices", value_len, value_len + index_len))
        return (("indices", 0, index_len), ("values", index_len, index_len + value_len))

    def pack(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``(k,)`` int64 positions and ``(k,)`` values -> ``(payload_bytes,)`` uint8.

        With bucket offsets, ``indices`` must list the buckets in order, ``k_per_bucket``
        entries each (as ``distk.selection.bucket_candidates`` returns them); when
        :attr:`implicit`, they must be ``0 .. numel - 1`` in order (not sent).
        """
        if indices.shape != (self.k,) or values.shape != (self.k,):
            raise ValueError(f"pack expects indices and values of shape ({self.k},), got "
                             f"{tuple(indices.shape)} and {tuple(values.shape)}")
        if self.bitmap:
            order = self._bucket_order(indices)
            ascending, sort = torch.sort(order)
            bits = torch.zeros(self.numel, dtype=torch.uint8, device=indices.device)
            bits[ascending] = 1
            return torch.cat([self.codec.pack(values[sort]), pack_bits(bits, 1)])
        if self.bucketed:
            indices = self._offsets(indices)
        codec = self.codec
        if codec is not None:
            return torch.cat([codec.pack(values), pack_bits(indices, self.index_bits)])
        parts = {
            "indices": encode_indices(indices, self.index_dtype).view(torch.uint8),
            "values": values.to(self.value_dtype).contiguous().view(torch.uint8),
        }
        return torch.cat([parts[name] for name, _, _ in self._sections()])

    def unpack(self, payload: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(..., payload_bytes)`` uint8 -> int64 positions and values, each ``(..., k)``."""
        if payload.dtype != torch.uint8 or payload.shape[-1] != self.payload_bytes:
            raise ValueError(f"unpack expects uint8 payloads of {self.payload_bytes} bytes, "
                             f"got {payload.dtype} of shape {tuple(payload.shape)}")
        payload = payload if payload.stride(-1) == 1 else payload.contiguous()
        codec = self.codec
        if codec is not None:
            values = codec.unpack(payload[..., : codec.nbytes])
            if self.implicit:
                return torch.arange(self.k, device=payload.device).expand_as(values), values
            if self.bitmap:
                return self._from_bitmap(payload[..., codec.nbytes:]), values
            indices = unpack_bits(payload[..., codec.nbytes:], self.k, self.index_bits)
            if self.bucketed:
                indices = self._positions(indices)
            return indices, values
        out = {}
        for name, start, stop in self._sections():
            dtype = self.index_dtype if name == "indices" else self.value_dtype
            section = payload[..., start:stop]
            try:
                out[name] = section.view(dtype)
            except RuntimeError:  # unaligned row stride or offset: view a fresh copy
                out[name] = section.clone(memory_format=torch.contiguous_format).view(dtype)
        indices = decode_indices(out["indices"])
        if self.bucketed:
            indices = self._positions(indices)
        return indices, out["values"]
