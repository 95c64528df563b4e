"""distk.deepspeed: the "distk" block of a DeepSpeed config, on 2 real gloo ranks (CPU).

Each fixture starts one 2-rank job (spawned processes; DeepSpeed's first
``deepspeed.initialize`` in a process costs ~10-15 s here, plus a one-off ~60 s JIT build
of DeepSpeed's shm op per machine, cached in ~/.cache/torch_extensions) and several tests
read its results, so the whole file needs five spawns:

- ``parity``: density 1.0 reproduces plain DeepSpeed for ZeRO 0, 1 and 2 (fp32; ZeRO 1
  and 2 with several gradient buckets, so that exchanges are in flight during backward);
  a config without the block is passed through untouched; the config may come as a path;
- ``overlap``: asynchronous exchanges (the default) give bitwise the results of waiting
  for every bucket where it is launched, under every ZeRO seam, and a bucket is in
  flight while backward computes the next one;
- ``sparse``: at 5 % density the loss falls for ZeRO 0/1/2 in fp32 and bf16 (including
  DeepSpeed's BF16_Optimizer path), the seams are hit, clipping acts on the exchanged
  gradient, stats reach DeepSpeed's csv monitor, a checkpoint restores the residuals;
- ``refusals``: bad blocks and unsupported setups fail on every rank before any collective.
"""

from __future__ import annotations

import json
import os
import time

import pytest

pytest.importorskip("deepspeed")

from distributed import run_distributed  # noqa: E402

pytestmark = pytest.mark.distributed

IN_FEATURES, HIDDEN, OUT_FEATURES = 32, 64, 8
MICRO_BATCH = 8


# -- helpers run inside the ranks -----------------------------------------------------------

def _model(seed: int = 0):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(IN_FEATURES, HIDDEN), torch.nn.Tanh(),
        torch.nn.Linear(HIDDEN, OUT_FEATURES),
    )


def _ds_config(stage: int, block: dict | None = None, *, bf16: bool = False,
               fp32_accumulation: bool = False, gas: int = 1, clip: float = 0.0,
               optimizer: str = "SGD", lr: float = 0.05, extra: dict | None = None) -> dict:
    params: dict = {"lr": lr}
    if optimizer == "AdamW":
        params["torch_adam"] = True
    config: dict = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": clip,
        "optimizer": {"type": optimizer, "params": params},
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if bf16:
        config["bf16"] = {"enabled": True}
    if fp32_accumulation:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if block is not None:
        config["distk"] = block
    config.update(extra or {})
    return config


def _teacher_batches(rank: int, count: int):
    """Fixed regression batches, different on every rank (so averaging matters)."""
    import torch

    teacher = torch.Generator().manual_seed(1234)
    w1 = torch.randn(IN_FEATURES, HIDDEN, generator=teacher) / IN_FEATURES**0.5
    w2 = torch.randn(HIDDEN, OUT_FEATURES, generator=teacher) / HIDDEN**0.5
    data = torch.Generator().manual_seed(100 + rank)
    batches = []
    for _ in range(count):
        x = torch.randn(MICRO_BATCH, IN_FEATURES, generator=data)
        batches.append((x, torch.tanh(x @ w1) @ w2))
    return batches


def _train(engine, batches, dtype) -> list[float]:
    losses = []
    for x, y in batches:
        loss = (engine(x.to(dtype)).float() - y).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _params(engine):
    return [p.detach().float().clone() for p in engine.module.parameters()]


# -- parity at density 1.0 ----------------------------------------------------------------

# Several buckets under ZeRO 1/2 (the model's parameters hold 8, 512, 64 and 2048
# entries): the first bucket is launched when the 2048-entry weight arrives, which then
# goes alone, as DeepSpeed's "extra large" parameter. ZeRO 1 reduces from its gradient
# hooks only with overlap_comm.
SMALL_BUCKETS = 600
PARITY_ZERO = {0: {"stage": 0},
               1: {"stage": 1, "overlap_comm": True, "reduce_bucket_size": SMALL_BUCKETS},
               2: {"stage": 2, "reduce_bucket_size": SMALL_BUCKETS}}


