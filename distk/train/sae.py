"""The k-sparse autoencoder job: exact vs bucketed TopK on a language model's activations.

The autoencoder (:class:`distk.nn.sae.SparseAutoencoder`) follows Gao et al. 2024
("Scaling and evaluating sparse autoencoders"):

    z     = ReLU(TopK(W_enc (x - b_pre) + b_enc))        (k non-zeros at most)
    x_hat = W_dec z + b_pre

* ``b_pre`` (pre-encoder bias) starts at the geometric median of a data sample;
* ``W_dec`` has unit-norm columns: they are renormalised after every step, and the part
  of their gradient parallel to them is removed before it;
* ``W_enc`` starts as ``W_dec^T`` (tied initialisation; trained untied);
* loss: normalised MSE ``||x - x_hat||^2 / ||x - mean(x)||^2`` plus the AuxK loss
  (``aux_coef`` times the normalised MSE with which the top-``aux_k`` *dead* latents
  reconstruct the residual ``x - x_hat``), which revives latents that stopped firing;
* inputs are scaled by one constant so that their mean squared norm is ``d_model``.

The TopK layer is ``distk.nn.TopK`` with ``method="exact"`` (``torch.topk``) or
``"bucketed"`` (distk's approximate top-k); the job trains one autoencoder per method from
the same initialisation on the same batches and compares normalised MSE, dead latents,
time per step and the selection's recall.

Activations: the residual stream after block ``layer`` of distk-train's byte-level GPT
(``distk.train.model``), loaded from a checkpoint, or from a short training run of
``distk-train`` when there is none; or synthetic sparse-dictionary data
(``source="synthetic"``).

Run: ``python -m distk.train.sae --config configs/sae.json`` (see docs/activations.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distk.nn.sae import SparseAutoencoder, geometric_median
from distk.selection import resolve_buckets
from distk.train.checkpoint import checkpoint_dir
from distk.train.config import apply_overrides, fields_from_dict
from distk.train.config import load_config as load_train_config
from distk.train.data import build_corpus, build_data
from distk.train.loop import setup_distributed, train
from distk.train.model import build_model

__all__ = [
    "SAEConfig",
    "collect_lm_activations",
    "load_activations",
    "load_config",
    "main",
    "run",
    "synthetic_activations",
    "train_sae",
]

SOURCES = ("lm", "synthetic")
METHODS = ("exact", "bucketed")


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"sae.{key}={value!r} is invalid: allowed {allowed}")


@dataclass
class SAEConfig:
    """Settings of ``python -m distk.train.sae`` (one JSON object, ``configs/sae.json``)."""

    source: str = "lm"
    """Where activations come from: ``"lm"`` (distk-train's GPT) or ``"synthetic"``."""

    methods: list[str] = field(default_factory=lambda: ["exact", "bucketed"])
    """TopK selection methods to train and compare, from ``"exact"``, ``"bucketed"``."""

    n_latents: int = 2048
    """Number of latents (dictionary size), >= 2."""

    k: int = 32
    """Active latents per token, in [1, n_latents]."""

    recall_target: float | None = None
    """Expected recall of the bucketed selection, in (0, 1]; None = distk's default
    (0.95). Used when ``buckets`` / ``k_per_bucket`` are not both given."""

    buckets: int | None = None
    """Buckets of the bucketed selection (None = chosen for ``recall_target``)."""

    k_per_bucket: int | None = None
    """Entries kept per bucket (None = chosen for ``recall_target``)."""

    steps: int = 300
    """Optimiser steps per method, >= 1."""

    batch_size: int = 1024
    """Tokens per step, >= 1."""

    lr: float = 1e-3
    """Adam learning rate, > 0."""

    aux_k: int = 64
    """Dead latents used by the AuxK loss per token (0 = no AuxK loss), >= 0."""

    aux_coef: float = 1.0 / 32
    """Weight of the AuxK loss, >= 0 (Gao et al. use 1/32)."""

    dead_after_tokens: int = 32768
    """A latent is dead (for AuxK and the training dead fraction) when it has not fired
    in this many training tokens, >= 1."""

    eval_tokens: int = 8192
    """Held-out tokens for the final metrics, >= 1."""

    train_tokens: int = 65536
    """Training tokens collected (re-shuffled every epoch), >= batch_size."""

    seed: int = 0
    """Seed of initialisation, batch order and synthetic data, >= 0."""

    device: str = "auto"
    """``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``."""

    num_threads: int = 0
    """``torch.set_num_threads``; 0 = leave torch's default."""

    output: str = "runs/sae/results.json"
    """JSON file the results are written to (its directory is created)."""

    lm_config: str | None = None
    """distk-train config (JSON) of the language model; None = distk-train's defaults."""

    lm_overrides: list[str] = field(default_factory=list)
    """``section.key=value`` overrides applied to ``lm_config`` (as ``distk-train --set``),
    e.g. ``["train.steps=60"]`` for the short run."""

    lm_checkpoint: str | None = None
    """Checkpoint file (``rank-0.pt`` of distk-train) or run directory to load; None =
    ``<run_root>/<name>/checkpoint/rank-0.pt`` of the LM config, trained by a short
    distk-train run (single process, with a checkpoint at the end) when missing."""

    layer: int | None = None
    """Block whose output (residual stream) is read, in [0, n_layer); None = the middle
    block (``n_layer // 2``)."""

    synthetic_d_model: int = 64
    """Synthetic data: width of the activations, >= 2."""

    synthetic_features: int = 1024
    """Synthetic data: ground-truth dictionary size, >= 1."""

    synthetic_active: int = 8
    """Synthetic data: features active per token, in [1, synthetic_features]."""

    synthetic_noise: float = 0.01
    """Synthetic data: standard deviation of added Gaussian noise per dimension, >= 0."""

    def __post_init__(self) -> None:
        _check(self.source in SOURCES, "source", self.source, f"one of {SOURCES}")
        _check(isinstance(self.methods, list) and len(self.methods) > 0
               and all(m in METHODS for m in self.methods)
               and len(set(self.methods)) == len(self.methods),
               "methods", self.methods, f"a non-empty list of distinct names from {METHODS}")
        _check(self.n_latents >= 2, "n_latents", self.n_latents, "an int >= 2")
        _check(1 <= self.k <= self.n_latents, "k", self.k,
               f"an int in [1, n_latents={self.n_latents}]")
        _check(self.recall_target is None or 0.0 < self.recall_target <= 1.0,
               "recall_target", self.recall_target, "null or a float in (0, 1]")
        _check(self.buckets is None or 1 <= self.buckets <= self.n_latents, "buckets",
               self.buckets, f"null or an int in [1, n_latents={self.n_latents}]")
        _check(self.k_per_bucket is None or self.k_per_bucket >= 1, "k_per_bucket",
               self.k_per_bucket, "null or an int >= 1")
        _check(self.steps >= 1, "steps", self.steps, "an int >= 1")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "an int >= 1")
        _check(self.lr > 0, "lr", self.lr, "a float > 0")
        _check(self.aux_k >= 0, "aux_k", self.aux_k, "an int >= 0")
        _check(self.aux_coef >= 0, "aux_coef", self.aux_coef, "a float >= 0")
        _check(self.dead_after_tokens >= 1, "dead_after_tokens", self.dead_after_tokens,
               "an int >= 1")
        _check(self.eval_tokens >= 1, "eval_tokens", self.eval_tokens, "an int >= 1")
        _check(self.train_tokens >= self.batch_size, "train_tokens", self.train_tokens,
               f"an int >= batch_size={self.batch_size}")
        _check(self.seed >= 0, "seed", self.seed, "an int >= 0")
        _check(self.device in ("auto", "cpu", "cuda"), "device", self.device,
               '"auto", "cpu" or "cuda"')
        _check(self.num_threads >= 0, "num_threads", self.num_threads, "an int >= 0")
        _check(self.layer is None or self.layer >= 0, "layer", self.layer,
               "null or an int >= 0")
        _check(self.synthetic_d_model >= 2, "synthetic_d_model", self.synthetic_d_model,
               "an int >= 2")
        _check(self.synthetic_features >= 1, "synthetic_features", self.synthetic_features,
               "an int >= 1")
        _check(1 <= self.synthetic_active <= self.synthetic_features, "synthetic_active",
               self.synthetic_active, f"an int in [1, synthetic_features="
               f"{self.synthetic_features}]")
        _check(self.synthetic_noise >= 0, "synthetic_noise", self.synthetic_noise,
               "a float >= 0")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        """Build and validate from a dict: unknown keys raise ValueError naming the
        closest valid key, wrong types name the key, value and expected type."""
        if not isinstance(d, dict):
            raise ValueError(f"an SAE config must be a JSON object, got {type(d).__name__}")
        return cls(**fields_from_dict(cls, d, prefix="sae."))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (the format of ``configs/sae.json``)."""
        return dataclasses.asdict(self)

    def resolve_device(self) -> torch.device:
        """The device to train on."""
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("sae.device='cuda' but torch.cuda.is_available() is False")
        if self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available()):
            return torch.device("cuda")
        return torch.device("cpu")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None
                ) -> SAEConfig:
    """Read a JSON SAE config (None = defaults), apply ``key=value`` overrides, validate."""
    base: dict[str, Any] = {}
    if path is not None:
        with open(path) as fh:
            base = json.load(fh)
    return SAEConfig.from_dict(apply_overrides(base, overrides or []))


def synthetic_activations(cfg: SAEConfig) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Tokens that are sparse combinations of a random unit-norm dictionary:
    ``synthetic_active`` features per token, drawn with Zipf-like frequencies
    (``p_i ~ 1/sqrt(i+1)``), exponential magnitudes, plus Gaussian noise.

    Returns ``(train (train_tokens, d), eval (eval_tokens, d), info)``.
    """
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    d, features = cfg.synthetic_d_model, cfg.synthetic_features
    dictionary = torch.randn(features, d, generator=gen)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    frequency = 1.0 / torch.arange(1, features + 1, dtype=torch.float64).sqrt()
    total = cfg.train_tokens + cfg.eval_tokens
    chunks = []
    for start in range(0, total, 8192):
        rows = min(8192, total - start)
        active = torch.multinomial(frequency.expand(rows, -1), cfg.synthetic_active,
                                   replacement=False, generator=gen)
        magnitude = torch.empty(rows, cfg.synthetic_active).exponential_(generator=gen)
        codes = torch.zeros(rows, features).scatter_(1, active, magnitude)
        chunks.append(codes @ dictionary
                      + cfg.synthetic_noise * torch.randn(rows, d, generator=gen))
    data = torch.cat(chunks)
    info = {"source": "synthetic", "d_model": d, "features": features,
            "active": cfg.synthetic_active}
    return data[:cfg.train_tokens], data[cfg.train_tokens:], info


