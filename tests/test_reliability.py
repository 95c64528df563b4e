"""Bad inputs are refused clearly, on every rank, and never poison state.

The rows of the catalogue in docs/reliability.md that no other test file covers: the
rows already covered elsewhere are referenced there, not repeated here. Process-level
faults (killed and stalled ranks, torchrun restarts, determinism) are in test_faults.py.

Exactness: single-process checks compare bitwise where both sides run the same
arithmetic on the same inputs; distributed checks use 2 real gloo ranks under a timeout,
so a refusal that hangs instead of raising fails the test.
"""

from __future__ import annotations

import math

import pytest
import torch
from distributed import run_distributed
from torch import nn

import distk
from distk import GradientCompressor, SparsityConfig
from distk.comm import launch_exchange, sparse_allreduce
from distk.compressor import NonFiniteGradientError

# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize("key,value", [
    ("density", math.nan), ("density", math.inf), ("density", -0.5),
    ("recall_target", math.nan), ("momentum", math.nan), ("momentum", -0.1),
    ("warmup_density", math.nan), ("clip_norm", math.nan), ("clip_norm", -1.0),
    ("k", -3), ("k", True), ("buckets", 2.5), ("min_numel", None), ("method", None),
])
def test_non_finite_negative_and_mistyped_numbers_are_refused(key, value):
    with pytest.raises(ValueError, match=rf"SparsityConfig\.{key} must be .*got {value!r}"):
        SparsityConfig.from_dict({key: value})


def test_checkpointed_state_with_another_config_or_version_is_refused():
    from distk.integrations import CompressionState

    saved = CompressionState(SparsityConfig(density=0.05)).state_dict()
    state = CompressionState(SparsityConfig(density=0.01))
    with pytest.raises(ValueError, match=r"different SparsityConfig.*'density': \(0.05, 0.01\)"):
        state.load_state_dict(saved)
    with pytest.raises(ValueError, match="compressor state version must be 2 or 3, got 99"):
        GradientCompressor(SparsityConfig()).load_state_dict({**saved["compressor"],
                                                             "version": 99})


def test_training_checkpoint_from_another_world_size_is_refused(tmp_path):
    from distk.train.checkpoint import load_checkpoint, save_checkpoint

    model = nn.Linear(4, 2)
    save_checkpoint(tmp_path, step=3, model=model, optimizer=torch.optim.SGD(
        model.parameters(), lr=0.1), distk_state=None, extra={}, rank=0, world_size=2)
    with pytest.raises(ValueError, match="written by 2 ranks, this run has 1"):
        load_checkpoint(tmp_path, rank=0, world_size=1)


# -- tensors handed to the compressor and the exchange ----------------------------------------


@pytest.mark.parametrize("make,match", [
    (lambda: torch.arange(10), "floating-point tensor, got torch.int64"),
    (lambda: torch.ones(10, dtype=torch.bool), "floating-point tensor, got torch.bool"),
    (lambda: [1.0, 2.0], "floating-point tensor, got list"),
    (lambda: torch.randn(10).to_sparse(),
     r"dense \(strided\) tensor, got layout torch.sparse_coo"),
    (lambda: torch.randn(4, 4).to_sparse_csr(),
     r"dense \(strided\) tensor, got layout torch.sparse_csr"),
], ids=["int64", "bool", "list", "sparse_coo", "sparse_csr"])
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_compressor_refuses_non_floating_and_sparse_gradients(make, match):
    with pytest.raises(ValueError, match=match):
        GradientCompressor(SparsityConfig(min_numel=1)).step(make(), "w", step=0)


@pytest.mark.parametrize("method", ["bucketed", "exact"])
def test_k_larger_than_numel_sends_the_whole_tensor(method):
    comp = GradientCompressor(SparsityConfig(k=5000, method=method, min_numel=1))
    grad = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    # One process: the "average" is the tensor itself, nothing is rounded.
    assert torch.equal(comp.step(grad, "w", step=0), grad)
    assert comp.last.sent == 1000 and comp.last.density == 1.0
    assert torch.equal(comp.residual("w"), torch.zeros(1000))


