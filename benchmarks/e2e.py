"""End-to-end benchmark: time to quality over a dilated emulated network, distk beside
PyTorch's own communication hooks, every method tuned on a seed of its own.

Every run is the main training job (``python -m distk.train`` on ``configs/default.json``
with the preset's changes, ``PRESETS``), one rank per network namespace
(``launchers/netem.sh run``), so every gradient byte between ranks crosses a rate-limited
link. The methods share the loop, data, model, timing and logging. Each is declared in
``METHODS`` as a :class:`Method` (distk-train's ``--mode``, fixed ``--set`` overrides and
the knobs to tune), and ``--method`` adds or replaces one from the command line:

* ``dense_fp32``: fp32 all-reduce (distk's hook, ``sparsity.method=dense``): the
  reference, which sets the link rate and the target;
* ``dense_bf16``: PyTorch's ``bf16_compress_hook`` (``train.comm_hook=bf16``);
* ``powersgd``: PyTorch's ``powerSGD_hook``, error feedback and warm start on, tuned over
  rank {1, 2, 4, 8} x ``start_powerSGD_iter`` {10%, 25%} of the run x factors in fp32 or
  in bf16 (PyTorch's ``bf16_compress_wrapper``);
* ``exact``, ``bucketed``: distk's top-k exchange with ``torch.topk`` / bucketed selection;
* ``outer`` (``--methods`` only): outer synchronisation (``distk.outer``) with
  SparseLoCo's recipe (``SparsityConfig.sparseloco()``), its period H and a dense start
  tuned;
* ``bucketed_2bit``, ``outer_h8_2bit``, ``outer_h32_4bit`` (``--methods`` only): the
  compact codec, and outer synchronisation every 8 / 32 steps with distk's plain codec.

Protocol (docs/netem.md, "The protocol"), per optimizer:

1. **Calibrate**: ``benchmarks/e2e_compute.py`` times the dense step's compute on the
   unshaped network.
2. **Dilate**: for each R in ``--ratios`` the link rate is set so that dense fp32's ring
   all-reduce takes R x that compute: ``rate = bytes_per_rank * 8 / (R * compute)``.
3. **Sweep the learning rate** on the tuning seeds (``--tuning-seeds``, never reported),
   on the unshaped link (the loss per step does not depend on the link): every method
   runs ``--sweep-steps`` steps at each rate of its optimizer's grid on each tuning seed,
   its knobs at their first values; the lowest mean final validation loss wins (ties: the
   smaller rate).
4. **Tune the knobs** on the tuning seeds at the chosen rate: every combination of a
   method's knob values runs the full ``--steps`` once per tuning seed on the unshaped
   link, and so does dense fp32 (each seed's tuning target: its final loss x (1 + the
   first slack)). For each R, each run is put on that link's clock (wall time at an
   evaluation = its unshaped wall time + the bytes it sent so far x 8 / rate); the
   combination that reaches its seed's target on the most tuning seeds, then with the
   earliest mean stable time over those seeds, is the method's setting at that R (ties:
   the lowest mean final loss, then fewer bytes). One tuning seed is the default; a knob
   whose effect is smaller than the seed-to-seed swing needs two or more
   (``choose_setting``).
5. **Measure**: every method, at its rate and its setting for that R, runs ``--steps``
   under netem once per reported seed (``--seeds``), all in this one run of the script.
   Methods named in ``--bound`` instead run each reported seed once on the unshaped
   link, and at each R take the **lower bound** of their time on that link: at every
   evaluation, max(unshaped wall time, bytes sent so far x 8 / rate). No run on the
   link can beat it (the compute is the same, and the link carries no more than its
   rate), so a netem-measured method that reaches the target before a bound row's time
   is sooner for certain, and a speed-up over a bound dense fp32 is a lower bound
   itself. It is for rows whose netem runs would take hours (dense fp32 at R = 64 spends
   64 x compute per step on the link); the tables mark such rows "bound".

Reported per R and slack (``--slacks``; target = mean over the reported seeds of dense
fp32's final validation loss x (1 + slack)): **time to target**, the training wall time
(evaluation excluded) at the first evaluation after which every later one stays at or
below the target (and at the first evaluation at or below it); the bytes sent, their
fraction of dense fp32's and the effective density (entries sent / entries) up to that
evaluation; the final loss (equal steps); the loss at equal wall time (the shortest mean
run of that R) and at equal bytes (the smallest mean total of that R); seconds per step
split into compute, selection and exposed communication; MB per step (distk's count) and
the whole run's bytes on each host's link (``netem.sh``'s counters). Curves: validation
loss against wall time, mean over the seeds with the min-max band, one panel per R.

Root only. Not a test: the full protocol takes hours on a small CPU machine.

    sudo .venv/bin/python benchmarks/e2e.py --quick                  # plumbing, minutes
    sudo .venv/bin/python benchmarks/e2e.py --optimizers adamw       # 2 ranks, R = 1 4 16
    sudo .venv/bin/python benchmarks/e2e.py --preset full8 --optimizers adamw   # 8 ranks
    sudo .venv/bin/python benchmarks/e2e.py --preset reduced --optimizers adamw
    sudo .venv/bin/python benchmarks/e2e.py --dry-run                # plan and commands

Prints the tables, writes ``benchmarks/results/<out>.json`` and ``<out>.png``. Run
directories go under ``runs/e2e/<out>/``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, print_table, write_results  # noqa: E402
from outer_long import RECIPE  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NETEM = ROOT / "launchers" / "netem.sh"
CHECK = ROOT / "launchers" / "netem_check.py"
COMPUTE = Path(__file__).resolve().parent / "e2e_compute.py"
MAIN_JOB = ROOT / "configs" / "default.json"

MODES = ("dense", "exact", "bucketed")
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_PERCENT = re.compile(r"([0-9]+(?:\.[0-9]+)?)%")


# -- methods -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """One row of the tables: how ``distk-train`` runs it and what is tuned.

    Attributes:
        name: row name, lower case, digits and ``_``.
        mode: distk-train's ``--mode`` ("dense", "exact" or "bucketed").
        set: fixed config overrides (``key: value``, as ``--set key=value``).
        tune: knobs tuned on the tuning seeds, ``key: [values]``; every combination runs,
            and each R takes its best. The first value of each knob is the setting of
            the learning-rate sweep. A value ``"N%"`` is N% of the run's steps, rounded
            up (``"10%"`` of 300 steps is 30).
        about: one line for the docs and the JSON.
    """

    name: str
    mode: str
    set: Mapping[str, Any] = field(default_factory=dict)
    tune: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    about: str = ""

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"method name {self.name!r} is invalid: allowed lower-case "
                             "letters, digits and '_', starting with a letter")
        if self.mode not in MODES:
            raise ValueError(f"method {self.name}: mode={self.mode!r} is invalid: allowed "
                             f"{', '.join(MODES)}")
        for key, values in self.tune.items():
            is_list = isinstance(values, Sequence) and not isinstance(values, str | bytes)
            if not is_list or not values:
                raise ValueError(f"method {self.name}: tune[{key!r}]={values!r} is invalid: "
                                 "allowed a non-empty list of values")
        both = sorted(set(self.set) & set(self.tune))
        if both:
            raise ValueError(f"method {self.name}: {both} both fixed (set) and tuned (tune): "
                             "allowed in one of them")

    def settings(self) -> list[dict[str, Any]]:
        """Every combination of the knob values (unresolved); the first is the sweep's."""
        keys = list(self.tune)
        return [dict(zip(keys, combo)) for combo in
                itertools.product(*(self.tune[k] for k in keys))]

    @property
    def tuned(self) -> bool:
        """Whether the tuning stage runs this method: more than one setting to choose from."""
        return len(self.settings()) > 1

    def overrides(self, setting: Mapping[str, Any], steps: int) -> list[str]:
        """``key=value`` overrides of this method at ``setting`` for a run of ``steps``."""
        merged = {**self.set, **setting}
        return [f"{key}={json.dumps(resolve(value, steps))}" for key, value in merged.items()]

    def argv(self, setting: Mapping[str, Any], steps: int) -> list[str]:
        """distk-train arguments of this method at ``setting``."""
        out = ["--mode", self.mode]
        for item in self.overrides(setting, steps):
            out += ["--set", item]
        return out


