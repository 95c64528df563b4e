"""local_optimizer="adam" (Adam's moments tracked by sparse increments) and "adam_update".

Checks that the mechanisms act and follow docs/train.md ("Sparse training with AdamW"),
with real gloo processes where ranks matter: under "adam" only the increments of each
rank's Adam moments enter residuals and the exchange, the shared moments equal the
ranks' average moments minus the average residual, and the update is Adam's from them;
under "adam_update" each rank's Adam update goes through error feedback. A dense world
of one followed by momentum-free SGD is AdamW exactly; moments are checkpointed; the DDP
hook's dense bucket-rebuild iteration sends an Adam step too; distk-train's placement
rewrites AdamW only in sparse modes.
"""

from __future__ import annotations

import math

import pytest
import torch

from distk import GradientCompressor, SparsityConfig
from distk.local_adam import LocalAdam
from tests.distributed import run_distributed

NUMEL = 4096
STEPS = 5
BETAS = (0.9, 0.95)
EPS = 1e-8


def _grad(rank: int, step: int, numel: int = NUMEL) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 * step + rank)
    # Different scales per coordinate: raw top-k and Adam-normalised top-k then differ.
    scale = torch.logspace(-3, 1, numel, dtype=torch.float64)
    return torch.randn(numel, generator=gen, dtype=torch.float64) * scale


def _reference_adam_updates(rank: int, steps: int) -> list[torch.Tensor]:
    """Adam updates of this rank's gradients, written out from the formulas."""
    m = torch.zeros(NUMEL, dtype=torch.float64)
    v = torch.zeros(NUMEL, dtype=torch.float64)
    out = []
    for t in range(1, steps + 1):
        g = _grad(rank, t - 1)
        m = BETAS[0] * m + (1 - BETAS[0]) * g
        v = BETAS[1] * v + (1 - BETAS[1]) * g * g
        out.append((m / (1 - BETAS[0] ** t)) / ((v / (1 - BETAS[1] ** t)).sqrt() + EPS))
    return out


def _tracked_variance_scenario(rank: int, world: int) -> dict:
    import torch.distributed as dist

    cfg = SparsityConfig(density=0.01, method="bucketed", min_numel=1, local_optimizer="adam",
                         adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_eps=EPS)
    comp = GradientCompressor(cfg)
    inner_g, inner_v = comp._moments.inner, comp._moments.inner_v
    v = torch.zeros(NUMEL, dtype=torch.float64)
    shared_m = torch.zeros(NUMEL, dtype=torch.float64)
    before = torch.zeros(NUMEL, dtype=torch.float64)
    worst = {"sent": 0.0, "update": 0.0, "local_v": 0.0}
    for step in range(STEPS):
        g = _grad(rank, step)
        update = comp.step(g, "w")
        t = step + 1
        # 1. The gradient goes through ordinary error feedback: the averaged exchange is
        #    what the ranks took out of their residual (raw gradient units).
        after = inner_g.residual(("w", "g"))
        sent = g + before - after
        before = after
        delivered = sent.clone()
        dist.all_reduce(delivered)
        delivered /= world
        shared_m = BETAS[0] * shared_m + (1 - BETAS[0]) * delivered
        # 2. The second moment is of the local gradient, never of the exchanged one.
        v = BETAS[1] * v + (1 - BETAS[1]) * g * g
        local_v = comp._moments.adam.state_dict()["exp_avg_sq"]["w"]
        worst["local_v"] = max(worst["local_v"], float((local_v - v).abs().max()))
        # 3. Shared log-variance = mean over ranks of (local log v_hat - its residual).
        tracked = (v / (1 - BETAS[1] ** t)).log() - inner_v.residual(("w", "logv"))
        dist.all_reduce(tracked)
        m_hat = shared_m / (1 - BETAS[0] ** t)
        v_hat = torch.maximum((tracked / world).exp(), m_hat ** 2)
        expected = m_hat / (v_hat.sqrt() + EPS)
        worst["update"] = max(worst["update"], float((update - expected).abs().max()))
        worst["sent"] = max(worst["sent"], int((sent.abs() > 1e-12).sum()) / NUMEL)
    gathered = [None] * world
    dist.all_gather_object(gathered, update)
    return {"worst": worst, "same": all(torch.equal(x, update) for x in gathered),
            "keys": (set(inner_g.state_dict()["residuals"]),
                     set(inner_v.state_dict()["residuals"])),
            "moved": float((update != 0).float().mean())}


def test_adam_exchanges_gradient_and_keeps_bursts_out_of_the_second_moment():
    results = run_distributed(_tracked_variance_scenario, 2, timeout=120)
    for result in results:
        worst = result["worst"]
        assert worst["local_v"] < 1e-12
        assert worst["update"] < 1e-6    # rounding, amplified where m_hat is near 0
        assert worst["sent"] <= 0.02     # the gradient is sent sparse (~1%)
        assert result["keys"] == ({("w", "g")}, {("w", "logv")})
        assert result["same"]            # every rank applies the same update
        # The optimizer's momentum keeps sent entries moving: more entries move at the
        # last step than two ranks' selections of one step (~1.6% each) can reach.
        assert result["moved"] > 0.04


