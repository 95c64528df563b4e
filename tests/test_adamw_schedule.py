"""AdamW's sparse schedule (docs/train.md, "Sparse training with AdamW").

Sparse modes under AdamW get at least ``train.adamw_dense_steps`` dense steps, a
``train.adamw_warmup_steps`` density warm-up and bf16 values on the wire
(``sparsity.adam_value_dtype``); SGD and the dense mode are untouched. The
distributed test trains through the real DDP hook on 2 gloo processes and reads the
density each step actually exchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from distributed import run_distributed

from distk.train.config import load_config
from distk.train.placement import adamw_block_schedule, adamw_schedule

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.json"
ADAMW = ["train.optimizer=adamw", "train.lr=0.003", "train.weight_decay=0.1"]


def test_adamw_sparse_modes_get_the_schedule_and_nothing_else_does():
    for mode in ("exact", "bucketed"):
        cfg = load_config(None, [*ADAMW, f"sparsity.method={mode}"])
        scheduled = adamw_schedule(cfg)
        got = scheduled.sparsity
        assert (got.dense_steps, got.warmup_steps, got.value_dtype) == (75, 200, "bfloat16")
        # Only those three fields change; the optimizer stays AdamW.
        assert got.replace(dense_steps=cfg.sparsity.dense_steps,
                           warmup_steps=cfg.sparsity.warmup_steps,
                           value_dtype=cfg.sparsity.value_dtype) == cfg.sparsity
        assert scheduled.train == cfg.train
    # Larger user values are kept; 0 turns the rule off.
    cfg = load_config(None, [*ADAMW, "sparsity.dense_steps=80", "sparsity.warmup_steps=260"])
    assert (adamw_schedule(cfg).sparsity.dense_steps,
            adamw_schedule(cfg).sparsity.warmup_steps) == (80, 260)
    for overrides in ([*ADAMW, "sparsity.method=dense"],
                      [*ADAMW, "train.adamw_dense_steps=0", "train.adamw_warmup_steps=0"],
                      ["sparsity.method=bucketed"]):            # SGD: the default config
        cfg = load_config(None, overrides)
        assert adamw_schedule(cfg).sparsity.dense_steps == cfg.sparsity.dense_steps
        assert adamw_schedule(cfg).sparsity.warmup_steps == cfg.sparsity.warmup_steps
    # The wire dtype has its own switch; a user's codec or dtype is kept.
    for overrides, wire in ((["sparsity.adam_value_dtype=null"], "auto"),
                            (["sparsity.value_dtype=\"float32\""], "float32"),
                            (["sparsity.value_bits=2"], "auto")):
        cfg = load_config(None, [*ADAMW, *overrides])
        assert adamw_schedule(cfg).sparsity.value_dtype == wire, overrides
        assert adamw_schedule(cfg).sparsity.dense_steps == 75


def test_deepspeed_block_gets_the_schedule():
    from distk.config import SparsityConfig

    cfg = load_config(None, ADAMW)
    block = adamw_block_schedule(cfg, SparsityConfig(density=0.01))
    assert (block.dense_steps, block.warmup_steps, block.value_dtype) == (75, 200, "bfloat16")
    assert adamw_block_schedule(cfg, None) is None
    sgd = load_config(None, [])
    assert adamw_block_schedule(sgd, SparsityConfig()) == SparsityConfig()


@pytest.mark.parametrize("key", ["train.adamw_dense_steps", "train.adamw_warmup_steps"])
def test_bad_values_name_key_value_and_allowed(key):
    with pytest.raises(ValueError, match=rf"{key}=-1 is invalid: allowed an int >= 0"):
        load_config(None, [f"{key}=-1"])


def _train_worker(rank: int, world: int, root: str) -> None:
    from distk.train.loop import train

    # Local masks: every rank sends exactly the scheduled k (a union of shared proposals
    # may hold fewer), so the density read back is the schedule's. Both runs in one
    # process group (starting processes costs more than these 9 steps).
    for optimizer in ("adamw", "sgd"):
        overrides = [f"run_root={json.dumps(root)}", "train.steps=9", "logging.log_every=1",
                     "sparsity.method=bucketed", "sparsity.mask=local",
                     "train.adamw_dense_steps=3",
                     "train.adamw_warmup_steps=4", f"train.optimizer={optimizer}"]
        train(load_config(TINY, overrides), Path(root) / optimizer)


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_adamw_run_exchanges_dense_then_warms_up_through_the_ddp_hook(tmp_path: Path):
    run_distributed(_train_worker, 2, str(tmp_path), timeout=200)
    density = {}
    for optimizer in ("adamw", "sgd"):
        rows = [json.loads(line) for line in (tmp_path / optimizer / "metrics.jsonl").open()]
        density[optimizer] = [r["distk/density"] for r in rows if "distk/density" in r]
    tiny = load_config(TINY, [])
    target, start = tiny.sparsity.density, tiny.sparsity.warmup_density
    # AdamW: 3 dense steps, then the density decays from warmup_density over 4 steps.
    adamw = density["adamw"]
    assert adamw[:3] == [1.0, 1.0, 1.0]
    expected = [start * (target / start) ** (t / 4) for t in range(4)] + [target, target]
    for got, want in zip(adamw[3:], expected, strict=True):
        assert math.isclose(got, want, rel_tol=0.15), (adamw, expected)
    # SGD (tiny.json's own schedule: warmup_steps 0): only DDP's bucket-rebuild step is
    # dense, then the target density straight away.
    sgd = density["sgd"]
    assert sgd[0] == 1.0 and all(math.isclose(d, target, rel_tol=0.15) for d in sgd[1:]), sgd


# -- the same schedule outside distk-train: SparsityConfig.adam_* and the integrations ------

def test_for_optimizer_raises_the_schedule_for_adam_family_only():
    import torch

    from distk.config import SparsityConfig, is_adam_family

    params = [torch.nn.Parameter(torch.zeros(2))]
    adamw, sgd = torch.optim.AdamW(params), torch.optim.SGD(params, lr=0.1)

    class Outer:  # Accelerate's AcceleratedOptimizer keeps .optimizer
        def __init__(self, inner):
            self.optimizer = inner

    class Lightning:  # Lightning's LightningOptimizer keeps ._optimizer
        def __init__(self, inner):
            self._optimizer = inner

    assert is_adam_family(adamw) and is_adam_family(torch.optim.Adam(params))
    assert is_adam_family(Outer(Lightning(adamw))) and is_adam_family("adamw")
    assert not is_adam_family(sgd) and not is_adam_family(Outer(sgd))
    assert not is_adam_family("sgd") and not is_adam_family(None)

    cfg = SparsityConfig(density=0.01)
    got = cfg.for_optimizer(Outer(adamw))
    assert (got.dense_steps, got.warmup_steps, got.value_dtype) == (75, 200, "bfloat16")
    # nothing else changes
    assert got.replace(dense_steps=0, warmup_steps=0, value_dtype="auto") == cfg
    assert got.for_optimizer(adamw) is got  # applying it twice changes nothing more
    assert cfg.for_optimizer(sgd) is cfg and cfg.for_optimizer(None) is cfg
    dense = SparsityConfig(method="dense")
    assert dense.for_optimizer(adamw) is dense
    off = SparsityConfig(adam_dense_steps=0, adam_warmup_steps=0, adam_value_dtype=None)
    assert off.for_optimizer(adamw) is off
    larger = SparsityConfig(dense_steps=80, warmup_steps=10).for_optimizer(adamw)
    assert (larger.dense_steps, larger.warmup_steps) == (80, 200)  # user values kept if larger
    # a wire the user chose (a dtype or the compact codec) is kept
    assert SparsityConfig(value_dtype="float16").for_optimizer(adamw).value_dtype == "float16"
    assert SparsityConfig(value_bits=4).for_optimizer(adamw).value_dtype == "auto"
    assert SparsityConfig(adam_value_dtype="float16").for_optimizer(adamw).value_dtype == "float16"
    for key in ("adam_dense_steps", "adam_warmup_steps"):
        with pytest.raises(ValueError, match=rf"SparsityConfig.{key} must be an integer >= 0, "
                                             r"got -1"):
            SparsityConfig(**{key: -1})
    with pytest.raises(ValueError, match=r"SparsityConfig.adam_value_dtype must be None or one "
                                         r"of .*'bfloat16'.*, got 'bf16'"):
        SparsityConfig(adam_value_dtype="bf16")


def _ddp_schedule_worker(rank: int, world: int) -> dict:
    import contextlib
    import io

    import torch
    from torch.nn.parallel import DistributedDataParallel

    import distk

    cfg = {"density": 0.05, "min_numel": 16, "adam_dense_steps": 2, "adam_warmup_steps": 0}
    out: dict = {}
    for name, make in (("adamw", lambda p: torch.optim.AdamW(p, lr=1e-3)),
                       ("sgd", lambda p: torch.optim.SGD(p, lr=0.01))):
        torch.manual_seed(0)
        model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(32, 32),
                                                            torch.nn.Linear(32, 4)))
        optimizer = make(model.parameters())
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            state = distk.ddp.enable(model, cfg, optimizer=optimizer)
        densities = []
        for step in range(4):
            torch.manual_seed(100 * rank + step)
            model(torch.randn(8, 32)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            densities.append(state.stats.density)
        out[name] = {"said": stderr.getvalue(), "densities": densities,
                     "schedule": (state.cfg.dense_steps, state.cfg.warmup_steps,
                                  state.cfg.value_dtype)}
    return out


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_ddp_enable_applies_the_adam_schedule_for_the_given_optimizer():
    results = run_distributed(_ddp_schedule_worker, 2, timeout=150)
    for rank, result in enumerate(results):
        adamw, sgd = result["adamw"], result["sgd"]
        assert adamw["schedule"] == (2, 0, "bfloat16") and sgd["schedule"] == (0, 0, "auto")
        # AdamW: 2 dense steps, then sparse; SGD: only DDP's bucket-rebuild step is dense.
        assert adamw["densities"][:2] == [1.0, 1.0], adamw
        assert all(d < 0.5 for d in adamw["densities"][2:]), adamw
        assert sgd["densities"][0] == 1.0 and all(d < 0.5 for d in sgd["densities"][1:]), sgd
        # rank 0 announces the change, once; nothing for SGD or on rank 1
        if rank == 0:
            assert "AdamW) is Adam-family, so dense_steps 0 -> 2" in adamw["said"], adamw
            assert "value_dtype auto -> bfloat16" in adamw["said"], adamw
        else:
            assert adamw["said"] == "", adamw
        assert sgd["said"] == "", sgd


def test_job_amounts_travel_in_the_block_so_deepspeed_does_not_reapply_defaults():
    # train.adamw_*=0 turns the schedule off; the block must say so too, or
    # distk.deepspeed.enable (which sees the engine's AdamW) would apply 75 / 200.
    from distk.config import SparsityConfig

    off = load_config(None, [*ADAMW, "train.adamw_dense_steps=0", "train.adamw_warmup_steps=0"])
    block = adamw_block_schedule(off, SparsityConfig(density=0.01))
    assert block.for_optimizer("adamw") is block
    assert (block.dense_steps, block.warmup_steps) == (0, 0)
    short = load_config(None, [*ADAMW, "train.adamw_dense_steps=3", "train.adamw_warmup_steps=4"])
    block = adamw_block_schedule(short, SparsityConfig(density=0.01))
    assert (block.dense_steps, block.warmup_steps) == (3, 4)
    assert block.for_optimizer("adamw") is block


@pytest.mark.parametrize("density", [0.25, 0.5, 1.0])
def test_adam_schedule_never_makes_a_valid_config_invalid(density):
    """A density at or above warmup_density gets no warm-up (the warm-up decays towards
    the density), density 1.0 gets nothing; the result validates."""
    from distk.config import SparsityConfig

    cfg = SparsityConfig(density=density)
    scheduled = cfg.for_optimizer("adamw")
    assert SparsityConfig.from_dict(scheduled.to_dict()) == scheduled  # still valid
    assert scheduled.warmup_steps == 0
    if density == 1.0:
        assert scheduled is cfg
    else:
        assert (scheduled.dense_steps, scheduled.value_dtype) == (75, "bfloat16")
    # Below warmup_density the warm-up still applies.
    assert SparsityConfig(density=0.2).for_optimizer("adamw").warmup_steps == 200


def test_adam_schedule_announces_a_skipped_warmup(capsys):
    from distk.integrations.state import schedule_for_optimizer

    scheduled = schedule_for_optimizer({"density": 0.5}, "adamw", "distk.ddp.enable")
    said = capsys.readouterr().err
    assert scheduled.warmup_steps == 0 and scheduled.dense_steps == 75
    assert "dense_steps 0 -> 75" in said and "no density warm-up (density 0.5" in said
    assert ("distk.ddp.enable(ddp_model, SparsityConfig.adamw_outer(), optimizer=optimizer)"
            in said and "a sync every 5 steps, the first 50 steps dense in bfloat16" in said)
    assert "distk.outer.enable(model, optimizer, SparsityConfig.adamw_outer())" in said
    # The configuration it recommends: SparseLoCo's recipe at ADAMW_OUTER, bf16 dense
    # syncs, then the codec; distk.outer counts dense_steps in syncs (10 syncs of 5 steps).
    import torch

    from distk.config import ADAMW_OUTER, SparsityConfig
    recommended = SparsityConfig.adamw_outer()
    assert recommended == SparsityConfig.sparseloco(**ADAMW_OUTER)
    assert (recommended.sync_every, recommended.dense_steps, recommended.value_bits) == (5, 10, 2)
    assert recommended.wire_dtype_for(torch.float32, whole=True, dense=True) == torch.bfloat16
    assert SparsityConfig.adamw_outer(sync_every=8).sync_every == 8


def test_adam_schedule_leaves_outer_synchronisation_alone():
    """dense_steps counts syncs under outer synchronisation: the per-step schedule (75
    dense steps, a 200-step warm-up) must not turn into 75 dense syncs."""
    from distk.config import SparsityConfig

    cfg = SparsityConfig(sync_every=8, density=0.01)
    assert cfg.for_optimizer("adamw") is cfg
    assert SparsityConfig.adamw_outer().for_optimizer("adamw") == SparsityConfig.adamw_outer()
