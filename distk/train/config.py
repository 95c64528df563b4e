"""Typed configuration of the main training job (``distk-train``).

One JSON file (``configs/*.json``) holds every setting in sections::

    {"name": "default", "seed": 0, "run_root": "runs",
     "data": {...}, "model": {...}, "train": {...}, "logging": {...},
     "sparsity": {...}}          # the one distk.SparsityConfig, embedded as-is

Every field has a docstring and is validated in ``__post_init__``; unknown keys are
rejected with the closest valid key suggested. Overrides from the command line use the
same dotted names: ``--set train.steps=50 --set sparsity.density=0.01``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distk.config import SparsityConfig

__all__ = [
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_overrides",
    "load_config",
]


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} is invalid: allowed {allowed}")


@dataclass
class DataConfig:
    """Where the byte-level text corpus comes from and how it is split (see docs/train.md)."""

    root: str | None = None
    """Directory whose files form the corpus; None = the Python standard library
    (``sysconfig.get_paths()["stdlib"]``), present on every machine without a download."""

    pattern: str = "*.py"
    """Glob (matched recursively under ``root``) selecting the corpus files."""

    exclude_dirs: list[str] = field(
        default_factory=lambda: ["site-packages", "dist-packages", "test", "tests", "idle_test"]
    )
    """Directory names skipped anywhere under ``root`` (third-party packages, test suites)."""

    val_fraction: float = 0.05
    """Fraction of files held out for validation, chosen by a hash of their relative path,
    in [0, 1)."""

    max_train_bytes: int = 2_000_000
    """Cap on the training split in bytes (files taken in sorted path order), >= 1024."""

    max_val_bytes: int = 200_000
    """Cap on the validation split in bytes, >= 1024."""

    def __post_init__(self) -> None:
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction", self.val_fraction,
               "a float in (0, 1)")
        _check(self.max_train_bytes >= 1024, "data.max_train_bytes", self.max_train_bytes,
               "an int >= 1024")
        _check(self.max_val_bytes >= 1024, "data.max_val_bytes", self.max_val_bytes,
               "an int >= 1024")
        _check(bool(self.pattern), "data.pattern", self.pattern, "a non-empty glob")


@dataclass
class ModelConfig:
    """Shape of the byte-level GPT (vocabulary: the 256 byte values)."""

    n_layer: int = 4
    """Number of transformer blocks, >= 1."""

    n_head: int = 4
    """Attention heads per block; must divide ``d_model``."""

    d_model: int = 128
    """Width of the residual stream, >= 8."""

    context: int = 128
    """Context length in bytes (sequence length of every batch), >= 2."""

    mlp_ratio: int = 4
    """Hidden width of the MLP as a multiple of ``d_model``, >= 1."""

    dropout: float = 0.0
    """Dropout probability in [0, 1); 0 keeps runs bitwise reproducible across resumes."""

    def __post_init__(self) -> None:
        _check(self.n_layer >= 1, "model.n_layer", self.n_layer, "an int >= 1")
        _check(self.d_model >= 8, "model.d_model", self.d_model, "an int >= 8")
        _check(self.n_head >= 1 and self.d_model % self.n_head == 0, "model.n_head",
               self.n_head, f"a positive divisor of model.d_model={self.d_model}")
        _check(self.context >= 2, "model.context", self.context, "an int >= 2")
        _check(self.mlp_ratio >= 1, "model.mlp_ratio", self.mlp_ratio, "an int >= 1")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "a float in [0, 1)")


@dataclass
class OptimConfig:
    """Optimisation, evaluation, checkpointing and process settings (section ``train``)."""

    steps: int = 300
    """Total optimiser steps of the run (the learning-rate schedule spans them), >= 1."""

    batch_size: int = 16
    """Sequences per rank per step (global batch = batch_size * world size), >= 1."""

    optimizer: str = "sgd"
    """"adamw" or "sgd" (Nesterov momentum ``beta1``). Error feedback restores the
    magnitude of rarely sent coordinates, which SGD keeps but Adam's per-coordinate
    normalisation undoes, so sparse modes track dense far more closely under SGD."""

    lr: float = 0.3
    """Peak learning rate, > 0 (0.3 suits SGD on the default model; AdamW wants ~2e-3)."""

    min_lr_ratio: float = 0.1
    """Cosine decay ends at ``lr * min_lr_ratio``; in [0, 1]."""

    lr_warmup_steps: int = 20
    """Linear learning-rate warm-up steps, >= 0."""

    weight_decay: float = 0.0
    """Weight decay on matrices (biases, norms and embeddings get none), >= 0."""

    beta1: float = 0.9
    """AdamW beta1, or the SGD momentum; in [0, 1)."""

    beta2: float = 0.95
    """AdamW beta2, in [0, 1)."""

    grad_clip: float = 1.0
    """Clip the (communicated) gradient's global norm to this; 0 = off. >= 0."""

    momentum_correction: bool = True
    """Sparse modes under SGD move the momentum ``beta1`` from the optimizer into the
    compressor (``sparsity.momentum``, Deep Gradient Compression's momentum correction:
    velocity accumulates before selection, so unsent coordinates keep their momentum);
    the dense mode keeps it in the optimizer. Ignored when ``sparsity.momentum`` is set
    or the optimizer is AdamW."""

    adamw_dense_steps: int = 75
    """Sparse modes under AdamW exchange at least this many first steps dense
    (``sparsity.dense_steps`` is raised to it; the dense mode and SGD are untouched).
    Measured on the default model: see docs/train.md, "Sparse training with AdamW". >= 0."""

    adamw_warmup_steps: int = 200
    """Sparse modes under AdamW decay the density over at least this many steps after the
    dense ones (``sparsity.warmup_steps`` is raised to it), from ``sparsity.warmup_density``
    to ``sparsity.density``. >= 0."""

    eval_every: int = 100
    """Evaluate on the validation split every N steps (and always at the end); 0 = end only."""

    eval_windows: int = 128
    """Validation windows (of ``model.context`` bytes, evenly spaced over the split), shared
    out across ranks, >= 1."""

    checkpoint_every: int = 0
    """Save a checkpoint every N steps (and at ``stop_after``); 0 = never."""

    stop_after: int | None = None
    """Stop after this many steps (checkpointing first) without changing the schedule of
    ``steps``; for time-sliced or preemptible jobs, resumed later with ``--resume``."""

    device: str = "auto"
    """"auto" (CUDA when available, each rank on ``cuda:LOCAL_RANK``), "cpu" or "cuda"."""

    backend: str = "auto"
    """torch.distributed backend: "auto" (nccl on CUDA, gloo on CPU), "gloo" or "nccl"."""

    num_threads: int = 1
    """``torch.set_num_threads`` per rank; 0 = leave torch's default."""

    bucket_cap_mb: float = 25.0
    """DDP gradient bucket size in MiB (each bucket is compressed as one tensor), > 0."""

    comm_hook: str = "distk"
    """DDP communication hook: "distk" (the sparse compressor; ``sparsity.method`` is the
    mode), or one of PyTorch's own hooks as a baseline through the same loop, data and
    logging: "bf16" (``default_hooks.bf16_compress_hook``) or "powersgd"
    (``powerSGD_hook.powerSGD_hook``, rank ``powersgd_rank``, error feedback and warm
    start on, vanilla all-reduce for the first max(2, ``lr_warmup_steps``, 10% of
    ``steps``) steps as PyTorch recommends). The PyTorch hooks need
    ``sparsity.method="dense"`` (distk is then unused), the DDP job (not DeepSpeed) and no
    checkpoints; their bytes per step are computed from the tensor sizes (see
    ``distk.train.peer_hooks``)."""

    powersgd_rank: int = 1
    """``matrix_approximation_rank`` of the "powersgd" hook, >= 1."""

    powersgd_start_iter: int | None = None
    """``start_powerSGD_iter`` of the "powersgd" hook (vanilla all-reduce before it), >= 2;
    None = max(2, ``lr_warmup_steps``, 10% of ``steps``)."""

    powersgd_bf16: bool = False
    """Run the "powersgd" hook inside PyTorch's ``bf16_compress_wrapper``: its factors,
    error feedback and uncompressed tensors in bf16 (also on gloo; see
    ``distk.train.peer_hooks``)."""

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "train.steps", self.steps, "an int >= 1")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "an int >= 1")
        _check(self.optimizer in ("adamw", "sgd"), "train.optimizer", self.optimizer,
               '"adamw" or "sgd"')
        _check(self.lr > 0, "train.lr", self.lr, "a float > 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", self.min_lr_ratio,
               "a float in [0, 1]")
        _check(self.lr_warmup_steps >= 0, "train.lr_warmup_steps", self.lr_warmup_steps,
               "an int >= 0")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a float >= 0")
        _check(0.0 <= self.beta1 < 1.0, "train.beta1", self.beta1, "a float in [0, 1)")
        _check(0.0 <= self.beta2 < 1.0, "train.beta2", self.beta2, "a float in [0, 1)")
        for key in ("adamw_dense_steps", "adamw_warmup_steps"):
            _check(getattr(self, key) >= 0, f"train.{key}", getattr(self, key), "an int >= 0")
        _check(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "a float >= 0")
        _check(self.eval_every >= 0, "train.eval_every", self.eval_every, "an int >= 0")
        _check(self.eval_windows >= 1, "train.eval_windows", self.eval_windows, "an int >= 1")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", self.checkpoint_every,
               "an int >= 0")
        _check(self.stop_after is None or 1 <= self.stop_after <= self.steps,
               "train.stop_after", self.stop_after, f"null or an int in [1, {self.steps}]")
        _check(self.device in ("auto", "cpu", "cuda"), "train.device", self.device,
               '"auto", "cpu" or "cuda"')
        _check(self.backend in ("auto", "gloo", "nccl"), "train.backend", self.backend,
               '"auto", "gloo" or "nccl"')
        _check(self.num_threads >= 0, "train.num_threads", self.num_threads, "an int >= 0")
        _check(self.bucket_cap_mb > 0, "train.bucket_cap_mb", self.bucket_cap_mb,
               "a float > 0")
        _check(self.comm_hook in ("distk", "bf16", "powersgd"), "train.comm_hook",
               self.comm_hook, '"distk", "bf16" or "powersgd"')
        _check(self.powersgd_rank >= 1, "train.powersgd_rank", self.powersgd_rank,
               "an int >= 1")
        _check(self.powersgd_start_iter is None or self.powersgd_start_iter >= 2,
               "train.powersgd_start_iter", self.powersgd_start_iter, "null or an int >= 2")
        if self.comm_hook != "distk":
            _check(self.checkpoint_every == 0 and self.stop_after is None, "train.comm_hook",
                   self.comm_hook, '"distk" when checkpointing (checkpoint_every > 0 or '
                   "stop_after set): PyTorch's hook states are not checkpointed here")