def _parity_worker(rank: int, world_size: int, tmp: str) -> dict:
    import argparse

    import deepspeed
    import torch

    import distk

    gas, steps = 2, 3
    batches = _teacher_batches(rank, gas * steps)
    block = {"density": 1.0, "method": "exact", "min_numel": 1}
    results: dict = {}
    for stage in (0, 1, 2):
        common = dict(gas=gas, clip=0.5, optimizer="SGD", lr=0.05,
                      extra={"zero_optimization": PARITY_ZERO[stage]})
        model = _model()
        plain, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                         config=_ds_config(stage, **common))
        plain_losses = _train(plain, batches, torch.float32)

        model = _model()
        path = os.path.join(tmp, f"stage{stage}.json")
        if rank == 0:
            with open(path, "w") as handle:
                json.dump(_ds_config(stage, block, **common), handle)
        torch.distributed.barrier()
        if stage == 1:  # the config may also arrive as args.deepspeed_config
            args = argparse.Namespace(deepspeed_config=path, local_rank=rank)
            engine, *_ = distk.deepspeed.initialize(args=args, model=model,
                                                    model_parameters=model.parameters())
            assert args.deepspeed_config == path, "the caller's args must stay unchanged"
        else:
            engine, *_ = distk.deepspeed.initialize(model=model, config=path,
                                                    model_parameters=model.parameters())
        state = distk.deepspeed.get_state(engine)
        losses = _train(engine, batches, torch.float32)
        diffs = [(a - b).abs().max().item() for a, b in zip(_params(plain), _params(engine))]
        results[stage] = {
            "max_abs_diff": max(diffs),
            "loss_diff": max(abs(a - b) for a, b in zip(plain_losses, losses)),
            "seam": state.seam,
            # Buffers the shared compressor exchanged in the run, and in the last step.
            "calls": state.totals.buffers,
            "buffers": state.stats.buffers,
            "iterations": state.iteration,
            "n_params": len(list(engine.module.parameters())),
        }

    # No block: deepspeed.initialize's result, untouched.
    model = _model()
    engine, *_ = distk.deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                            config=_ds_config(0))
    results["passthrough"] = {
        "state": distk.deepspeed.get_state(engine) is None,
        "untouched": not any(name in engine.__dict__ for name in (
            "step", "buffered_allreduce_fallback", "save_checkpoint", "load_checkpoint")),
    }
    return results


@pytest.fixture(scope="module")
def parity(tmp_path_factory) -> list[dict]:
    tmp = str(tmp_path_factory.mktemp("ds_parity"))
    return run_distributed(_parity_worker, 2, tmp, timeout=420)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_density_one_matches_plain_deepspeed(parity, stage):
    # Density 1.0 with exact selection sends every entry, so distk's average is DeepSpeed's
    # all-reduce average of the same gradients (SGD, clipping 0.5, 2 accumulation steps,
    # 3 optimizer steps). With 2 ranks the sum of two floats is order-independent and
    # halving is exact, so we expect bitwise equality; the tolerance only allows a future
    # exchange scheme to sum in another order (a few ulps of parameters of size ~0.1-1).
    for rank_result in parity:
        result = rank_result[stage]
        assert result["max_abs_diff"] <= 1e-6, result
        assert result["loss_diff"] <= 1e-6, result


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_seam_is_hit(parity, stage):
    # Fails when DeepSpeed stops calling the method distk replaces: then distk's compressor
    # exchanges no buffer (or not one per parameter per exchange), as its totals count.
    for rank_result in parity:
        result = rank_result[stage]
        assert result["seam"] == ("engine" if stage == 0 else "zero")
        # One step per optimizer step (3) under every stage. ZeRO 0/1 exchange each
        # gradient once per step, ZeRO 2 once per micro-batch (2 per step).
        per_step = 2 if stage == 2 else 1
        assert result["iterations"] == 3, result
        assert result["calls"] == 3 * per_step * result["n_params"], result
        assert result["buffers"] == per_step * result["n_params"], result