def _lm_checkpoint_path(cfg: SAEConfig, lm_cfg: Any) -> Path:
    if cfg.lm_checkpoint is None:
        return checkpoint_dir(lm_cfg.run_dir) / "rank-0.pt"
    path = Path(cfg.lm_checkpoint)
    return checkpoint_dir(path) / "rank-0.pt" if path.is_dir() else path


def _train_lm(lm_cfg: Any, log: Any) -> None:
    """A short single-process distk-train run that ends with a checkpoint."""
    lm_cfg = dataclasses.replace(
        lm_cfg, train=dataclasses.replace(lm_cfg.train, checkpoint_every=lm_cfg.train.steps))
    created = not (dist.is_available() and dist.is_initialized())
    setup_distributed(lm_cfg)
    try:
        result = train(lm_cfg, lm_cfg.run_dir)
    finally:
        if created:
            dist.destroy_process_group()
    log(f"[sae] trained the LM for {result.steps} steps: val loss "
        f"{result.final_val_loss:.3f} (run dir {lm_cfg.run_dir})")


def collect_lm_activations(cfg: SAEConfig, log: Any = print
                           ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Residual-stream activations after block ``cfg.layer`` of distk-train's GPT.

    Loads the checkpoint (see ``SAEConfig.lm_checkpoint``), training the LM first when
    there is none. Training tokens come from training-split windows, evaluation tokens
    from the validation split; position 0 of every window is skipped (its activation
    carries no context and is an outlier in norm).
    """
    lm_cfg = load_train_config(cfg.lm_config, cfg.lm_overrides)
    path = _lm_checkpoint_path(cfg, lm_cfg)
    if not path.exists():
        if cfg.lm_checkpoint is not None:
            raise ValueError(f"sae.lm_checkpoint={cfg.lm_checkpoint!r}: no checkpoint at {path}")
        log(f"[sae] no LM checkpoint at {path}: training the LM "
            f"({lm_cfg.train.steps} steps of distk-train)")
        _train_lm(lm_cfg, log)
    payload = torch.load(path, map_location="cpu", weights_only=False)
    model = build_model(lm_cfg)
    model.load_state_dict(payload.get("model", payload))
    model.eval()
    n_layer = lm_cfg.model.n_layer
    layer = n_layer // 2 if cfg.layer is None else cfg.layer
    if layer >= n_layer:
        raise ValueError(f"sae.layer={layer} is invalid: allowed an int in [0, {n_layer})")

    captured: list[torch.Tensor] = []
    hook = model.blocks[layer].register_forward_hook(
        lambda _module, _inputs, output: captured.append(output[:, 1:].detach()))
    corpus = build_corpus(lm_cfg)
    data = build_data(lm_cfg, rank=0, world_size=1, corpus=corpus)
    per_window = lm_cfg.model.context - 1
    try:
        with torch.no_grad():
            step = 0
            while sum(c.shape[0] * c.shape[1] for c in captured) < cfg.train_tokens:
                model(data.train_batch(10_000_000 + step)[0])  # steps the LM never saw
                step += 1
            train = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured])
            captured.clear()
            for inputs, _ in data.val_batches():
                model(inputs)
                if sum(c.shape[0] for c in captured) * per_window >= cfg.eval_tokens:
                    break
            held_out = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured])
    finally:
        hook.remove()
    info = {"source": "lm", "checkpoint": str(path), "step": payload.get("step"),
            "layer": layer, "d_model": lm_cfg.model.d_model, "n_layer": n_layer}
    return train[:cfg.train_tokens], held_out[:cfg.eval_tokens], info


def load_activations(cfg: SAEConfig, log: Any = print
                     ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(train, eval, info)`` activations for ``cfg.source``, scaled by one constant so
    that the training tokens' mean squared norm is ``d_model`` (``info["scale"]``)."""
    if cfg.source == "synthetic":
        train, held_out, info = synthetic_activations(cfg)
    else:
        train, held_out, info = collect_lm_activations(cfg, log)
    scale = math.sqrt(train.shape[1] / train.pow(2).sum(1).mean().item())
    info["scale"] = scale
    info["train_tokens"], info["eval_tokens"] = train.shape[0], held_out.shape[0]
    return train * scale, held_out * scale, info


# ----------------------------------------------------------------------------- training


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _evaluate(sae: SparseAutoencoder, data: torch.Tensor, data_mean: torch.Tensor,
              batch_size: int) -> dict[str, float]:
    squared_error = 0.0
    fired = torch.zeros(sae.n_latents, dtype=torch.bool, device=data.device)
    active = 0
    recall_hits = 0
    for start in range(0, data.shape[0], batch_size):
        x = data[start:start + batch_size]
        reconstruction, latents, pre = sae(x)
        squared_error += (reconstruction - x).pow(2).sum().item()
        fired |= (latents > 0).any(0)
        active += int((latents > 0).sum())
        exact = torch.topk(pre, sae.k, dim=-1).indices
        selected = sae.activation(pre) != 0
        recall_hits += int(selected.gather(-1, exact).sum())
    total = (data - data_mean).pow(2).sum().item()
    return {"nmse": squared_error / total,
            "dead_fraction_eval": 1.0 - fired.float().mean().item(),
            "l0": active / data.shape[0],
            "recall": recall_hits / (data.shape[0] * sae.k)}


def _time_selection(sae: SparseAutoencoder, x: torch.Tensor, repeats: int = 5) -> float:
    """Median seconds of the TopK layer's forward+backward on one batch of pre-acts."""
    with torch.no_grad():
        pre = sae.pre_activations(x)
    times = []
    for _ in range(repeats):
        leaf = pre.clone().requires_grad_(True)
        _sync(pre.device)
        begin = time.perf_counter()
        sae.activation(leaf).sum().backward()
        _sync(pre.device)
        times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2]