def _moments_scenario(rank: int, world: int) -> dict:
    import torch.distributed as dist

    cfg = SparsityConfig(density=0.01, method="bucketed", min_numel=1,
                         local_optimizer="adam_moments",
                         adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_eps=EPS)
    comp = GradientCompressor(cfg)
    m = torch.zeros(NUMEL, dtype=torch.float64)
    v = torch.zeros(NUMEL, dtype=torch.float64)
    worst, sparse_ok = 0.0, True
    for step in range(STEPS):
        g = _grad(rank, step)
        update = comp.step(g, "w")
        t = step + 1
        m = BETAS[0] * m + (1 - BETAS[0]) * g
        v = BETAS[1] * v + (1 - BETAS[1]) * g * g
        # Shared estimates = average moments minus average residual (EF21 bookkeeping).
        shared = []
        for moment, name in ((m, "m"), (v, "v")):
            tracked = moment - comp._moments.inner.residual(("w", name))
            dist.all_reduce(tracked)
            shared.append(tracked / world)
        m_hat = shared[0] / (1 - BETAS[0] ** t)
        v_hat = torch.maximum(shared[1] / (1 - BETAS[1] ** t), m_hat ** 2)
        worst = max(worst, float((update - m_hat / (v_hat.sqrt() + EPS)).abs().max()))
        sparse_ok &= comp.stats["k"] <= 2 * 64 * math.ceil(0.01 * NUMEL / 64) + 2
    # Only the moments' increments have residuals: the raw gradient never enters one.
    keys = set(comp.state_dict()["local_adam"]["inner"]["residuals"])
    gathered = [None] * world
    dist.all_gather_object(gathered, update)
    return {"worst": worst, "sparse": sparse_ok, "keys": keys, "residual_keys": set(
        comp.state_dict()["residuals"]), "same": all(torch.equal(x, update) for x in gathered),
        "moved": float((update != 0).float().mean())}


def test_adam_moments_exchange_tracks_average_adam_moments():
    results = run_distributed(_moments_scenario, 2, timeout=120)
    for result in results:
        assert result["worst"] < 1e-5  # rounding, amplified where V is near 0
        assert result["sparse"]
        assert result["keys"] == {("w", "m"), ("w", "v")}
        assert result["residual_keys"] == set()
        assert result["same"]                 # every rank applies the same update
        # Entries keep moving after they were sent once: more than one step's union of
        # selections (2 ranks x ~1.6% per moment) moves at the last step.
        assert result["moved"] > 0.04


def _exchange_scenario(rank: int, world: int) -> dict:
    import torch.distributed as dist

    cfg = SparsityConfig(density=0.01, method="exact", min_numel=1,
                         local_optimizer="adam_update",
                         adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_eps=EPS)
    comp = GradientCompressor(cfg)
    reference = _reference_adam_updates(rank, STEPS)
    ok_sent, ok_selected = True, True
    total_update = torch.zeros(NUMEL, dtype=torch.float64)
    before = torch.zeros(NUMEL, dtype=torch.float64)
    for step in range(STEPS):
        update = comp.step(_grad(rank, step), "w")
        total_update += update
        after = comp.residual("w")
        sent = before + reference[step] - after  # what this rank put on the wire
        summed = sent.clone()
        dist.all_reduce(summed)
        ok_sent &= torch.allclose(update, summed / world, rtol=1e-10, atol=1e-12)
        # The k entries sent are the largest of |residual + Adam update| (exact method;
        # step 1's updates are all about +-1, so compare magnitudes, not positions).
        acc = (before + reference[step]).abs()
        kth = torch.topk(acc, comp.stats["k"]).values[-1]
        chosen = sent.abs() > 1e-9  # unsent entries: 0 up to rounding of the reference
        ok_selected &= int(chosen.sum()) == comp.stats["k"]
        ok_selected &= bool((acc[chosen] >= kth - 1e-9).all())
        before = after
    # Conservation in Adam units: world * sum(updates) + sum(residuals) == sum(Adam updates).
    # (The updates are the same on every rank; residuals and Adam updates are per rank.)
    residuals = before.clone()
    rhs = torch.stack(reference).sum(0)
    dist.all_reduce(residuals)
    dist.all_reduce(rhs)
    lhs = world * total_update + residuals
    return {"sent": ok_sent, "selected": ok_selected,
            "conservation": float((lhs - rhs).abs().max())}


def test_adam_update_exchange_carries_local_adam_updates_with_error_feedback():
    results = run_distributed(_exchange_scenario, 2, timeout=120)
    for result in results:
        assert result["sent"]
        assert result["selected"]
        assert result["conservation"] < 1e-9