def test_no_block_is_plain_deepspeed(parity):
    for rank_result in parity:
        assert rank_result["passthrough"] == {"state": True, "untouched": True}


# -- asynchronous exchange ------------------------------------------------------------------

OVERLAP_CASES = {
    # name: (stage, zero_optimization, bf16, fp32 gradient accumulation)
    "zero0": (0, {"stage": 0}, False, False),
    "zero1-overlap_comm": (1, PARITY_ZERO[1], False, False),
    "zero2": (2, PARITY_ZERO[2], False, False),
    "zero2-noncontiguous": (2, {**PARITY_ZERO[2], "contiguous_gradients": False}, False, False),
    "zero2-bf16-fp32acc": (2, PARITY_ZERO[2], True, True),  # DeepSpeed's fp32 partitions
}
# recall_interval 0: no recall measurement, whose bytes count as sent (under a shared mask,
# the default, it is a sampled all-reduce that on these small weights outweighs a dense
# all-reduce: measured 35 % of dense bytes over the 4 steps with it, under 20 % without).
OVERLAP_BLOCK = {"density": 0.05, "method": "exact", "min_numel": 256, "recall_interval": 0}


def _overlap_worker(rank: int, world_size: int) -> dict:
    import torch

    import distk

    results: dict = {}
    batches = _teacher_batches(rank, 8)
    for name, (stage, zero, bf16, fp32_acc) in OVERLAP_CASES.items():
        runs = {}
        for overlap in (True, False):
            model = _model()
            engine, *_ = distk.deepspeed.initialize(
                model=model, model_parameters=model.parameters(),
                config=_ds_config(stage, OVERLAP_BLOCK, bf16=bf16, fp32_accumulation=fp32_acc,
                                  gas=2, clip=1.0, extra={"zero_optimization": zero}))
            state = distk.deepspeed.get_state(engine)
            state.overlap = overlap
            # The first layer's weight is the last gradient backward computes: when it
            # arrives (after DeepSpeed's own hook has handled it), the bucket before it
            # has been launched.
            in_backward: list[int] = []
            engine.module[0].weight.register_post_accumulate_grad_hook(
                lambda _, seen=in_backward, state=state: seen.append(state.buckets_in_flight))
            after_backward = []
            dtype = torch.bfloat16 if bf16 else torch.float32
            losses = []
            for x, y in batches:
                loss = (engine(x.to(dtype)).float() - y).pow(2).mean()
                engine.backward(loss)
                after_backward.append(state.buckets_in_flight)
                engine.step()
                losses.append(loss.item())
            runs[overlap] = {
                "params": _params(engine), "losses": losses,
                "in_backward": max(in_backward), "after_backward": max(after_backward),
                "bytes_sent": state.totals.bytes_sent, "dense_bytes": state.totals.dense_bytes,
                "iterations": state.iteration,
            }
        results[name] = {
            "same_params": all(torch.equal(a, b) for a, b in
                               zip(runs[True]["params"], runs[False]["params"])),
            **{f"{key}_{mode}": run[key] for mode, run in (("async", runs[True]),
                                                            ("sync", runs[False]))
               for key in ("losses", "in_backward", "after_backward", "bytes_sent",
                           "dense_bytes", "iterations")},
        }
    return results


@pytest.fixture(scope="module")
def overlap() -> list[dict]:
    return run_distributed(_overlap_worker, 2, timeout=420)


@pytest.mark.parametrize("case", list(OVERLAP_CASES))
def test_asynchronous_exchange_equals_synchronous(overlap, case):
    for rank_result in overlap:
        result = rank_result[case]
        # Same launches, same arithmetic, only the wait moves: bitwise equal.
        assert result["same_params"], result
        assert result["losses_async"] == result["losses_sync"], result
        assert result["bytes_sent_async"] == result["bytes_sent_sync"], result
        assert result["iterations_async"] == result["iterations_sync"] == 4, result
        # distk acted: 5 % of the weight matrices travel (biases go dense).
        assert 0 < result["bytes_sent_async"] < 0.2 * result["dense_bytes_async"], result


