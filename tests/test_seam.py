"""The one integration seam: asynchronous exchange, CompressionState, StepStats.

Distributed checks run 2 real gloo ranks under a timeout. Exactness: the asynchronous and
the verified synchronous exchange run the same arithmetic on the same bytes, so their
results are compared bitwise.
"""

from __future__ import annotations

import time

import pytest
import torch
from distributed import run_distributed
from torch import nn

import distk
from distk.comm import RankMismatchError, exchange, launch_exchange
from distk.compressor import NonFiniteGradientError
from distk.integrations import CompressionState
from distk.stats import StepStats

# How long rank 1 waits before joining a collective, so that rank 0's collective cannot
# have completed when launch returns (a synchronous launch would block for this long).
PEER_DELAY = 1.5


def _selection(rank: int, numel: int = 1000, k: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(rank)
    return torch.randperm(numel, generator=gen)[:k], torch.randn(k, generator=gen)


def _exchange_worker(rank: int, world: int) -> dict:
    out: dict = {}
    indices, values = _selection(rank)
    for scheme in ("allgather", "dense"):
        dense_values = torch.zeros(1000).index_put_((indices,), values)
        args = (None, dense_values) if scheme == "dense" else (indices, values)
        verified = exchange(*args, 1000, scheme=scheme).output
        if rank == 1:
            time.sleep(PEER_DELAY)
        started = time.perf_counter()
        pending = launch_exchange(*args, 1000, scheme=scheme, verify=False)
        out[f"{scheme}/launch_seconds"] = time.perf_counter() - started
        out[f"{scheme}/done_at_launch"] = pending.future.done()
        result = pending.wait()
        out[f"{scheme}/same"] = torch.equal(result.output, verified)
        out[f"{scheme}/bytes"] = (result.bytes_sent, exchange(*args, 1000,
                                                              scheme=scheme).bytes_sent)
        # A non-finite flag travels inside the payload: every rank learns who set it.
        flagged = launch_exchange(*args, 1000, scheme=scheme, verify=False,
                                  nonfinite=rank == 1).wait()
        out[f"{scheme}/flagged"] = (flagged.output, flagged.nonfinite_ranks)
    # Unverified steps still catch ranks that disagree (here: the key tag) on every rank.
    try:
        launch_exchange(indices, values, 1000, tag=rank, verify=False).wait()
        out["tag"] = None
    except RankMismatchError as err:
        out["tag"] = str(err)
    out["alive"] = exchange(torch.arange(2), torch.ones(2), 4).output.tolist()
    return out


@pytest.mark.distributed
def test_unverified_async_exchange_matches_the_verified_one_and_still_checks():
    for rank, out in enumerate(run_distributed(_exchange_worker, 2, timeout=120,
                                               pg_timeout=30)):
        for scheme in ("allgather", "dense"):
            assert out[f"{scheme}/same"], scheme
            if rank == 0:
                # Returned while the peer was still away: the collective was only enqueued.
                assert not out[f"{scheme}/done_at_launch"], scheme
                assert out[f"{scheme}/launch_seconds"] < PEER_DELAY / 3, out
            unverified, verified = out[f"{scheme}/bytes"]
            assert unverified < verified  # no metadata row
            assert out[f"{scheme}/flagged"] == (None, [1]), scheme
        assert out["tag"] is not None and "ranks disagree" in out["tag"], out["tag"]
        assert out["alive"] == [1.0, 1.0, 0.0, 0.0]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 512), nn.Tanh(), nn.Linear(512, 256), nn.Tanh(),
                         nn.Linear(256, 1))


