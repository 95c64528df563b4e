"""AdamW with a stale second moment after the dense start (1-bit Adam's idea), on distk-train.

Why try it: under error feedback at 1% density a coordinate receives ~100 steps of
gradient at once, and AdamW divides that burst by its own size, so it moves the
coordinate by one step's worth instead of a hundred (docs/train.md, "AdamW at a true
1%"). With the second moment ``v`` held fixed, AdamW is momentum SGD with a fixed
diagonal preconditioner: linear in the gradient, so a burst moves a coordinate as far as
the steps it stands for, as error feedback assumes. 1-bit Adam (Tang et al., 2021) and
0/1 Adam freeze ``v`` after a dense warm-up for this reason.

This script runs ``distk-train`` (one process per rank under torchrun, with the same
arguments) with a step pre-hook on its AdamW. After ``--freeze-after`` optimizer steps
the hook takes the step itself and leaves ``torch.optim.AdamW`` nothing to do:

* ``exp_avg`` (Adam's first moment, bias-corrected as AdamW does) is updated from the
  exchanged gradient; decoupled weight decay as AdamW;
* the denominator is ``sqrt(v_frozen * s_t / s_F) + eps``: ``v_frozen`` is AdamW's
  bias-corrected ``exp_avg_sq`` at the freeze, and ``s_t / s_F`` follows each tensor's mean
  squared local gradient (an EMA with AdamW's beta2, averaged over ranks by an all-reduce
  of one float64 per tensor), so the step size follows the gradient's decay
  (``--no-scale`` turns this off);
* ``--refresh K``: every K frozen steps ``v_frozen`` is replaced by the ranks' mean of an
  EMA of their own local squared gradients (one dense all-reduce of ``v``; not counted in
  distk's bytes, which makes the row an upper bound on what the idea can give).

Every rank computes the same update from the same exchanged gradient, so the replicas
stay equal. Results (main job, seed 0) are in docs/train.md, "AdamW at a true 1%":

    .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        benchmarks/adamw_stale_variance.py --freeze-after 20 -- \\
        --config configs/default.json --set train.optimizer=adamw --set train.lr=0.003 \\
        --set train.weight_decay=0.1 --set train.adamw_dense_steps=20 \\
        --set train.adamw_warmup_steps=0 --set sparsity.warmup_steps=0
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist

import distk.train.loop as loop
from distk.train.__main__ import main as train_main


def stale_variance(optimizer: torch.optim.Optimizer, after: int, refresh: int = 0,
                   scale: bool = True) -> None:
    """Install the stale-second-moment step on ``optimizer`` (a torch AdamW)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    index = {id(p): i for i, p in enumerate(params)}
    beta2 = optimizer.param_groups[0]["betas"][1]
    local_sq = torch.zeros(len(params), dtype=torch.float64)
    ema = torch.zeros(len(params), dtype=torch.float64)
    local_v: dict[int, torch.Tensor] = {}
    frozen: dict[int, torch.Tensor] = {}
    s_frozen: dict[int, float] = {}
    steps = [0]

    def grad_hook(i: int) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:  # the local gradient, before DDP's exchange
            g = grad.detach()
            local_sq[i] = float(g.double().pow(2).mean())
            if refresh:
                v = local_v.setdefault(i, torch.zeros_like(g))
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        return hook

    for i, p in enumerate(params):
        p.register_hook(grad_hook(i))

    def pre_step(opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        steps[0] += 1
        t = steps[0]
        mean_sq = local_sq.clone()
        dist.all_reduce(mean_sq)
        ema.mul_(beta2).add_(mean_sq / dist.get_world_size(), alpha=1 - beta2)
        s_now = ema / (1 - beta2 ** t)
        if t <= after:
            return  # AdamW's own step
        for group in opt.param_groups:
            beta1 = group["betas"][0]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                i = index[id(p)]
                state = opt.state[p]
                if i not in frozen:
                    frozen[i] = state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))
                    s_frozen[i] = float(s_now[i])
                elif refresh and (t - after) % refresh == 0:
                    v = local_v[i].clone()
                    dist.all_reduce(v)
                    frozen[i] = v / (dist.get_world_size() * (1 - beta2 ** t))
                    s_frozen[i] = float(s_now[i])
                ratio = float(s_now[i]) / s_frozen[i] if scale and s_frozen[i] > 0 else 1.0
                state["step"] += 1
                bias1 = 1 - beta1 ** float(state["step"])
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                with torch.no_grad():
                    p.mul_(1 - lr * wd)
                    p.addcdiv_(state["exp_avg"], (frozen[i] * ratio).sqrt_().add_(eps),
                               value=-lr / bias1)
                p.grad = None  # AdamW skips it

    optimizer.register_step_pre_hook(pre_step)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s [options] -- <distk-train arguments>")
    parser.add_argument("--freeze-after", type=int, required=True,
                        help="optimizer steps of plain AdamW before v is held")
    parser.add_argument("--refresh", type=int, default=0,
                        help="replace v by the ranks' mean local v every K steps (0: never)")
    parser.add_argument("--no-scale", action="store_true",
                        help="hold v exactly, without the per-tensor gradient scale")
    args, rest = parser.parse_known_args(argv)
    if args.freeze_after < 0 or args.refresh < 0:
        parser.error(f"--freeze-after ({args.freeze_after}) and --refresh ({args.refresh}) "
                     "must be >= 0")
    build = loop.build_optimizer

    def build_with_stale_v(model: torch.nn.Module, cfg: loop.TrainConfig
                           ) -> torch.optim.Optimizer:
        if cfg.train.optimizer != "adamw":
            raise SystemExit(f"train.optimizer={cfg.train.optimizer!r}: this script "
                             "changes AdamW's step; pass --set train.optimizer=adamw")
        optimizer = build(model, cfg)
        stale_variance(optimizer, args.freeze_after, args.refresh, not args.no_scale)
        return optimizer

    loop.build_optimizer = build_with_stale_v
    return train_main([a for a in rest if a != "--"])


if __name__ == "__main__":
    sys.exit(main())