def test_a_key_whose_size_changes_is_refused():
    comp = GradientCompressor(SparsityConfig(density=0.1, min_numel=1))
    comp.step(torch.randn(2000), "layer", step=0)
    with pytest.raises(ValueError, match=r"key 'layer' had 2000 entries .* has 1000 now"):
        comp.step(torch.randn(1000), "layer", step=1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(indices=torch.tensor([0, 5, 10]), values=torch.ones(3), numel=10),
     r"indices must lie in \[0, numel=10\), got values from 0 to 10"),
    (dict(indices=torch.tensor([-1, 2]), values=torch.ones(2), numel=10),
     r"indices must lie in \[0, numel=10\), got values from -1 to 2"),
    (dict(indices=torch.tensor([1, 2]), values=torch.tensor([1, 2]), numel=10),
     "values must be floating point, got torch.int64"),
    (dict(indices=torch.tensor([1.0, 2.0]), values=torch.ones(2), numel=10),
     "indices must be an integer tensor, got torch.float32"),
    (dict(indices=torch.tensor([1, 2]), values=torch.ones(3), numel=10),
     "indices and values must be 1-D of the same length"),
    (dict(indices=torch.tensor([1]), values=torch.ones(1), numel=0),
     "numel must be .*>= 1, got 0"),
])
def test_sparse_allreduce_refuses_malformed_selections(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sparse_allreduce(**kwargs)


# -- non-finite gradients -----------------------------------------------------------------------


def _poisoned(numel: int, step: int) -> torch.Tensor:
    grad = torch.randn(numel, generator=torch.Generator().manual_seed(step))
    if step == 2:
        grad[[3, 500, 900]] = torch.tensor([math.nan, math.inf, -math.inf])
    return grad


@pytest.mark.parametrize("policy", ["raise", "skip", "zero"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("dense_steps", [0, 5])
def test_residuals_and_velocities_are_never_poisoned(policy, momentum, dense_steps):
    cfg = SparsityConfig(density=0.05, min_numel=1, nonfinite=policy, momentum=momentum,
                         dense_steps=dense_steps)
    comp = GradientCompressor(cfg)
    for step in range(5):
        before = comp.state_dict()
        try:
            update = comp.step(_poisoned(1000, step), "w", step=step)
        except NonFiniteGradientError as err:
            assert policy == "raise" and step == 2
            assert "at step 2 for key 'w' on rank(s) [0]" in str(err)
            update = None
        state = comp.state_dict()
        for table in ("residuals", "momenta"):
            for tensor in state[table].values():
                assert torch.isfinite(tensor).all(), (table, step)
        if update is not None:
            assert torch.isfinite(update).all(), step
        if step == 2 and policy in ("raise", "skip"):
            # The step is dropped: state untouched (bitwise), update zero under "skip".
            for table in ("residuals", "momenta"):
                assert before[table].keys() == state[table].keys()
                for key, tensor in before[table].items():
                    assert torch.equal(state[table][key], tensor), (table, key)
            if policy == "skip":
                assert torch.equal(update, torch.zeros(1000)) and comp.last.skipped


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_zero_policy_equals_the_gradient_with_those_entries_zeroed(momentum):
    poisoned = GradientCompressor(SparsityConfig(density=0.05, min_numel=1, nonfinite="zero",
                                                 momentum=momentum))
    clean = GradientCompressor(SparsityConfig(density=0.05, min_numel=1, momentum=momentum))
    for step in range(5):
        grad = _poisoned(1000, step)
        zeroed = torch.where(torch.isfinite(grad), grad, torch.zeros(()))
        # Same arithmetic on the same finite inputs: bitwise equal.
        assert torch.equal(poisoned.step(grad, "w", step=step),
                           clean.step(zeroed, "w", step=step)), step
        assert torch.equal(poisoned.residual("w"), clean.residual("w")), step


@pytest.mark.parametrize("method", ["bucketed", "dense"])
def test_a_narrow_wire_dtype_never_overflows_into_the_residual(method):
    comp = GradientCompressor(SparsityConfig(density=0.01, min_numel=1, method=method,
                                             value_dtype="float16"))
    grad = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    grad[7] = 1e6  # beyond fp16's largest finite value, 65504
    update = comp.step(grad, "w", step=0)
    assert torch.isfinite(update).all() and torch.isfinite(comp.residual("w")).all()
    assert update[7] == 65504.0  # clamped to the wire's range; the excess stays behind
    assert comp.residual("w")[7] == 1e6 - 65504.0
    # Conservation: update + residual == gradient (the fp16 rounding error of the other
    # entries sits in the residual; sums of two fp32 values of magnitude < 1e6: 1 ulp).
    torch.testing.assert_close(update + comp.residual("w"), grad, rtol=1e-7, atol=1e-7)


# -- distributed: refusals on every rank, never a hang ---------------------------------------


def _catch(fn) -> str | None:
    try:
        fn()
    except (ValueError, RuntimeError, FloatingPointError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 128), nn.Tanh(), nn.Linear(128, 1))


def _ddp_steps(rank: int, policy: str, nan_step: int, steps: int = 4) -> dict:
    """Train a DDP+distk model; rank 1 gets a NaN gradient at ``nan_step``."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(_net())
    state = distk.ddp.enable(ddp, SparsityConfig(density=0.05, min_numel=64,
                                                 nonfinite=policy))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    out: dict = {"error": None, "skipped_grads_zero": None}
    for step in range(steps):
        gen = torch.Generator().manual_seed(10 * step + rank)
        x, y = torch.randn(32, 16, generator=gen), torch.randn(32, 1, generator=gen)
        if step == nan_step and rank == 1:
            x[0, 0] = math.nan
        before = state.compressor.state_dict()
        loss = nn.functional.mse_loss(ddp(x), y)
        try:
            loss.backward()
        except NonFiniteGradientError as err:
            out["error"] = str(err)
            return out
        if step == nan_step:
            grads = [p.grad for p in ddp.parameters()]
            out["skipped_grads_zero"] = all(bool((g == 0).all()) for g in grads)
            out["grads_finite"] = all(bool(torch.isfinite(g).all()) for g in grads)
            after = state.compressor.state_dict()
            out["residuals_untouched"] = before["residuals"].keys() == after["residuals"].keys() \
                and all(torch.equal(before["residuals"][k], after["residuals"][k])
                        for k in before["residuals"])
        opt.step()
        opt.zero_grad()
    out["params"] = torch.cat([p.detach().reshape(-1) for p in ddp.parameters()]).numpy()
    out["residuals_finite"] = all(bool(torch.isfinite(r).all())
                                  for r in state.compressor.state_dict()["residuals"].values())
    return out


def _refusals_worker(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    out: dict = {}
    # Selections out of range on one rank: every rank refuses before any data moves.
    for scheme in ("allgather", "reduce_scatter", "dense"):
        indices = torch.arange(10) if rank == 0 else torch.arange(10) + 995
        out[f"indices/{scheme}"] = _catch(
            lambda s=scheme, i=indices: sparse_allreduce(i, torch.ones(10), 1000, scheme=s))
    # An unverified all-gather asked for the range check alone (the compressor's stats
    # steps): the bad range travels in the trailer and raises on every rank.
    indices = torch.arange(10) if rank == 0 else torch.arange(10) + 995
    out["indices/allgather_unverified"] = _catch(lambda: launch_exchange(
        indices, torch.ones(10), 1000, scheme="allgather", verify=False,
        check_range=True).wait())
    try:  # numel differs across ranks
        sparse_allreduce(torch.arange(2), torch.ones(2), 4 + rank)
        out["mismatch_as_value_error"] = None
    except ValueError as err:
        out["mismatch_as_value_error"] = type(err).__name__
    out["alive"] = sparse_allreduce(torch.arange(2), torch.ones(2), 4).tolist()
    # Sparse gradients (Embedding(sparse=True)) are refused when distk is enabled.
    embedding = nn.Sequential(nn.Embedding(100, 8, sparse=True), nn.Linear(8, 1))
    out["sparse_embedding"] = _catch(lambda: distk.ddp.enable(DDP(embedding),
                                                              SparsityConfig()))
    # FSDP2 with a config that differs across ranks.
    model = _net()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    out["fsdp_config"] = _catch(lambda: distk.fsdp.enable(
        model, SparsityConfig(density=0.01, nonfinite="skip" if rank == 1 else "raise")))
    # Non-finite gradients through the DDP hook: at the dense bucket-rebuild iteration
    # (0) and at a compressed one (2).
    for policy in ("raise", "skip", "zero"):
        for nan_step in (0, 2):
            out[f"ddp/{policy}/{nan_step}"] = _ddp_steps(rank, policy, nan_step)
    return out


@pytest.fixture(scope="module")
def refusals() -> list[dict]:
    # pg_timeout: a refusal that left one rank inside a collective would time out here.
    return run_distributed(_refusals_worker, 2, timeout=150, pg_timeout=30)


@pytest.mark.distributed
@pytest.mark.parametrize("scheme", ["allgather", "reduce_scatter", "dense",
                                    "allgather_unverified"])
def test_out_of_range_indices_on_one_rank_are_refused_on_every_rank(refusals, scheme):
    for out in refusals:
        assert out[f"indices/{scheme}"] == ("ValueError: distk.comm: indices out of range "
                                            "[0, numel=1000) on rank(s) [1]")
        assert out["alive"] == [1.0, 1.0, 0.0, 0.0]  # the group still works afterwards


@pytest.mark.distributed
def test_sparse_gradients_are_refused_by_the_ddp_integration(refusals):
    for out in refusals:
        assert out["sparse_embedding"].startswith("ValueError: distk.ddp.enable does not "
                                                  "support sparse gradients")


@pytest.mark.distributed
def test_fsdp_config_differing_across_ranks_is_refused_on_every_rank(refusals):
    for out in refusals:
        assert out["fsdp_config"] == ("RankMismatchError: distk: the sparsity config differs "
                                      "across ranks: nonfinite (rank 0: 'raise', rank 1: "
                                      "'skip')")


@pytest.mark.distributed
@pytest.mark.parametrize("nan_step", [0, 2])
def test_ddp_nonfinite_raise_fails_every_rank_naming_step_and_bucket(refusals, nan_step):
    for out in refusals:
        error = out[f"ddp/raise/{nan_step}"]["error"]
        assert error is not None and "non-finite gradient (NaN or Inf)" in error
        # Step 0 is DDP's bucket-rebuild iteration (the compressor's dense path, stateless),
        # step 2 a compressed one: one step counter names both, with the bucket and rank.
        assert f"at step {nan_step} for key 0 on rank(s) [1]" in error


@pytest.mark.distributed
@pytest.mark.parametrize("nan_step", [0, 2])
def test_ddp_nonfinite_skip_zeroes_the_update_on_every_rank(refusals, nan_step):
    for out in refusals:
        result = out[f"ddp/skip/{nan_step}"]
        assert result["error"] is None and result["skipped_grads_zero"], result
        assert result["residuals_untouched"] and result["residuals_finite"]
    # Replicas stay identical: every rank applied the same (zero) update.
    assert (refusals[0][f"ddp/skip/{nan_step}"]["params"]
            == refusals[1][f"ddp/skip/{nan_step}"]["params"]).all()


@pytest.mark.distributed
@pytest.mark.parametrize("nan_step", [0, 2])
def test_ddp_nonfinite_zero_keeps_training_finite(refusals, nan_step):
    for out in refusals:
        result = out[f"ddp/zero/{nan_step}"]
        assert result["error"] is None and result["grads_finite"]
        assert result["residuals_finite"] and not result["skipped_grads_zero"]
    assert (refusals[0][f"ddp/zero/{nan_step}"]["params"]
            == refusals[1][f"ddp/zero/{nan_step}"]["params"]).all()


def _deepspeed_mismatch_worker(rank: int, world: int) -> str | None:
    config = {
        "train_micro_batch_size_per_gpu": 4, "steps_per_print": 10**9,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
        "zero_optimization": {"stage": 0}, "zero_allow_untested_optimizer": True,
        "distk": {"density": 0.05 if rank == 0 else 0.1},
    }
    model = _net()
    return _catch(lambda: distk.deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config))


@pytest.mark.distributed
def test_deepspeed_config_differing_across_ranks_is_refused_on_every_rank():
    pytest.importorskip("deepspeed")
    for message in run_distributed(_deepspeed_mismatch_worker, 2, timeout=150, pg_timeout=30):
        assert message == ("RankMismatchError: distk: the sparsity config differs across "
                           "ranks: density (rank 0: 0.05, rank 1: 0.1)")


@pytest.mark.distributed
def test_a_cross_rank_mismatch_is_caught_by_except_value_error(refusals):
    # Callers catching ValueError for bad configs also catch cross-rank mismatches.
    for out in refusals:
        assert out["mismatch_as_value_error"] == "RankMismatchError"
