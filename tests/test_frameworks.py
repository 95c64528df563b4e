"""HF Trainer (DDP, DeepSpeed ZeRO 1/2), Accelerate and Lightning on 2 real gloo ranks.

Every test trains a GPT-2-shaped model built from a config (no downloads) on token
batches made here, and checks that distk *acted* (bytes one rank sent below what a dense
all-reduce sends, statistics in the framework's logs) and that a save/resume round trip
gives every rank back its own residuals (compared tensor by tensor, per rank), while a
rank offered another rank's file refuses it. Each framework is skipped, with the reason,
when it is not installed (``pip install distk[frameworks]``); every run is bounded by
``run_distributed``'s timeout, so a hang fails.

By default: HF Trainer on DDP and on DeepSpeed ZeRO 2 (DistkCallback enabling distk from
the JSON block), Accelerate, Lightning (callback, and DDPStrategy's hook state),
``distk.deepspeed.install()`` without a trainer, ``distk.enable``'s dispatch, a hook
state built before the process group, and outer synchronisation
(``SparsityConfig.adamw_outer``) through HF Trainer, Accelerate and Lightning on DDP.
``--runslow`` adds HF Trainer on ZeRO 1 after ``distk.deepspeed.install()`` (each HF
DeepSpeed run costs about a minute here).
"""

from __future__ import annotations

import contextlib
import io
import os

import pytest
from distributed import run_distributed

pytestmark = pytest.mark.distributed

VOCAB, SEQ, BATCH = 256, 32, 4
DENSITY = 0.05
# Every framework here trains with AdamW, so distk applies the Adam schedule it finds the
# optimizer for; shortened to 1 dense step and a 1-step warm-up to fit these few steps
# (the defaults, 75 and 200, would keep every step dense). SCHEDULE is what the state's
# config must then hold: (dense_steps, warmup_steps, value_dtype), (0, 0, None) unless the
# optimizer was seen.
CFG = {"density": DENSITY, "adam_dense_steps": 1, "adam_warmup_steps": 1}
SCHEDULE = (1, 1, "bfloat16")


# -- helpers that run inside the ranks ------------------------------------------------------

def _gpt2(seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def _token_rows(count: int, seed: int = 0):
    """``count`` rows of a learnable sequence (next token = token + 1 mod VOCAB, noisy)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, VOCAB, (count, 1), generator=generator)
    rows = (starts + torch.arange(SEQ)) % VOCAB
    return [{"input_ids": row, "labels": row.clone()} for row in rows]


def _residuals(state) -> dict:
    return {key: tensor.clone() for key, tensor in
            state.compressor.state_dict()["residuals"].items()}


def _refusal_of_other_rank(folder: str, state) -> str:
    """Rank 0 tries rank 1's file for its state: the message it gets ("" when nothing
    refused it)."""
    import torch.distributed as dist

    from distk.integrations.checkpoint import rank_file, read_rank_state

    if dist.get_rank() != 0:
        return ""
    try:
        read_rank_state(rank_file(folder, rank=1), state)
    except ValueError as err:
        return str(err)
    return ""


def _load_swapped_files(folder: str, state) -> str:
    """Copy the two ranks' files crosswise into a new folder and load it: what each rank
    raises (every rank must refuse, none may restore another rank's residuals)."""
    import shutil

    import torch.distributed as dist

    from distk.integrations.checkpoint import load_rank_state, rank_file

    swapped = os.path.join(folder, "swapped")
    if dist.get_rank() == 0:
        os.makedirs(swapped, exist_ok=True)
        shutil.copy(rank_file(folder, 0), rank_file(swapped, 1))
        shutil.copy(rank_file(folder, 1), rank_file(swapped, 0))
    dist.barrier()
    try:
        load_rank_state(swapped, state)
    except ValueError as err:
        return str(err)
    return ""


def _hf_args(output_dir: str, *, max_steps: int, deepspeed: dict | None = None):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=BATCH,
        learning_rate=1e-3, logging_steps=1, save_strategy="steps", save_steps=2,
        report_to=[], use_cpu=True, ddp_backend="gloo", dataloader_num_workers=0,
        disable_tqdm=True, seed=0, deepspeed=deepspeed,
    )


