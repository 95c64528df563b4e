"""Byte-level text corpus that every machine already has: the Python standard library.

How the corpus is built (deterministic for a given Python installation):

1. list the files matching ``data.pattern`` (default ``*.py``) under ``data.root``
   (default ``sysconfig.get_paths()["stdlib"]``), skipping any directory named in
   ``data.exclude_dirs``; sort them by relative POSIX path;
2. a file is *validation* when the first 8 hex digits of the SHA-256 of its relative
   path, read as an integer / 2**32, are below ``data.val_fraction``; otherwise *train*;
3. each split is the concatenation of its files' bytes (each followed by ``b"\\n"``), in
   sorted order, truncated at ``max_train_bytes`` / ``max_val_bytes``.

Training batches are random windows of ``context + 1`` bytes whose offsets come from a
generator seeded by ``(seed, step, rank)`` alone, so the data position of a run is just
its step number (resume needs nothing else). Validation uses fixed, evenly spaced windows
dealt round-robin to ranks.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from distk.train.config import TrainConfig

__all__ = ["ByteCorpus", "TrainData", "build_corpus", "build_data", "list_corpus_files"]


def _corpus_root(root: str | None) -> Path:
    return Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])


def list_corpus_files(root: str | None, pattern: str, exclude_dirs: list[str]) -> list[Path]:
    """Files of the corpus, as paths relative to the root, sorted by POSIX path."""
    base = _corpus_root(root)
    if not base.is_dir():
        raise ValueError(f"data.root={str(base)!r} is not a directory")
    excluded = set(exclude_dirs)
    files = [
        p.relative_to(base) for p in base.rglob(pattern)
        if p.is_file() and not excluded.intersection(p.relative_to(base).parts[:-1])
    ]
    return sorted(files, key=lambda p: p.as_posix())


def is_validation_file(relative_path: Path, val_fraction: float) -> bool:
    """Held-out split membership: SHA-256 of the relative POSIX path, first 32 bits."""
    digest = hashlib.sha256(relative_path.as_posix().encode()).hexdigest()
    return int(digest[:8], 16) / 2**32 < val_fraction


@dataclass(frozen=True)
class ByteCorpus:
    """The two splits as flat uint8 tensors, plus where they came from."""

    train: torch.Tensor
    val: torch.Tensor
    root: str
    train_files: int
    val_files: int
    fingerprint: str
    """SHA-256 (first 16 hex digits) of both splits: equal fingerprints = equal data."""


def build_corpus(cfg: TrainConfig) -> ByteCorpus:
    """Read the corpus described by ``cfg.data`` (see the module docstring)."""
    data = cfg.data
    base = _corpus_root(data.root)
    files = list_corpus_files(data.root, data.pattern, data.exclude_dirs)
    splits: dict[str, bytearray] = {"train": bytearray(), "val": bytearray()}
    caps = {"train": data.max_train_bytes, "val": data.max_val_bytes}
    counts = {"train": 0, "val": 0}
    for rel in files:
        split = "val" if is_validation_file(rel, data.val_fraction) else "train"
        buf = splits[split]
        if len(buf) >= caps[split]:
            continue
        buf += (base / rel).read_bytes() + b"\n"
        counts[split] += 1
        if len(buf) > caps[split]:
            del buf[caps[split]:]
    context = cfg.model.context
    for split, buf in splits.items():
        if len(buf) < context + 2:
            raise ValueError(
                f"the {split} split of {str(base)!r} (pattern {data.pattern!r}) has "
                f"{len(buf)} bytes, fewer than model.context + 2 = {context + 2}"
            )
    digest = hashlib.sha256(bytes(splits["train"]) + b"\0" + bytes(splits["val"]))
    return ByteCorpus(
        train=torch.frombuffer(splits["train"], dtype=torch.uint8).clone(),
        val=torch.frombuffer(splits["val"], dtype=torch.uint8).clone(),
        root=str(base),
        train_files=counts["train"],
        val_files=counts["val"],
        fingerprint=digest.hexdigest()[:16],
    )


def _step_seed(seed: int, step: int, rank: int) -> int:
    digest = hashlib.sha256(f"distk-train/{seed}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class TrainData:
    """Batches for one rank: ``train_batch(step)`` and ``val_batches()``.

    Both return int64 ``(inputs, targets)`` of shape ``(batch, context)`` on ``device``;
    targets are the inputs shifted by one byte.
    """

    def __init__(self, corpus: ByteCorpus, cfg: TrainConfig, rank: int, world_size: int,
                 device: torch.device | str = "cpu") -> None:
        self.corpus = corpus
        self.seed = cfg.seed
        self.batch_size = cfg.train.batch_size
        self.context = cfg.model.context
        self.eval_windows = cfg.train.eval_windows
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)

    def _windows(self, source: torch.Tensor, offsets: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        index = offsets[:, None] + torch.arange(self.context + 1)[None, :]
        chunk = source[index].long()
        return chunk[:, :-1].to(self.device), chunk[:, 1:].to(self.device)

    def train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of ``step`` on this rank (a pure function of seed, step and rank)."""
        gen = torch.Generator().manual_seed(_step_seed(self.seed, step, self.rank))
        high = self.corpus.train.numel() - self.context - 1
        offsets = torch.randint(0, high + 1, (self.batch_size,), generator=gen)
        return self._windows(self.corpus.train, offsets)

    def val_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of the fixed validation windows, in batches of ``batch_size``."""
        last = self.corpus.val.numel() - self.context - 1
        count = min(self.eval_windows, last + 1)
        offsets = torch.linspace(0, last, count).round().long()[self.rank::self.world_size]
        return [self._windows(self.corpus.val, offsets[i:i + self.batch_size])
                for i in range(0, offsets.numel(), self.batch_size)]


def build_data(cfg: TrainConfig, rank: int, world_size: int,
               device: torch.device | str = "cpu", corpus: ByteCorpus | None = None
               ) -> TrainData:
    """Build (or reuse ``corpus``) and return this rank's ``TrainData``."""
    return TrainData(corpus if corpus is not None else build_corpus(cfg), cfg, rank,
                     world_size, device)
