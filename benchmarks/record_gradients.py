"""Record the vectors that gradient selection sees in the main job, as a small fixture.

Trains ``configs/default.json`` (ByteGPT, DDP, bucketed mode) exactly as ``distk-train``
does, and at the chosen compressor steps saves, per DDP bucket, the accumulated
error-feedback vector ``acc`` (residual + momentum-corrected gradient) that
``GradientCompressor._select_local`` receives (local masks: each rank's own top-k), with the
bucket's parameter layout (name, shape, offset) and the plan the compressor used. Rank 0's
vectors only.

    .venv/bin/torchrun --standalone --nproc_per_node 2 benchmarks/record_gradients.py \
        --steps 150 251 --out tests/fixtures/bytegpt_acc.pt

made ``tests/fixtures/bytegpt_acc.pt`` (3.4 MB; about 4 minutes here). ``--steps`` are
the owner's steps (the DDP state's iteration, the step the compressor's schedule follows;
default 50 150 250); 150 and 251 run the two bucket counts that packed plans alternate
between. The compressor measures recall every ``gcd(steps)`` steps (every step here; the
run's mean is printed). Extra ``--set KEY=VALUE`` go to the training config
like ``distk-train --set``. The vectors are stored in fp16 after
division by a per-vector power-of-two scale (exact, so the ranking within fp16 precision
is kept and small entries do not underflow): ``acc = data.float() * scale``. Load with
:func:`load_fixture`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

FIXTURE_VERSION = 1


def _scale_of(acc: torch.Tensor) -> float:
    """Power of two that brings max|acc| near 2^14 (fp16 max is 65504)."""
    peak = float(acc.abs().max())
    return 1.0 if peak == 0 else 2.0 ** (math.floor(math.log2(peak)) - 14)


def load_fixture(path: str | os.PathLike) -> dict[str, Any]:
    """The fixture written by this script, with ``acc`` restored to float32.

    Returns ``{"config": ..., "records": [{"step", "bucket", "numel", "k", "buckets",
    "k_per_bucket", "params": [(name, shape, offset)], "acc": float32}]}``.
    """
    data = torch.load(path, map_location="cpu", weights_only=True)
    if data.get("version") != FIXTURE_VERSION:
        raise ValueError(f"{path}: fixture version must be {FIXTURE_VERSION}, "
                         f"got {data.get('version')!r}")
    for record in data["records"]:
        record["acc"] = record.pop("data").float() * record.pop("scale")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1]
                                                / "configs" / "default.json"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 150, 250],
                        help="compressor steps to record (default: 50 150 250)")
    parser.add_argument("--buckets", type=int, nargs="*", default=None,
                        help="DDP bucket indices to record (default: all)")
    parser.add_argument("--out", required=True, help="fixture path (.pt)")
    args = parser.parse_args(argv)

    import torch.distributed as dist

    import distk.integrations.ddp as ddp_integration
    from distk.compressor import GradientCompressor
    from distk.train.config import load_config
    from distk.train.loop import setup_distributed, train

    # Recall is measured by the compressor itself at every recorded step.
    overrides = ["sparsity.method=bucketed", "sparsity.mask=local", "logging.progress=false",
                 f"sparsity.recall_interval={math.gcd(*args.steps)}", *args.overrides]
    cfg = load_config(args.config, overrides)
    wanted = set(args.steps)
    names: dict[int, str] = {}          # id(param) -> name
    layouts: dict[int, list] = {}       # bucket index -> [(name, shape, offset)]
    records: list[dict[str, Any]] = []
    current: dict[str, Any] = {}

    original_enable = ddp_integration.enable
    original_hook = ddp_integration.sparse_allreduce_hook
    original_launch = GradientCompressor.launch
    original_select = GradientCompressor._select_local

    def enable(ddp_model, *a, **kw):
        names.update({id(p): n for n, p in ddp_model.module.named_parameters()})
        return original_enable(ddp_model, *a, **kw)

    def hook(state, bucket):
        buffer = bucket.buffer()
        layouts[bucket.index()] = [
            (names.get(id(p), "?"), tuple(p.shape),
             (g.data_ptr() - buffer.data_ptr()) // buffer.element_size())
            for p, g in zip(bucket.parameters(), bucket.gradients())]
        return original_hook(state, bucket)

    def launch(self, grad, key, out=None, *, step, stateless=False):
        current.update(key=key, step=step)
        return original_launch(self, grad, key, out, step=step, stateless=stateless)

    def select(self, acc, plan, pending=None):
        if current["step"] in wanted and (args.buckets is None or current["key"] in args.buckets):
            full = acc if pending is None else acc + pending
            scale = _scale_of(full)
            records.append({"step": current["step"], "bucket": int(current["key"]),
                            "numel": full.numel(), "k": plan.k, "buckets": plan.buckets,
                            "k_per_bucket": plan.k_per_bucket,
                            "data": (full.float() / scale).half().cpu(), "scale": scale})
        return original_select(self, acc, plan, pending)

    ddp_integration.enable = enable
    ddp_integration.sparse_allreduce_hook = hook
    GradientCompressor.launch = launch
    GradientCompressor._select_local = select

    rank, _, _ = setup_distributed(cfg)
    result = train(cfg, Path(cfg.run_dir) / "record_gradients")
    if rank == 0:
        for rec in records:
            rec["params"] = layouts[rec["bucket"]]
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"version": FIXTURE_VERSION, "config": cfg.to_dict(),
                    "records": records}, out)
        size = out.stat().st_size / 1e6
        print(f"[record_gradients] {len(records)} vectors -> {out} ({size:.2f} MB); "
              f"run mean recall {result.mean_recall}", flush=True)
        for rec in records:
            print(f"  step {rec['step']} bucket {rec['bucket']}: numel {rec['numel']} "
                  f"k {rec['k']} plan {rec['buckets']} x {rec['k_per_bucket']}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