def _hf_job(rank: int, world_size: int, output_dir: str, deepspeed: dict | None,
            install: bool = False) -> dict:
    """Train 4 steps (checkpoints at 2 and 4), resume from step 2 in a new Trainer.

    ``install``: route ``deepspeed.initialize`` through distk first (the engine is then
    built with distk and the callback adopts its state); otherwise the callback enables
    distk on the engine DeepSpeed built, from the config's "distk" block.
    """
    from transformers import Trainer, TrainerCallback

    import distk
    from distk.integrations.hf import DistkCallback

    if install:
        distk.deepspeed.install()
        distk.deepspeed.install()  # idempotent
    probes: dict = {}

    class Probe(TrainerCallback):
        """Residuals as saved at step 2, and as found before the resumed run's first step."""

        def __init__(self, distk_callback, phase):
            self.distk_callback, self.phase = distk_callback, phase

        def on_save(self, args, state, control, **kwargs):
            if self.phase == "first" and state.global_step == 2:
                probes["saved"] = _residuals(self.distk_callback.state)

        def on_step_begin(self, args, state, control, **kwargs):
            if self.phase == "resumed" and "restored" not in probes:
                probes["restored"] = _residuals(self.distk_callback.state)
                probes["restored_iteration"] = self.distk_callback.state.iteration

    data = _token_rows(64, seed=rank)
    callback = DistkCallback(None if deepspeed is not None else CFG)
    trainer = Trainer(model=_gpt2(), args=_hf_args(output_dir, max_steps=4, deepspeed=deepspeed),
                      train_dataset=data, callbacks=[callback])
    trainer.add_callback(Probe(callback, "first"))
    trainer.train()
    probes["schedule"] = (callback.state.cfg.dense_steps, callback.state.cfg.warmup_steps,
                          callback.state.cfg.value_dtype)
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    wrapped_type = type(trainer.model_wrapped).__name__
    if deepspeed is not None:
        # install() hands DeepSpeed the config without the block (and enables distk as it
        # builds the engine); otherwise DeepSpeed's engine config still carries it.
        probes["engine_saw_block"] = "distk" in trainer.model_wrapped.config
        probes["installed"] = distk.deepspeed.installed()

    callback2 = DistkCallback(None if deepspeed is not None else CFG)
    resumed = Trainer(model=_gpt2(seed=1),
                      args=_hf_args(output_dir, max_steps=4, deepspeed=deepspeed),
                      train_dataset=data, callbacks=[callback2])
    resumed.add_callback(Probe(callback2, "resumed"))
    resumed.train(resume_from_checkpoint=os.path.join(output_dir, "checkpoint-2"))
    return {
        "history": history, "wrapped": wrapped_type, **probes,
        "refusal": _refusal_of_other_rank(os.path.join(output_dir, "checkpoint-2"),
                                          callback2.state),
        "resumed_steps": resumed.state.global_step,
    }


# -- checks shared by every framework ----------------------------------------------------------

def _assert_acted(metrics: dict) -> None:
    """The last logged step sent fewer bytes than dense, at an effective density < 1."""
    assert metrics["distk/bytes_sent"] < metrics["distk/dense_bytes"], metrics
    assert metrics["distk/compression"] > 1.5, metrics
    assert 0 < metrics["distk/density"] < 0.5, metrics
    # Lightning stores logged values as float32 tensors: 0.05 comes back as 0.0500000007.
    assert metrics["distk/target_density"] == pytest.approx(DENSITY, rel=1e-6)


def _assert_restored_per_rank(results: list[dict]) -> None:
    import torch

    for rank, result in enumerate(results):
        saved, restored = result["saved"], result["restored"]
        assert saved, f"rank {rank}: no residuals at the step-2 checkpoint"
        assert set(saved) == set(restored), (rank, set(saved), set(restored))
        for key in saved:
            # Loaded from disk and not touched before the first resumed step: bit-exact.
            torch.testing.assert_close(restored[key], saved[key], rtol=0, atol=0,
                                       msg=f"rank {rank}, residual {key!r}")
    # Ranks hold different residuals, so restoring rank 0's everywhere would be caught.
    saved0, saved1 = results[0]["saved"], results[1]["saved"]
    assert any(saved0[key].abs().sum() > 0 for key in saved0), "all residuals are zero"
    assert any(not torch.equal(saved0[key], saved1[key]) for key in saved0)
    refusal = results[0]["refusal"]
    assert ("written by rank 1 of world size 2" in refusal
            and "this is rank 0 of world size 2" in refusal), refusal


