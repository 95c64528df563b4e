"""Compact wire codecs: bit packing, value quantization, wire round trips, and the
compressor with quantized values on real gloo ranks (conservation, identical bits)."""

from __future__ import annotations

import math

import pytest
import torch
from distributed import run_distributed

from distk.comm.codec import VALUE_BITS, ValueCodec, bits_for, pack_bits, scale_dtype, unpack_bits
from distk.comm.cost import scheme_bytes
from distk.comm.wire import WireFormat, codec_group_size
from distk.compressor import GradientCompressor
from distk.config import VALUE_BITS as CONFIG_VALUE_BITS
from distk.config import SparsityConfig
from distk.selection import per_bucket_topk
from distk.selection.reference import positions_of


def reference_pack_bits(codes: list[int], width: int) -> bytes:
    """The plain definition: one Python integer holding code i at bits i*width.."""
    stream = 0
    for i, code in enumerate(codes):
        assert 0 <= code < (1 << width) or width == 0
        stream |= code << (i * width)
    return stream.to_bytes((len(codes) * width + 7) // 8, "little")


def on_wire(x: float, bits: int) -> float:
    """A range bound as it travels: bfloat16 up to 4 bits, float32 at 8."""
    return torch.tensor(x, dtype=torch.float32).to(scale_dtype(bits)).item()


def range_bytes(bits: int) -> int:
    """Bytes of one group's (lo, hi) on the wire."""
    return 4 if bits <= 4 else 8


def reference_quantize(values: list[float], bits: int, group: int) -> list[float]:
    """Plain per-group sign-magnitude quantizer (float64): the sign, and the nearest of
    the centres of 2**(bits-1) equal cells of [least, largest magnitude] (bounds rounded
    as they travel); 1 bit: the sign times the mean magnitude."""
    cells = 1 << (bits - 1)
    out = []
    for start in range(0, len(values), group):
        chunk = values[start:start + group]
        mags = [abs(v) for v in chunk]
        if bits == 1:
            centres = [on_wire(sum(mags) / len(mags), bits)]
        else:
            lo, hi = on_wire(min(mags), bits), on_wire(max(mags), bits)
            centres = [lo + (j + 0.5) * (hi - lo) / cells for j in range(cells)]
        for v in chunk:
            magnitude = min(centres, key=lambda c: abs(c - abs(v)))
            out.append(-magnitude if v < 0 else magnitude)
    return out


WIDTHS = [0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 16, 17, 31]
COUNTS = [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 63, 64, 65]


@pytest.mark.parametrize("width", WIDTHS)
def test_pack_bits_matches_reference_and_round_trips(width):
    gen = torch.Generator().manual_seed(width)
    for count in COUNTS:
        high = 1 << width
        codes = torch.randint(0, high, (count,), generator=gen, dtype=torch.int64)
        if count:  # the extremes of the range
            codes[0] = high - 1
            codes[-1] = 0 if count > 1 else codes[-1]
        packed = pack_bits(codes, width)
        assert packed.dtype == torch.uint8
        assert bytes(packed.tolist()) == reference_pack_bits(codes.tolist(), width), (width, count)
        assert torch.equal(unpack_bits(packed, count, width), codes), (width, count)


def test_unpack_bits_batched_rows():
    codes = torch.randint(0, 1 << 12, (3, 11), generator=torch.Generator().manual_seed(0))
    packed = torch.stack([pack_bits(row, 12) for row in codes])
    assert torch.equal(unpack_bits(packed, 11, 12), codes)
    with pytest.raises(ValueError, match="take 17 bytes"):
        unpack_bits(packed[:, :-1], 11, 12)


def test_bits_for_bucket_sizes():
    # ceil(log2(size)): 12 bits for 4096, 13 just past a power of two, 0 for one entry.
    assert [bits_for(n) for n in (1, 2, 3, 4, 5, 4096, 4097, 65536, 65537)] == \
        [0, 1, 2, 2, 3, 12, 13, 16, 17]


@pytest.mark.parametrize("bits", VALUE_BITS)
@pytest.mark.parametrize("k,group", [(1, 1), (1, 64), (5, 2), (63, 64), (64, 64), (65, 64),
                                     (130, 13), (9, 4)])
def test_value_codec_matches_reference(bits, k, group):
    values = torch.randn(k, generator=torch.Generator().manual_seed(k * 10 + bits))
    codec = ValueCodec(bits, k, group)
    decoded = codec.roundtrip(values)
    expected = torch.tensor(reference_quantize(values.double().tolist(), bits, group),
                            dtype=torch.float64)
    # float32 range and level arithmetic vs float64: a few ulps of the largest magnitude.
    torch.testing.assert_close(decoded.double(), expected, rtol=1e-6, atol=1e-6)
    # What goes over the wire decodes to exactly the round trip.
    payload = codec.pack(values)
    assert payload.numel() == codec.nbytes == (range_bytes(bits) * math.ceil(k / group)
                                               + (k * bits + 7) // 8)
    assert torch.equal(codec.unpack(payload), decoded)
    assert torch.equal(codec.unpack(torch.stack([payload, payload])), torch.stack([decoded] * 2))


def reference_cell_means(values: list[float], bits: int, group: int) -> list[float]:
    """``levels="means"``: the cells of :func:`reference_quantize` (bounds rounded as they
    travel), each entry decoded to the mean magnitude of its group's entries in its cell,
    rounded as it travels."""
    cells = 1 << (bits - 1)
    out = []
    for start in range(0, len(values), group):
        chunk = values[start:start + group]
        mags = [abs(v) for v in chunk]
        lo, hi = on_wire(min(mags), bits), on_wire(max(mags), bits)
        width = hi - lo if hi > lo else 1.0
        cell = [min(cells - 1, max(0, math.floor((m - lo) / width * cells))) for m in mags]
        means = {}
        for j in set(cell):
            members = [m for m, c in zip(mags, cell, strict=True) if c == j]
            means[j] = on_wire(sum(members) / len(members), bits)
        out += [-means[c] if v < 0 else means[c] for v, c in zip(chunk, cell, strict=True)]
    return out


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("k,group", [(1, 1), (5, 2), (64, 64), (65, 64), (130, 13), (4096, 64)])
def test_value_codec_cell_means(bits, k, group):
    values = torch.randn(k, generator=torch.Generator().manual_seed(k + bits))
    codec = ValueCodec(bits, k, group, "means")
    decoded = codec.roundtrip(values)
    expected = torch.tensor(reference_cell_means(values.double().tolist(), bits, group),
                            dtype=torch.float64)
    torch.testing.assert_close(decoded.double(), expected, rtol=1e-6, atol=1e-7)
    # The least-squares value of each cell: never worse than the cell centres (up to the
    # bfloat16 rounding of the means), and sent in M bfloat16 per group.
    centres = ValueCodec(bits, k, group).roundtrip(values)
    assert (decoded - values).norm() <= (centres - values).norm() * 1.002 + 1e-6
    groups = math.ceil(k / group)
    payload = codec.pack(values)
    assert payload.numel() == codec.nbytes == 2 * (1 << (bits - 1)) * groups + (k * bits + 7) // 8
    assert torch.equal(codec.unpack(torch.stack([payload, payload])), torch.stack([decoded] * 2))
    # 1 bit: the sign times the mean either way.
    assert torch.equal(ValueCodec(1, k, group, "means").roundtrip(values),
                       ValueCodec(1, k, group).roundtrip(values))
    with pytest.raises(ValueError, match="levels must be one of"):
        ValueCodec(8, k, group, "means")


def test_value_codec_edge_values():
    codec = ValueCodec(2, 6, 3)
    zeros = torch.zeros(6)
    assert torch.equal(codec.roundtrip(zeros).abs(), zeros)  # all-zero group: range [0, 0]
    values = torch.tensor([3.0, -3.0, 1.0, 0.5, -0.5, 0.5])
    # Group 1: magnitudes in [1, 3], 2 cells with centres 1.5 and 2.5; group 2 (one
    # magnitude): every entry decodes to it, with its sign.
    assert codec.roundtrip(values).tolist() == [2.5, -2.5, 1.5, 0.5, -0.5, 0.5]
    sign = ValueCodec(1, 4, 4).roundtrip(torch.tensor([1.0, -2.0, 3.0, -6.0]))
    assert sign.tolist() == [3.0, -3.0, 3.0, -3.0]
    # Top-k values of a bucket share a narrow magnitude band: 2 bits keep them close.
    band = torch.tensor([2.6, -2.9, 3.4, -4.1, 2.7, 3.0, -2.5, 3.8])
    error = (ValueCodec(2, 8, 8).roundtrip(band) - band).norm() / band.norm()
    assert error < 0.1
    with pytest.raises(ValueError, match="value bits must be one of"):
        ValueCodec(3, 4, 4)


def _bucketed_selection(numel, buckets, k_per_bucket, interleaved, seed):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    keys = per_bucket_topk(x.view(1, -1), buckets, k_per_bucket, interleaved, True)
    return x, positions_of(keys).reshape(-1)


@pytest.mark.parametrize("bits", VALUE_BITS)
@pytest.mark.parametrize("numel,buckets,k_per_bucket,interleaved", [
    (4096 * 4, 4, 64, True),        # buckets of 2^12: 12-bit offsets
    ((4096 + 1) * 3, 3, 5, True),   # 2^12 + 1: 13-bit offsets, k not a multiple of 8
    (4097 * 3 - 2, 3, 7, False),    # contiguous, uneven bucket sizes
    (16, 16, 1, True),              # one-entry buckets: 0-bit offsets
    (33, 2, 3, True),
])
def test_wire_round_trip_bucketed(bits, numel, buckets, k_per_bucket, interleaved):
    x, positions = _bucketed_selection(numel, buckets, k_per_bucket, interleaved, bits)
    k = buckets * k_per_bucket
    wire = WireFormat(numel, k, torch.float32, buckets, k_per_bucket, interleaved, bits)
    assert wire.index_bits == bits_for(math.ceil(numel / buckets))
    payload = wire.pack(positions, x[positions])
    group = codec_group_size(k_per_bucket)
    assert payload.numel() == wire.payload_bytes == (
        range_bytes(bits) * math.ceil(k / group) + (k * bits + 7) // 8
        + (k * wire.index_bits + 7) // 8)
    indices, values = wire.unpack(torch.stack([payload, payload]))
    assert torch.equal(indices, torch.stack([positions] * 2))
    assert torch.equal(values[1], wire.decoded(x[positions]))


def _tile_selection(rows, cols, per_tile, seed):
    """The top ``per_tile`` of every 64 x 64 tile of a ``rows x cols`` matrix, tiles in
    order, each tile's entries by descending magnitude (as the tile layout selects)."""
    from distk.comm.wire import from_tile_order, to_tile_order
    x = torch.randn(rows * cols, generator=torch.Generator().manual_seed(seed))
    in_tile_order = torch.empty_like(x)
    in_tile_order[to_tile_order(torch.arange(x.numel()), cols)] = x
    tiles = x.numel() // 4096
    top = in_tile_order.view(tiles, 4096).abs().topk(per_tile, dim=1).indices
    order = (torch.arange(tiles)[:, None] * 4096 + top).reshape(-1)
    return x, from_tile_order(order, cols)


@pytest.mark.parametrize("bits", VALUE_BITS)
@pytest.mark.parametrize("shape,buckets,k_per_bucket", [
    ((128, 192), 6, 1024),     # a quarter of every tile: 4096 bits a tile, not 12288
    ((64, 64), 1, 400),        # just above 4096 / 12 per tile
    (4097 * 3 - 2, 3, 500),    # contiguous flat buckets of uneven sizes, 13-bit offsets
])
def test_wire_bitmap_where_offsets_cost_more(bits, shape, buckets, k_per_bucket):
    """Contiguous buckets whose entries would take more offset bits than the bucket has
    entries travel as a bitmap of numel bits: each bucket's entries in ascending order,
    every position with the value it decodes to in selection order."""
    tiled = isinstance(shape, tuple)
    if tiled:
        x, positions = _tile_selection(*shape, k_per_bucket, seed=bits)
    else:
        x, positions = _bucketed_selection(shape, buckets, k_per_bucket, False, bits)
    numel, k = x.numel(), buckets * k_per_bucket
    wire = WireFormat(numel, k, torch.float32, buckets, k_per_bucket, False, bits,
                      tiles=shape if tiled else None)
    assert wire.bitmap and wire.index_code & (1 << 27)
    payload = wire.pack(positions, x[positions])
    group = codec_group_size(k_per_bucket)
    assert payload.numel() == wire.payload_bytes == (
        range_bytes(bits) * math.ceil(k / group) + (k * bits + 7) // 8 + (numel + 7) // 8)
    assert wire.payload_bytes < wire.codec.nbytes + (k * wire.index_bits + 7) // 8
    indices, values = wire.unpack(torch.stack([payload, payload]))
    assert torch.equal(indices[0], indices[1]) and torch.equal(values[0], values[1])
    assert torch.equal(indices[0].sort().values, positions.sort().values)
    sent, received = torch.zeros(numel), torch.zeros(numel)
    sent[positions] = wire.decoded(x[positions])
    received[indices[0]] = values[0]
    assert torch.equal(received, sent)
    # One set bit too many is a corrupt payload, refused on the CPU.
    corrupt = payload.clone()
    bitmap = corrupt[wire.codec.nbytes:]
    free = int((unpack_bits(bitmap, numel, 1) == 0).nonzero()[0])
    bitmap[free // 8] |= 1 << (free % 8)
    with pytest.raises(ValueError, match=f"exactly k={k} set bits"):
        wire.unpack(corrupt)
    # Below 1/12 of each tile the 12-bit offsets stay.
    sparse = WireFormat(numel, buckets * 64, torch.float32, buckets, 64, False, bits,
                        tiles=shape if tiled else None)
    assert not sparse.bitmap and not sparse.index_code & (1 << 27)


@pytest.mark.parametrize("numel,k", [(2, 1), (1000, 3), (65537, 100), (4096, 4095)])
def test_wire_round_trip_absolute(numel, k):
    gen = torch.Generator().manual_seed(numel)
    positions = torch.randperm(numel, generator=gen)[:k]
    values = torch.randn(k, generator=gen)
    wire = WireFormat(numel, k, torch.float32, value_bits=4)
    assert wire.index_bits == bits_for(numel) and not wire.implicit
    indices, decoded = wire.unpack(wire.pack(positions, values))
    assert torch.equal(indices, positions)
    assert torch.equal(decoded, ValueCodec(4, k, 64).roundtrip(values))


@pytest.mark.parametrize("bits", VALUE_BITS)
@pytest.mark.parametrize("numel", [1, 7, 512, 1000])
def test_wire_every_entry_leaves_positions_off(bits, numel):
    # k == numel with the codec: values in position order, no index section.
    values = torch.randn(numel, generator=torch.Generator().manual_seed(numel + bits))
    wire = WireFormat(numel, numel, torch.float32, value_bits=bits)
    assert wire.implicit and wire.index_bits == 0
    payload = wire.pack(torch.arange(numel), values)
    assert payload.numel() == wire.payload_bytes == (
        range_bytes(bits) * math.ceil(numel / 64) + (numel * bits + 7) // 8)
    indices, decoded = wire.unpack(torch.stack([payload, payload]))
    assert torch.equal(indices, torch.arange(numel).expand(2, numel))
    assert torch.equal(decoded[0], wire.decoded(values))


def test_sparseloco_setting_bits():
    # 64 of every 4096 entries, 2-bit values, 12-bit offsets, a 32-bit (two bfloat16)
    # range per bucket.
    wire = WireFormat(4096 * 256, 64 * 256, torch.float32, 256, 64, True, 2)
    assert wire.bits_per_entry == 2 + 12 + 32 / 64
    assert wire.bits_per_entry * 64 / 4096 == pytest.approx(0.2266, abs=1e-4)
    cost = scheme_bytes(wire.numel, wire.k, 4, wire.index_bytes, wire.value_bytes,
                        payload_bytes=wire.payload_bytes)
    plain = scheme_bytes(wire.numel, wire.k, 4, 2, 4)
    assert cost["allgather"] - plain["allgather"] == 3 * (wire.payload_bytes - wire.k * 6)


def test_wire_and_config_validation():
    with pytest.raises(ValueError, match="decodes to float32"):
        WireFormat(100, 10, torch.bfloat16, value_bits=2)
    with pytest.raises(ValueError, match="value_bits must be None or one of"):
        WireFormat(100, 10, torch.float32, value_bits=3)
    assert CONFIG_VALUE_BITS == VALUE_BITS
    with pytest.raises(ValueError, match=r"SparsityConfig.value_bits must be None or one of"
                                         r" \(1, 2, 4, 8\), got 16"):
        SparsityConfig(value_bits=16)
    with pytest.raises(ValueError, match="SparsityConfig.exchange must be 'auto' or"):
        SparsityConfig(value_bits=2, exchange="reduce_scatter")
    assert SparsityConfig.from_dict({"value_bits": 4}).value_bits == 4
    with pytest.raises(ValueError, match=r"SparsityConfig.small_tensors must be 'dense' when "
                                         r"value_bits is None .*got 'codec'"):
        SparsityConfig(small_tensors="codec")
    with pytest.raises(ValueError, match=r"SparsityConfig.value_levels must be 'centres' when "
                                         r"value_bits=8"):
        SparsityConfig(value_bits=8, value_levels="means")
    with pytest.raises(ValueError, match=r"SparsityConfig.value_levels must be one of"):
        SparsityConfig(value_bits=2, value_levels="median")
    with pytest.raises(ValueError, match=r"SparsityConfig.small_tensors must be one of "
                                         r"\('dense', 'codec'\), got 'fp16'"):
        SparsityConfig(small_tensors="fp16", value_bits=2)


def test_compressor_single_process_keeps_quantization_error():
    # An explicit plan (8 buckets of 4096): 2-bit values + 12-bit offsets + the per-bucket
    # range (two bfloat16) amortised to half a bit per entry.
    cfg = SparsityConfig(density=1 / 64, value_bits=2, min_numel=0, recall_interval=0,
                         buckets=8, k_per_bucket=64)
    compressor = GradientCompressor(cfg)
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(4096 * 8, generator=gen) for _ in range(4)]
    total = torch.zeros(4096 * 8, dtype=torch.float64)
    for step, grad in enumerate(grads):
        update = compressor.step(grad, "w", step=step)
        total += update.double()
        stats = compressor.last
        # Every step sends the plan's 512 entries at the layout's 14.5 bits each, i.e.
        # 14.5 bits per 64 parameters (all counts are powers of two: exact).
        assert (stats.sent, stats.bits_per_entry, stats.bits_per_param) == (512, 14.5, 14.5 / 64)
        # Every sent entry arrives non-zero (sign-magnitude codes have no zero level).
        assert update.count_nonzero() == stats.sent, step
    residual = compressor.residual("w").double()
    torch.testing.assert_close(total + residual, sum(g.double() for g in grads),
                               rtol=0, atol=1e-5)


def test_value_dtype_with_the_codec_sets_the_dense_steps_dtype_only():
    # value_bits encodes the sparse steps; a named value_dtype is the dense steps' dtype
    # (bf16: half the bytes), the rounding kept in the residual; the codec is untouched.
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(4096 * 8, generator=gen) for _ in range(3)]
    runs = {}
    for value_dtype in (None, "bfloat16"):
        cfg = SparsityConfig(density=1 / 64, value_bits=2, min_numel=0, recall_interval=0,
                             buckets=8, k_per_bucket=64, dense_steps=1,
                             value_dtype=value_dtype)
        assert cfg.wire_dtype_for(torch.float32, whole=True, dense=True) == (
            torch.float32 if value_dtype is None else torch.bfloat16)
        assert cfg.wire_dtype_for(torch.float32, whole=True) == torch.float32  # codec
        compressor = GradientCompressor(cfg)
        updates, stats = [], []
        for step, grad in enumerate(grads):
            updates.append(compressor.step(grad, "w", step=step))
            stats.append(compressor.last)
        runs[value_dtype] = (updates, stats, compressor.residual("w"))
    (fp32_updates, fp32_stats, _), (bf16_updates, bf16_stats, residual) = runs.values()
    # The dense step: every entry, at 4 and at 2 bytes.
    assert fp32_stats[0].payload_bytes == 4 * grads[0].numel()
    assert bf16_stats[0].payload_bytes == 2 * grads[0].numel()
    torch.testing.assert_close(fp32_updates[0], grads[0], rtol=0, atol=0)
    torch.testing.assert_close(bf16_updates[0], grads[0].bfloat16().float(), rtol=0, atol=0)
    # The sparse steps: the same codec, the same bytes, and mass is conserved.
    for fp32, bf16 in zip(fp32_stats[1:], bf16_stats[1:], strict=True):
        assert (bf16.sent, bf16.bits_per_entry) == (fp32.sent, fp32.bits_per_entry) == (
            512, 14.5)
    total = sum(u.double() for u in bf16_updates) + residual.double()
    torch.testing.assert_close(total, sum(g.double() for g in grads), rtol=0, atol=1e-5)


def _conservation(rank, world, bits, exchange, small, levels):
    cfg = SparsityConfig(density=0.02, value_bits=bits, exchange=exchange, min_numel=1024,
                         dense_steps=1, recall_interval=0, small_tensors=small,
                         value_levels=levels)
    compressor = GradientCompressor(cfg)
    sizes = {"big": 4096 * 6 + 17, "small": 300, "mid": 5000}
    updates = {key: torch.zeros(n, dtype=torch.float64) for key, n in sizes.items()}
    grads = {key: torch.zeros(n, dtype=torch.float64) for key, n in sizes.items()}
    sent, stats = [], {}
    for step in range(5):
        for key, n in sizes.items():
            gen = torch.Generator().manual_seed(1000 * step + 10 * rank + n)
            grad = torch.randn(n, generator=gen) * (1 + rank)
            update = compressor.step(grad, key, step=step)
            updates[key] += update.double()
            grads[key] += grad.double()
            sent.append(update)
            stats[key] = compressor.last
    residuals = {key: compressor.residual(key).double() for key in sizes}
    return updates, grads, residuals, sent, stats


CONSERVATION_CASES = [(2, "auto", "dense", "centres"), (1, "allgather", "dense", "centres"),
                      (8, "auto", "dense", "centres"), (2, "auto", "codec", "means"),
                      (2, "auto", "codec", "sigma")]


def _conservation_cases(rank, world):
    return {case: _conservation(rank, world, *case) for case in CONSERVATION_CASES}


@pytest.fixture(scope="module")
def conservation_runs() -> list[dict]:
    """Every case on one 2-rank run (starting the processes costs more than a case)."""
    return run_distributed(_conservation_cases, 2, timeout=180)


@pytest.mark.parametrize("bits,exchange,small,levels", CONSERVATION_CASES)
def test_conservation_and_identical_bits_on_two_ranks(bits, exchange, small, levels,
                                                       conservation_runs):
    world = 2
    results = [run[bits, exchange, small, levels] for run in conservation_runs]
    for key in results[0][0]:
        updates = results[0][0][key]
        residuals = sum(r[2][key] for r in results)
        grads = sum(r[1][key] for r in results)
        # Sums of a few float32 updates/residuals in float64: fp32 rounding of each term.
        torch.testing.assert_close(world * updates + residuals, grads, rtol=0, atol=1e-4)
    for a, b in zip(results[0][3], results[1][3], strict=True):
        assert torch.equal(a, b)  # every rank applies bitwise the same update
    stats = results[0][4]
    assert stats["mid"].schemes == {"allgather": 1}
    assert stats["mid"].bits_per_entry <= bits + 13 + 1
    # The 300-entry tensor: dense in float32 (nothing left behind), or every entry at
    # `bits` bits with no index and a bfloat16 range per 64 entries (one table of 2**bits
    # bfloat16 cell means for the tensor with "sigma"), its rounding kept.
    residual = results[0][2]["small"]
    if small == "dense":
        assert (stats["small"].bits_per_entry, residual.abs().max()) == (32.0, 0.0)
    else:
        assert stats["small"].sent == 300 and stats["small"].schemes == {"allgather": 1}
        scale_bits = 16 * (1 << bits) if levels == "sigma" else 32 * 5
        assert stats["small"].bits_per_entry == ((300 * bits + 7) // 8 * 8 + scale_bits) / 300
        assert residual.abs().max() > 0


def test_step_stats_carry_bits_per_entry_and_per_param():
    # An explicit plan (8 buckets of 4096): 2-bit values + 12-bit offsets + the per-bucket
    # range (two bfloat16) amortised to half a bit per entry.
    cfg = SparsityConfig(density=1 / 64, value_bits=2, min_numel=0, recall_interval=0,
                         buckets=8, k_per_bucket=64)
    compressor = GradientCompressor(cfg)
    work = compressor.launch(torch.randn(4096 * 8, generator=torch.Generator().manual_seed(0)),
                             "w", step=0)
    work.wait()
    stats = work.stats
    assert stats == compressor.last
    assert stats.bits_per_entry == 2 + 12 + 0.5
    assert stats.bits_per_param == stats.bits_per_entry / 64
    merged = stats.merge(stats)
    assert merged.bits_per_entry == stats.bits_per_entry
    metrics = compressor.totals.to_metrics()
    assert metrics["distk/bits_per_entry"] == 14.5
    assert metrics["distk/bits_per_param"] == 14.5 / 64


def reference_sigma(values: list[float], bits: int, group: int) -> list[float]:
    """``levels="sigma"`` in plain Python: per group, ``2**bits`` cells of width 6 s /
    2**bits about the mean (s unbiased), code round((v - mean) / width) + 2**(bits-1)
    clamped, each entry decoded to its cell's mean, rounded as it travels."""
    cells = 1 << bits
    out = []
    for start in range(0, len(values), group):
        chunk = values[start:start + group]
        mean = sum(chunk) / len(chunk)
        std = math.sqrt(sum((v - mean) ** 2 for v in chunk) / max(len(chunk) - 1, 1))
        width = 6 * std / cells or 1.0
        code = [min(cells - 1, max(0, round((v - mean) / width) + cells // 2)) for v in chunk]
        means = {j: sum(v for v, c in zip(chunk, code, strict=True) if c == j)
                 / code.count(j) for j in set(code)}
        out += [on_wire(means[c], bits) for c in code]
    return out


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("k,group", [(1, 1), (5, 2), (64, 64), (130, 13), (4096, 4096)])
def test_value_codec_sigma_cells(bits, k, group):
    """``levels="sigma"`` decodes to :func:`reference_sigma`, sends ``2**bits`` means per
    group, and its pack decodes to the round trip."""
    values = torch.randn(k, generator=torch.Generator().manual_seed(k * bits)) * 3 + 0.5
    codec = ValueCodec(bits, k, group, "sigma")
    decoded = codec.roundtrip(values)
    expected = torch.tensor(reference_sigma(values.double().tolist(), bits, group),
                            dtype=torch.float64)
    torch.testing.assert_close(decoded.double(), expected, rtol=1e-6, atol=1e-7)
    groups = math.ceil(k / group)
    payload = codec.pack(values)
    assert payload.numel() == codec.nbytes == (range_bytes(bits) // 2 * (1 << bits) * groups
                                               + (k * bits + 7) // 8)
    assert torch.equal(codec.unpack(torch.stack([payload, payload])), torch.stack([decoded] * 2))
    # A constant group decodes exactly; values far outside 3 s land in the end cells.
    assert torch.equal(ValueCodec(bits, 4, 4, "sigma").roundtrip(torch.full((4,), 2.5)),
                       torch.full((4,), 2.5))
    spiky = torch.tensor([0.0] * 63 + [100.0])
    assert ValueCodec(bits, 64, 64, "sigma").encode(spiky)[0][-1] == (1 << bits) - 1
    with pytest.raises(ValueError, match="'sigma' at 2, 4 or 8"):
        ValueCodec(1, k, group, "sigma")


def test_sigma_levels_config_and_wire():
    """The config accepts ``"sigma"`` at 2, 4 and 8 bits only; the wire format gives it one
    group for the tensor and a distinct index code."""
    SparsityConfig(value_bits=2, value_levels="sigma")
    with pytest.raises(ValueError, match=r"SparsityConfig.value_levels must be 'centres' or "
                                          r"'means' when value_bits=1"):
        SparsityConfig(value_bits=1, value_levels="sigma")
    with pytest.raises(ValueError, match=r"SparsityConfig.value_levels must be 'centres' or "
                                          r"'means' when value_bits=None"):
        SparsityConfig(value_levels="sigma")
    args = dict(numel=4096 * 4, k=256, value_dtype=torch.float32, buckets=4, k_per_bucket=64,
                interleaved=False, value_bits=2)
    sigma = WireFormat(**args, value_levels="sigma")
    assert sigma.codec.group_size == 256 and sigma.codec.scale_bytes == 4 * 2
    centres = WireFormat(**args)
    assert centres.codec.group_size == 64 and centres.codec.scale_bytes == 4 * 2 * 2
    assert sigma.index_code != centres.index_code
    assert len({WireFormat(**args, value_levels=lv).index_code
                for lv in ("centres", "means", "sigma")}) == 3