def train_sae(cfg: SAEConfig, method: str, train: torch.Tensor, held_out: torch.Tensor,
              progress: bool = True) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Train one autoencoder with the TopK ``method`` on ``train`` tokens; metrics on
    ``held_out``. Same initialisation and batch order for every method (``cfg.seed``)."""
    device = train.device
    gen = torch.Generator().manual_seed(cfg.seed)
    sae = SparseAutoencoder(train.shape[1], cfg.n_latents, cfg.k, method=method,
                            buckets=cfg.buckets, k_per_bucket=cfg.k_per_bucket,
                            recall_target=cfg.recall_target, generator=gen).to(device)
    sample = train[torch.randperm(train.shape[0], generator=gen)[:4096].to(device)]
    with torch.no_grad():
        sae.pre_bias.copy_(geometric_median(sample))
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    data_mean = train.mean(0)
    baseline = (train - data_mean).pow(2).sum(1).mean()  # per-token variance, for the losses
    tokens_since_fired = torch.zeros(cfg.n_latents, dtype=torch.int64, device=device)

    order = torch.empty(0, dtype=torch.int64)
    step_times: list[float] = []
    curve: list[tuple[int, float]] = []
    iterator: Any = range(cfg.steps)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"sae[{method}]", leave=False, file=sys.stderr)
    for step in iterator:
        if order.numel() < cfg.batch_size:
            order = torch.cat([order, torch.randperm(train.shape[0], generator=gen)])
        batch_index, order = order[:cfg.batch_size], order[cfg.batch_size:]
        x = train[batch_index.to(device)]
        _sync(device)
        begin = time.perf_counter()
        reconstruction, latents, pre = sae(x)
        loss = (reconstruction - x).pow(2).sum(-1).mean() / baseline
        with torch.no_grad():
            fired = (latents > 0).any(0)
            tokens_since_fired += x.shape[0]
            tokens_since_fired[fired] = 0
            dead = tokens_since_fired >= cfg.dead_after_tokens
            n_dead = int(dead.sum())
        aux_loss = torch.zeros((), device=device)
        if cfg.aux_k and cfg.aux_coef and n_dead:
            residual = (x - reconstruction).detach()
            aux = sae.aux_reconstruction(pre, dead, min(cfg.aux_k, n_dead))
            aux_loss = (aux - residual).pow(2).sum(-1).mean() / baseline
        total = loss + cfg.aux_coef * aux_loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        sae.remove_parallel_decoder_grad()
        optimizer.step()
        sae.normalize_decoder()
        _sync(device)
        step_times.append(time.perf_counter() - begin)
        if step % 10 == 0 or step == cfg.steps - 1:
            curve.append((step + 1, loss.item()))
            if progress:
                iterator.set_postfix(nmse=f"{loss.item():.4f}", dead=n_dead)

    metrics = _evaluate(sae, held_out, data_mean, cfg.batch_size)
    # The first steps include one-time costs (allocations, kernel builds): excluded.
    warm = step_times[min(5, len(step_times) - 1):]
    metrics.update({
        "method": method,
        "dead_fraction_train": float((tokens_since_fired >= cfg.dead_after_tokens)
                                     .float().mean()),
        "seconds_per_step": sum(warm) / len(warm),
        "selection_seconds": _time_selection(sae, held_out[:cfg.batch_size]),
        "train_curve": curve,
        "steps": cfg.steps,
    })
    if method == "bucketed":
        buckets, k_per_bucket = resolve_buckets(cfg.n_latents, cfg.k, cfg.buckets,
                                                cfg.k_per_bucket, cfg.recall_target)
        metrics.update({"buckets": buckets, "k_per_bucket": k_per_bucket})
    return sae, metrics


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """The comparison table printed by the job."""
    header = (f"{'method':<9} {'nmse':>8} {'dead(eval)':>10} {'dead(train)':>11} "
              f"{'L0':>6} {'recall':>7} {'ms/step':>8} {'topk ms':>8}")
    lines = [header, "-" * len(header)]
    for method, m in results.items():
        lines.append(f"{method:<9} {m['nmse']:>8.4f} {m['dead_fraction_eval']:>10.3f} "
                     f"{m['dead_fraction_train']:>11.3f} {m['l0']:>6.1f} {m['recall']:>7.3f} "
                     f"{1e3 * m['seconds_per_step']:>8.1f} "
                     f"{1e3 * m['selection_seconds']:>8.2f}")
    return "\n".join(lines)


def run(cfg: SAEConfig, progress: bool = True, log: Any = print) -> dict[str, Any]:
    """Load activations, train one autoencoder per method, write ``cfg.output``; returns
    the results dict (config, activation info, per-method metrics)."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = cfg.resolve_device()
    train, held_out, info = load_activations(cfg, log)
    train, held_out = train.to(device), held_out.to(device)
    log(f"[sae] activations: {info}")
    results = {}
    for method in cfg.methods:
        _, results[method] = train_sae(cfg, method, train, held_out, progress=progress)
    log(format_table(results))
    out: dict[str, Any] = {"config": cfg.to_dict(), "activations": info, "device": str(device),
                           "results": results}
    if "exact" in results and "bucketed" in results:
        out["speedup_per_step"] = (results["exact"]["seconds_per_step"]
                                   / results["bucketed"]["seconds_per_step"])
        out["speedup_selection"] = (results["exact"]["selection_seconds"]
                                    / results["bucketed"]["selection_seconds"])
        log(f"[sae] bucketed vs exact: {out['speedup_per_step']:.2f}x per step, "
            f"{out['speedup_selection']:.2f}x in the TopK layer (forward+backward)")
    path = Path(cfg.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    log(f"[sae] wrote {path}")
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m distk.train.sae [--config FILE] [--set key=value ...] [--no-progress]``."""
    parser = argparse.ArgumentParser(
        prog="python -m distk.train.sae",
        description="Train k-sparse autoencoders (exact vs bucketed TopK) on a language "
                    "model's activations and compare them.")
    parser.add_argument("--config", default=None, help="SAE config JSON (configs/sae.json)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a config key (value parsed as JSON), repeatable, "
                             "e.g. --set steps=100 --set 'methods=[\"bucketed\"]'")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as err:
        parser.error(str(err))
    run(cfg, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