# -- HF Trainer ------------------------------------------------------------------------------

def test_hf_trainer_ddp_callback_acts_logs_and_resumes_per_rank(tmp_path):
    pytest.importorskip("transformers", reason="HF Trainer test needs distk[frameworks]")
    pytest.importorskip("accelerate", reason="HF Trainer needs accelerate (distk[frameworks])")
    results = run_distributed(_hf_job, 2, str(tmp_path / "run"), None, timeout=240)
    for result in results:
        assert result["wrapped"] == "DistributedDataParallel"
        assert result["resumed_steps"] == 4
        logged = [entry for entry in result["history"] if "distk/bytes_sent" in entry]
        assert len(logged) == 4, result["history"]  # every logged step carries distk stats
        assert logged[0]["distk/density"] == 1.0  # DDP's bucket-rebuild step is dense
        assert result["schedule"] == SCHEDULE  # the callback passed the Trainer's AdamW
        _assert_acted(logged[-1])
        assert logged[-1]["distk/total_bytes_sent"] < logged[-1]["distk/total_dense_bytes"]
    _assert_restored_per_rank(results)
    for rank in range(2):
        assert (tmp_path / "run" / "checkpoint-2" / f"distk_rank{rank:05d}.pt").is_file()


def _hf_outer_job(rank: int, world_size: int, output_dir: str) -> dict:
    """HF Trainer on DDP with SparsityConfig.adamw_outer (a sync every 2 steps, 1 dense
    sync): 6 steps, the parameters after the last (a sync) returned; then a new Trainer
    resumed from checkpoint-4."""
    from transformers import Trainer, TrainerCallback

    from distk.config import SparsityConfig
    from distk.integrations.hf import DistkCallback

    cfg = SparsityConfig.adamw_outer(sync_every=2, dense_steps=1)
    probes: dict = {}

    class Probe(TrainerCallback):
        """Residuals as saved at step 4, and as found before the resumed run's step 5."""

        def __init__(self, distk_callback):
            self.distk_callback = distk_callback

        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 4 and "saved" not in probes:
                probes["saved"] = _residuals(self.distk_callback.state)

        def on_step_begin(self, args, state, control, **kwargs):
            if "saved" in probes and "restored" not in probes and state.global_step == 4:
                probes["restored"] = _residuals(self.distk_callback.state)

    callback = DistkCallback(cfg)
    trainer = Trainer(model=_gpt2(), args=_hf_args(output_dir, max_steps=6),
                      train_dataset=_token_rows(64, seed=rank), callbacks=[callback])
    trainer.add_callback(Probe(callback))
    trainer.train()
    result = {"history": [entry for entry in trainer.state.log_history if "loss" in entry],
              "state": type(callback.state).__name__, "syncs": callback.state.syncs,
              "params": [p.detach().clone() for p in trainer.model.parameters()]}
    resumed_callback = DistkCallback(cfg)  # a new Trainer resumes from step 4
    resumed = Trainer(model=_gpt2(seed=1), args=_hf_args(output_dir, max_steps=6),
                      train_dataset=_token_rows(64, seed=rank), callbacks=[resumed_callback])
    resumed.add_callback(Probe(resumed_callback))
    resumed.train(resume_from_checkpoint=os.path.join(output_dir, "checkpoint-4"))
    # DistkCallback() with no config and no DeepSpeed: distk's default for the Trainer's
    # AdamW, SparsityConfig.adamw_outer(), announced on rank 0.
    default_callback = DistkCallback()
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        Trainer(model=_gpt2(), args=_hf_args(os.path.join(output_dir, "default"), max_steps=1),
                train_dataset=_token_rows(64, seed=rank), callbacks=[default_callback]).train()
    default = (type(default_callback.state).__name__, default_callback.state.cfg,
               "SparsityConfig.adamw_outer()" in said.getvalue())
    return {**result, **probes, "resumed_syncs": resumed_callback.state.syncs,
            "refusal": _refusal_of_other_rank(os.path.join(output_dir, "checkpoint-4"),
                                              resumed_callback.state), "default": default}


