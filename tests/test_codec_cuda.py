"""The compact codec and outer synchronisation on CUDA tensors (skipped without a GPU).

What matters across devices: receivers decode the same bits whatever device decodes
(one fp32 multiply per entry), and the CUDA path keeps the conservation law.
"""

from __future__ import annotations

import pytest
import torch

import distk
from distk.comm.codec import VALUE_BITS, ValueCodec
from distk.comm.wire import WireFormat
from distk.compressor import GradientCompressor
from distk.config import SparsityConfig

pytestmark = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)


@pytest.mark.parametrize("bits,levels", [(b, "centres") for b in VALUE_BITS]
                         + [(2, "means"), (2, "sigma"), (4, "sigma")])
def test_cuda_decode_equals_cpu_decode(bits, levels):
    values = torch.randn(1000, device="cuda")
    codec = ValueCodec(bits, 1000, 1000 if levels == "sigma" else 64, levels)
    payload = codec.pack(values)
    assert payload.is_cuda
    on_cuda = codec.unpack(payload)
    assert torch.equal(on_cuda, codec.roundtrip(values))
    assert torch.equal(codec.unpack(payload.cpu()), on_cuda.cpu())


def test_cuda_bucketed_wire_round_trip():
    numel, buckets, k_per_bucket = 4096 * 16, 16, 64
    x = torch.randn(numel, device="cuda")
    positions = (x.view(-1, buckets).abs().topk(k_per_bucket, dim=0).indices * buckets
                 + torch.arange(buckets, device="cuda")).T.reshape(-1)  # bucket order
    wire = WireFormat(numel, buckets * k_per_bucket, torch.float32, buckets, k_per_bucket,
                      True, 2)
    indices, decoded = wire.unpack(wire.pack(positions, x[positions]))
    assert torch.equal(indices, positions)
    assert torch.equal(decoded, wire.decoded(x[positions]))


def test_cuda_compressor_keeps_quantization_error_in_residual():
    compressor = GradientCompressor(SparsityConfig(density=1 / 64, value_bits=2, min_numel=0,
                                                   recall_interval=0))
    total = torch.zeros(1 << 20, dtype=torch.float64, device="cuda")
    grads = torch.zeros_like(total)
    for step in range(3):
        grad = torch.randn(1 << 20, device="cuda")
        total += compressor.step(grad, "w", step=step).double()
        grads += grad.double()
    assert compressor.last.bits_per_entry < 15
    torch.testing.assert_close(total + compressor.residual("w").double(), grads,
                               rtol=0, atol=1e-5)


def test_cuda_outer_sync_single_process():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(),
                                torch.nn.Linear(256, 1)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sync = distk.outer.enable(model, optimizer, {"sync_every": 2, "value_bits": 2,
                                                 "min_numel": 0, "outer_momentum": 0.9})
    for _ in range(4):
        loss = model(torch.randn(32, 64, device="cuda")).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert sync.syncs == 2 and sync.stats.bits_per_param > 0