def test_dense_world_of_one_plus_sgd_is_adamw():
    """Dense exchange + momentum-free SGD (lr, weight_decay) reproduces torch's AdamW."""
    torch.manual_seed(0)
    init = torch.randn(300, dtype=torch.float64)
    lr, wd = 0.01, 0.1
    p_ref = init.clone().requires_grad_(True)
    p_new = init.clone().requires_grad_(True)
    adamw = torch.optim.AdamW([p_ref], lr=lr, betas=BETAS, eps=EPS, weight_decay=wd)
    sgd = torch.optim.SGD([p_new], lr=lr, momentum=0.0, weight_decay=wd)
    comp = GradientCompressor(SparsityConfig(method="dense", local_optimizer="adam",
                                             adam_beta1=BETAS[0], adam_beta2=BETAS[1],
                                             adam_eps=EPS))
    target = torch.linspace(-2, 2, 300, dtype=torch.float64)
    for _ in range(20):
        for p in (p_ref, p_new):
            p.grad = None
            ((p - target) ** 4).sum().backward()
        adamw.step()
        p_new.grad = comp.step(p_new.grad, "p")
        sgd.step()
    torch.testing.assert_close(p_new, p_ref, rtol=1e-12, atol=1e-12)


def test_moments_are_checkpointed():
    cfg = SparsityConfig(density=0.05, min_numel=1, local_optimizer="adam")
    first = GradientCompressor(cfg)
    for step in range(3):
        first.step(_grad(0, step).float(), "w")
    state = first.state_dict()
    assert set(state["local_adam"]["moments"]["exp_avg"]) == {"w"}
    second = GradientCompressor(cfg)
    second.load_state_dict(state)
    torch.testing.assert_close(second.step(_grad(0, 3).float(), "w"),
                               first.step(_grad(0, 3).float(), "w"), rtol=0, atol=0)


def test_skip_keeps_moments_of_a_dropped_step():
    adam = LocalAdam(0.9, 0.95, 1e-8)
    update, token = adam.update(torch.ones(4), "w", torch.float32, commit=False)
    assert token is not None and adam.state_dict()["steps"] == {}
    adam.commit(token)
    assert adam.state_dict()["steps"] == {"w": 1}
    torch.testing.assert_close(update, torch.ones(4))


@pytest.mark.parametrize("changes, key", [
    ({"local_optimizer": "lamb"}, "local_optimizer"),
    ({"adam_beta1": 1.0}, "adam_beta1"),
    ({"adam_beta2": -0.1}, "adam_beta2"),
    ({"adam_eps": 0}, "adam_eps"),
    ({"local_optimizer": "adam", "momentum": 0.9}, "momentum"),
    ({"local_optimizer": "adam_update", "momentum": 0.5}, "momentum"),
])
def test_config_validation(changes, key):
    with pytest.raises(ValueError, match=rf"SparsityConfig\.{key} must be"):
        SparsityConfig(**changes)


def _ddp_rebuild_scenario(rank: int, world: int) -> list[torch.Tensor]:
    from torch.nn.parallel import DistributedDataParallel

    import distk

    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32, bias=False)
    ddp = DistributedDataParallel(model)
    distk.ddp.enable(ddp, SparsityConfig(density=0.1, local_optimizer="adam", min_numel=1))
    grads = []
    for step in range(2):
        gen = torch.Generator().manual_seed(10 * step + rank)
        ddp(torch.randn(8, 64, generator=gen)).square().sum().backward()
        grads.append(model.weight.grad.detach().clone())
        model.weight.grad = None
    return grads


def test_ddp_rebuild_iteration_sends_adam_first_step():
    ranks = run_distributed(_ddp_rebuild_scenario, 2, timeout=120)
    first = ranks[0][0]
    torch.testing.assert_close(first, ranks[1][0])
    # Each rank sent g / (|g| + eps), about +-1: the average is in {-1, 0, 1}.
    assert torch.allclose(first.abs().round(), first.abs(), atol=1e-3)
    assert (first.abs() > 0.99).float().mean() > 0.5
    # The next step goes through the compressor: the same Adam update on both ranks.
    torch.testing.assert_close(ranks[0][1], ranks[1][1], rtol=0, atol=0)
    assert 0 < float(ranks[0][1].abs().max()) <= 1


def test_train_placement_moves_adam_into_the_compressor():
    from distk.train.config import load_config
    from distk.train.placement import local_adam_placement

    adamw = ["train.optimizer=adamw", "train.lr=0.003", "train.weight_decay=0.1"]
    for mode in ("exact", "bucketed"):
        cfg = local_adam_placement(load_config(None, [*adamw, f"sparsity.method={mode}"]))
        assert cfg.sparsity.local_optimizer == "adam"
        assert (cfg.sparsity.adam_beta1, cfg.sparsity.adam_beta2) == (0.9, 0.95)
        assert cfg.train.optimizer == "sgd" and cfg.train.beta1 == 0.0
        assert cfg.train.lr == 0.003 and cfg.train.weight_decay == 0.1
        assert cfg.train.grad_clip == 0.0 and cfg.sparsity.clip_norm == 1.0
    for overrides in ([*adamw, "sparsity.method=dense"],           # dense keeps AdamW
                      [*adamw, "train.local_adam=false"],          # opt-out
                      ["sparsity.method=bucketed"]):               # SGD untouched
        cfg = load_config(None, overrides)
        assert local_adam_placement(cfg) == cfg
