"""distk.fsdp: sparse gradient reduction for FSDP2 (fully_shard) and FSDP1, on 2 gloo ranks.

Parity at density 1.0 against plain FSDP2 / FSDP1 (with and without gradient
accumulation), training at a few percent density, checkpoint round trips, the FSDP1
per-unit hook-state seam, the configurations that are refused, and the FSDP2 seam that
keeps the exchange synchronous.
"""

from __future__ import annotations

import functools
import io
import pickle

import pytest
import torch
from distributed import run_distributed, teacher_batch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, ShardingStrategy, fully_shard
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

import distk

pytestmark = pytest.mark.distributed

WORLD = 2
TIMEOUT = 120

# Parity tolerance at density 1.0: with 2 ranks each averaged entry is one fp32 addition
# of two values and an exact halving (FSDP2's SUM contract adds an exact doubling by 2
# before FSDP's own division by 2), so distk and plain FSDP agree to the bit in
# practice. A few ulps are allowed in case the exchange accumulates in another order;
# real errors (wrong shard, wrong scale, stale residual) are orders of magnitude larger.
PARITY_RTOL = 1e-6
PARITY_ATOL = 1e-7


def _run(fn, *args):
    """run_distributed on WORLD ranks (results, tensors included, come back pickled)."""
    return run_distributed(fn, WORLD, *args, timeout=TIMEOUT)


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 96), nn.Tanh(), nn.Linear(96, 17), nn.Tanh(),
                         nn.Linear(17, 1))


def _fsdp2(seed: int = 0, mesh_shape: tuple[int, ...] = (WORLD,)) -> nn.Module:
    model = _model(seed)
    names = ("replicate", "shard")[-len(mesh_shape):]
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    for layer in model:
        if isinstance(layer, nn.Linear) and layer.in_features == 96:
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root owns the first and last Linear
    return model


def _fsdp1(strategy: ShardingStrategy, seed: int = 0) -> FSDP1:
    model = _model(seed)
    cpu = torch.device("cpu")
    model[2] = FSDP1(model[2], device_id=cpu, sharding_strategy=strategy)
    return FSDP1(model, device_id=cpu, sharding_strategy=strategy)


def _train(model: nn.Module, rank: int, steps: int, accumulate: int = 1, lr: float = 0.1,
           start: int = 0) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for step in range(start, start + steps):
        opt.zero_grad()
        for micro in range(accumulate):
            last = micro == accumulate - 1
            x, y = teacher_batch(rank, step, micro)
            if isinstance(model, FSDPModule):
                model.set_requires_gradient_sync(last)
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
            elif isinstance(model, FSDP1) and not last:
                with model.no_sync():
                    loss = nn.functional.mse_loss(model(x), y)
                    loss.backward()
            else:
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
        losses.append(loss.item())
        opt.step()
    return losses


def _full_params(model: nn.Module) -> torch.Tensor:
    if isinstance(model, FSDP1):
        with FSDP1.summon_full_params(model):
            return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    return torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()])


FLAVOURS = ("fsdp2", "FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")


def _parity_worker(rank: int, world: int) -> list[dict]:
    results = []
    for flavour, accumulate in [(f, a) for f in FLAVOURS for a in (1, 2)]:
        if flavour == "fsdp2":
            plain, sparse = _fsdp2(), _fsdp2()
        else:
            strategy = ShardingStrategy[flavour]
            plain, sparse = _fsdp1(strategy), _fsdp1(strategy)
        cfg = distk.SparsityConfig(density=1.0, method="exact", exchange="allgather",
                                   min_numel=1)
        state = distk.fsdp.enable(sparse, cfg)
        _train(plain, rank, steps=4, accumulate=accumulate)
        _train(sparse, rank, steps=4, accumulate=accumulate)
        results.append({
            "case": (flavour, accumulate), "plain": _full_params(plain),
            "sparse": _full_params(sparse), "iteration": state.iteration,
            "stats": state.stats, "units": state.unit_names,
        })
    return results


def test_density_one_matches_plain_fsdp() -> None:
    """FSDP2 and the three FSDP1 strategies, with and without gradient accumulation."""
    results = _run(_parity_worker)
    for rank_results in results:
        for res in rank_results:
            torch.testing.assert_close(res["sparse"], res["plain"], rtol=PARITY_RTOL,
                                       atol=PARITY_ATOL, msg=lambda m, r=res: f"{r['case']}: {m}")
            assert res["iteration"] == 4  # accumulation micro-steps are not counted
            assert res["stats"].buffers == len(res["units"]) == 2
            assert res["stats"].density == 1.0