@pytest.mark.parametrize("case", list(OVERLAP_CASES))
def test_a_bucket_is_in_flight_during_backward(overlap, case):
    for rank_result in overlap:
        result = rank_result[case]
        # ZeRO 0 reduces after backward (DeepSpeed's engine all-reduce), so nothing is in
        # flight during it; ZeRO 1 (overlap_comm) and 2 keep one bucket in flight while
        # backward computes the next, as DeepSpeed's double buffer does.
        expected = 0 if case == "zero0" else 1
        assert result["in_backward_async"] == expected, result
        assert result["in_backward_sync"] == 0, result
        # DeepSpeed's end-of-reduction wait point finishes every bucket.
        assert result["after_backward_async"] == result["after_backward_sync"] == 0, result


# -- sparse training ------------------------------------------------------------------------

SPARSE_CASES = {
    # name: (stage, bf16, fp32 gradient accumulation) -> optimizer class used by DeepSpeed
    "zero0-fp32": (0, False, False),
    "zero1-fp32": (1, False, False),
    "zero2-fp32": (2, False, False),
    "zero0-bf16": (0, True, False),
    "zero1-bf16-fp32acc": (1, True, True),  # DeepSpeed's BF16_Optimizer
    "zero2-bf16": (2, True, False),
}
# The engines train with AdamW: the Adam schedule applies, shortened to fit 40 steps.
SPARSE_BLOCK = {"density": 0.05, "method": "exact", "min_numel": 256,
                "adam_dense_steps": 2, "adam_warmup_steps": 3}
SPARSE_STEPS = 40


def _clipping_check(rank: int, stage: int) -> dict:
    """One SGD step (lr 1, no momentum) from a fresh engine: the update must be exactly the
    exchanged gradient scaled by DeepSpeed's clip factor computed from *its* norm."""
    import torch
    from deepspeed.utils import safe_get_full_grad

    import distk

    clip = 0.05
    model = _model(seed=1)
    engine, *_ = distk.deepspeed.initialize(
        model=model, model_parameters=model.parameters(),
        config=_ds_config(stage, SPARSE_BLOCK, clip=clip, optimizer="SGD", lr=1.0))
    before = _params(engine)
    x, y = _teacher_batches(rank, 1)[0]
    engine.backward((engine(x) - y).pow(2).mean())
    grads = [safe_get_full_grad(p).detach().float().clone() for p in engine.module.parameters()]
    engine.step()
    after = _params(engine)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
    factor = min(1.0, clip / (norm + 1e-6))
    errors = [((b - a) - factor * g).abs().max().item() for a, b, g in zip(after, before, grads)]
    # Entries a rank can receive: the union of both ranks' k = 5 % selections.
    nonzero_ok = all(
        (g != 0).sum().item() <= 2 * max(1, round(0.05 * g.numel()))
        for p, g in zip(engine.module.parameters(), grads) if p.numel() >= 256)
    return {"norm": norm, "factor": factor, "max_error": max(errors), "nonzero_ok": nonzero_ok}


