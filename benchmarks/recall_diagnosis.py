"""Why bucketed recall falls short on recorded gradients: the measurements behind
docs/selection.md, "Recall on real gradients".

    .venv/bin/python benchmarks/recall_diagnosis.py tests/fixtures/bytegpt_acc.pt
    .venv/bin/python benchmarks/recall_diagnosis.py --simulate      # iid Gaussian, closed loop

For each recorded vector (``benchmarks/record_gradients.py``): recall of the plan the job
ran against the model, after a fixed random permutation, with other bucket counts and with
more entries per bucket on the same partition; the dispersion of the true top-k's bucket
loads (variance / mean: 1 for random placement); whether the sampled floor changes the
selection; the miss rate per kind of parameter. ``--simulate`` runs error feedback on iid
Gaussian gradients with one fixed bucket count, with and without momentum, and with the
compressor's own (alternating) plan.
"""

from __future__ import annotations

import argparse
import collections
import math
import sys
from pathlib import Path

import torch

import distk
from distk.selection import bucket_candidates, per_bucket_topk
from distk.selection.reference import positions_of

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_gradients import load_fixture  # noqa: E402


def recall_of(acc: torch.Tensor, buckets: int, k_per_bucket: int) -> float:
    """Recall of a packed interleaved selection against the exact top-(buckets*k_b)."""
    k = buckets * k_per_bucket
    chosen = torch.zeros(acc.numel(), dtype=torch.bool)
    chosen[positions_of(per_bucket_topk(acc.view(1, -1), buckets, k_per_bucket)).reshape(-1)] = 1
    return float(chosen[torch.topk(acc.abs(), k, sorted=False).indices].sum()) / k


def dispersion(acc: torch.Tensor, buckets: int, k: int) -> float:
    exact = torch.topk(acc.abs(), k, sorted=False).indices
    load = torch.bincount(exact % buckets, minlength=buckets).double()
    return float(load.var() / load.mean())


def diagnose(path: str, counts: list[int]) -> None:
    for rec in load_fixture(path)["records"]:
        acc, b, kb = rec["acc"], rec["buckets"], rec["k_per_bucket"]
        n, k = acc.numel(), b * kb
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        row = {"model": distk.expected_recall(n, k, b, kb), f"plan {b}x{kb}": recall_of(acc, b, kb),
               "permuted": recall_of(acc[perm], b, kb)}
        for other in counts:
            row[f"b={other}"] = recall_of(acc, other, math.ceil(k / other))
        row[f"{b}x{kb + 15}"] = recall_of(acc, b, kb + 15)
        cells = "  ".join(f"{name} {value:.4f}" for name, value in row.items())
        floor_same = torch.equal(
            per_bucket_topk(acc.view(1, -1).clone(), b, kb).sort(dim=-1).values,
            bucket_candidates(acc.view(1, -1).clone(), b, kb).sort(dim=-1).values)
        print(f"step {rec['step']} (job measured {rec.get('recall')}): {cells}  "
              f"load var/mean {dispersion(acc, b, k):.2f}  floor changes nothing: {floor_same}")
        exact = torch.topk(acc.abs(), k, sorted=False).indices
        chosen = torch.zeros(n, dtype=torch.bool)
        chosen[positions_of(per_bucket_topk(acc.view(1, -1), b, kb)).reshape(-1)] = 1
        kinds: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        for name, shape, offset in rec["params"]:
            inside = (exact >= offset) & (exact < offset + math.prod(shape))
            kind = name.split(".", 2)[-1] if name.startswith("blocks.") else name
            kinds[kind][0] += int(inside.sum())
            kinds[kind][1] += int((inside & ~chosen[exact]).sum())
        print("    missed / in top-k: " + ", ".join(
            f"{kind} {miss}/{top}" for kind, (top, miss) in kinds.items() if top >= 50))


def simulate(n: int = 842496, steps: int = 150) -> None:
    """Error feedback on iid N(0, 1) gradients, k = n/100; recall every 25 steps."""
    k = n // 100
    fixed = 131, math.ceil(k / 131)
    for momentum in (0.0, 0.9):
        torch.manual_seed(0)
        acc, velocity, out = torch.zeros(n), torch.zeros(n), []
        for step in range(steps):
            g = torch.randn(n)
            if momentum:
                g = velocity.mul_(momentum).add_(g)
            acc.add_(g)
            positions = positions_of(per_bucket_topk(acc.view(1, -1), *fixed)).reshape(-1)
            if step % 25 == 24:
                out.append(f"{recall_of(acc, *fixed):.3f}/{dispersion(acc, fixed[0], k):.1f}")
            acc[positions] = 0
            velocity[positions] = 0
        print(f"fixed {fixed[0]}x{fixed[1]}, momentum {momentum}: recall/dispersion "
              f"every 25 steps: {' '.join(out)}")
    compressor = distk.GradientCompressor(distk.SparsityConfig(
        density=0.01, momentum=0.9, warmup_steps=0, recall_interval=1))
    torch.manual_seed(0)
    recalls, plans = [], set()
    for step in range(steps):
        work = compressor.launch(torch.randn(n), "g", step=step)
        work.wait()
        plans.add((work.plan.selection.buckets, work.plan.selection.k_per_bucket))
        if step >= 25:
            recalls.append(work.stats.recall)
    print(f"GradientCompressor plans {sorted(plans)}, momentum 0.9: mean recall of steps "
          f"25..{steps - 1} {sum(recalls) / len(recalls):.4f} (min {min(recalls):.4f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fixtures", nargs="*")
    parser.add_argument("--counts", type=int, nargs="*", default=[128, 129, 130, 132, 133, 137])
    parser.add_argument("--simulate", action="store_true")
    args = parser.parse_args()
    for path in args.fixtures:
        diagnose(path, args.counts)
    if args.simulate:
        simulate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