def _ddp_future_worker(rank: int, world: int, marker_dir: str) -> dict:
    import importlib
    from pathlib import Path

    from torch.nn.parallel import DistributedDataParallel as DDP

    from distk.integrations.ddp import DDPCompressionState, sparse_allreduce_hook

    if rank == 1:
        exchange_module = importlib.import_module("distk.comm.exchange")
        # On steps whose layout is verified, rank 0's hook waits for rank 1's metadata
        # before it launches the values, so rank 1 may meet it there and both values
        # launches race. Rank 1 lingers after the metadata round (a delay of distk's own
        # step, nothing replaced), so rank 0's values collective is pending when its hook
        # returns on these steps too.
        verify = exchange_module._verify_metadata

        def late_verify(*args, **kwargs):
            rows = verify(*args, **kwargs)
            time.sleep(PEER_DELAY / 3)
            return rows

        exchange_module._verify_metadata = late_verify

    # bucket_cap_mb small: several buckets (one per large weight), so backward has work
    # left to overlap.
    ddp = DDP(_net(), bucket_cap_mb=0.1)
    # Local masks: the exchange is one asynchronous collective. (A shared mask's first
    # step agrees on its positions synchronously, before the values travel.)
    state = DDPCompressionState(distk.SparsityConfig(density=0.05, min_numel=64,
                                                     mask="local"),
                                ddp.process_group, model=ddp.module)
    done_at_return: list[bool] = []
    steps = []

    def recording(hook_state, bucket):  # distk's hook, noting whether it came back done
        # Rank 1 launches a step's first bucket only after rank 0's hook has returned its
        # future (a marker file: no collective), so that future cannot be complete then,
        # however the scheduler runs the two processes. On verified steps rank 0's hook
        # waits for rank 1's metadata instead: rank 1 then goes on after PEER_DELAY and
        # lingers after the metadata round (above).
        marker = Path(marker_dir) / f"step{len(steps)}"
        if rank == 1 and not done_at_return:
            deadline = time.monotonic() + PEER_DELAY
            while not marker.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        future = sparse_allreduce_hook(hook_state, bucket)
        done_at_return.append(future.done())
        if rank == 0 and len(done_at_return) == 1:
            marker.touch()
        return future

    ddp.register_comm_hook(state, recording)
    for step in range(4):
        gen = torch.Generator().manual_seed(10 * step + rank)
        x, y = torch.randn(32, 16, generator=gen), torch.randn(32, 1, generator=gen)
        loss = nn.functional.mse_loss(ddp(x), y)
        done_at_return.clear()
        loss.backward()
        steps.append({"iteration": state.iteration, "buffers": state.stats.buffers,
                      "done_at_return": list(done_at_return)})
        for param in ddp.parameters():
            param.grad = None
    return {"steps": steps, "params": torch.cat([p.detach().reshape(-1)
                                                 for p in ddp.parameters()])}


@pytest.mark.distributed
def test_ddp_hook_returns_futures_that_complete_after_the_hook_returns(tmp_path):
    results = run_distributed(_ddp_future_worker, 2, str(tmp_path), timeout=120,
                              pg_timeout=30)
    rank0 = results[0]["steps"]
    # One step per backward (the step boundary ends with the backward pass).
    assert [s["iteration"] for s in rank0] == [1, 2, 3, 4]
    assert all(s["buffers"] >= 2 for s in rank0[1:]), rank0  # rebuilt into 2+ buckets
    # Rank 1 launched late: rank 0's first bucket future was pending when the hook returned.
    for step in rank0:
        assert step["done_at_return"] and not step["done_at_return"][0], step
    assert torch.equal(results[0]["params"], results[1]["params"])


def _async_raise_worker(rank: int, world: int, defer: bool) -> str | None:
    import math

    from torch.nn.parallel import DistributedDataParallel as DDP

    if defer:  # the CUDA path's deferred check, on these CPU tensors (this process only)
        distk.GradientCompressor.DEFER_DEVICE_TYPES = ("cuda", "cpu")

    ddp = DDP(_net(), bucket_cap_mb=0.1)
    distk.ddp.enable(ddp, distk.SparsityConfig(density=0.05, min_numel=64, stats_interval=100))
    for step in range(3):
        gen = torch.Generator().manual_seed(step + rank)
        x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 1, generator=gen)
        if step == 2 and rank == 1:
            x[0, 0] = math.nan
        try:
            nn.functional.mse_loss(ddp(x), y).backward()
        except NonFiniteGradientError as err:  # the type survives the future chain
            return str(err)
    return None


@pytest.mark.distributed
@pytest.mark.parametrize("defer", [False, True], ids=["host_check", "device_flag"])
def test_nonfinite_in_an_unverified_async_step_raises_its_type_on_every_rank(defer):
    # stats_interval=100: step 2 of each bucket is neither its first exchange nor a stats
    # step, so the flag travels inside the payload, and end_step raises it. With the
    # deferred check (CUDA gradients) the sender never reads its flag on the host.
    for message in run_distributed(_async_raise_worker, 2, defer, timeout=120,
                                   pg_timeout=30):
        assert message is not None and "at step 2 for key" in message, message
        assert "on rank(s) [1]" in message


