"""HF Trainer + a DeepSpeed JSON with a "distk" block (ZeRO 2 here; ZeRO 0/1 work too).

    torchrun --nproc_per_node 2 examples/hf_trainer_deepspeed.py        # CPU (gloo) or GPU
    torchrun --nproc_per_node 2 examples/hf_trainer_deepspeed.py --resume

The one line is ``distk.deepspeed.install()``: the Trainer's own ``deepspeed.initialize``
then builds an engine that exchanges gradients through distk. ``DistkCallback()`` is
optional here; it adds ``distk/*`` statistics to the Trainer's logs (wandb, ...).
Residuals are saved per rank with every checkpoint and restored on resume.
"""

from __future__ import annotations

import argparse
import os

import torch
from common import distk_summary, tiny_gpt2, token_rows
from transformers import Trainer, TrainingArguments

import distk
from distk.integrations.hf import DistkCallback

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output-dir", default="runs/examples/hf_trainer_deepspeed")
    parser.add_argument("--config", default=os.path.join(HERE, "ds_config.json"))
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint")
    args = parser.parse_args()

    distk.deepspeed.install()  # the one line: deepspeed.initialize honours "distk"
    rank = int(os.environ.get("RANK", 0))
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=8,
        learning_rate=1e-3, logging_steps=5, save_steps=10, report_to=[],
        use_cpu=not torch.cuda.is_available(), deepspeed=args.config, disable_tqdm=True)
    callback = DistkCallback()  # cfg=None: the "distk" block of the DeepSpeed config
    trainer = Trainer(model=tiny_gpt2(), args=training_args,
                      train_dataset=token_rows(512, seed=rank), callbacks=[callback])
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    engine_state = distk.deepspeed.get_state(trainer.model_wrapped)
    print(f"[rank {rank}] distk: seam={engine_state.seam} zero_stage={engine_state.zero_stage}")
    print(f"[rank {rank}] {distk_summary(callback.state)}")


if __name__ == "__main__":
    main()