def test_hf_trainer_ddp_runs_outer_synchronisation_from_the_callback(tmp_path):
    """One line: DistkCallback(SparsityConfig.adamw_outer()) on DDP switches DDP's
    all-reduce off and synchronises every sync_every steps of the Trainer's AdamW; so does
    DistkCallback() with no config (distk's default for AdamW on DDP)."""
    pytest.importorskip("transformers", reason="HF Trainer test needs distk[frameworks]")
    pytest.importorskip("accelerate", reason="HF Trainer needs accelerate (distk[frameworks])")
    import torch

    results = run_distributed(_hf_outer_job, 2, str(tmp_path / "run"), timeout=240)
    for result in results:
        assert result["state"] == "OuterSync" and result["syncs"] == 3
        logged = [entry for entry in result["history"] if "distk/syncs" in entry]
        # Steps 2-6 (step 1 precedes the first sync, which has nothing to log yet).
        assert [entry["distk/syncs"] for entry in logged] == [1, 1, 2, 2, 3]
        last = logged[-1]  # a sparse sync (the first was the dense start)
        assert last["distk/bytes_sent"] < last["distk/dense_bytes"] / 4, last
        assert 0 < last["distk/density"] < 0.5
    for a, b in zip(results[0]["params"], results[1]["params"], strict=True):
        assert torch.equal(a, b)  # step 6 was a sync: the replicas are identical
    for rank in range(2):  # the Trainer's checkpoints carry each rank's outer state
        assert (tmp_path / "run" / "checkpoint-6" / f"distk_rank{rank:05d}.pt").is_file()
    # Resumed from checkpoint-4, every rank gets its own residuals back (rank 1's file is
    # refused by rank 0) and the sync counter goes on from there: 3 syncs at step 6.
    _assert_restored_per_rank(results)
    assert [result["resumed_syncs"] for result in results] == [3, 3]
    # DistkCallback() alone: outer synchronisation for the Trainer's AdamW, said on rank 0.
    from distk.config import SparsityConfig
    assert [result["default"] for result in results] == [
        ("OuterSync", SparsityConfig.adamw_outer(density=0.25), said)
        for said in (True, False)]


def _ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "distk": CFG,
    }


@pytest.mark.parametrize(("stage", "install"), [
    # ZeRO 1 after install(): the slow run. install() itself (no recursion, the block kept
    # from DeepSpeed, the state adopted by distk.enable, which the callback calls) is
    # covered by default in test_deepspeed_initialize_patch_and_install_do_not_recurse,
    # ZeRO 1 under distk in test_deepspeed.py, the callback on an HF-built engine here.
    pytest.param(1, True, id="zero1-install", marks=pytest.mark.slow),
    pytest.param(2, False, id="zero2-callback"),
])
def test_hf_trainer_deepspeed_json_distk_block_acts_and_resumes_per_rank(tmp_path, stage,
                                                                        install):
    """TrainingArguments(deepspeed=...) with a "distk" block: after distk.deepspeed.install()
    (ZeRO 1) and through DistkCallback() alone (ZeRO 2)."""
    pytest.importorskip("transformers", reason="HF Trainer test needs distk[frameworks]")
    pytest.importorskip("deepspeed", reason="DeepSpeed test needs distk[deepspeed]")
    results = run_distributed(_hf_job, 2, str(tmp_path / "run"), _ds_config(stage), install,
                              timeout=300)
    for result in results:
        assert result["wrapped"] == "DeepSpeedEngine"
        assert result["installed"] is install
        assert result["engine_saw_block"] is not install
        assert result["resumed_steps"] == 4
        logged = [entry for entry in result["history"] if "distk/bytes_sent" in entry]
        assert len(logged) == 4, result["history"]
        assert result["schedule"] == SCHEDULE  # the engine's own (HF-built) AdamW
        _assert_acted(logged[-1])
    _assert_restored_per_rank(results)


# -- Accelerate ------------------------------------------------------------------------------

