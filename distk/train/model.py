"""A small GPT-style byte-level language model, and its evaluation.

Pre-norm transformer blocks (causal self-attention through
``F.scaled_dot_product_attention``, GELU MLP), learned position embeddings and an output
head tied to the byte embedding. Vocabulary: the 256 byte values.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from distk.train.config import ModelConfig, TrainConfig

__all__ = ["VOCAB_SIZE", "ByteGPT", "build_model", "evaluate"]

VOCAB_SIZE = 256


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        qkv = self.qkv(x).view(batch, time, 3, self.n_head, width // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(batch, time, width))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_mlp = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model),
            nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class ByteGPT(nn.Module):
    """``forward(inputs (B, T) int64, targets (B, T) int64 | None) -> (logits (B, T, 256),
    mean cross-entropy | None)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(VOCAB_SIZE, cfg.d_model)
        self.position_embedding = nn.Embedding(cfg.context, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_final = nn.LayerNorm(cfg.d_model)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections keeps the stream's variance flat.
        for name, param in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        time = inputs.shape[1]
        if time > self.cfg.context:
            raise ValueError(f"sequence length {time} exceeds model.context={self.cfg.context}")
        positions = torch.arange(time, device=inputs.device)
        x = self.drop(self.token_embedding(inputs) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        logits = self.ln_final(x) @ self.token_embedding.weight.t()  # tied output head
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1))
        return logits, loss


def build_model(cfg: TrainConfig, device: torch.device | str = "cpu") -> ByteGPT:
    """A freshly initialised model, seeded by ``cfg.seed`` (the same on every rank)."""
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        model = ByteGPT(cfg.model)
    return model.to(device)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean per-byte cross-entropy over ``batches``, summed over all ranks of the default
    process group when one is initialised (every rank must call it). ``model`` is the bare
    module (not the DDP wrapper); its train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for inputs, targets in batches:
        logits, _ = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE).float(), targets.reshape(-1),
                               reduction="sum")
        totals[0] += loss.double()
        totals[1] += targets.numel()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    model.train(was_training)
    return float(totals[0] / totals[1])