def _sparse_worker(rank: int, world_size: int, tmp: str) -> dict:
    import torch

    import distk

    results: dict = {}
    batches = _teacher_batches(rank, SPARSE_STEPS)
    for name, (stage, bf16, fp32_acc) in SPARSE_CASES.items():
        monitor = {}
        if name == "zero2-fp32":
            monitor = {"csv_monitor": {"enabled": True, "output_path": os.path.join(tmp, "csv"),
                                       "job_name": "distk"}}
        model = _model()
        engine, optimizer, *_ = distk.deepspeed.initialize(
            model=model, model_parameters=model.parameters(),
            config=_ds_config(stage, SPARSE_BLOCK, bf16=bf16, fp32_accumulation=fp32_acc,
                              clip=1.0, optimizer="AdamW", lr=1e-2, extra=monitor))
        state = distk.deepspeed.get_state(engine)
        dtype = torch.bfloat16 if bf16 else torch.float32
        losses = _train(engine, batches, dtype)
        results[name] = {
            "first": sum(losses[:5]) / 5, "last": sum(losses[-5:]) / 5,
            "optimizer": type(optimizer).__name__, "calls": state.totals.buffers,
            "n_params": len(list(engine.module.parameters())), "seam": state.seam,
            "density": state.stats.density,
            "schedule": (state.cfg.dense_steps, state.cfg.warmup_steps, state.cfg.value_dtype),
        }
        if name in ("zero0-fp32", "zero2-fp32"):
            results[name]["checkpoint"] = _checkpoint_round_trip(engine, state, stage, rank,
                                                                 os.path.join(tmp, name))
    for stage in (0, 1, 2):
        results[f"clip-zero{stage}"] = _clipping_check(rank, stage)
    if rank == 0:
        csv_dir = os.path.join(tmp, "csv")
        files = {}
        for root, _, names in os.walk(csv_dir):
            for file_name in names:
                if file_name.startswith("distk_"):
                    with open(os.path.join(root, file_name)) as handle:
                        files[file_name] = handle.read().splitlines()
        results["csv"] = files
    return results


def _checkpoint_round_trip(engine, state, stage: int, rank: int, directory: str) -> dict:
    """Save, rebuild a fresh engine, load: residuals and the next step must match exactly."""
    import torch

    import distk

    tag = f"global_step{engine.global_steps}"
    engine.save_checkpoint(directory)
    keys = [name for name, p in engine.module.named_parameters() if p.numel() >= 256]
    saved = {key: state.compressor.residual(key).clone() for key in keys}
    nonzero = all(saved[key].abs().sum().item() > 0 for key in keys)

    model = _model(seed=7)  # different weights: everything must come from the checkpoint
    fresh, *_ = distk.deepspeed.initialize(
        model=model, model_parameters=model.parameters(),
        config=_ds_config(stage, SPARSE_BLOCK, clip=1.0, optimizer="AdamW", lr=1e-2))
    load_path, _ = fresh.load_checkpoint(directory)
    fresh_state = distk.deepspeed.get_state(fresh)
    restored = all(torch.equal(saved[key], fresh_state.compressor.residual(key)) for key in keys)
    # One more identical step on both engines: same parameters afterwards.
    x, y = _teacher_batches(rank + 10, 1)[0]
    for e in (engine, fresh):
        e.backward((e(x) - y).pow(2).mean())
        e.step()
    same_next = all(torch.equal(a, b) for a, b in zip(_params(engine), _params(fresh)))
    files = sorted(f for f in os.listdir(os.path.join(directory, tag)) if f.startswith("distk_"))
    return {"loaded": load_path is not None, "nonzero": nonzero, "restored": restored,
            "iteration": fresh_state.iteration == state.iteration, "same_next": same_next,
            "files": files}


@pytest.fixture(scope="module")
def sparse(tmp_path_factory) -> list[dict]:
    tmp = str(tmp_path_factory.mktemp("ds_sparse"))
    return run_distributed(_sparse_worker, 2, tmp, timeout=480)


@pytest.mark.parametrize("case", list(SPARSE_CASES))
def test_loss_falls_at_five_percent_density(sparse, case):
    for rank_result in sparse:
        result = rank_result[case]
        # Teacher-student regression, AdamW lr 1e-2, 40 steps: dense training cuts the loss
        # by >10x; with 5 % of each weight matrix exchanged (error feedback on) we require
        # the mean of the last 5 losses to be under half the mean of the first 5.
        assert result["last"] < 0.5 * result["first"], result
        assert result["calls"] == SPARSE_STEPS * result["n_params"], result
        # the engine's AdamW (built from the JSON "optimizer" block) was found
        assert result["schedule"] == (2, 3, "bfloat16"), result
        assert result["density"] < 0.5, result