def _accelerate_job(rank: int, world_size: int, output_dir: str) -> dict:
    """3 steps, save_state, 1 more step (residuals move on), load_state: own residuals back."""
    import torch
    from accelerate import Accelerator

    import distk

    accelerator = Accelerator(cpu=True)
    model = _gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rows = _token_rows(32, seed=rank)
    loader = torch.utils.data.DataLoader(rows, batch_size=BATCH)
    model, optimizer = accelerator.prepare(model, optimizer)
    try:  # Accelerate keeps no DDP wrapper: without model= this must refuse, not no-op
        distk.integrations.accelerate.enable(accelerator, CFG)
        without_model = ""
    except ValueError as err:
        without_model = str(err)
    state = distk.integrations.accelerate.enable(accelerator, CFG, model=model)
    batches = iter(loader)

    def train_step():
        batch = next(batches)
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(3):
        train_step()
    metrics = distk.integrations.auto.metrics(state)
    accelerator.save_state(output_dir)
    saved = _residuals(state)
    train_step()
    moved = any(not torch.equal(tensor, saved[key]) for key, tensor in _residuals(state).items())
    accelerator.load_state(output_dir)
    restored = _residuals(state)
    swapped = _load_swapped_files(output_dir, state)
    return {"metrics": metrics, "saved": saved, "restored": restored, "moved": moved,
            "swapped": swapped, "schedule": (state.cfg.dense_steps, state.cfg.warmup_steps,
                         state.cfg.value_dtype),
            "wrapped": type(model).__name__, "refusal": _refusal_of_other_rank(output_dir, state),
            "without_model": without_model}


def test_accelerate_ddp_acts_and_save_load_state_is_per_rank(tmp_path):
    pytest.importorskip("accelerate", reason="Accelerate test needs distk[frameworks]")
    pytest.importorskip("transformers", reason="the test model is transformers' GPT-2")
    results = run_distributed(_accelerate_job, 2, str(tmp_path / "state"), timeout=180)
    for result in results:
        assert result["wrapped"] == "DistributedDataParallel"
        assert result["schedule"] == SCHEDULE  # the accelerator's one prepared AdamW
        _assert_acted(result["metrics"])
        assert result["moved"], "the extra step did not change residuals: the test is vacuous"
        assert "pass what prepare returned" in result["without_model"]
        assert "written by rank" in result["swapped"] or "another rank refused" in \
            result["swapped"], result["swapped"]
    _assert_restored_per_rank(results)


def _accelerate_outer_job(rank: int, world_size: int) -> dict:
    """4 steps with accelerate.enable(accelerator, SparsityConfig.adamw_outer(...))."""
    import torch
    from accelerate import Accelerator

    import distk

    accelerator = Accelerator(cpu=True)
    model = _gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(_token_rows(16, seed=rank), batch_size=BATCH)
    model, optimizer = accelerator.prepare(model, optimizer)
    sync = distk.integrations.accelerate.enable(
        accelerator, distk.SparsityConfig.adamw_outer(sync_every=2, dense_steps=1), model=model)
    for batch in loader:
        accelerator.backward(model(**batch).loss)
        optimizer.step()  # the AcceleratedOptimizer: the sync hooks the AdamW inside it
        optimizer.zero_grad()
    return {"state": type(sync).__name__, "syncs": sync.syncs,
            "metrics": distk.integrations.auto.metrics(sync),
            "params": [p.detach().clone() for p in model.parameters()]}


def test_accelerate_ddp_runs_outer_synchronisation(tmp_path):
    pytest.importorskip("accelerate", reason="Accelerate test needs distk[frameworks]")
    pytest.importorskip("transformers", reason="the test model is transformers' GPT-2")
    import torch

    results = run_distributed(_accelerate_outer_job, 2, timeout=180)
    for result in results:
        assert result["state"] == "OuterSync" and result["syncs"] == 2
        metrics = result["metrics"]  # the last sync's, a sparse one
        assert metrics["distk/bytes_sent"] < metrics["distk/dense_bytes"] / 4, metrics
    for a, b in zip(results[0]["params"], results[1]["params"], strict=True):
        assert torch.equal(a, b)  # step 4 was a sync: the replicas are identical


# -- Lightning -------------------------------------------------------------------------------