def _sparse_training_worker(rank: int, world: int) -> dict:
    out = {}
    for flavour in ("fsdp2", "FULL_SHARD"):
        model = _fsdp2() if flavour == "fsdp2" else _fsdp1(ShardingStrategy[flavour])
        # Local masks: recall is measured against this rank's own exact top-k, every step
        # (under a shared mask each measurement is a sampled all-reduce, whose bytes on
        # this 3.4k-entry model outweigh the 4 % payload).
        cfg = distk.SparsityConfig(density=0.04, method="bucketed", min_numel=64,
                                   recall_interval=1, mask="local")
        state = distk.fsdp.enable(model, cfg)
        losses = _train(model, rank, steps=60, lr=0.1)
        residual_numels = {key: state.compressor.residual(key).numel()
                           for key in state.unit_names}
        out[flavour] = {"losses": losses, "stats": state.stats, "units": state.unit_names,
                        "residual_numels": residual_numels, "params": _full_params(model)}
    return out


@pytest.mark.parametrize("flavour", ["fsdp2", "FULL_SHARD"])
def test_sparse_training_loss_falls(flavour: str) -> None:
    results = [by_flavour[flavour] for by_flavour in _training_results()]
    # Unit names (compressor keys): the root owns the first and last Linear, the nested
    # unit the middle one; residuals are unsharded (padded to a multiple of 2 ranks).
    expected_units = ("<root>", "2")
    padded_root = (96 * 16 + 96 + 17 + 1) if flavour == "FULL_SHARD" else None
    for res in results:
        assert res["units"] == expected_units
        if padded_root is not None:
            # FSDP1 pads the flat parameter to a multiple of the world size.
            assert res["residual_numels"]["<root>"] == padded_root + padded_root % 2
        early = sum(res["losses"][:5]) / 5
        late = sum(res["losses"][-10:]) / 10
        # 4% density with error feedback must make clear progress on this learnable task.
        assert late < 0.6 * early, (early, late)
        assert res["stats"].bytes_sent < res["stats"].dense_bytes
        # Measured every step against exact top-k; the plan targets recall 0.95, a broken
        # selection (random or contiguous picks) falls far below 0.8.
        assert res["stats"].recall is not None and res["stats"].recall >= 0.8
    # Both ranks apply the same averaged update to their shards: gathered parameters agree.
    assert torch.equal(results[0]["params"], results[1]["params"])


@functools.cache
def _training_results() -> list[dict]:
    """One 2-rank run trains both flavours (process start-up dominates the test time)."""
    return _run(_sparse_training_worker)


def _checkpoint_worker(rank: int, world: int) -> dict:
    cfg = distk.SparsityConfig(density=0.05, method="exact", min_numel=64)
    model = _fsdp2()
    state = distk.fsdp.enable(model, cfg)
    _train(model, rank, steps=3)

    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    pickled = pickle.loads(pickle.dumps(state))

    resumed = _fsdp2(seed=1)
    resumed.load_state_dict(model.state_dict())
    resumed_state = distk.fsdp.enable(resumed, cfg)
    resumed_state.load_state_dict(saved)
    restored = {k: resumed_state.compressor.residual(k).clone() for k in state.unit_names}
    original = {k: state.compressor.residual(k).clone() for k in state.unit_names}
    pickled_residuals = {k: pickled.compressor.residual(k).clone() for k in state.unit_names}
    # FSDP has no bucket rebuild: the resumed run continues exactly like the original.
    _train(model, rank, steps=2, start=3)
    _train(resumed, rank, steps=2, start=3)
    return {"refusals": _refusals(), "original": original, "restored": restored,
            "pickled": pickled_residuals,
            "params": _full_params(model), "resumed_params": _full_params(resumed),
            "iterations": (state.iteration, resumed_state.iteration, pickled.iteration)}


def test_checkpoint_round_trip_restores_residuals() -> None:
    for res in _checkpoint_results():
        for key, residual in res["original"].items():
            assert residual.abs().sum() > 0, "residuals should be non-trivial at 5% density"
            assert torch.equal(res["restored"][key], residual)
            assert torch.equal(res["pickled"][key], residual)
        assert res["iterations"] == (5, 5, 3)
        # Same parameters, residuals and data, same reductions: bitwise equal.
        assert torch.equal(res["params"], res["resumed_params"])


def _refusals() -> dict[str, str]:
    messages = {}
    cfg = distk.SparsityConfig()
    try:
        distk.fsdp.enable(_fsdp2(mesh_shape=(1, WORLD)), cfg)
    except ValueError as err:
        messages["hsdp"] = str(err)
    try:
        model = _model()
        hybrid = FSDP1(model, device_id=torch.device("cpu"),
                       sharding_strategy=ShardingStrategy.HYBRID_SHARD)
        distk.fsdp.enable(hybrid, cfg)
    except ValueError as err:
        messages["hybrid"] = str(err)
    return messages


@functools.cache
def _checkpoint_results() -> list[dict]:
    """One 2-rank run for the checkpoint test and the refusal checks."""
    return _run(_checkpoint_worker)


