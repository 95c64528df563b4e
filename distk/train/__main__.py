"""Command line of the main training job: ``distk-train`` / ``python -m distk.train``.

Launch one process per rank with torchrun (``launchers/torchrun.sh``); started alone it
trains as a world of one. See docs/train.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from distk.train.config import load_config

EPILOG = """\
examples:
  launchers/torchrun.sh --compare                       # dense vs exact vs bucketed
  NPROC=2 launchers/torchrun.sh --mode bucketed --set train.steps=100
  launchers/torchrun.sh --config configs/tiny.json --set sparsity.density=0.05 --wandb
  launchers/torchrun.sh --compare --resume              # continue an interrupted compare
  launchers/torchrun.sh --set sparsity.sync_every=30 --set sparsity.value_bits=2
                                                        # outer sync every 30 steps, 2-bit
  launchers/torchrun.sh --compare --modes dense,bucketed,outer --set train.optimizer=adamw \
      --set train.lr=0.003 --set train.weight_decay=0.1     # AdamW, beside outer sync

--set takes dotted keys of the JSON config; values are parsed as JSON (numbers,
true/false/null) and otherwise kept as strings, e.g. --set sparsity.nonfinite=skip.
Sections: data, model, train, logging, sparsity (every distk.SparsityConfig option).
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``distk-train``."""
    parser = argparse.ArgumentParser(
        prog="distk-train",
        description="Train a byte-level GPT on the Python standard library's sources, "
                    "data-parallel with distk's sparse gradient exchange.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="JSON",
                        help="training config file (default: built-in defaults, identical to "
                             "configs/default.json)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value (repeatable), e.g. "
                        "train.steps=50 or sparsity.density=0.01")
    parser.add_argument("--mode", choices=("dense", "exact", "bucketed"),
                        help="shorthand for --set sparsity.method=MODE")
    parser.add_argument("--compare", action="store_true",
                        help="run dense, exact and bucketed one after another with the same "
                             "seed and data; print a table, write compare.json/compare.png")
    parser.add_argument("--modes", metavar="M1,M2,...",
                        help="modes of --compare, comma-separated, from dense, exact, bucketed "
                             "and outer (outer synchronisation: the config's own options when "
                             "sparsity.sync_every > 1, else SparseLoCo's recipe at "
                             "distk.config.ADAMW_OUTER, H = 5 with 50 dense bf16 steps); "
                             "default: dense,exact,bucketed")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run directory's checkpoint (if any)")
    parser.add_argument("--name", help="shorthand for --set name=NAME (the run directory)")
    parser.add_argument("--steps", type=int, help="shorthand for --set train.steps=N")
    parser.add_argument("--wandb", action="store_true",
                        help="log to Weights & Biases (offline without credentials); "
                             "shorthand for --set logging.wandb=true")
    parser.add_argument("--deepspeed", metavar="DS_CONFIG_JSON",
                        help="train through DeepSpeed with this config (its \"distk\" block "
                             "configures the compression); launch with the deepspeed launcher")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as JSON and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``distk-train``."""
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.mode:
        overrides.append(f"sparsity.method={args.mode}")
    if args.name:
        overrides.append(f"name={json.dumps(args.name)}")
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.wandb:
        overrides.append("logging.wandb=true")
    try:
        cfg = load_config(args.config, overrides)
    except (ValueError, OSError) as err:
        print(f"distk-train: error: {err}", file=sys.stderr)
        return 2
    modes = tuple(m for m in (args.modes or "").split(",") if m)
    if modes:  # (imports torch: only when asked for)
        from distk.train.compare import ALL_MODES
        from distk.train.outer_mode import OUTER_MODE

        unknown = [m for m in modes if m not in ALL_MODES]
        problem = None
        if unknown:
            problem = f"unknown mode(s) {unknown}; allowed: {', '.join(ALL_MODES)}"
        elif not args.compare:
            problem = "--modes needs --compare"
        elif args.deepspeed and OUTER_MODE in modes:
            problem = (f"mode {OUTER_MODE!r} trains a plain model with local steps, not "
                       "through DeepSpeed (whose engine reduces gradients at every step); "
                       "leave it out of --modes with --deepspeed")
        if problem:
            print(f"distk-train: error: {problem}", file=sys.stderr)
            return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    # Imported here, not at the top: --help and --print-config stay fast without torch.
    import torch.distributed as dist

    from distk.train import deepspeed_job
    from distk.train.compare import run_compare
    from distk.train.loop import format_result, setup_distributed, train

    rank, _, _ = setup_distributed(cfg)
    if args.compare:
        run_compare(cfg, resume=args.resume, ds_config=args.deepspeed,
                    **({"modes": modes} if modes else {}))
    elif args.deepspeed:
        deepspeed_job.run(cfg, args.deepspeed, resume=args.resume)
    else:
        result = train(cfg, cfg.run_dir, resume=args.resume)
        if rank == 0:
            print(format_result(result), flush=True)
    # Barrier first: a gloo rank that tears down while its peer is still finishing (rank 0
    # writes the results) can abort the peer. On an error there is no teardown: torchrun
    # stops the other ranks.
    dist.barrier()
    dist.destroy_process_group()
    return 0


def exit_after_clean_finish(code: int) -> None:
    """Leave the process with ``code`` through ``os._exit`` once its work is done (logs
    closed, process group destroyed).

    The C++ static destructors that ``exit()`` would run can find a torch or gloo
    background thread still joinable and abort the process ("terminate called without
    an active exception", SIGABRT) after all the work was done, which torchrun reports as
    a failed run. Only for a clean finish: an exception should exit the usual way.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cli() -> None:
    """Console entry point: :func:`main`, then :func:`exit_after_clean_finish`."""
    exit_after_clean_finish(main())


if __name__ == "__main__":
    cli()
