"""PyTorch Lightning DDP (CPU gloo or GPU) with distk: one callback.

    torchrun --nproc_per_node 2 examples/lightning_ddp.py
    torchrun --nproc_per_node 2 examples/lightning_ddp.py --resume

Lightning registers DDP communication hooks only on CUDA; ``DistkCallback`` enables
distk on the strategy's DDP model itself, on CPU and GPU, logs ``distk/*`` and writes
every rank's residuals next to each checkpoint.
"""

from __future__ import annotations

import argparse
import os

import pytorch_lightning as pl
import torch
from common import add_distk_arguments, distk_config, distk_summary, tiny_gpt2, token_rows

from distk.integrations.lightning import DistkCallback


class LitGPT2(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_gpt2()

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    add_distk_arguments(parser)
    parser.add_argument("--output-dir", default="runs/examples/lightning_ddp")
    parser.add_argument("--resume", action="store_true", help="resume from last.ckpt")
    args = parser.parse_args()

    callback = DistkCallback(distk_config(args))  # the one line
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=os.path.join(args.output_dir, "ckpt"),
                                               save_last=True, every_n_train_steps=10)
    trainer = pl.Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu", devices=2, strategy="ddp",
        max_steps=args.steps, callbacks=[callback, checkpoints],
        default_root_dir=args.output_dir, logger=False, enable_progress_bar=False,
        enable_model_summary=False)
    rank = int(os.environ.get("RANK", 0))
    loader = torch.utils.data.DataLoader(token_rows(512, seed=rank), batch_size=8)
    trainer.fit(LitGPT2(), loader, ckpt_path="last" if args.resume else None)
    print(f"[rank {trainer.global_rank}] {distk_summary(callback.state)}")


if __name__ == "__main__":
    main()
