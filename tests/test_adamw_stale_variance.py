"""benchmarks/adamw_stale_variance.py: AdamW with its second moment held after N steps.

Two real gloo ranks with different data: before the freeze the hook leaves AdamW alone
(bitwise the plain AdamW step); after it, every rank applies AdamW's first moment over a
held ``v`` (here without the per-tensor scale), the replicas stay equal, and AdamW's own
``exp_avg_sq`` is no longer touched.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from distributed import run_distributed
from script_module import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "adamw_stale_variance.py"


def _steps(rank: int, world: int, freeze_after: int) -> dict:
    stale = load_script(SCRIPT, "adamw_stale_variance")
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    reference = torch.nn.Linear(6, 3)
    reference.load_state_dict(model.state_dict())
    kwargs = dict(lr=0.01, betas=(0.9, 0.95), weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), **kwargs)
    plain = torch.optim.AdamW(reference.parameters(), **kwargs)
    stale.stale_variance(opt, after=freeze_after, scale=False)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    held, v_at_freeze, out = None, None, {}
    for step in range(1, 6):
        x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
        for m in (model, reference):
            m.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            for p in m.parameters():  # the "exchange": the ranks' mean gradient
                dist.all_reduce(p.grad)
                p.grad /= world
        if step == freeze_after + 1:
            state = opt.state[model.weight]
            held = (state["exp_avg_sq"] / (1 - 0.95 ** float(state["step"]))).clone()
            v_at_freeze = state["exp_avg_sq"].clone()
            before = model.weight.detach().clone()
            m_new = 0.9 * state["exp_avg"] + 0.1 * model.weight.grad
            expected = (before * (1 - 0.01 * 0.1)
                        - 0.01 / (1 - 0.9 ** step) * m_new / (held.sqrt() + 1e-8))
        opt.step()
        plain.step()
        if step <= freeze_after:
            out.setdefault("plain_equal", []).append(
                torch.equal(model.weight, reference.weight))
        if step == freeze_after + 1:
            out["frozen_step_error"] = float((model.weight - expected).abs().max())
            out["frozen_differs_from_plain"] = not torch.equal(model.weight, reference.weight)
    out["v_untouched"] = torch.equal(opt.state[model.weight]["exp_avg_sq"], v_at_freeze)
    out["weight"] = model.weight.detach().clone()
    return out


def test_plain_adamw_before_the_freeze_held_v_after_and_replicas_equal():
    results = run_distributed(_steps, 2, 2, timeout=90)
    for r in results:
        assert r["plain_equal"] == [True, True]
        assert r["frozen_step_error"] < 1e-6
        assert r["frozen_differs_from_plain"]
        assert r["v_untouched"]
    assert torch.equal(results[0]["weight"], results[1]["weight"])