def test_state_dict_carries_rank_and_world_size_and_refuses_another():
    cfg = distk.SparsityConfig(density=0.05)
    saved = CompressionState(cfg).state_dict()
    assert (saved["rank"], saved["world_size"]) == (0, 1)
    for key, value in (("rank", 1), ("world_size", 4)):
        state = CompressionState(cfg)
        other = {**saved, key: value}
        with pytest.raises(ValueError, match=rf"written by rank {other['rank']} of world "
                                             rf"size {other['world_size']}; this is rank 0 "
                                             r"of world size 1"):
            state.load_state_dict(other)


@pytest.mark.parametrize("cfg,error,match", [
    ("dense", TypeError, r"cfg must be a distk.SparsityConfig or a dict of its keys, got str"),
    ({"densty": 0.1}, ValueError, "did you mean 'density'"),
])
def test_one_coercion_names_the_bad_config(cfg, error, match):
    with pytest.raises(error, match=match):
        CompressionState(cfg)


def test_the_step_ends_with_the_backward_pass_and_drives_the_schedule():
    # One process: the exchange is the identity, so the update equals what was sent.
    state = CompressionState(distk.SparsityConfig(density=0.1, min_numel=1, dense_steps=1,
                                                  method="exact"))
    weight = torch.zeros(100, requires_grad=True)
    weight.register_hook(lambda grad: state.reduce(grad.clone(), "w"))
    schemes = []
    for _ in range(3):
        (weight * torch.arange(100.0)).sum().backward()
        schemes.append(dict(state.stats.schemes))
        weight.grad = None
    assert state.iteration == 3
    assert schemes[0] == {"dense": 1} and "dense" not in schemes[1] | schemes[2]
    assert state.totals.buffers == 3 and state.totals.sent == 100 + 10 + 10
    with pytest.raises(RuntimeError, match="inside a backward pass"):
        state.reduce(torch.ones(100), "w")


@pytest.mark.parametrize("call", ["reduce_async", "reduce"])
def test_deferred_check_of_one_process_raises_when_the_step_ends(monkeypatch, call):
    # The CUDA path's deferred non-finite check, on CPU tensors: nothing is read during
    # the backward's exchanges; the step's end (or the synchronous reduce) raises.
    monkeypatch.setattr(distk.GradientCompressor, "DEFER_DEVICE_TYPES", ("cuda", "cpu"))
    state = CompressionState(distk.SparsityConfig(density=0.1, min_numel=1))
    weight = torch.zeros(100, requires_grad=True)
    def hook(grad: torch.Tensor) -> None:
        getattr(state, call)(grad.clone(), "w")

    weight.register_hook(hook)
    (weight * torch.arange(100.0)).sum().backward()  # a finite step goes through
    assert state.iteration == 1 and state.stats.sent == 10
    with pytest.raises(NonFiniteGradientError,
                       match=r"at step 1 for key 'w' on rank\(s\) \[0\]"):
        (weight * torch.full((100,), float("nan"))).sum().backward()
    assert state.iteration == 1  # the flagged step is dropped, not counted
    (weight * torch.arange(100.0)).sum().backward()  # and the next one runs
    assert state.iteration == 2


def test_step_stats_merge_and_metrics():
    a = StepStats(buffers=1, numel=1000, sent=10, bytes_sent=80, dense_bytes=4000,
                  schemes={"allgather": 1}, residual_sq=9.0, recall_sum=9.0,
                  recall_weight=10, step=3)
    b = StepStats(buffers=1, numel=100, sent=100, bytes_sent=400, dense_bytes=400,
                  schemes={"dense": 1}, residual_sq=16.0, step=3)
    merged = a.merge(b)
    assert merged.schemes == {"allgather": 1, "dense": 1}
    assert merged.density == 110 / 1100  # effective: dense small tensors count in full
    assert merged.residual_norm == 5.0 and merged.recall == 0.9
    assert StepStats().merge(a) == a and a.merge(StepStats()) == a
    assert a.merge(StepStats(buffers=1, numel=1)).residual_sq is None  # not measured there
    metrics = merged.to_metrics("distk/")
    assert metrics["distk/k"] == 110.0 and metrics["distk/compression"] == 4400 / 480
    assert StepStats.from_dict(merged.to_dict()) == merged
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\]"):
        StepStats.from_dict({"bogus": 1})