def _lightning_module():
    import pytorch_lightning as pl
    import torch

    class LitGPT2(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _gpt2()

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    return LitGPT2()


def _lightning_job(rank: int, world_size: int, root: str, via_strategy_hook: bool) -> dict:
    """fit 3 steps, save_checkpoint, then fit(ckpt_path=...) in a new Trainer."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.strategies import DDPStrategy

    from distk.integrations.ddp import DDPCompressionState, sparse_allreduce_hook
    from distk.integrations.lightning import DistkCallback

    probes: dict = {}

    class Probe(pl.Callback):
        def __init__(self, distk_callback):
            self.distk_callback = distk_callback

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            probes["wrapped"] = type(trainer.strategy.model).__name__  # unwrapped after fit
            if "restored" not in probes and trainer.global_step == 3:
                probes["restored"] = _residuals(self.distk_callback.state)

    def make(max_steps):
        if via_strategy_hook:  # the documented hook/state pair; the state gets a dict
            strategy = DDPStrategy(ddp_comm_hook=sparse_allreduce_hook,
                                   ddp_comm_state=DDPCompressionState({"density": DENSITY}))
            callback = DistkCallback()
        else:
            strategy = DDPStrategy()
            callback = DistkCallback(CFG)
        trainer = pl.Trainer(
            accelerator="cpu", devices=world_size, strategy=strategy, max_steps=max_steps,
            callbacks=[callback, Probe(callback)], default_root_dir=root, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            log_every_n_steps=1)
        return trainer, callback

    loader = torch.utils.data.DataLoader(_token_rows(32, seed=rank), batch_size=BATCH)
    trainer, callback = make(3)
    trainer.fit(_lightning_module(), loader)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()
               if key.startswith("distk/")}
    path = os.path.join(root, "three.ckpt")
    trainer.save_checkpoint(path)
    saved = _residuals(callback.state)
    folder = os.path.join(root, "distk", "step-3")

    resumed, callback2 = make(4)
    resumed.fit(_lightning_module(), loader, ckpt_path=path)
    return {"metrics": metrics, "saved": saved, **probes,
            "schedule": (callback.state.cfg.dense_steps, callback.state.cfg.warmup_steps,
                          callback.state.cfg.value_dtype),
            "refusal": _refusal_of_other_rank(folder, callback2.state),
            "resumed_steps": resumed.global_step}


@pytest.mark.parametrize("via_strategy_hook", [False, True], ids=["callback", "strategy_hook"])
def test_lightning_ddp_on_cpu_acts_and_resumes_per_rank(tmp_path, via_strategy_hook):
    pytest.importorskip("pytorch_lightning", reason="Lightning test needs distk[frameworks]")
    pytest.importorskip("transformers", reason="the test model is transformers' GPT-2")
    results = run_distributed(_lightning_job, 2, str(tmp_path), via_strategy_hook,
                              timeout=180)
    for result in results:
        assert result["wrapped"] == "DistributedDataParallel"
        assert result["resumed_steps"] == 4
        # The callback passes the trainer's AdamW; a state the user built for the strategy
        # saw no optimizer (a warning says so) and keeps its config.
        assert result["schedule"] == ((0, 0, "auto") if via_strategy_hook else SCHEDULE)
        _assert_acted(result["metrics"])
    _assert_restored_per_rank(results)


def _lightning_outer_job(rank: int, world_size: int, root: str) -> dict:
    """fit 4 steps with DistkCallback(SparsityConfig.adamw_outer(sync_every=2, ...))."""
    import pytorch_lightning as pl
    import torch

    from distk.config import SparsityConfig
    from distk.integrations.lightning import DistkCallback

    callback = DistkCallback(SparsityConfig.adamw_outer(sync_every=2, dense_steps=1))
    trainer = pl.Trainer(
        accelerator="cpu", devices=world_size, strategy="ddp", max_steps=4,
        callbacks=[callback], default_root_dir=root, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    module = _lightning_module()
    trainer.fit(module, torch.utils.data.DataLoader(_token_rows(32, seed=rank),
                                                    batch_size=BATCH))
    return {"state": type(callback.state).__name__, "syncs": callback.state.syncs,
            "metrics": {key: float(value) for key, value in trainer.callback_metrics.items()
                        if key.startswith("distk/")},
            "params": [p.detach().clone() for p in module.parameters()]}


def test_lightning_ddp_runs_outer_synchronisation_from_the_callback(tmp_path):
    pytest.importorskip("pytorch_lightning", reason="Lightning test needs distk[frameworks]")
    pytest.importorskip("transformers", reason="the test model is transformers' GPT-2")
    import torch

    results = run_distributed(_lightning_outer_job, 2, str(tmp_path), timeout=180)
    for result in results:
        assert result["state"] == "OuterSync" and result["syncs"] == 2
        metrics = result["metrics"]  # the last sync's, a sparse one
        assert metrics["distk/syncs"] == 2.0
        assert metrics["distk/bytes_sent"] < metrics["distk/dense_bytes"] / 4, metrics
    for a, b in zip(results[0]["params"], results[1]["params"], strict=True):
        assert torch.equal(a, b)  # step 4 was a sync: the replicas are identical


# -- deepspeed.initialize patched: no recursion, idempotent --------------------------------------

def _install_job(rank: int, world_size: int) -> dict:
    import deepspeed
    import torch

    import distk

    def build(block: dict | None):
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
        config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 0},
                  "optimizer": {"type": "SGD", "params": {"lr": 0.01}},
                  "steps_per_print": 10**9}
        if block is not None:
            config["distk"] = block
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=config)
        return engine

    # The patch users try first used to recurse: distk reached itself through the attribute.
    deepspeed.initialize = distk.deepspeed.initialize
    manual = distk.deepspeed.get_state(build({"density": DENSITY}))
    distk.deepspeed.install()
    distk.deepspeed.install()
    with_block = build({"density": DENSITY})
    without_block = build(None)
    return {"manual": manual is not None, "installed": distk.deepspeed.installed(),
            "with_block": distk.deepspeed.get_state(with_block) is not None,
            # install() hands DeepSpeed the config without the block
            "engine_saw_block": "distk" in with_block.config,
            "without_block": distk.deepspeed.get_state(without_block) is None,
            "adopted": distk.enable(with_block) is distk.deepspeed.get_state(with_block)}


def test_deepspeed_initialize_patch_and_install_do_not_recurse():
    pytest.importorskip("deepspeed", reason="DeepSpeed test needs distk[deepspeed]")
    for result in run_distributed(_install_job, 2, timeout=180):
        assert result == {"manual": True, "installed": True, "with_block": True,
                          "engine_saw_block": False, "without_block": True, "adopted": True}


# -- distk.enable refuses what it cannot act on (no process group needed) -------------------------

def test_enable_refuses_an_unwrapped_model_and_a_missing_config():
    import torch

    import distk
    from distk.integrations.auto import config_for, resolve_config

    with pytest.raises(TypeError, match="DistributedDataParallel module, an FSDP2"):
        distk.enable(torch.nn.Linear(4, 4), {"density": 0.1})
    # Neither a cfg nor a block: None, distk's default for the optimizer on DDP and FSDP;
    # a DeepSpeed engine's config must carry the block (resolve_config, its path).
    assert config_for(None, {"zero_optimization": {"stage": 1}}, where="test") is None
    assert config_for(None, None, where="test") is None
    with pytest.raises(ValueError, match='no DeepSpeed config with a "distk" block'):
        resolve_config(None, {"zero_optimization": {"stage": 1}}, where="test")
    with pytest.raises(ValueError, match="differs from the \"distk\" block"):
        config_for({"density": 0.5}, {"distk": {"density": 0.1}}, where="test")
    with pytest.raises(TypeError, match="cfg must be"):
        config_for(0.1, None, where="test")
    assert config_for(None, {"distk": {"density": 0.1}}, where="test").density == 0.1


def _enable_dispatch_job(rank: int, world_size: int) -> dict:
    import torch
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    import distk

    torch.manual_seed(0)
    ddp = DistributedDataParallel(torch.nn.Linear(64, 64))
    ddp_state = distk.enable(torch.compile(ddp), {"density": DENSITY})  # compile outside DDP
    ddp(torch.randn(4, 64)).square().sum().backward()  # first step: DDP's dense rebuild
    ddp(torch.randn(4, 64)).square().sum().backward()
    fsdp = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    fully_shard(fsdp)
    fsdp_state = distk.enable(fsdp, distk.SparsityConfig(density=DENSITY))
    fsdp(torch.randn(4, 64)).square().sum().backward()
    return {"ddp": type(ddp_state).__name__, "ddp_kept": distk.integrations.auto.get_state(ddp)
            is ddp_state, "ddp_density": ddp_state.stats.density,
            "fsdp": type(fsdp_state).__name__, "fsdp_density": fsdp_state.stats.density}


def _enable_jobs(rank: int, world_size: int) -> dict:
    """Both jobs on one 2-rank run (starting the processes costs more than either job); a
    job's error is kept for the test that reads it. The late check goes last: it replaces
    the process group."""
    import traceback

    out = {}
    for name, job in (("dispatch", _enable_dispatch_job), ("late_check", _late_check_job)):
        try:
            out[name] = job(rank, world_size)
        except Exception:  # noqa: BLE001 - reported by the test that reads this job
            out[name] = {"error": traceback.format_exc()}
    return out


@pytest.fixture(scope="module")
def enable_runs() -> list[dict]:
    return run_distributed(_enable_jobs, 2, timeout=180)


def test_enable_dispatches_on_the_wrapper_type(enable_runs):
    for result in (run["dispatch"] for run in enable_runs):
        assert "error" not in result, result["error"]
        assert result["ddp"] == "DDPCompressionState" and result["ddp_kept"]
        assert result["fsdp"] == "FSDPCompressionState"
        # 64 * 64 + 64 entries per Linear: at most round(0.05 * 4160) = 208 selected (a
        # shared mask, the default, is the union of the ranks' proposals: maybe fewer).
        for density in (result["ddp_density"], result["fsdp_density"]):
            assert 0 < density <= DENSITY + 1e-3, result


# -- a hand-built hook state (Lightning's ddp_comm_state): config checked on first exchange ------

def _late_check_job(rank: int, world_size: int) -> dict:
    """Build hook states with no process group (as ``DDPStrategy(ddp_comm_state=...)`` is,
    before Lightning calls init_process_group), then start the group and train."""
    import datetime

    import torch
    import torch.distributed as dist
    from distributed import free_port
    from torch.nn.parallel import DistributedDataParallel

    from distk.integrations.ddp import DDPCompressionState, sparse_allreduce_hook

    # The group run_distributed started is torn down; a new one on a fresh port (chosen
    # by rank 0, sent while the old group still works) comes up after the states exist.
    port = [free_port() if rank == 0 else None]
    dist.broadcast_object_list(port, src=0)
    dist.destroy_process_group()

    result: dict = {}
    torch.manual_seed(0)
    same = DDPCompressionState({"density": DENSITY})
    # Configs that differ across ranks are not refused while no group exists: nothing
    # collective can run, so nothing is compared yet.
    differing = DDPCompressionState({"density": DENSITY * (rank + 1)})
    result["before"] = (dist.is_initialized(), same.iteration)

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port[0]}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=60))
    ddp = DistributedDataParallel(torch.nn.Linear(64, 64))
    ddp.register_comm_hook(same, sparse_allreduce_hook)
    for _ in range(2):
        ddp(torch.randn(4, 64)).square().sum().backward()
    result["after"] = (same.rank, same.world_size, same.iteration)
    result["acted"] = (same.stats.density, same.stats.bytes_sent, same.stats.dense_bytes)
    other = DistributedDataParallel(torch.nn.Linear(64, 64))
    other.register_comm_hook(differing, sparse_allreduce_hook)
    try:
        other(torch.randn(4, 64)).square().sum().backward()
        result["mismatch"] = ""
    except Exception as err:  # noqa: BLE001 - DDP may re-wrap the hook's error
        result["mismatch"] = f"{type(err).__name__}: {err}"
    return result


def test_a_hook_state_built_before_the_process_group_checks_its_config_on_first_exchange(
        enable_runs):
    for rank, result in enumerate(run["late_check"] for run in enable_runs):
        assert "error" not in result, result["error"]
        assert result["before"] == (False, 0)  # built with no group, differing or not
        # Rank and world size are taken once the group exists; the second step (the first
        # is DDP's dense bucket-rebuild step) is sparse: at most k = round(0.05 * 4160)
        # entries (a shared mask's union of the ranks' proposals may hold fewer).
        assert result["after"] == (rank, 2, 2)
        density, bytes_sent, dense_bytes = result["acted"]
        assert 0 < density <= DENSITY + 1e-3 and bytes_sent < dense_bytes, result["acted"]
        # The differing densities are refused, on every rank, at the first exchange.
        assert "density" in result["mismatch"], result["mismatch"]
