"""Accelerate (DDP on CPU gloo or GPU) with distk, and per-rank save_state/load_state.

    torchrun --nproc_per_node 2 examples/accelerate_ddp.py
    accelerate launch --num_processes 2 --cpu examples/accelerate_ddp.py

After ``accelerator.prepare``, ``distk.integrations.accelerate.enable`` registers distk
on the prepared model and makes ``save_state`` / ``load_state`` carry every rank's own
residuals.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from common import add_distk_arguments, distk_config, distk_summary, tiny_gpt2, token_rows

import distk
import distk.integrations.accelerate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    add_distk_arguments(parser)
    parser.add_argument("--output-dir", default="runs/examples/accelerate_ddp")
    args = parser.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(
        token_rows(512, seed=accelerator.process_index), batch_size=8, shuffle=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = distk.integrations.accelerate.enable(  # the one line
        accelerator, distk_config(args), model=model)

    batches = iter(loader)
    for step in range(1, args.steps + 1):
        batch = {key: value.to(accelerator.device) for key, value in next(batches).items()}
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0:
            accelerator.print(f"step {step} loss {loss.item():.3f} "
                              f"{distk.integrations.auto.metrics(state)}")
    accelerator.save_state(args.output_dir)   # + distk_rank<NNNNN>.pt from every rank
    accelerator.load_state(args.output_dir)   # every rank gets its own residuals back
    print(f"[rank {accelerator.process_index}] {distk_summary(state)}")


if __name__ == "__main__":
    main()