def resolve(value: Any, steps: int) -> Any:
    """A knob value for a run of ``steps``: ``"N%"`` -> ceil(N/100 x steps); else as is."""
    if isinstance(value, str):
        match = _PERCENT.fullmatch(value)
        if match:
            return math.ceil(float(match.group(1)) / 100 * steps)
    return value


def setting_label(setting: Mapping[str, Any]) -> str:
    """Short text of a setting: each key's last part, e.g. ``powersgd_rank=4``."""
    return " ".join(f"{key.rsplit('.', 1)[-1]}={json.dumps(value).strip(chr(34))}"
                    for key, value in setting.items()) or "-"


def _parse_value(text: str) -> Any:
    """JSON when it parses (numbers, true/false, null, lists), else the raw string (as
    distk-train's ``--set`` reads it)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_method(tokens: Sequence[str]) -> Method:
    """``--method NAME MODE [KEY=VALUE ...] [tune:KEY=V1,V2 ...]`` as a :class:`Method`."""
    if len(tokens) < 2:
        raise ValueError(f"--method {' '.join(tokens)} is invalid: allowed NAME MODE "
                         "[KEY=VALUE ...] [tune:KEY=V1,V2 ...]")
    name, mode, *items = tokens
    fixed: dict[str, Any] = {}
    tune: dict[str, list[Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--method {name}: {item!r} is invalid: allowed KEY=VALUE or "
                             "tune:KEY=V1,V2")
        if key.startswith("tune:"):
            tune[key[len("tune:"):]] = [_parse_value(v) for v in value.split(",")]
        else:
            fixed[key] = _parse_value(value)
    return Method(name, mode, fixed, tune, about="from --method")


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("dense_fp32", "dense",
           about="fp32 ring all-reduce through distk's hook (reference: rate and target)"),
    Method("dense_bf16", "dense", {"train.comm_hook": "bf16"},
           about="PyTorch's bf16_compress_hook"),
    Method("powersgd", "dense", {"train.comm_hook": "powersgd"},
           tune={"train.powersgd_rank": [4, 1, 2, 8],
                 "train.powersgd_start_iter": ["10%", "25%"],
                 "train.powersgd_bf16": [False, True]},
           about="PyTorch's powerSGD_hook (error feedback, warm start); factors in bf16 "
                 "through PyTorch's bf16_compress_wrapper"),
    Method("exact", "exact", about="distk, torch.topk selection"),
    Method("bucketed", "bucketed",
           about="distk, bucketed selection, the defaults (mask='auto': a shared mask at 2 "
                 "ranks and above)"),
    Method("bucketed_local", "bucketed", {"sparsity.mask": "local"},
           about="distk, bucketed selection, each rank's own top-k (all-gather)"),
    Method("outer", "bucketed",
           {"train.adamw_dense_steps": 0, "train.adamw_warmup_steps": 0,
            **{f"sparsity.{key}": value for key, value in RECIPE.items()}},
           # Periods that divide eval_every (evaluations fall on syncs); a dense start of
           # 25 or 50 steps (fp32 pseudo-gradients) or none.
           tune={"sparsity.sync_every": [5, 25], "sparsity.dense_steps": [0, 25, 50]},
           about="distk.outer with SparseLoCo's recipe (top-64 of each 64 x 64 tile, 2-bit "
                 "values, decayed error feedback, senders' average, median clip), H and "
                 "a dense start tuned"),
    Method("bucketed_2bit", "bucketed", {"sparsity.value_bits": 2},
           about="bucketed with 2-bit values and bit-packed offsets"),
    Method("outer_h8_2bit", "bucketed", {"sparsity.sync_every": 8, "sparsity.value_bits": 2},
           about="outer synchronisation every 8 steps, 2-bit values"),
    Method("outer_h32_4bit", "bucketed",
           {"sparsity.sync_every": 32, "sparsity.value_bits": 4},
           about="outer synchronisation every 32 steps, 4-bit values"),
]}
"""The built-in methods; ``DEFAULT_METHODS`` run unless ``--methods`` says otherwise."""
DEFAULT_METHODS = ["dense_fp32", "dense_bf16", "powersgd", "exact", "bucketed"]

# Per optimizer: fixed settings and the default 3-point learning-rate grid.
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adamw": {"set": {"train.optimizer": "adamw", "train.weight_decay": 0.1,
                      "train.beta1": 0.9, "train.beta2": 0.95},
              "lrs": [1e-3, 2e-3, 4e-3]},
    "sgd": {"set": {"train.optimizer": "sgd", "train.weight_decay": 0.0, "train.beta1": 0.9},
            "lrs": [0.1, 0.3, 0.9]},
}

# The protocol's job is the main job (configs/default.json: 4 layers, width 128, 0.84M
# parameters, 16 x 128 = 2048 tokens per rank and step, 20-step warm-up then cosine decay
# to 10%, density 1%, and the main job's sparsity schedule), with these changes.
_PROTOCOL_JOB: dict[str, Any] = {
    "train": {"eval_windows": 1024, "num_threads": 1},
    "logging": {"progress": False, "histogram_every": 0},
    "sparsity": {"recall_interval": 0},
}
_FULL = {"world": 2, "ratios": [1.0, 4.0, 16.0], "steps": 300, "eval_every": 25,
         "sweep_steps": 100, "seeds": [1, 2, 3], "tuning_seeds": [0],
         "optimizers": ["adamw", "sgd"], "check_mb": 16.0, "calibrate_steps": 10,
         "lrs": {name: spec["lrs"] for name, spec in OPTIMIZERS.items()},
         "tune": {}, "job": _PROTOCOL_JOB}
PRESETS: dict[str, dict[str, Any]] = {
    # The protocol at 2 ranks (one per core of a 2-core machine).
    "full": _FULL,
    # 8 ranks, 8 namespaces: R = 4 and 16.
    "full8": {**_FULL, "world": 8, "ratios": [4.0, 16.0]},
    # About an hour per optimizer at 2 ranks on an idle 2-core machine (docs/netem.md,
    # "Presets and durations"): the full protocol at R = 4 only (the R of the 3x target).
    "reduced": {**_FULL, "ratios": [4.0]},
    # The same pipeline on a tiny model: plumbing, not a measurement. PowerSGD's grid is
    # rank {2, 1} only, so the tuning stage runs with two candidates.
    "quick": {"world": 2, "ratios": [4.0], "steps": 8, "eval_every": 4, "sweep_steps": 0,
              "seeds": [1, 2], "tuning_seeds": [0], "optimizers": ["adamw"],
              "check_mb": 1.0, "calibrate_steps": 3, "lrs": {"adamw": [3e-3], "sgd": [0.1]},
              "tune": {"powersgd": {"train.powersgd_rank": [2, 1]}},
              "job": {"data": {"max_train_bytes": 200_000, "max_val_bytes": 20_000},
                      "model": {"n_layer": 1, "n_head": 2, "d_model": 64, "context": 32},
                      # AdamW's dense start and density warm-up scaled to 8 steps.
                      "train": {"batch_size": 4, "lr_warmup_steps": 2, "eval_windows": 16,
                                "num_threads": 1, "adamw_dense_steps": 1,
                                "adamw_warmup_steps": 2},
                      "logging": {"progress": False, "histogram_every": 0},
                      "sparsity": {"density": 0.05, "min_numel": 256, "recall_interval": 0,
                                   "warmup_steps": 2}}},
}


def _merge(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in, section by section (a deep copy)."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def job_config(preset: Mapping[str, Any]) -> dict[str, Any]:
    """The training config of every run: the main job with the preset's changes."""
    return _merge(json.loads(MAIN_JOB.read_text()), preset["job"])


