"""Pieces the framework examples share: a GPT-2-shaped model built from a config (no
download) and a learnable token data set made on the spot."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB, SEQ = 256, 32


def add_distk_arguments(parser) -> None:
    """``--density`` and the Adam schedule's two lengths (distk's defaults are 75 dense
    steps and a 200-step density warm-up under AdamW; these 20-step demos shorten them so
    that the sparse exchange shows)."""
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--adam-dense-steps", type=int, default=5,
                        help="dense steps under AdamW (distk's default 75; 5 for the demo)")
    parser.add_argument("--adam-warmup-steps", type=int, default=5,
                        help="density warm-up under AdamW (distk's default 200; 5 here)")
    parser.add_argument("--outer", action="store_true",
                        help="outer synchronisation at SparsityConfig.adamw_outer() (DDP's "
                             "all-reduce off, a sync every 5 steps; the dense start "
                             "shortened to 1 sync for the demo, distk's default 10)")


def distk_config(args) -> dict:
    """The distk config of the examples' arguments."""
    if args.outer:
        from distk import SparsityConfig

        return SparsityConfig.adamw_outer(dense_steps=1).to_dict()
    return {"density": args.density, "adam_dense_steps": args.adam_dense_steps,
            "adam_warmup_steps": args.adam_warmup_steps}


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """2 layers, width 64: ~0.1M parameters, enough for distk to have something to drop."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def token_rows(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Rows where each token is the previous one + 1 (mod VOCAB): a model learns it fast."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, VOCAB, (count, 1), generator=generator)
    rows = (starts + torch.arange(SEQ)) % VOCAB
    return [{"input_ids": row, "labels": row.clone()} for row in rows]


def distk_summary(state) -> str:
    """One line of the last exchange's statistics."""
    stats = state.stats
    return (f"distk: iteration {state.iteration}, effective density {stats.density:.4f} "
            f"(target {stats.target_density}), sent {stats.bytes_sent} B vs dense "
            f"{stats.dense_bytes} B ({stats.compression:.1f}x less)")
