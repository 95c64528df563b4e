"""Shared masks: every rank sends its values at the same positions, one all-reduce sums
them (``SparsityConfig(mask="shared")``, ``distk.compressor.masks``).

Exactness: gradients are fp64 small integers and values travel in fp64, so every sum is
exact in any order and conservation holds to the last bit up to the final division by
the world size (one ulp, hence ``atol=1e-9`` on values ~1e4).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed

from distk import GradientCompressor, SparsityConfig
from distk.comm import RankMismatchError, exchange, ring_allreduce_bytes
from distk.compressor.masks import MaskPolicy

NUMEL = 4000
POLICIES = ("union", "leader", "moment", "sketch", "predicted")


def _grad(rank: int, step: int, numel: int = NUMEL) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    # A shared trend (every rank) plus per-rank noise, in small integers.
    trend = torch.randint(-300, 300, (numel,), generator=torch.Generator().manual_seed(7))
    return (trend + torch.randint(-100, 100, (numel,), generator=gen)).to(torch.float64)


# -- the "shared" scheme of distk.comm ----------------------------------------------------------

def _shared_scheme(rank, world):
    positions = torch.tensor([3, 17, 999, 40, 5], dtype=torch.int64)
    values = torch.arange(5, dtype=torch.float64) * (rank + 1)
    result = exchange(positions, values, 1000, scheme="shared", out_dtype=torch.float64)
    flagged = exchange(positions, values, 1000, scheme="shared", verify=False,
                       nonfinite=rank == world - 1)
    return result.output.numpy(), result.bytes_sent, flagged.output, flagged.nonfinite_ranks


@pytest.mark.distributed
def test_shared_scheme_sums_values_at_the_agreed_positions():
    world = 3
    results = run_distributed(_shared_scheme, world, timeout=90)
    expected = np.zeros(1000)
    expected[[3, 17, 999, 40, 5]] = np.arange(5) * sum(r + 1 for r in range(world)) / world
    for output, sent, flagged, ranks in results:
        np.testing.assert_array_equal(output, expected)  # integer sums, exact
        # The values' ring all-reduce (metadata row on this verified call aside).
        assert sent - ring_allreduce_bytes(5, world, 8) == (world - 1) * (12 + world) * 8
        assert flagged is None and ranks == [world - 1]


# -- the compressor with each policy ------------------------------------------------------------

def _train(rank, world, policy, steps=6):
    cfg = SparsityConfig(density=0.02, min_numel=1, mask="shared", mask_policy=policy,
                         recall_interval=2, stats_interval=3)
    comp = GradientCompressor(cfg)
    updates, grad_sum = [], torch.zeros(NUMEL, dtype=torch.float64)
    for step in range(steps):
        grad = _grad(rank, step)
        grad_sum += grad
        updates.append(comp.step(grad, "w", step=step))
    residual_sum = comp.residual("w").clone()
    summed_grads = grad_sum.clone()
    dist.all_reduce(residual_sum)
    dist.all_reduce(summed_grads)
    totals = comp.totals
    return (torch.stack(updates).numpy(), residual_sum.numpy(), summed_grads.numpy(),
            totals.schemes, totals.global_recall, totals.bytes_sent, totals.sent)


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3, 8])
def test_every_policy_agrees_on_the_mask_and_conserves_the_gradient(world):
    results = {policy: run_distributed(_train, world, policy, timeout=240)
               for policy in (POLICIES if world != 8 else ("union", "leader"))}
    for policy, per_rank in results.items():
        updates, residuals, grads, schemes, recall, sent_bytes, sent = per_rank[0]
        assert schemes == {"shared": 6}, policy
        for other in per_rank[1:]:  # every rank applies bitwise the same update
            np.testing.assert_array_equal(other[0], updates)
        # One mask per step: the update's support holds about k = 80 positions (packed
        # plans round k up to whole buckets; a union may hold fewer).
        assert all(0 < np.count_nonzero(u) <= 2 * 0.02 * NUMEL for u in updates), policy
        assert 0.5 * 0.02 * NUMEL * 6 <= sent <= 2 * 0.02 * NUMEL * 6, (policy, sent)
        # Conservation: world * sum(updates) + sum of residuals == sum of gradients.
        np.testing.assert_allclose(world * updates.sum(0) + residuals, grads, rtol=0,
                                   atol=1e-9, err_msg=policy)
        assert recall is not None and 0.0 <= recall <= 1.0
    # With a trend shared by the ranks, the leader's top-k finds far more of the global
    # top-k than positions picked at random would (recall = density = 0.02).
    assert results["leader"][0][4] >= 10 * 0.02


def _bytes_per_step(rank, world):
    comp = GradientCompressor(SparsityConfig(density=0.01, min_numel=1, mask="shared",
                                             recall_interval=0, stats_interval=1000,
                                             value_dtype="bfloat16"))
    local = GradientCompressor(SparsityConfig(density=0.01, min_numel=1, mask="local",
                                              recall_interval=0, stats_interval=1000,
                                              value_dtype="bfloat16"))
    out = []
    for step in range(4):  # steps 1..3 unverified: the steady state
        grad = _grad(rank, step, 100_000).float()
        comp.step(grad, "w", step=step)
        local.step(grad, "w", step=step)
        out.append((comp.last.bytes_sent, local.last.bytes_sent))
    return out[-1]


@pytest.mark.distributed
def test_shared_mask_bytes_per_rank_stay_flat_while_the_all_gather_grows():
    shared, gathered = {}, {}
    for world in (2, 4):
        shared[world], gathered[world] = run_distributed(_bytes_per_step, world, timeout=120)[0]
    # bf16 values: 2 (P-1)/P k * 2 bytes, plus the leader's packed positions.
    assert shared[4] < 1.6 * shared[2]
    assert gathered[4] > 2.5 * gathered[2]
    assert shared[4] < gathered[4] / 2


class _RankDependentMask(MaskPolicy):
    """A broken policy: each rank picks other positions (what a bug in a policy, or a
    rank restored from another rank's state, would do)."""

    def positions(self, ctx):
        rank = dist.get_rank()
        return torch.arange(ctx.wire.k, dtype=torch.int64) + rank


def _broken(rank, world):
    comp = GradientCompressor(SparsityConfig(density=0.01, min_numel=1, mask="shared"))
    comp.masks = _RankDependentMask()
    try:
        comp.step(_grad(rank, 0), "w", step=0)
    except RankMismatchError as err:
        return str(err)
    return None


@pytest.mark.distributed
def test_ranks_with_different_masks_are_refused_on_every_rank():
    for message in run_distributed(_broken, 2, timeout=60):
        assert message is not None and "disagree on the shared mask of key 'w'" in message


def _resume(rank, world, policy, ahead):
    cfg = SparsityConfig(density=0.02, min_numel=1, mask="shared", mask_policy=policy,
                         stats_interval=1000, recall_interval=0, mask_ahead=ahead)
    first = GradientCompressor(cfg)
    for step in range(3):
        first.step(_grad(rank, step), "w", step=step)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # with mask_ahead, the next mask is in flight
    buffer.seek(0)
    second = GradientCompressor(cfg)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    same = True
    for step in range(3, 6):
        grad = _grad(rank, step)
        same &= bool(torch.equal(first.step(grad, "w", step=step),
                                 second.step(grad, "w", step=step)))
    return same and bool(torch.equal(first.residual("w"), second.residual("w")))


@pytest.mark.distributed
@pytest.mark.parametrize("policy,ahead", [(p, False) for p in POLICIES]
                         + [("union", True), ("leader", True)])
def test_resume_from_a_checkpoint_is_bitwise(policy, ahead):
    assert all(run_distributed(_resume, 2, policy, ahead, timeout=120))


def test_a_shared_mask_refuses_a_codec_that_does_not_sum():
    with pytest.raises(ValueError, match="mask must be 'auto' or 'local' when value_bits=2"):
        SparsityConfig(mask="shared", value_bits=2)
    with pytest.raises(ValueError, match="exchange must be 'auto' when mask='shared'"):
        SparsityConfig(mask="shared", exchange="allgather")
    with pytest.raises(ValueError, match="mask_policy must be one of"):
        SparsityConfig(mask_policy="random")


def test_single_process_shared_mask_is_its_own_top_k():
    # One process: the leader is this rank; the update is its accumulator at the mask.
    comp = GradientCompressor(SparsityConfig(density=0.05, min_numel=1, mask="shared",
                                             method="exact"))
    grad = torch.randn(2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    update = comp.step(grad, "w", step=0)
    chosen = torch.topk(grad.abs(), 100).indices
    expected = torch.zeros_like(grad)
    expected[chosen] = grad[chosen]
    assert torch.equal(update, expected)
    assert torch.equal(update + comp.residual("w"), grad)


# -- EF21: the estimate feedback -----------------------------------------------------------------

def _ef21(rank, world, mask):
    cfg = SparsityConfig(density=0.02, min_numel=1, mask=mask, feedback="estimate",
                         recall_interval=0, stats_interval=2)
    comp = GradientCompressor(cfg)
    updates = []
    for step in range(5):
        updates.append(comp.step(_grad(rank, step), "w", step=step))
    state = comp.state_dict()
    estimates = state["estimates"]["w"].clone()
    dist.all_reduce(estimates)
    return (torch.stack(updates).numpy(), (estimates / world).numpy(),
            state["means"]["w"].numpy(), comp.last.residual_norm)


@pytest.mark.distributed
@pytest.mark.parametrize("mask", ["local", "shared"])
def test_ef21_hands_back_the_mean_of_the_ranks_estimates(mask):
    world = 3
    results = run_distributed(_ef21, world, mask, timeout=120)
    updates, mean_of_estimates, mean, residual_norm = results[0]
    for other in results[1:]:
        np.testing.assert_array_equal(other[0], updates)  # the same update on every rank
        np.testing.assert_array_equal(other[2], mean)
    # The mean estimate every rank keeps is the mean of the ranks' own estimates (integer
    # sums divided by 3: one rounding each, hence the tolerance), and it is the update.
    np.testing.assert_allclose(mean, mean_of_estimates, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(updates[-1], mean)
    # Dense: every coordinate the estimates ever moved at keeps a gradient at every step.
    assert np.count_nonzero(updates[-1]) > np.count_nonzero(updates[0])
    assert residual_norm is not None and residual_norm > 0


def test_ef21_configuration_errors_name_the_key():
    with pytest.raises(ValueError, match="momentum must be 0 with feedback='estimate'"):
        SparsityConfig(feedback="estimate", momentum=0.9)
    with pytest.raises(ValueError, match="feedback must be one of"):
        SparsityConfig(feedback="ef22")
