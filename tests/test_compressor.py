"""GradientCompressor: error feedback, schedules, state, exchange schemes, failure modes.

Exactness: distributed checks use fp64 gradients holding small integers, so every sum is
exact in any order; the only rounding is the final division by the world size, which the
compressor and the dense reference perform identically on identical sums.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed

from distk import GradientCompressor, SparsityConfig
from distk.comm import RankMismatchError
from distk.compressor import NonFiniteGradientError, packed_k_per_bucket, poisson_limit_recall
from distk.selection import expected_recall

NUMEL = 3000
STEPS = 4


def _integer_grad(rank: int, step: int, numel: int = NUMEL, salt: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(10_000 * salt + 100 * step + rank)
    return torch.randint(-1000, 1000, (numel,), generator=gen).to(torch.float64)


def _dense_average(tensor: torch.Tensor, world: int) -> torch.Tensor:
    tensor = tensor.clone()
    if world > 1:
        dist.all_reduce(tensor)
    return tensor / world


def _scenarios(rank, world):
    """Every per-world-size check in one process group (spawning costs seconds)."""
    out = {}
    # 1. Each scheme: update == dense average of what each rank sent (acc - new residual),
    #    and error-feedback conservation over several steps.
    for method in ("bucketed", "exact"):
        for scheme in ("allgather", "reduce_scatter", "dense"):
            cfg = SparsityConfig(density=0.02, method=method, exchange=scheme, min_numel=1)
            comp = GradientCompressor(cfg)
            updates, sent_ok = [], True
            grad_sum = torch.zeros(NUMEL, dtype=torch.float64)
            before = torch.zeros(NUMEL, dtype=torch.float64)  # no residual before step 0
            for step in range(STEPS):
                grad = _integer_grad(rank, step)
                grad_sum += grad
                update = comp.step(grad, "w", step=step)
                sent = grad + before - comp.residual("w")
                before = comp.residual("w")
                sent_ok &= bool(torch.equal(update, _dense_average(sent, world)))
                sent_ok &= int((sent != 0).sum()) <= comp.last.sent
                updates.append(update)
            out[f"{method}/{scheme}"] = {
                "updates": torch.stack(updates).numpy(),
                "sent_matches_dense": sent_ok,
                "update_sum": torch.stack(updates).sum(0).numpy(),
                "residual_sum": _dense_average(comp.residual("w"), 1).numpy()
                if world == 1 else (_dense_average(comp.residual("w"), world) * world).numpy(),
                "grad_sum": (_dense_average(grad_sum, world) * world).numpy(),
                "scheme": list(comp.last.schemes),
                "bytes_sent": comp.last.bytes_sent,
            }
    # 2. density 1.0 equals dense averaging (and leaves a zero residual).
    comp = GradientCompressor(SparsityConfig(density=1.0, min_numel=1))
    grad = _integer_grad(rank, 0)
    out["density1"] = bool(torch.equal(comp.step(grad, 0, step=0),
                                       _dense_average(grad, world)))
    out["density1_residual_zero"] = bool((comp.residual(0) == 0).all())
    # 3. Every rank holds the same bits for real-valued fp32 gradients (auto scheme).
    comp = GradientCompressor(SparsityConfig(density=0.05, min_numel=1))
    gen = torch.Generator().manual_seed(rank)
    out["fp32_update"] = comp.step(torch.randn(4096, generator=gen), "x", step=0).numpy()
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_compressor_across_world_sizes(world):
    results = run_distributed(_scenarios, world, timeout=180)
    for rank, res in enumerate(results):
        assert res["density1"] and res["density1_residual_zero"], rank
        np.testing.assert_array_equal(res["fp32_update"], results[0]["fp32_update"])
        for name in [n for n in res if "/" in n]:
            case = res[name]
            assert case["sent_matches_dense"], (rank, name)
            assert case["scheme"] == [name.split("/")[1]]
            # Every rank holds the same bits; all schemes agree exactly (integer sums).
            np.testing.assert_array_equal(case["updates"], results[0][name]["updates"])
            np.testing.assert_array_equal(case["updates"],
                                          results[0]["bucketed/allgather"]["updates"]
                                          if name.startswith("bucketed")
                                          else results[0]["exact/allgather"]["updates"])
            # Conservation: world * sum(updates) + sum of residuals == sum of gradients.
            # The update is (exact sum) / world; multiplying back rounds by <= 1 ulp of
            # values ~1e4, hence the absolute tolerance.
            np.testing.assert_allclose(world * case["update_sum"] + case["residual_sum"],
                                       case["grad_sum"], rtol=0, atol=1e-9)
            if world == 1:
                assert case["bytes_sent"] == 0


def _failure_modes(rank, world):
    out = {}

    def attempt(fn):
        try:
            fn()
        except (RankMismatchError, NonFiniteGradientError) as error:
            return f"{type(error).__name__}: {error}"
        return None

    # numel differs across ranks
    comp = GradientCompressor(SparsityConfig(density=0.1, min_numel=1))
    out["numel"] = attempt(lambda: comp.step(torch.ones(1000 + 10 * (rank == 1)), "a", step=0))
    # k differs (different densities)
    comp = GradientCompressor(SparsityConfig(density=0.1 + 0.1 * (rank == 2), min_numel=1))
    out["k"] = attempt(lambda: comp.step(torch.ones(1000), "a", step=0))
    # keys called in different orders
    comp = GradientCompressor(SparsityConfig(density=0.1, min_numel=1))
    out["key"] = attempt(lambda: comp.step(torch.ones(1000), "a" if rank == 0 else "b", step=0))
    # non-finite: raise on every rank
    comp = GradientCompressor(SparsityConfig(density=0.1, min_numel=1))
    grad = torch.ones(1000)
    grad[5] = float("nan") if rank == 1 else 1.0
    out["raise"] = attempt(lambda: comp.step(grad, "w", step=0))
    # non-finite: skip -> zero update everywhere, residual untouched
    comp = GradientCompressor(SparsityConfig(density=0.1, min_numel=1, nonfinite="skip"))
    comp.step(torch.arange(1000.0), "w", step=0)
    before = comp.residual("w").clone()
    update = comp.step(grad if rank == 1 else torch.ones(1000), "w", step=1)
    out["skip_zero"] = bool((update == 0).all())
    out["skip_residual"] = bool(torch.equal(comp.residual("w"), before))
    out["skip_stats"] = comp.last.skipped
    # non-finite: zero -> entries count as 0, residual stays finite
    comp = GradientCompressor(SparsityConfig(density=0.1, min_numel=1, nonfinite="zero"))
    bad = torch.ones(1000)
    bad[7] = float("inf")
    update = comp.step(bad, "w", step=0)
    out["zero_finite"] = bool(torch.isfinite(update).all() and
                              torch.isfinite(comp.residual("w")).all())
    # the process group still works after every error above
    out["alive"] = float(_dense_average(torch.ones(1), world).item())
    return out


@pytest.mark.distributed
def test_failure_modes_on_every_rank():
    world = 3
    results = run_distributed(_failure_modes, world, timeout=120)
    for res in results:
        assert "disagree on numel (rank 0: 1000, rank 1: 1010, rank 2: 1000)" in res["numel"]
        assert "disagree on k (" in res["k"]
        assert "disagree on key tag" in res["key"]
        assert res["raise"].startswith("NonFiniteGradientError")
        assert "step 0 for key 'w' on rank(s) [1]" in res["raise"]
        assert res["skip_zero"] and res["skip_residual"] and res["skip_stats"]
        assert res["zero_finite"]
        assert res["alive"] == 1.0


def _deferred_nonfinite(rank, world):
    # The deferred check (defer_checks, as the integrations run it) on CPU tensors: the
    # flag is written on the device side of the exchange, never read by the sender.
    GradientCompressor.DEFER_DEVICE_TYPES = ("cuda", "cpu")  # this process only
    out = {}
    for name, options in (("allgather", dict(exchange="allgather", mask="local")),
                          ("dense", dict(exchange="dense", mask="local")),
                          ("shared", dict(mask="shared"))):
        cfg = SparsityConfig(density=0.1, min_numel=1, stats_interval=100, **options)
        comp = GradientCompressor(cfg, defer_checks=True)
        comp.step(torch.arange(1000.0) * (rank + 1), "w", step=1)  # verified: first exchange
        before = comp.residual("w")
        grad = torch.ones(1000)
        if rank == 1:
            grad[5] = float("nan")
        try:  # step 2 is unverified: the flag travels with the payload
            comp.step(grad, "w", step=2)
            out[name] = None
        except NonFiniteGradientError as err:
            out[name] = str(err)
        # The flagged rank's residual got zeros, not the NaN; another rank's keeps its
        # gradient (delayed, not lost), as without the deferral.
        out[f"{name}/residual_kept"] = bool(torch.equal(comp.residual("w"), before))
        out[f"{name}/deferred_left"] = len(comp._deferred)
    return out


@pytest.mark.distributed
def test_deferred_nonfinite_check_raises_on_every_rank_from_the_payload():
    results = run_distributed(_deferred_nonfinite, 2, timeout=120)
    for rank, res in enumerate(results):
        for name in ("allgather", "dense", "shared"):
            assert res[name] is not None, (name, res)
            assert "step 2 for key 'w' on rank(s) [1]" in res[name], res[name]
            assert res[f"{name}/residual_kept"] == (rank == 1), (rank, name)
            assert res[f"{name}/deferred_left"] == 0  # several ranks: nothing kept back


@pytest.mark.parametrize("options", [{}, {"momentum": 0.9, "error_decay": 0.9}])
def test_deferred_nonfinite_check_of_one_process(monkeypatch, options):
    monkeypatch.setattr(GradientCompressor, "DEFER_DEVICE_TYPES", ("cuda", "cpu"))
    cfg = SparsityConfig(density=0.1, min_numel=1, **options)
    plain, deferred = GradientCompressor(cfg), GradientCompressor(cfg, defer_checks=True)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):  # finite gradients: bitwise the same updates, nothing raised
        grad = torch.randn(1000, generator=gen)
        want = plain.step(grad, "w", step=step)
        work = deferred.launch(grad, "w", step=step)
        assert torch.equal(work.wait(), want)
        deferred.raise_deferred()
    before = deferred.state_dict()
    bad = torch.ones(1000)
    bad[3], bad[9] = float("inf"), float("nan")
    work_a = deferred.launch(bad, "a", step=3)
    work_w = deferred.launch(bad, "w", step=3)
    # A flagged step updates nothing and takes nothing from the state.
    assert (work_a.wait() == 0).all() and (work_w.wait() == 0).all()
    after = deferred.state_dict()
    for table in ("residuals", "momenta"):
        assert before[table].keys() == after[table].keys() - {"a"}
        for key, tensor in before[table].items():
            assert torch.equal(after[table][key], tensor), (table, key)
    with pytest.raises(NonFiniteGradientError,
                       match=r"at step 3 for keys \['a', 'w'\] on rank\(s\) \[0\]"):
        deferred.raise_deferred()
    deferred.raise_deferred()  # read once: nothing left
    with pytest.raises(NonFiniteGradientError, match=r"at step 4 for key 'w'"):
        deferred.step(bad, "w", step=4)  # step() reads its own check


# -- single process ---------------------------------------------------------------------

def test_warmup_schedule():
    cfg = SparsityConfig(density=0.001, warmup_steps=4, warmup_density=0.25, dense_steps=1,
                         min_numel=1)
    numel = 100_000
    comp = GradientCompressor(cfg.replace(method="exact"))
    ks = []
    for step in range(7):
        comp.step(torch.randn(numel), "w", step=step)
        ks.append(comp.last.sent)
    # Step 0 dense; then 0.25 * (0.001/0.25)^(t/4) for t = 0..3; then the target density.
    expected = [numel] + [round(0.25 * (0.001 / 0.25) ** (t / 4) * numel) for t in range(4)]
    assert ks == expected + [100, 100]
    assert comp.last.step == 6


def test_state_dict_round_trip():
    cfg = SparsityConfig(density=0.05, momentum=0.9, min_numel=1)
    first = GradientCompressor(cfg)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(2000, generator=gen) for _ in range(5)]
    for step, grad in enumerate(grads[:3]):
        first.step(grad, "layer", step=step)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = GradientCompressor(cfg)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    assert second.totals.buffers == 3
    for step, grad in enumerate(grads[3:], start=3):
        # Same state, same inputs, same arithmetic: bitwise equal.
        assert torch.equal(first.step(grad, "layer", step=step),
                           second.step(grad, "layer", step=step))
    assert torch.equal(first.residual("layer"), second.residual("layer"))
    assert second.totals.buffers == 5


def test_momentum_correction_matches_dgc_formula():
    cfg = SparsityConfig(density=0.1, momentum=0.5, method="exact", min_numel=1)
    comp = GradientCompressor(cfg)
    gen = torch.Generator().manual_seed(3)
    velocity = torch.zeros(500, dtype=torch.float64)
    residual = torch.zeros(500, dtype=torch.float64)
    for step in range(4):
        grad = torch.randn(500, generator=gen, dtype=torch.float64)
        velocity = 0.5 * velocity + grad
        acc = residual + velocity
        chosen = torch.topk(acc.abs(), 50).indices
        expected = torch.zeros_like(acc)
        expected[chosen] = acc[chosen]
        residual = acc.clone()
        residual[chosen] = 0
        velocity[chosen] = 0
        # Same operations in the same order in fp64: exact.
        assert torch.equal(comp.step(grad, 0, step=step), expected)
    assert torch.equal(comp.residual(0), residual)


def test_clipping_and_value_dtype_keep_conservation():
    cfg = SparsityConfig(density=0.05, clip_norm=1.0, value_dtype="bfloat16", min_numel=1)
    comp = GradientCompressor(cfg)
    gen = torch.Generator().manual_seed(4)
    clipped_sum = torch.zeros(1000)
    update_sum = torch.zeros(1000)
    for step in range(5):
        grad = 10 * torch.randn(1000, generator=gen)
        clipped_sum += grad * (1.0 / grad.norm())
        update_sum += comp.step(grad, "w", step=step)
    # bf16 rounding of sent values stays in the residual, so the sum is conserved up to
    # fp32 rounding of 5 accumulations of values ~0.1 (atol 1e-6).
    torch.testing.assert_close(update_sum + comp.residual("w"), clipped_sum,
                               rtol=0, atol=1e-6)
    # bf16 on the wire: 2 bytes per value (and 2 per 16-bit offset).
    assert comp.last.bits_per_entry == 32


def test_small_tensors_and_dense_method_go_dense():
    comp = GradientCompressor(SparsityConfig(min_numel=1024))
    grad = torch.randn(100)
    assert torch.equal(comp.step(grad, "bias", step=0), grad)
    assert comp.last.schemes == {"dense": 1} and comp.last.sent == 100
    comp = GradientCompressor(SparsityConfig(method="dense", min_numel=1))
    assert torch.equal(comp.step(grad.double(), "w", step=0), grad.double())


def test_packed_plan_meets_recall_target():
    comp = GradientCompressor(SparsityConfig(density=0.01, min_numel=1))
    plan = comp.launch(torch.randn(1 << 16), "w", step=0).plan
    selection = plan.selection
    assert selection.packed and selection.buckets * selection.k_per_bucket == plan.k
    assert plan.wire.index_bytes == 2  # offsets inside buckets of <= 65536 entries
    assert 655 <= plan.k <= 655 + 655 // packed_k_per_bucket(0.95)
    assert expected_recall(1 << 16, plan.k, selection.buckets, selection.k_per_bucket) \
        >= 0.95
    # The large-k bound used for big selections sits just below finite-k recall.
    assert poisson_limit_recall(64) == pytest.approx(0.9502, abs=1e-4)
    assert poisson_limit_recall(64) <= expected_recall(1 << 22, 41984, 656, 64)
    assert math.isclose(poisson_limit_recall(1), 1 - math.exp(-1), rel_tol=1e-12)
    assert packed_k_per_bucket(0.95) == 64 and poisson_limit_recall(63) < 0.95
    # An explicit k is kept exactly: k_per_bucket is a divisor of k.
    comp = GradientCompressor(SparsityConfig(k=640, min_numel=1))
    selection = comp.launch(torch.randn(1 << 16), "w", step=0).plan.selection
    assert selection.k == 640 and selection.buckets * selection.k_per_bucket == 640


def test_grad_shape_dtype_preserved():
    comp = GradientCompressor(SparsityConfig(density=0.1, min_numel=1))
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        grad = torch.randn(30, 40).to(dtype)
        update = comp.step(grad, str(dtype), step=0)
        assert update.shape == grad.shape and update.dtype == dtype
        assert comp.residual(str(dtype)).dtype == torch.promote_types(dtype, torch.float32)


def test_fused_residual_addition_matches_the_unfused_path(monkeypatch):
    # On CPU fp32 with a packed plan the kernel adds the gradient to the residual during
    # selection; the reference backend adds first. Same updates and residuals, bitwise.
    def run(backend: str) -> tuple[list[torch.Tensor], torch.Tensor]:
        monkeypatch.setenv("DISTK_TOPK_BACKEND", backend)
        comp = GradientCompressor(SparsityConfig(density=0.01, min_numel=1))
        gen = torch.Generator().manual_seed(0)
        updates = []
        for step in range(4):
            work = comp.launch(torch.randn(1 << 21, generator=gen), "w", step=step)
            assert work.plan.selection.packed
            updates.append(work.wait().clone())
        return updates, comp.residual("w")

    from distk.selection import cpu_kernel

    kernel = cpu_kernel.bucket_candidates_cpu
    fused_calls = []

    def spy(*args, **kwargs):
        fused_calls.append(len(args) > 7 and args[7] is not None)
        return kernel(*args, **kwargs)

    if cpu_kernel.load() is None:
        pytest.skip("no C++ compiler: the CPU kernel (and its fused addition) is not built")
    monkeypatch.setattr(cpu_kernel, "bucket_candidates_cpu", spy)
    fused_updates, fused_residual = run("cpu")
    assert sum(fused_calls) == 3, fused_calls  # steps 2-4 add their gradient in the kernel
    plain_updates, plain_residual = run("reference")
    for fused, plain in zip(fused_updates, plain_updates, strict=True):
        assert torch.equal(fused, plain)
    assert torch.equal(fused_residual, plain_residual)


def test_bf16_residuals_keep_the_mass_on_average_and_resume_bitwise():
    """residual_dtype="bfloat16": half the memory; each residual is rounded stochastically,
    so over many steps the rounding errors cancel instead of drifting one way."""
    cfg = SparsityConfig(density=0.01, min_numel=1, residual_dtype="bfloat16", method="exact")
    comp = GradientCompressor(cfg)
    gen = torch.Generator().manual_seed(0)
    # Small, persistent gradients: bf16's 8-bit mantissa would swallow them under
    # round-to-nearest once the residual is large; stochastic rounding keeps them.
    trend = torch.full((5000,), 1e-3)
    grads = [trend + 1e-4 * torch.randn(5000, generator=gen) for _ in range(60)]
    update_sum = torch.zeros(5000, dtype=torch.float64)
    for step, grad in enumerate(grads):
        update_sum += comp.step(grad, "w", step=step).double()
        assert comp.residual("w").dtype == torch.bfloat16
    total = sum(g.double() for g in grads)
    kept = update_sum + comp.residual("w").double()
    # Per coordinate the stochastic rounding errors (<= 2^-8 relative each step) add up
    # like a random walk: the mean over 5000 coordinates is within 1e-3 of the total's.
    assert abs((kept - total).mean().item()) < 1e-3 * total.abs().mean().item()
    # Rounding is a function of (step, position): a restored compressor continues bitwise.
    saved = comp.state_dict()
    again = GradientCompressor(cfg)
    again.load_state_dict(saved)
    grad = grads[0]
    assert torch.equal(comp.step(grad, "w", step=60), again.step(grad, "w", step=60))
    assert torch.equal(comp.residual("w"), again.residual("w"))