# -- arguments -----------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="full (default: 2 ranks, R 1 4 16), full8 (8 ranks, R 4 16), "
                             "reduced (2 ranks, R 4), quick (tiny model, plumbing only)")
    parser.add_argument("--quick", action="store_true", help="the same as --preset quick")
    parser.add_argument("--world", type=int, default=None, help="ranks = namespaces")
    parser.add_argument("--ratios", type=float, nargs="+", default=None,
                        help="R: dense fp32 communication / compute")
    parser.add_argument("--rates", nargs="+", default=None,
                        help="fixed link rates (tc syntax, e.g. 1gbit) instead of --ratios: "
                             "no dilation; the table shows the ratio each rate gave")
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"methods to run (default: {' '.join(DEFAULT_METHODS)}; also "
                             f"{' '.join(m for m in METHODS if m not in DEFAULT_METHODS)}); "
                             "--method adds its own")
    parser.add_argument("--method", dest="extra_methods", nargs="+", action="append",
                        default=[], metavar="TOKEN",
                        help="add (or replace) a method: NAME MODE [KEY=VALUE ...] "
                             "[tune:KEY=V1,V2 ...], e.g. --method shared bucketed "
                             "sparsity.exchange=shared tune:sparsity.warmup_steps=0,50")
    parser.add_argument("--bound", nargs="+", default=[], metavar="METHOD",
                        help="methods timed by their lower bound instead of under netem: "
                             "each reported seed runs once unshaped, and at each R its time "
                             "is max(unshaped wall, bytes sent x 8 / rate) (module "
                             "docstring, step 5); for rows whose netem runs take hours")
    parser.add_argument("--optimizers", nargs="+", default=None, choices=list(OPTIMIZERS),
                        help="tables to run; the first is the headline")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="reported seeds, each run under netem at every R (1 2 3)")
    parser.add_argument("--tuning-seeds", "--tuning-seed", dest="tuning_seeds", type=int,
                        nargs="+", default=None,
                        help="seeds of the learning-rate sweep and the knob tuning, none "
                             "among --seeds; with several, every sweep and tuning run is "
                             "repeated on each and the choices go by the mean (0)")
    parser.add_argument("--steps", type=int, default=None, help="steps of every run (300)")
    parser.add_argument("--eval-every", type=int, default=None, help="(25; quick 4)")
    parser.add_argument("--sweep-steps", type=int, default=None,
                        help="steps of the learning-rate sweep runs (100; 0 = no sweep: "
                             "the middle of the grid)")
    parser.add_argument("--lrs-adamw", type=float, nargs="+", default=None,
                        help="AdamW learning-rate grid (1e-3 2e-3 4e-3)")
    parser.add_argument("--lrs-sgd", type=float, nargs="+", default=None,
                        help="SGD learning-rate grid (0.1 0.3 0.9)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="distk-train override for every run")
    parser.add_argument("--slacks", type=float, nargs="+", default=[0.01, 0.02],
                        help="targets = dense fp32's mean final val loss x (1 + slack); "
                             "the first also selects the tuned settings (0.01 0.02)")
    parser.add_argument("--compute-seconds", type=float, default=None,
                        help="skip the calibration and use this dense compute s/step")
    parser.add_argument("--calibrate-steps", type=int, default=None)
    parser.add_argument("--check-mb", type=float, default=None,
                        help="per-rate all-reduce check in MB (16; quick 1; 0 = skip)")
    parser.add_argument("--timeout", type=int, default=7200, help="seconds per run")
    parser.add_argument("--out", default=None, help="result name (e2e / e2e_<preset>)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS,
                        help="where <out>.json and <out>.png go (benchmarks/results)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate every method's config and print the plan and the "
                             "commands (rates from --compute-seconds or 0.1 s)")
    parser.add_argument("--tune-only", action="store_true",
                        help="stop after the sweep and the tuning (steps 1-4): no run under "
                             "netem; the table and the plot compare every tuned setting's "
                             "final loss per tuning seed with dense fp32's on that seed")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.quick and args.preset not in (None, "quick"):
        parser.error(f"--quick with --preset {args.preset} is invalid: allowed one of them")
    args.preset = "quick" if args.quick else (args.preset or "full")
    preset = PRESETS[args.preset]
    for key in ("world", "ratios", "steps", "eval_every", "sweep_steps", "seeds",
                "tuning_seeds", "optimizers", "check_mb", "calibrate_steps"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.lrs = {"adamw": args.lrs_adamw or preset["lrs"]["adamw"],
                "sgd": args.lrs_sgd or preset["lrs"]["sgd"]}
    args.config = job_config(preset)
    args.out = args.out or ("e2e" if args.preset == "full" else f"e2e_{args.preset}")
    try:
        args.method_table = method_table(preset, args.extra_methods)
    except ValueError as err:
        parser.error(str(err))
    if args.methods is None:
        args.methods = DEFAULT_METHODS + [m for m in args.method_table
                                          if m not in METHODS and m not in DEFAULT_METHODS]
    unknown = [m for m in args.methods if m not in args.method_table]
    if unknown:
        parser.error(f"--methods {unknown} unknown: allowed {', '.join(args.method_table)}")
    if len(set(args.methods)) != len(args.methods):
        parser.error(f"--methods {args.methods} is invalid: a method appears twice")
    if args.world < 2:
        parser.error(f"--world {args.world} is invalid: allowed an int >= 2")
    if args.steps < 1:
        parser.error(f"--steps {args.steps} is invalid: allowed an int >= 1")
    if not 1 <= args.eval_every <= args.steps:
        parser.error(f"--eval-every {args.eval_every} is invalid: allowed 1..{args.steps}")
    if any(r <= 0 for r in args.ratios):
        parser.error(f"--ratios {args.ratios} is invalid: allowed floats > 0")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        parser.error(f"--seeds {args.seeds} is invalid: allowed distinct ints >= 0")
    if (len(set(args.tuning_seeds)) != len(args.tuning_seeds) or min(args.tuning_seeds) < 0
            or set(args.tuning_seeds) & set(args.seeds)):
        parser.error(f"--tuning-seeds {args.tuning_seeds} is invalid: allowed distinct ints "
                     f">= 0 not among --seeds {args.seeds} (tuning is done apart from "
                     "reporting)")
    if "dense_fp32" not in args.methods:
        parser.error("--methods must include dense_fp32: it sets the target and the rate")
    outside = [m for m in args.bound if m not in args.methods]
    if outside or len(set(args.bound)) != len(args.bound):
        parser.error(f"--bound {args.bound} is invalid: allowed distinct methods among "
                     f"--methods {args.methods}")
    if set(args.bound) == set(args.methods):
        parser.error(f"--bound {args.bound} is invalid: at least one method must run under "
                     "netem (bound every row and nothing is measured)")
    if args.tune_only and not any(args.method_table[m].tuned for m in args.methods):
        parser.error(f"--tune-only with --methods {args.methods} runs nothing: allowed "
                     "with a method that has knobs to tune (tune:KEY=V1,V2)")
    if args.sweep_steps < 0:
        parser.error(f"--sweep-steps {args.sweep_steps} is invalid: allowed an int >= 0")
    if any(lr <= 0 for grid in args.lrs.values() for lr in grid):
        parser.error(f"learning rates must be > 0, got {args.lrs}")
    if not args.slacks or any(s < 0 for s in args.slacks):
        parser.error(f"--slacks {args.slacks} is invalid: allowed floats >= 0")
    if args.compute_seconds is not None and args.compute_seconds <= 0:
        parser.error(f"--compute-seconds {args.compute_seconds} is invalid: allowed > 0")
    return args


def method_table(preset: Mapping[str, Any], extra: list[list[str]]) -> dict[str, Method]:
    """The built-in methods with the preset's knob grids, then ``--method`` additions (a
    name already taken replaces that method)."""
    table = dict(METHODS)
    for name, grid in preset["tune"].items():
        table[name] = Method(table[name].name, table[name].mode, table[name].set, grid,
                             table[name].about)
    for tokens in extra:
        method = parse_method(tokens)
        table[method.name] = method
    return table


def validate_configs(args: argparse.Namespace, config_path: Path) -> None:
    """Load the config of every (optimizer, method, setting) as distk-train would, so a
    wrong key or value fails now, naming the method, instead of hours into the run."""
    from distk.train.config import load_config

    for opt in args.optimizers:
        for name in args.methods:
            method = args.method_table[name]
            for setting in method.settings():
                overrides = [*optimizer_sets(opt), f"train.lr={args.lrs[opt][0]}",
                             *args.overrides, *method.overrides(setting, args.steps),
                             f"sparsity.method={method.mode}"]
                try:
                    load_config(config_path, overrides)
                except ValueError as err:
                    raise SystemExit(f"e2e.py: method {name} ({opt}, setting "
                                     f"{setting_label(setting)}) is not a valid distk-train "
                                     f"config: {err}") from None


# -- commands ------------------------------------------------------------------------------
def netem_prefix(args: argparse.Namespace, rate: str, log_dir: Path | None = None,
                 timeout: int | None = None) -> list[str]:
    cmd = ["bash", str(NETEM), "run", "--timeout", str(timeout or args.timeout)]
    if log_dir is not None:
        cmd += ["--log-dir", str(log_dir)]
    return cmd + [str(args.world), rate, "--"]


def optimizer_sets(opt: str) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in OPTIMIZERS[opt]["set"].items()]


def train_command(args: argparse.Namespace, *, rate: str, method: str,
                  setting: Mapping[str, Any], opt: str, lr: float, seed: int, steps: int,
                  run_dir: Path, config_path: Path) -> list[str]:
    """The netem.sh command line of one run (one rank of distk-train per namespace)."""
    eval_every = min(args.eval_every, steps)
    overrides = [f"run_root={json.dumps(str(run_dir.parent))}", f"train.steps={steps}",
                 f"train.eval_every={eval_every}", f"logging.log_every={eval_every}",
                 f"seed={seed}", *optimizer_sets(opt), f"train.lr={lr}", *args.overrides]
    cmd = netem_prefix(args, rate, run_dir / "logs") + [
        sys.executable, "-m", "distk.train", "--config", str(config_path),
        "--name", run_dir.name, *args.method_table[method].argv(setting, steps)]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def compute_command(args: argparse.Namespace, opt: str, config_path: Path) -> list[str]:
    cmd = netem_prefix(args, "none", timeout=1800) + [
        sys.executable, str(COMPUTE), "--config", str(config_path),
        "--steps", str(args.calibrate_steps), "--warmup", "2", "--eval"]
    for item in [*optimizer_sets(opt), f"train.lr={args.lrs[opt][0]}", *args.overrides]:
        cmd += ["--set", item]
    return cmd


def check_command(args: argparse.Namespace, rate: str) -> list[str]:
    return netem_prefix(args, rate, timeout=600) + [
        sys.executable, str(CHECK), "--mb", str(args.check_mb), "--repeats", "2"]


def _check_module() -> Any:
    spec = importlib.util.spec_from_file_location("netem_check", CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def links(args: argparse.Namespace, bytes_per_rank: int, compute: float
          ) -> list[tuple[str, str, float | None, float | None]]:
    """(key, tc rate, R asked for, bits/s) of every link setting: one per ``--ratios``
    value (key "4"), or one per fixed ``--rates`` rate (key the rate, R not set)."""
    if args.rates:
        bits = _check_module().rate_bits_per_second
        return [(rate, rate, None, bits(rate)) for rate in args.rates]
    return [(f"{ratio:g}", *_rate_of(bytes_per_rank, compute, ratio)) for ratio in args.ratios]


def _rate_of(bytes_per_rank: int, compute: float, ratio: float) -> tuple[str, float, float]:
    rate, bits = dilated_rate(bytes_per_rank, compute, ratio)
    return rate, ratio, bits


def dense_bytes_per_rank(args: argparse.Namespace, config_path: Path) -> int:
    """Bytes one rank transmits in a ring all-reduce of the job's fp32 gradient."""
    import torch

    from distk.comm.exchange import dense_allreduce_bytes
    from distk.train import build_model, load_config

    cfg = load_config(config_path, list(args.overrides))
    numel = sum(p.numel() for p in build_model(cfg, torch.device("cpu")).parameters())
    return dense_allreduce_bytes(numel, args.world, 4)


def dilated_rate(bytes_per_rank: int, compute_seconds: float, ratio: float) -> tuple[str, float]:
    """(tc rate, bits/s) at which one rank's ring all-reduce of ``bytes_per_rank`` takes
    ``ratio`` x ``compute_seconds``."""
    bits = bytes_per_rank * 8 / (ratio * compute_seconds)
    return f"{max(1, int(round(bits / 1e3)))}kbit", bits


# -- running -------------------------------------------------------------------------------
def _tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return f"({path} missing)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_json(cmd: list[str], env: dict[str, str], what: str) -> dict[str, Any]:
    """Rank 0's last stdout line (JSON) of a netem.sh run."""
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def read_evals(metrics_path: Path) -> list[dict[str, Any]]:
    """Every evaluation of a run from its ``metrics.jsonl``: step, training wall seconds,
    validation loss, and the run's totals up to that step (bytes sent, dense fp32 bytes,
    effective density) with the step's own density; a total the run did not log is None."""
    evals = []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if "val/loss" not in record or record.get("train/wall_seconds") is None:
            continue
        evals.append({"step": record["step"], "wall": record["train/wall_seconds"],
                      "loss": record["val/loss"],
                      "bytes": record.get("distk/total_bytes_sent"),
                      "dense_bytes": record.get("distk/total_dense_bytes"),
                      "density": record.get("distk/total_density"),
                      "step_density": record.get("distk/density")})
    return evals


def read_wire(path: Path) -> list[int] | None:
    """Bytes each host's link transmitted in a run (``netem.sh run --log-dir``'s
    ``wire.tsv``, host order), or None when the file is missing or unreadable."""
    try:
        rows = [line.split() for line in path.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
        return [int(tx) for _, tx, _ in sorted(rows, key=lambda r: int(r[0][1:]))]
    except (OSError, ValueError):
        return None


def run_training(cmd: list[str], run_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run one training job; its result.json plus its evaluations (``read_evals``) and
    the bytes each host's link carried (``wire_tx_bytes``, ``read_wire``)."""
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        logs = "\n".join(f"--- {p.name} ---\n{_tail(p)}"
                         for p in sorted((run_dir / "logs").glob("h*.log")))
        raise RuntimeError(f"run {run_dir} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-2000:]}\n{logs}")
    result = json.loads((run_dir / "result.json").read_text())
    result["evals"] = read_evals(run_dir / "metrics.jsonl")
    result["wire_tx_bytes"] = read_wire(run_dir / "logs" / "wire.tsv")
    return result


def select_lr(sweep: dict[float, dict[str, Any]]) -> float:
    """The rule: lowest final validation loss of the sweep (non-finite losses lose); ties
    go to the smaller learning rate."""
    def key(lr: float) -> tuple[float, float]:
        loss = sweep[lr]["final_val_loss"]
        return (loss if math.isfinite(loss) else math.inf, lr)
    return min(sweep, key=key)


# -- time to target ------------------------------------------------------------------------
def crossings(losses: Sequence[float], target: float) -> tuple[int | None, int | None]:
    """(first, stable) indices: the first evaluation at or below ``target``, and the first
    after which every evaluation stays at or below it; None when there is none."""
    first = next((i for i, loss in enumerate(losses) if loss <= target), None)
    stable = None
    for i in range(len(losses) - 1, -1, -1):
        if losses[i] > target or not math.isfinite(losses[i]):
            break
        stable = i
    return first, stable


def at_target(evals: Sequence[Mapping[str, Any]], target: float) -> dict[str, Any]:
    """Where one run reaches ``target``: wall seconds and step of the first and of the
    stable crossing (``crossings``), and at the stable one the bytes sent so far, their
    fraction of dense fp32's, the effective density so far and the step's density."""
    first, stable = crossings([e["loss"] for e in evals], target)
    out: dict[str, Any] = {"first_s": None, "first_step": None, "stable_s": None,
                           "stable_step": None, "mb": None, "bytes_fraction": None,
                           "density": None, "step_density": None}
    if first is not None:
        out["first_s"], out["first_step"] = evals[first]["wall"], evals[first]["step"]
    if stable is not None:
        at = evals[stable]
        out["stable_s"], out["stable_step"] = at["wall"], at["step"]
        if at.get("bytes") is not None:
            out["mb"] = at["bytes"] / 1e6
            if at.get("dense_bytes"):
                out["bytes_fraction"] = at["bytes"] / at["dense_bytes"]
        out["density"], out["step_density"] = at.get("density"), at.get("step_density")
    return out


def loss_at(evals: Sequence[Mapping[str, Any]], key: str, budget: float) -> float | None:
    """Validation loss of the last evaluation whose ``key`` ("wall" or "bytes") is at or
    below ``budget``; None when there is none (or the run did not log ``key``)."""
    last = None
    for e in evals:
        if e.get(key) is not None and e[key] <= budget * (1 + 1e-9):
            last = e["loss"]
    return last


def on_link_clock(evals: Sequence[Mapping[str, Any]], bits: float | None
                  ) -> list[dict[str, Any]]:
    """Evaluations of an unshaped run placed on a link of ``bits``/s: each wall time plus
    the bytes sent so far x 8 / bits (the tuning stage's model; None = unchanged)."""
    if not bits:
        return [dict(e) for e in evals]
    return [{**e, "wall": e["wall"] + (e.get("bytes") or 0) * 8 / bits} for e in evals]


def lower_bound(result: Mapping[str, Any], bits: float) -> dict[str, Any]:
    """An unshaped run's result with its times bounded from below on a link of
    ``bits``/s: at every evaluation (and at the end) max(unshaped wall, bytes sent so far
    x 8 / bits); marked ``timing="bound"``. Module docstring, step 5."""
    def bound(wall: float, sent: float | None) -> float:
        return max(wall, (sent or 0) * 8 / bits)
    return {**result, "timing": "bound",
            "wall_seconds": bound(result["wall_seconds"], result["bytes_sent"]),
            "evals": [{**e, "wall": bound(e["wall"], e.get("bytes"))}
                      for e in result["evals"]]}


def tuning_dir(name: str, seed: int, tuning_seeds: Sequence[int]) -> str:
    """Run directory name of a sweep or tuning run: ``name`` alone with one tuning seed
    (the layout of every earlier result), ``name-t<seed>`` with several."""
    return name if len(tuning_seeds) == 1 else f"{name}-t{seed}"


def choose_setting(candidates: Sequence[Sequence[Mapping[str, Any]]],
                   targets: Sequence[float], bits: float | None
                   ) -> tuple[int, list[dict[str, Any]]]:
    """(index of the best candidate, one score per candidate) at a link of ``bits``/s.

    ``candidates[i][j]`` is candidate i's tuning run (``evals``, ``final_val_loss``,
    ``bytes_sent``) on tuning seed j, and ``targets[j]`` that seed's target. Each run is
    put on the link's clock (``on_link_clock``). The best candidate reaches its target
    (stable crossing) on the most seeds, then has the earliest mean time over the seeds
    it reaches, then the lowest mean final loss, then the fewest mean bytes. With one seed
    this is: the earliest time to target, else the lowest final loss, then bytes."""
    scores = []
    for runs in candidates:
        if len(runs) != len(targets):
            raise ValueError(f"a candidate has {len(runs)} tuning runs for "
                             f"{len(targets)} targets: allowed one run per tuning seed")
        times = [at_target(on_link_clock(run["evals"], bits), target)["stable_s"]
                 for run, target in zip(runs, targets)]
        reached = [t for t in times if t is not None]
        losses = [run["final_val_loss"] for run in runs]
        scores.append({
            "modelled_time_to_target_s": statistics.fmean(reached) if reached else None,
            "modelled_per_seed_s": times, "seeds_reached": len(reached),
            "final_val_loss": _finite_mean(losses),
            "mb": statistics.fmean(run["bytes_sent"] for run in runs) / 1e6})

    def key(i: int) -> tuple[int, float, float, float]:
        s = scores[i]
        time_s = s["modelled_time_to_target_s"]
        return (-s["seeds_reached"], time_s if time_s is not None else math.inf,
                s["final_val_loss"], s["mb"])
    return min(range(len(candidates)), key=key), scores


# -- summarising ---------------------------------------------------------------------------
def _finite_mean(values: Sequence[float]) -> float:
    """Mean of tuning losses; inf when any is not finite (a diverged run loses)."""
    return statistics.fmean(values) if all(math.isfinite(v) for v in values) else math.inf


def _mean(values: Sequence[float | None]) -> float | None:
    """Mean over seeds, or None when any seed has no value."""
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if len(vals) == len(values) and vals else None


def _spread(values: Sequence[float | None]) -> float | None:
    """Half the max-min range over seeds (None if any is missing or there is one seed)."""
    vals = [v for v in values if v is not None]
    if len(vals) != len(values) or len(vals) < 2:
        return None
    return (max(vals) - min(vals)) / 2


def summarise(runs: Mapping[str, Mapping[str, Mapping[str, Any]]], compute: float,
              slacks: Sequence[float], lrs: Mapping[str, float],
              settings: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Targets, budgets and one row per method of one (optimizer, R); ``runs`` maps
    method -> seed -> result."""
    dense_final = _mean([r["final_val_loss"] for r in runs["dense_fp32"].values()])
    targets = {f"{s:g}": dense_final * (1 + s) for s in slacks}
    wall_budget = min(statistics.fmean(r["wall_seconds"] for r in seeds.values())
                      for seeds in runs.values())
    bytes_budget = min(statistics.fmean(r["bytes_sent"] for r in seeds.values())
                       for seeds in runs.values())
    rows = []
    for method, seeds in runs.items():
        res = list(seeds.values())
        per_step = [r["wall_seconds"] / r["steps"] for r in res]
        sel = [r["selection_seconds"] / r["steps"] for r in res]
        mean_step, mean_sel = statistics.fmean(per_step), statistics.fmean(sel)
        row: dict[str, Any] = {
            "method": method, "setting": setting_label(settings[method]),
            "timing": "bound" if any(r.get("timing") == "bound" for r in res) else "netem",
            "lr": lrs[method], "seeds": len(res),
            "final_val_loss": _mean([r["final_val_loss"] for r in res]),
            "final_val_spread": _spread([r["final_val_loss"] for r in res]),
            "val_at_equal_wall": _mean([loss_at(r["evals"], "wall", wall_budget)
                                        for r in res]),
            "val_at_equal_bytes": _mean([loss_at(r["evals"], "bytes", bytes_budget)
                                         for r in res]),
            "s_per_step": mean_step, "compute_s_per_step": compute,
            "selection_s_per_step": mean_sel,
            "exposed_comm_s_per_step": max(0.0, mean_step - compute - mean_sel),
            "hook_comm_s_per_step": statistics.fmean(r["comm_seconds"] / r["steps"]
                                                     for r in res),
            "mb_per_step": statistics.fmean(r["bytes_sent"] / r["steps"] for r in res) / 1e6,
            "total_mb": statistics.fmean(r["bytes_sent"] for r in res) / 1e6,
            # On the wire: each host's link counter for the whole run (every frame, the
            # launch and evaluations included), mean over hosts, then over seeds.
            "wire_mb": _mean([statistics.fmean(r["wire_tx_bytes"]) / 1e6
                              if r.get("wire_tx_bytes") else None for r in res]),
            "targets": {},
        }
        row["wire_vs_count"] = (row["wire_mb"] / row["total_mb"]
                                if row["wire_mb"] and row["total_mb"] else None)
        for slack, target in targets.items():
            reached = [at_target(r["evals"], target) for r in res]
            stable = [a["stable_s"] for a in reached]
            row["targets"][slack] = {
                "reached": sum(t is not None for t in stable),
                "time_to_target_s": _mean(stable), "time_to_target_spread": _spread(stable),
                "first_crossing_s": _mean([a["first_s"] for a in reached]),
                "stable_step": _mean([a["stable_step"] for a in reached]),
                "mb_at_target": _mean([a["mb"] for a in reached]),
                "bytes_fraction_at_target": _mean([a["bytes_fraction"] for a in reached]),
                "density_at_target": _mean([a["density"] for a in reached]),
                "step_density_at_target": _mean([a["step_density"] for a in reached]),
            }
        rows.append(row)
    base = next(r for r in rows if r["method"] == "dense_fp32")
    for row in rows:
        for slack, block in row["targets"].items():
            dense_tt = base["targets"][slack]["time_to_target_s"]
            tt = block["time_to_target_s"]
            # A ratio of two bounds bounds nothing; a measured time against a bound
            # dense fp32 gives a lower bound of the speed-up ("speedup_at_least").
            both_bound = row["timing"] == base["timing"] == "bound" and row is not base
            block["speedup_vs_dense"] = (dense_tt / tt if dense_tt and tt and not both_bound
                                         else None)
            block["speedup_at_least"] = (base["timing"] == "bound" and row is not base
                                         and block["speedup_vs_dense"] is not None)
    return {"targets": targets, "equal_wall_budget_s": wall_budget,
            "equal_bytes_budget_mb": bytes_budget / 1e6, "rows": rows}


COLUMNS = [
    ("method", "method", "s"), ("timing", "timing", "s"), ("setting", "setting", "s"),
    ("lr", "lr", "g"),
    ("final_val_loss", "val @ end", ".4f"), ("final_val_spread", "+-", ".4f"),
    ("val_at_equal_wall", "val @ equal wall", ".4f"),
    ("val_at_equal_bytes", "val @ equal bytes", ".4f"),
    ("s_per_step", "s/step", ".3f"), ("compute_s_per_step", "compute", ".3f"),
    ("selection_s_per_step", "selection", ".3f"),
    ("exposed_comm_s_per_step", "exposed comm", ".3f"), ("mb_per_step", "MB/step", ".3f"),
    ("total_mb", "MB total", ".1f"), ("wire_mb", "wire MB", ".1f"),
    ("wire_vs_count", "wire/count", ".2f"),
]
TARGET_COLUMNS = [
    ("method", "method", "s"), ("timing", "timing", "s"), ("reached", "seeds at target", "d"),
    ("time_to_target_s", "time to target s", ".1f"), ("time_to_target_spread", "+-", ".1f"),
    ("first_crossing_s", "first crossing s", ".1f"),
    ("speedup_vs_dense", "vs dense fp32", ".2f"), ("stable_step", "step", ".0f"),
    ("mb_at_target", "MB at target", ".1f"),
    ("bytes_fraction_at_target", "of dense bytes", ".3f"),
    ("density_at_target", "eff. density", ".4f"),
    ("step_density_at_target", "step density", ".4f"),
]


def plot(results: Mapping[str, Any], path: Path) -> None:
    """Validation loss against wall time: mean over seeds, min-max band; one panel per
    (optimizer, R), the targets dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(t["ratios"]) for t in results.values())
    fig, axes = plt.subplots(len(results), cols, figsize=(6 * cols, 4.3 * len(results)),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for row, opt in enumerate(results):
        for col, (key, block) in enumerate(results[opt]["ratios"].items()):
            ax = axes[row][col]
            ax.set_visible(True)
            for i, (method, seeds) in enumerate(block["runs"].items()):
                curves = [r["evals"] for r in seeds.values()]
                n = min(len(c) for c in curves)
                if not n:
                    continue
                wall = [statistics.fmean(c[j]["wall"] for c in curves) for j in range(n)]
                loss = [[c[j]["loss"] for c in curves] for j in range(n)]
                setting = block["settings"][method]
                label = method + (f" ({setting_label(setting)})" if setting else "")
                bound = method in block.get("bound", ())
                ax.plot(wall, [statistics.fmean(v) for v in loss], "o--" if bound else "o-",
                        color=f"C{i}", markersize=3,
                        label=label + (" [lower bound]" if bound else ""))
                if len(curves) > 1:
                    ax.fill_between(wall, [min(v) for v in loss], [max(v) for v in loss],
                                    color=f"C{i}", alpha=0.2)
            for j, (slack, target) in enumerate(block["summary"]["targets"].items()):
                ax.axhline(target, color="grey", linestyle=("--", ":")[j % 2], linewidth=1,
                           label=f"target +{float(slack):.0%} {target:.3f}")
            label = f"R={key}" if block["ratio"] is not None else "fixed rate"
            ax.set_title(f"{opt}, {label} ({block['rate']}, all-reduce check "
                         f"{block['check_gbit_per_s'] or float('nan'):.3f} Gbit/s)", fontsize=9)
            ax.set_xlabel("training wall time (s)")
            ax.set_ylabel("validation loss (nats/byte)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.suptitle("validation loss vs training wall time, dilated emulation\n"
                 "(mean over the reported seeds, band = min..max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the protocol --------------------------------------------------------------------------
def plan(args: argparse.Namespace) -> dict[str, int]:
    """Runs of each stage, summed over ``--optimizers``: learning-rate sweep
    (``--sweep-steps`` each, unshaped, on every tuning seed), tuning (``--steps``,
    unshaped, on every tuning seed), measurement
    (``--steps``, under netem; ``--bound`` methods' reported seeds unshaped, at most one
    run per tuned setting and seed; none with ``--tune-only``)."""
    methods = [args.method_table[m] for m in args.methods]
    tune_runs = sum(len(m.settings()) for m in methods if m.tuned)
    out = {"sweep_runs": 0, "tune_runs": 0, "netem_runs": 0, "unshaped_runs": 0}
    n_tuning = len(args.tuning_seeds)
    for opt in args.optimizers:
        if args.sweep_steps and len(args.lrs[opt]) > 1:
            out["sweep_runs"] += len(methods) * len(args.lrs[opt]) * n_tuning
        # + dense fp32's reference, on every tuning seed
        out["tune_runs"] += (tune_runs + (1 if tune_runs else 0)) * n_tuning
        if args.tune_only:
            continue
        links_n = len(args.rates or args.ratios)
        for m in methods:
            if m.name in args.bound:  # at most one unshaped run per setting and seed
                out["unshaped_runs"] += len(args.seeds) * min(len(m.settings()), links_n)
            else:
                out["netem_runs"] += len(args.seeds) * links_n
    return out


def dry_run(args: argparse.Namespace, root: Path, config_path: Path) -> int:
    compute = args.compute_seconds or 0.1
    nbytes = dense_bytes_per_rank(args, config_path)
    counts = plan(args)
    print(f"# preset {args.preset}: {args.world} ranks; dense all-reduce {nbytes / 1e6:.3f} "
          f"MB per rank; rates below assume compute = {compute} s/step (--compute-seconds)")
    print(f"# runs: sweep {counts['sweep_runs']} x {args.sweep_steps} steps (unshaped), "
          f"tuning {counts['tune_runs']} x {args.steps} steps (unshaped), measured "
          f"{counts['netem_runs']} x {args.steps} steps (netem)"
          + (f", bound {counts['unshaped_runs']} x {args.steps} steps (unshaped)"
             if args.bound else ""))
    for opt in args.optimizers:
        if args.compute_seconds is None:
            print(" ".join(compute_command(args, opt, config_path)))
        lr = args.lrs[opt][len(args.lrs[opt]) // 2]
        for name in args.methods:
            method = args.method_table[name]
            sweep_setting = method.settings()[0]
            if args.sweep_steps and len(args.lrs[opt]) > 1:
                for grid_lr, seed in itertools.product(args.lrs[opt], args.tuning_seeds):
                    print(" ".join(train_command(
                        args, rate="none", method=name, setting=sweep_setting, opt=opt,
                        lr=grid_lr, seed=seed, steps=args.sweep_steps,
                        config_path=config_path,
                        run_dir=root / opt / "sweep" / tuning_dir(
                            f"{name}-lr{grid_lr:g}", seed, args.tuning_seeds))))
        print("# tuning (train.lr below: the grid's middle; the sweep chooses it)")
        for name in args.methods:
            method = args.method_table[name]
            if not method.tuned and name != "dense_fp32":
                continue
            for (i, setting), seed in itertools.product(enumerate(method.settings()),
                                                        args.tuning_seeds):
                print(" ".join(train_command(
                    args, rate="none", method=name, setting=setting, opt=opt, lr=lr,
                    seed=seed, steps=args.steps, config_path=config_path,
                    run_dir=root / opt / "tune" / tuning_dir(f"{name}-{i}", seed,
                                                             args.tuning_seeds))))
        for key, rate, ratio, _ in [] if args.tune_only else links(args, nbytes, compute):
            if ratio is not None:
                print(f"# R={key}: rate = bytes_per_rank * 8 / ({key} x compute); tuned "
                      "methods at their first setting below (the tuning chooses per R)")
            for name in args.methods:
                setting = args.method_table[name].settings()[0]
                bound = name in args.bound
                if bound:
                    print(f"# {name}: lower bound from its unshaped runs (run once)")
                for seed in args.seeds:
                    print(" ".join(train_command(
                        args, rate="none" if bound else rate, method=name, setting=setting,
                        opt=opt, lr=lr, seed=seed, steps=args.steps, config_path=config_path,
                        run_dir=root / opt / ("unshaped" if bound else f"R{key}")
                        / (f"{name}-0-s{seed}" if bound else f"{name}-s{seed}"))))
    return 0


def run_protocol(args: argparse.Namespace, root: Path, config_path: Path
                 ) -> dict[str, Any]:
    """Every stage for every optimizer (module docstring); the results per optimizer."""
    # A prefix of its own (unless DISTK_NETEM_PREFIX says otherwise): never collides with
    # a netem.sh run started by hand.
    env = {**os.environ, "DISTK_NETEM_PREFIX": os.environ.get("DISTK_NETEM_PREFIX",
                                                              "distk-e2e"),
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    counts = plan(args)
    bar = tqdm(total=sum(counts.values()), desc="e2e", unit="run")
    methods = {name: args.method_table[name] for name in args.methods}
    first_slack = args.slacks[0]
    results: dict[str, Any] = {}
    for opt in args.optimizers:
        table: dict[str, Any] = {"ratios": {}, "sweep": {}, "tuning": {},
                                 "methods": {name: {"mode": m.mode, "set": dict(m.set),
                                                    "tune": {k: list(v)
                                                             for k, v in m.tune.items()},
                                                    "about": m.about}
                                             for name, m in methods.items()}}
        results[opt] = table
        # 1. calibrate
        if args.compute_seconds is not None:
            calib = {"compute_seconds": args.compute_seconds, "given": True,
                     "dense_bytes_per_rank": dense_bytes_per_rank(args, config_path)}
        else:
            bar.set_postfix_str(f"{opt} calibrate")
            calib = run_json(compute_command(args, opt, config_path), env, "calibration")
        table["calibration"] = calib
        compute = calib["compute_seconds"]
        link_list = links(args, calib["dense_bytes_per_rank"], compute)

        def train(*, rate: str, method: str, setting: Mapping[str, Any], lr: float,
                  seed: int, steps: int, run_dir: Path, what: str,
                  opt: str = opt) -> dict[str, Any]:
            bar.set_postfix_str(f"{opt} {what}")
            result = run_training(train_command(
                args, rate=rate, method=method, setting=setting, opt=opt, lr=lr, seed=seed,
                steps=steps, run_dir=run_dir, config_path=config_path), run_dir, env)
            bar.update()
            return result

        # 2. learning rate, on the tuning seeds, each method at its first setting
        chosen_lr: dict[str, float] = {}
        grid = args.lrs[opt]
        tuning_seeds = args.tuning_seeds
        for name, method in methods.items():
            if args.sweep_steps == 0 or len(grid) == 1:
                chosen_lr[name] = grid[len(grid) // 2]
                continue
            losses = {lr: [train(rate="none", method=name, setting=method.settings()[0],
                                 lr=lr, seed=seed, steps=args.sweep_steps,
                                 run_dir=root / opt / "sweep" / tuning_dir(
                                     f"{name}-lr{lr:g}", seed, tuning_seeds),
                                 what=f"sweep {name} lr={lr:g} seed {seed}"
                                 )["final_val_loss"] for seed in tuning_seeds]
                      for lr in grid}
            sweep = {lr: {"final_val_loss": _finite_mean(values)}
                     for lr, values in losses.items()}
            chosen_lr[name] = select_lr(sweep)
            table["sweep"][name] = {
                f"{lr:g}": {"final_val_loss": sweep[lr]["final_val_loss"],
                            "per_seed": losses[lr], "edge": lr in (min(grid), max(grid))}
                for lr in grid}
        table["lr"] = chosen_lr
        # 3. knobs, on the tuning seeds: full-length runs on the unshaped link, each R's
        # clock modelled from the bytes they sent
        chosen: dict[str, dict[str, dict[str, Any]]] = {
            name: {key: m.settings()[0] for key, *_ in link_list}
            for name, m in methods.items()}
        tuned = [name for name, m in methods.items() if m.tuned]
        if tuned:
            references = [train(rate="none", method="dense_fp32", setting={},
                                lr=chosen_lr["dense_fp32"], seed=seed, steps=args.steps,
                                run_dir=root / opt / "tune" / tuning_dir(
                                    "dense_fp32-0", seed, tuning_seeds),
                                what=f"tune dense_fp32 seed {seed}")
                          for seed in tuning_seeds]
            finals = [r["final_val_loss"] for r in references]
            targets = [loss * (1 + first_slack) for loss in finals]
            # "target" and "reference_final_val_loss": the means (one seed: that seed's).
            table["tuning"] = {"seeds": list(tuning_seeds), "slack": first_slack,
                               "target": statistics.fmean(targets), "targets": targets,
                               "reference_final_val_loss": statistics.fmean(finals),
                               "reference_per_seed": finals, "methods": {}}
            for name in tuned:
                settings = methods[name].settings()
                candidates = [[train(rate="none", method=name, setting=setting,
                                     lr=chosen_lr[name], seed=seed, steps=args.steps,
                                     run_dir=root / opt / "tune" / tuning_dir(
                                         f"{name}-{i}", seed, tuning_seeds),
                                     what=f"tune {name} {setting_label(setting)} seed {seed}")
                               for seed in tuning_seeds]
                              for i, setting in enumerate(settings)]
                report = {"candidates": [{"setting": s, "label": setting_label(s)}
                                         for s in settings], "chosen": {}}
                for key, _, _, bits in link_list:
                    best, scores = choose_setting(candidates, targets, bits)
                    chosen[name][key] = settings[best]
                    report["chosen"][key] = setting_label(settings[best])
                    for cand, score in zip(report["candidates"], scores):
                        cand.setdefault("by_link", {})[key] = score
                for cand, runs in zip(report["candidates"], candidates):
                    cand["final_val_loss"] = statistics.fmean(r["final_val_loss"]
                                                              for r in runs)
                    cand["final_val_loss_per_seed"] = [r["final_val_loss"] for r in runs]
                    cand["unshaped_s_per_step"] = statistics.fmean(
                        r["wall_seconds"] / r["steps"] for r in runs)
                    cand["mb_per_step"] = statistics.fmean(
                        r["bytes_sent"] / r["steps"] for r in runs) / 1e6
                table["tuning"]["methods"][name] = report
        if args.tune_only:
            continue
        # 4. measure: every reported seed under netem at every R (--bound methods: once
        # unshaped per setting and seed, then bounded at each R)
        unshaped: dict[tuple[str, int, int], dict[str, Any]] = {}
        for key, rate, ratio, bits in link_list:
            check = None
            if args.check_mb:
                bar.set_postfix_str(f"{opt} R={key} check")
                check = run_json(check_command(args, rate), env, "all-reduce check")
            runs: dict[str, dict[str, Any]] = {}
            for name in methods:
                setting = chosen[name][key]
                if name in args.bound:
                    index = methods[name].settings().index(setting)
                    runs[name] = {}
                    for seed in args.seeds:
                        done = (name, index, seed)
                        if done not in unshaped:  # one run serves every R
                            unshaped[done] = train(
                                rate="none", method=name, setting=setting,
                                lr=chosen_lr[name], seed=seed, steps=args.steps,
                                run_dir=root / opt / "unshaped" / f"{name}-{index}-s{seed}",
                                what=f"unshaped {name} seed {seed}")
                        runs[name][str(seed)] = lower_bound(unshaped[done], bits)
                    continue
                runs[name] = {str(seed): train(
                    rate=rate, method=name, setting=setting, lr=chosen_lr[name],
                    seed=seed, steps=args.steps,
                    run_dir=root / opt / f"R{key}" / f"{name}-s{seed}",
                    what=f"R={key} {name} seed {seed}") for seed in args.seeds}
            settings = {name: chosen[name][key] for name in methods}
            summary = summarise(runs, compute, args.slacks, chosen_lr, settings)
            dense = next(r for r in summary["rows"] if r["method"] == "dense_fp32")
            table["ratios"][key] = {
                "ratio": ratio, "rate": rate, "rate_bits_per_s": bits, "check": check,
                "check_gbit_per_s": check["achieved_gbit_per_s"] if check else None,
                "measured_ratio": (None if dense["timing"] == "bound"
                                   else (dense["s_per_step"] - compute) / compute),
                "bound": list(args.bound), "settings": settings, "summary": summary,
                "runs": runs}
            for name in (n for n in tuned if n not in args.bound):
                # The tuning's clock model against this R's measurement of the setting.
                report = table["tuning"]["methods"][name]
                cand = next(c for c in report["candidates"]
                            if c["setting"] == chosen[name][key])
                row = next(r for r in summary["rows"] if r["method"] == name)
                report.setdefault("model_check", {})[key] = {
                    "modelled_s_per_step": cand["unshaped_s_per_step"]
                    + (cand["mb_per_step"] * 8e6 / bits if bits else 0.0),
                    "measured_s_per_step": row["s_per_step"]}
    bar.close()
    return results


def tuning_rows(tuning: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per tuned setting: its final validation loss on each tuning seed against
    dense fp32's on that seed (``gap_<seed>``, a fraction), the mean and the worst gap, and
    the MB one rank sent over a run."""
    refs = tuning.get("reference_per_seed", [])
    rows = []
    for name, report in tuning.get("methods", {}).items():
        for cand in report["candidates"]:
            gaps = [loss / ref - 1 for loss, ref in zip(cand["final_val_loss_per_seed"], refs)]
            first = next(iter(cand.get("by_link", {}).values()), {})
            rows.append({"method": name, "setting": cand["label"],
                         **{f"gap_{seed}": gap for seed, gap in zip(tuning["seeds"], gaps)},
                         "gap_mean": statistics.fmean(gaps) if gaps else None,
                         "gap_worst": max(gaps) if gaps else None, "mb": first.get("mb")})
    return rows


def tuning_columns(tuning: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    return [("method", "method", "s"), ("setting", "setting", "s"),
            *((f"gap_{seed}", f"seed {seed} vs dense", "+.2%") for seed in tuning["seeds"]),
            ("gap_mean", "mean", "+.2%"), ("gap_worst", "worst", "+.2%"),
            ("mb", "MB sent per rank", ".1f")]


def plot_tuning(results: Mapping[str, Any], path: Path) -> None:
    """``--tune-only``: each tuned setting's final loss against dense fp32's, one point
    per tuning seed and a bar for the mean; one panel per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 4.5), squeeze=False)
    for ax, (opt, table) in zip(axes[0], results.items()):
        rows = tuning_rows(table["tuning"])
        seeds = table["tuning"].get("seeds", [])
        x = range(len(rows))
        ax.bar(x, [100 * r["gap_mean"] for r in rows], color="C0", alpha=0.4, label="mean")
        for j, seed in enumerate(seeds):
            ax.plot(x, [100 * r[f"gap_{seed}"] for r in rows], "o", color=f"C{j + 1}",
                    label=f"seed {seed}")
        ax.axhline(0, color="grey", linewidth=1)
        ax.set_xticks(list(x), [f"{r['method']}\n{r['setting']}\n{r['mb']:.1f} MB"
                                for r in rows], fontsize=7)
        ax.set_ylabel("final val loss vs dense fp32 (%)")
        ax.set_title(f"{opt}: tuned settings on the tuning seeds", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_results(results: Mapping[str, Any]) -> None:
    for opt, table in results.items():
        c = table["calibration"]
        print(f"\n## {opt}: dense compute {c['compute_seconds']:.4f} s/step, "
              f"{c['dense_bytes_per_rank'] / 1e6:.3f} MB per rank per dense all-reduce; "
              f"lr {table['lr']}")
        for name, report in table["tuning"].get("methods", {}).items():
            seeds = table["tuning"].get("seeds", [0])
            print(f"tuned {name} (tuning seed{'s' if len(seeds) > 1 else ''} "
                  f"{' '.join(map(str, seeds))}, mean target "
                  f"{table['tuning']['target']:.4f}): "
                  + ", ".join(f"R={k}: {v}" for k, v in report["chosen"].items()))
        if table["tuning"].get("methods"):
            print_table(tuning_rows(table["tuning"]), tuning_columns(table["tuning"]))
        for key, block in table["ratios"].items():
            summary = block["summary"]
            print(f"\n### {opt} R={key}: rate {block['rate']}, all-reduce check "
                  f"{block['check_gbit_per_s'] or float('nan'):.3f} Gbit/s, dense fp32 "
                  f"measured (s/step - compute) / compute = "
                  f"{block['measured_ratio'] or float('nan'):.2f}, "
                  f"equal wall {summary['equal_wall_budget_s']:.1f} s, equal bytes "
                  f"{summary['equal_bytes_budget_mb']:.1f} MB")
            print_table(summary["rows"], COLUMNS)
            for slack, target in summary["targets"].items():
                print(f"\ntarget +{float(slack):.0%}: {target:.4f}")
                print_table([{"method": r["method"], "timing": r["timing"],
                              **r["targets"][slack]} for r in summary["rows"]],
                            TARGET_COLUMNS)
                if any(r["targets"][slack]["speedup_at_least"] for r in summary["rows"]):
                    print("(dense fp32 is a lower bound: its speed-ups are lower bounds)")


def main(argv: list[str] | None = None) -> int:
    """Entry point; see the module docstring."""
    args = parse_args(argv)
    root = ROOT / "runs" / "e2e" / args.out
    config_path = root / "config.json"
    root.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(args.config, indent=2) + "\n")
    validate_configs(args, config_path)
    if args.dry_run:
        return dry_run(args, root, config_path)
    if os.geteuid() != 0:
        print("e2e.py: must run as root: it builds network namespaces with "
              "launchers/netem.sh (try: sudo .venv/bin/python benchmarks/e2e.py ...)",
              file=sys.stderr)
        return 1
    started = time.perf_counter()
    results = run_protocol(args, root, config_path)
    print_results(results)
    payload = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                        if k not in ("config", "method_table")},
               "train_config": args.config, "results": results,
               "total_seconds": time.perf_counter() - started}
    path = write_results(args.out, payload, args.results_dir)
    print(f"wrote {path}")
    if not args.no_plot:
        png = args.results_dir / f"{args.out}.png"
        (plot_tuning if args.tune_only else plot)(results, png)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