def test_bf16_paths_use_the_expected_deepspeed_optimizers(sparse):
    optimizers = {case: sparse[0][case]["optimizer"] for case in SPARSE_CASES}
    assert optimizers["zero0-bf16"] == "FP16_UnfusedOptimizer"
    assert optimizers["zero1-bf16-fp32acc"] == "BF16_Optimizer"
    assert optimizers["zero2-bf16"] == "DeepSpeedZeroOptimizer"
    assert sparse[0]["zero1-bf16-fp32acc"]["seam"] == "engine"


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_clipping_applies_to_the_exchanged_gradient(sparse, stage):
    for rank_result in sparse:
        result = rank_result[f"clip-zero{stage}"]
        assert result["factor"] < 1.0, result  # clipping is active in this check
        # SGD lr=1: update == factor * exchanged gradient, up to fp32 rounding of one
        # multiply-add on values of size <= 0.05.
        assert result["max_error"] <= 1e-6, result
        # The exchanged gradient is sparse: DeepSpeed's dense all-reduce did not run.
        assert result["nonzero_ok"], result


def test_stats_reach_deepspeed_monitor(sparse):
    files = sparse[0]["csv"]
    assert "distk_bytes_sent.csv" in files, sorted(files)
    assert "distk_density.csv" in files, sorted(files)
    rows = files["distk_density.csv"]
    # Header, one row per optimizer step, one for the checkpoint check's extra step.
    assert len(rows) == 1 + SPARSE_STEPS + 1, rows
    density = float(rows[-1].split(",")[1])
    assert 0.0 < density < 0.2  # 5 % of the weight matrices; biases go dense


@pytest.mark.parametrize("case", ["zero0-fp32", "zero2-fp32"])
def test_checkpoint_round_trip_restores_residuals(sparse, case):
    for rank_result in sparse:
        result = rank_result[case]["checkpoint"]
        assert result["loaded"] and result["nonzero"], result
        assert result["restored"] and result["iteration"], result
        assert result["same_next"], result  # bitwise: same state, same data, same ops
        assert result["files"] == ["distk_rank00000.pt", "distk_rank00001.pt"], result


# -- refusals ---------------------------------------------------------------------------------

REFUSALS = {
    "typo": (_ds_config(0, {"densty": 0.1}), ["densty", "density"]),
    "bad value": (_ds_config(0, {"density": 1.5}), ["density", "1.5"]),
    "not an object": (_ds_config(0, 0.1), ['"distk" block', "float"]),
    "zero 3": (_ds_config(3, {"density": 0.1}), ["stage", "3", "(0, 1, 2)"]),
    "fp16": (_ds_config(0, {"density": 0.1}, extra={"fp16": {"enabled": True}}),
             ["fp16", "bf16"]),
    "offload": (_ds_config(2, {"density": 0.1}, extra={"zero_optimization": {
        "stage": 2, "offload_optimizer": {"device": "cpu"}}}), ["offload_optimizer", "cpu"]),
}


def _refusal_worker(rank: int, world_size: int) -> dict:
    import distk

    messages = {}
    for name, (config, _) in REFUSALS.items():
        model = _model()
        try:
            distk.deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                       config=config)
            messages[name] = None
        except ValueError as err:
            messages[name] = str(err)
    # Only rank 0 calls: any collective inside would hang until the 20 s group timeout.
    start = time.monotonic()
    if rank == 0:
        model = _model()
        try:
            distk.deepspeed.initialize(model=model, config=REFUSALS["typo"][0])
        except ValueError as err:
            messages["alone"] = str(err)
    messages["alone_seconds"] = time.monotonic() - start
    return messages


@pytest.fixture(scope="module")
def refusals() -> list[dict]:
    return run_distributed(_refusal_worker, 2, timeout=180, pg_timeout=20)