@dataclass
class LoggingConfig:
    """What rank 0 reports: progress bar, JSONL file, wandb."""

    log_every: int = 10
    """Log train metrics (mean loss over the interval, across ranks) every N steps, >= 1."""

    progress: bool = True
    """Show a tqdm progress bar on rank 0."""

    jsonl: bool = True
    """Write ``metrics.jsonl`` into the run directory."""

    wandb: bool = False
    """Log to Weights & Biases (needs ``pip install distk[wandb]``); offline when there are
    no credentials (no WANDB_API_KEY and no netrc entry)."""

    wandb_project: str = "distk"
    """wandb project name."""

    wandb_entity: str | None = None
    """wandb entity (team or user); None = the account's default."""

    histogram_every: int = 100
    """Log a wandb histogram of the exchanged update's magnitudes every N steps; 0 = never."""

    def __post_init__(self) -> None:
        _check(self.log_every >= 1, "logging.log_every", self.log_every, "an int >= 1")
        _check(self.histogram_every >= 0, "logging.histogram_every", self.histogram_every,
               "an int >= 0")
        _check(bool(self.wandb_project), "logging.wandb_project", self.wandb_project,
               "a non-empty string")


@dataclass
class TrainConfig:
    """The whole training job: data, model, optimisation, logging and distk's sparsity."""

    name: str = "default"
    """Run name; the run directory is ``<run_root>/<name>``."""

    seed: int = 0
    """Seed of model initialisation and data sampling (the same in every ``--compare`` mode)."""

    run_root: str = "runs"
    """Directory holding run directories."""

    data: DataConfig = field(default_factory=DataConfig)
    """Corpus settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape."""

    train: OptimConfig = field(default_factory=OptimConfig)
    """Optimisation, evaluation, checkpointing and process settings."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Reporting settings."""

    sparsity: SparsityConfig = field(default_factory=lambda: SparsityConfig(warmup_steps=50))
    """distk's gradient compression (``method`` "dense" | "exact" | "bucketed" is the mode).
    The job's default differs from ``SparsityConfig()`` in ``warmup_steps=50``: the density
    decays from 0.25 to 0.01 over the first 50 steps (DGC's warm-up)."""

    def __post_init__(self) -> None:
        _check(bool(self.name) and "/" not in self.name, "name", self.name,
               "a non-empty string without '/'")
        _check(isinstance(self.seed, int) and self.seed >= 0, "seed", self.seed, "an int >= 0")
        if self.train.comm_hook != "distk":
            _check(self.sparsity.method == "dense", "sparsity.method", self.sparsity.method,
                   f'"dense" with train.comm_hook={self.train.comm_hook!r} (PyTorch\'s hook '
                   "replaces distk's; --compare and --mode exact/bucketed need comm_hook "
                   '"distk")')

    @property
    def run_dir(self) -> Path:
        """``<run_root>/<name>``."""
        return Path(self.run_root) / self.name

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (the format of ``configs/*.json``)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "sparsity":
                out[f.name] = value.to_dict()
            elif dataclasses.is_dataclass(value):
                out[f.name] = dataclasses.asdict(value)
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build and validate from a dict; unknown keys raise ValueError naming the closest
        valid key, wrong types raise ValueError naming key, value and expected type."""
        if not isinstance(d, dict):
            raise ValueError(f"a training config must be a JSON object, got {type(d).__name__}")
        kwargs = fields_from_dict(cls, d, prefix="")
        sections = {"data": DataConfig, "model": ModelConfig, "train": OptimConfig,
                    "logging": LoggingConfig}
        for name, section_cls in sections.items():
            if name in kwargs:
                sub = kwargs[name]
                if not isinstance(sub, dict):
                    raise ValueError(f"{name} must be a JSON object, got {sub!r}")
                kwargs[name] = section_cls(**fields_from_dict(section_cls, sub, f"{name}."))
        if "sparsity" in kwargs:
            if not isinstance(kwargs["sparsity"], dict):
                raise ValueError(f"sparsity must be a JSON object, got {kwargs['sparsity']!r}")
            kwargs["sparsity"] = SparsityConfig.from_dict(kwargs["sparsity"])
        return cls(**kwargs)


def _type_ok(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits ``annotation`` (ints accepted for floats, converted)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(annotation):
            ok, converted = _type_ok(value, arm)
            if ok:
                return True, converted
        return False, value
    if annotation is type(None):
        return value is None, value
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            return False, value
        converted = []
        for v in value:
            ok, c = _type_ok(v, item)
            if not ok:
                return False, value
            converted.append(c)
        return True, converted
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if annotation is str:
        return isinstance(value, str), value
    return True, value  # nested sections are checked by their own from_dict


def _type_name(annotation: Any) -> str:
    """``int``, ``float | None``, ``list[str]``... for error messages."""
    if isinstance(annotation, type) and typing.get_origin(annotation) is None:
        return "null" if annotation is type(None) else annotation.__name__
    return str(annotation).replace("typing.", "").replace("NoneType", "null")


def fields_from_dict(cls: type, d: dict[str, Any], prefix: str) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out: dict[str, Any] = {}
    for key, value in d.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
            raise ValueError(
                f"unknown config key {prefix + key!r}{hint} (valid: {', '.join(names)})"
            )
        ok, converted = _type_ok(value, hints[key])
        if not ok:
            expected = _type_name(hints[key])
            raise ValueError(f"{prefix}{key}={value!r} is invalid: expected {expected}")
        out[key] = converted
    return out


def _parse_value(text: str) -> Any:
    """JSON value when it parses (numbers, true/false/null, lists), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as JSON, else strings) to a copy
    of the config dict ``d``."""
    out = json.loads(json.dumps(d))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        target = out
        for part in parts[:-1]:
            sub = target.setdefault(part, {})
            if not isinstance(sub, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
            target = sub
        target[parts[-1]] = _parse_value(raw)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None
                ) -> TrainConfig:
    """Read a JSON config (None = the built-in defaults, identical to configs/default.json),
    apply ``--set`` overrides and validate."""
    base: dict[str, Any] = {}
    if path is not None:
        with open(path) as fh:
            base = json.load(fh)
    return TrainConfig.from_dict(apply_overrides(base, overrides or []))
