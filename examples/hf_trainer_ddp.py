"""HF Trainer on DDP (CPU gloo or GPU) with distk: one callback.

    torchrun --nproc_per_node 2 examples/hf_trainer_ddp.py
    torchrun --nproc_per_node 2 examples/hf_trainer_ddp.py --resume

``DistkCallback(cfg)`` registers distk's DDP hook on ``trainer.model_wrapped``, adds
``distk/*`` statistics to the Trainer's logs and saves/restores every rank's residuals
with the Trainer's checkpoints.
"""

from __future__ import annotations

import argparse
import os

import torch
from common import add_distk_arguments, distk_config, distk_summary, tiny_gpt2, token_rows
from transformers import Trainer, TrainingArguments

from distk.integrations.hf import DistkCallback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    add_distk_arguments(parser)
    parser.add_argument("--output-dir", default="runs/examples/hf_trainer_ddp")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint")
    args = parser.parse_args()

    rank = int(os.environ.get("RANK", 0))
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=8,
        learning_rate=1e-3, logging_steps=5, save_steps=10, report_to=[],
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
    callback = DistkCallback(distk_config(args))  # the one line
    trainer = Trainer(model=tiny_gpt2(), args=training_args,
                      train_dataset=token_rows(512, seed=rank), callbacks=[callback])
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    print(f"[rank {rank}] {distk_summary(callback.state)}")


if __name__ == "__main__":
    main()