@pytest.mark.parametrize("name", list(REFUSALS))
def test_bad_setup_is_refused_on_every_rank(refusals, name):
    for messages in refusals:
        message = messages[name]
        assert message is not None, f"{name}: no error raised"
        for fragment in REFUSALS[name][1]:
            assert fragment in message, (fragment, message)


def test_refusal_needs_no_collective(refusals):
    assert "densty" in refusals[0]["alone"]
    assert refusals[0]["alone_seconds"] < 15  # far below the 20 s collective timeout


# -- the supported DeepSpeed range -------------------------------------------------------------

def test_supported_range_is_stated_once():
    # One constant in the package; the extra and the docs say the same, nothing else in
    # distk/ spells the range.
    import pathlib
    import re

    from distk.integrations.deepspeed import DEEPSPEED_REQUIREMENT
    from distk.integrations.deepspeed import config as config_module

    root = pathlib.Path(REPO)
    assert f'deepspeed = ["{DEEPSPEED_REQUIREMENT}"]' in (root / "pyproject.toml").read_text()
    assert f"`{DEEPSPEED_REQUIREMENT}`" in (root / "docs" / "deepspeed.md").read_text()
    spelled = re.compile(r"0\.(19|20)\b")
    elsewhere = [str(path.relative_to(root)) for path in (root / "distk").rglob("*.py")
                 if path != pathlib.Path(config_module.__file__)
                 and spelled.search(path.read_text())]
    assert elsewhere == [], elsewhere


# -- the main job and the shipped configs ----------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DS_CONFIGS = sorted(
    os.path.join(REPO, "configs", "deepspeed", f"{method}_zero{stage}.json")
    for method in ("dense", "exact", "bucketed") for stage in (0, 1, 2)
)


@pytest.mark.parametrize("path", DS_CONFIGS, ids=os.path.basename)
def test_shipped_configs_are_valid(path):
    from distk.integrations.deepspeed import check_supported
    from distk.train.config import load_config
    from distk.train.deepspeed_job import deepspeed_config_for

    config, mode = deepspeed_config_for(load_config(None), path)
    check_supported(config, None)
    stage, method = os.path.basename(path)[:-5].split("_zero")[::-1]
    assert mode == f"zero{stage}-{method}"
    assert config["distk"]["method"] == method
    assert config["train_micro_batch_size_per_gpu"] == load_config(None).train.batch_size


def _job_worker(rank: int, world_size: int, tmp: str, ds_config: str) -> dict:
    from distk.train.config import load_config
    from distk.train.deepspeed_job import run

    def config(name: str, *extra: str):
        return load_config(os.path.join(REPO, "configs", "tiny.json"), [
            f"run_root={json.dumps(tmp)}", f"name={name}", "train.steps=6",
            "logging.log_every=1", "train.eval_every=0", *extra])

    whole = run(config("whole"), ds_config)
    first = run(config("resumed", "train.stop_after=3"), ds_config)
    second = run(config("resumed"), ds_config, resume=True)
    return {"whole": whole.to_dict(), "first": first.to_dict(), "second": second.to_dict()}


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> list[dict]:
    tmp = str(tmp_path_factory.mktemp("ds_job"))
    ds_config = os.path.join(REPO, "configs", "deepspeed", "bucketed_zero2.json")
    return run_distributed(_job_worker, 2, tmp, ds_config, timeout=300)


def test_deepspeed_job_trains_and_resumes_exactly(job):
    for result in job:
        whole, first, second = result["whole"], result["first"], result["second"]
        assert whole["mode"] == "deepspeed-zero2-bucketed" and whole["completed"]
        assert not first["completed"] and second["completed"]
        assert 0 < whole["bytes_sent"] < whole["dense_bytes"]
        # Same data, same state (weights, AdamW moments, residuals) after the resume and
        # deterministic CPU kernels: the resumed run's losses equal the uninterrupted run's.
        assert second["train_curve"] == whole["train_curve"]
        assert second["final_val_loss"] == whole["final_val_loss"]
        assert second["bytes_sent"] == whole["bytes_sent"]