def test_unsupported_configurations_are_refused_on_every_rank() -> None:
    for messages in (res["refusals"] for res in _checkpoint_results()):
        assert "2-D device mesh" in messages["hsdp"]
        assert "replicate_group=mesh" in messages["hsdp"]  # points to distk's HSDP
        assert "HYBRID_SHARD" in messages["hybrid"]


def test_enable_rejects_unsharded_models() -> None:
    with pytest.raises(TypeError, match="fully_shard"):
        distk.fsdp.enable(nn.Linear(2, 2), distk.SparsityConfig())


def test_fsdp2_gives_custom_comms_no_work_to_wait_on() -> None:
    # Why SparseReduceScatter and the HSDP hook finish the exchange before they return
    # (docs/ddp-fsdp.md, "Why FSDP2 and HSDP exchange synchronously"): torch's
    # foreach_reduce calls the custom reduce-scatter without async_op, keeps nothing it
    # returns, calls the all-reduce hook for its side effect, and reads the output right
    # after. A failure means torch changed that seam: the FSDP2 exchange may then become
    # asynchronous, finished where FSDP waits for the Work.
    # Deliberately private: the seam is torch's own (torch.distributed.fsdp._fully_shard,
    # torch 2.13), with no public surface to observe it through; this test pins it.
    import inspect

    from torch.distributed.fsdp._fully_shard import _fsdp_collectives

    source = inspect.getsource(_fsdp_collectives.foreach_reduce)
    call = source[source.index("reduce_scatter_comm("):]
    call = call[:call.index(")") + 1]
    assert "output_tensor=reduce_output" in call and "async_op" not in call, call
    assert "= reduce_scatter_comm(" not in source
    assert "all_reduce_hook(reduce_output)" in source
    assert "= all_reduce_hook(" not in source
    assert "_div_if_needed(reduce_output, postdivide_factor)" in source


# -- HSDP: FSDP2 over the shard dimension, distk across the replicas -------------------------

HSDP_MESH = (2, 2)  # (replicate, shard): 4 gloo ranks


def _hsdp_pair(seed: int = 0) -> tuple[nn.Module, nn.Module, object]:
    """(plain native HSDP on the 2-D mesh, FSDP2 on its shard dimension, the mesh)."""
    mesh = init_device_mesh("cpu", HSDP_MESH, mesh_dim_names=("replicate", "shard"))
    models = []
    for shard_mesh in (mesh, mesh["shard"]):
        model = _model(seed)
        fully_shard(model[2], mesh=shard_mesh)
        fully_shard(model, mesh=shard_mesh)
        models.append(model)
    return models[0], models[1], mesh


def _hsdp_worker(rank: int, world: int) -> dict:
    plain, sparse, mesh = _hsdp_pair()
    _train(plain, rank, steps=4, accumulate=2)
    cfg = distk.SparsityConfig(density=1.0, method="exact", min_numel=1)
    state = distk.fsdp.enable(sparse, cfg, replicate_group=mesh["replicate"].get_group())
    _train(sparse, rank, steps=4, accumulate=2)
    # Sparse training across replicas: the loss must still fall at 5 % density.
    _, trained, mesh = _hsdp_pair(seed=1)
    sparse_state = distk.fsdp.enable(
        trained, distk.SparsityConfig(density=0.05, min_numel=16),
        replicate_group=mesh["replicate"].get_group())
    losses = _train(trained, rank, steps=60, lr=0.1)
    return {"plain": _full_params(plain), "sparse": _full_params(sparse),
            "flavour": state.flavour, "iteration": state.iteration,
            "world": state.world_size, "density": sparse_state.stats.density,
            "trained": _full_params(trained), "losses": losses}


@pytest.mark.timeout(300)
def test_hsdp_density_one_matches_plain_hsdp_on_a_2x2_mesh() -> None:
    results = run_distributed(_hsdp_worker, 4, timeout=280)
    for res in results:
        # Each entry: a sum of 2 in the shard group's reduce-scatter, halved, then the
        # same across the 2 replicas: one fp32 addition and an exact halving each way.
        torch.testing.assert_close(res["sparse"], res["plain"], rtol=PARITY_RTOL,
                                   atol=PARITY_ATOL)
        assert res["flavour"] == "hsdp" and res["world"] == 2  # replicas, not all ranks
        assert res["iteration"] == 4  # accumulation micro-steps are not counted
        assert 0.0 < res["density"] < 0.2
        early, late = sum(res["losses"][:5]) / 5, sum(res["losses"][-10:]) / 10
        assert late < 0.6 * early, (early, late)
    # Every replica and shard group ends with the same full parameters.
    for res in results[1:]:
        assert torch.equal(res["trained"], results[0]["trained"])
