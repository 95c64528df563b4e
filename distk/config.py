"""``SparsityConfig``: the one validated configuration of gradient sparsification.

Every integration (DDP, FSDP, DeepSpeed's ``"distk"`` block, the ``distk-train`` CLI)
builds one of these, so validation and the error messages live in one place. Build it
directly (``SparsityConfig(density=0.01)``) or from a mapping
(``SparsityConfig.from_dict({...})``): unknown keys and out-of-range values raise a
``ValueError`` that names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ADAMW_OUTER", "BUCKET_LAYOUTS", "MASKS", "MASK_POLICIES", "SparsityConfig", "TILE_SIDE",
           "VALUE_BITS", "VALUE_DTYPES", "VALUE_LEVELS", "is_adam_family", "optimizer_chain",
           "outer_density"]

ADAMW_OUTER: dict[str, Any] = {"sync_every": 5, "dense_steps": 10, "value_dtype": "bfloat16",
                               "density": "auto"}
"""The overrides of :meth:`SparsityConfig.sparseloco` that matched dense AdamW's quality on
the main job at a few % of its bytes (docs/benchmarks.md, outer synchronisation at 2, 4
and 8 ranks): a sync every 5 steps, the first 10 syncs (50 steps) dense in bf16, and the
share of each tile a rank sends chosen from the number of ranks (``density="auto"``,
:func:`outer_density`).
:meth:`SparsityConfig.adamw_outer` builds it: ``distk.ddp.enable(ddp_model,
SparsityConfig.adamw_outer(), optimizer=optimizer)`` (DDP, and HF Trainer / Accelerate /
Lightning on DDP) or ``distk.outer.enable(model, optimizer, SparsityConfig.adamw_outer())``
on a plain model. The Adam schedule's notice names it, and ``distk-train``'s ``outer``
compare mode runs it."""

METHODS = ("bucketed", "exact", "dense")
EXCHANGES = ("auto", "allgather", "reduce_scatter", "dense")
MASKS = ("auto", "local", "shared")
RESIDUAL_DTYPES = ("auto", "float32", "bfloat16")
FEEDBACKS = ("residual", "estimate")
MASK_POLICIES = ("leader", "union", "moment", "sketch", "predicted", "oracle")
NONFINITE_POLICIES = ("raise", "skip", "zero")
BUCKET_LAYOUTS = ("flat", "tile")
OUTER_AVERAGES = ("all", "senders")
OUTER_CLIPS = ("none", "median")
SMALL_TENSORS = ("dense", "codec")
TILE_SIDE = 64
"""Side of the square tiles of ``bucket_layout="tile"`` (a bucket is ``64 x 64 = 4096``
entries of a weight matrix)."""
VALUE_BITS = (1, 2, 4, 8)
"""Widths of the compact codec's value codes, accepted by ``SparsityConfig.value_bits``
(the codec in ``distk.comm.codec`` uses this tuple)."""
VALUE_LEVELS = ("centres", "means", "sigma")
"""What a code of the compact codec decodes to (``SparsityConfig.value_levels``)."""
VALUE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""Names accepted by ``SparsityConfig.value_dtype`` and the dtypes they stand for."""

OUTER_DENSITY_RANGE = (1 / 64, 1 / 4)
"""The shares of each tile :func:`outer_density` chooses between (64 and 1024 of 4096)."""


def outer_density(world_size: int) -> float:
    """``density="auto"`` of outer synchronisation: the share of each tensor one rank sends
    at a sync of ``world_size`` ranks, ``1 / world_size**2`` held within
    :data:`OUTER_DENSITY_RANGE` (1/4 at 2 ranks, 1/16 at 4, 1/64 at 8 and above).

    Measured under AdamW on the main job (H = 5, 50 dense bf16 steps; docs/outer.md,
    "The share per rank by world size"): by mean final loss on tuning seeds, 1/4 beat
    1/8, 1/16 and 1/64 at 2 ranks; 1/16 beat 1/4 and 1/64 at 4; at 8, 1/128 and 1/64 were
    level within a seed's spread and 1/16 and 1/32 lost. So what a sync of all ranks
    covers (``world_size * density``) falls as ``1 / world_size``. Sizes above 8 keep
    1/64, SparseLoCo's share (arXiv 2508.15706); 3, 5, 6 and 7 ranks follow the rule
    unmeasured."""
    if not _is_int(world_size) or world_size < 1:
        raise ValueError(f"outer_density: world_size must be an integer >= 1, got "
                         f"{world_size!r}")
    low, high = OUTER_DENSITY_RANGE
    return min(high, max(low, 1.0 / world_size ** 2))


def optimizer_chain(optimizer: object) -> list[object]:
    """``optimizer`` and the optimizers it wraps (Accelerate's ``.optimizer``, Lightning's
    ``._optimizer``, DeepSpeed ZeRO's ``.optimizer``), outermost first."""
    chain: list[object] = []
    while optimizer is not None and len(chain) < 8 and all(optimizer is not o for o in chain):
        chain.append(optimizer)
        inner = None
        for attr in ("optimizer", "_optimizer"):
            try:
                inner = getattr(optimizer, attr, None)
            except Exception:  # a wrapper whose property raises: stop there
                inner = None
            if inner is not None and not isinstance(inner, (str, bool, int, float)):
                break
            inner = None
        optimizer = inner
    return chain


def is_adam_family(optimizer: object) -> bool:
    """Whether ``optimizer`` (a ``torch.optim.Optimizer``, a wrapper of one, or a name such
    as ``"adamw"``) keeps Adam's second moment: its class name (or the name) contains
    "adam" (Adam, AdamW, NAdam, RAdam, DeepSpeed's FusedAdam / DeepSpeedCPUAdam,
    bitsandbytes' AdamW8bit, ...)."""
    if isinstance(optimizer, str):
        return "adam" in optimizer.lower()
    return any("adam" in type(o).__name__.lower() for o in optimizer_chain(optimizer))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fail(key: str, value: object, allowed: str) -> None:
    raise ValueError(f"SparsityConfig.{key} must be {allowed}, got {value!r}")


@dataclass
class SparsityConfig:
    """Gradient sparsification settings shared by the compressor and every integration.

    Selection size: ``k`` entries per tensor when ``k`` is set, else
    ``round(density * numel)`` (at least 1). Tensors with fewer than ``min_numel``
    entries (unless ``small_tensors="codec"``), the first ``dense_steps`` steps and
    ``method="dense"`` use a dense all-reduce through the same code path.
    """

    density: float | str = 0.01
    """Fraction of entries each rank sends per tensor, in (0, 1]; or ``"auto"`` with outer
    synchronisation (``sync_every > 1``, ``k`` unset): :func:`outer_density` of the number
    of ranks, resolved when the :class:`~distk.integrations.outer.OuterSync` is built
    (:meth:`for_world`) and announced on rank 0 (:meth:`adamw_outer` sets it)."""

    k: int | None = None
    """Fixed number of entries per tensor (overrides ``density``); ``None`` = use density.
    Tensors smaller than ``k`` are sent whole."""

    method: str = "bucketed"
    """Selection: ``"bucketed"`` (approximate, fast), ``"exact"`` (``torch.topk``) or
    ``"dense"`` (no selection: plain all-reduce baseline through the same code path)."""

    recall_target: float = 0.95
    """Expected recall of the bucketed selection against exact top-k, in (0, 1]; used to
    choose the bucket parameters when ``buckets`` / ``k_per_bucket`` are not both given."""

    buckets: int | None = None
    """Number of buckets of the bucketed selection (``None`` = chosen for recall_target)."""

    k_per_bucket: int | None = None
    """Entries kept per bucket (``None`` = chosen for recall_target)."""

    interleaved: bool = True
    """Interleaved buckets (element ``i`` in bucket ``i % buckets``) rather than
    contiguous blocks; robust to correlated neighbouring entries."""

    bucket_layout: str = "flat"
    """How a tensor is cut into the buckets of the bucketed selection. ``"flat"``: the
    flattened tensor (``interleaved`` or contiguous blocks, counts chosen for
    ``recall_target``). ``"tile"``: each bucket is a ``64 x 64`` tile of the tensor's
    2-D layout (a weight matrix; more dimensions are viewed as ``(shape[0], -1)``), so
    every tile sends its own ``round(k / tiles)`` largest entries (SparseLoCo's chunked
    top-k, arXiv 2508.15706: top-64 of each 4096-entry tile) and indices travel as
    12-bit offsets inside the tile. Tensors whose two dimensions do not both divide by
    64 (biases, flat DDP buckets, odd shapes) keep the flat layout (a note on rank 0,
    once). Needs ``method="bucketed"`` (or ``"dense"``) and a local mask: not
    ``mask="shared"``, and ``mask="auto"`` then keeps every tensor on a local mask."""

    error_feedback: bool = True
    """Keep the unsent part of each tensor as a residual added to the next step's
    gradient (needed for top-k SGD to converge to dense quality)."""

    error_decay: float = 1.0
    """Decay of the residual (error feedback), in (0, 1]: at every step the residual is
    multiplied by it before the new gradient (pseudo-gradient) is added, so that mass
    left unsent for long fades instead of being released late. 1.0 = classic error
    feedback. SparseLoCo (arXiv 2508.15706) uses 0.95 on outer pseudo-gradients, where
    the decayed residual replaces outer momentum (:meth:`sparseloco`). Applies wherever
    the residual does; below 1 it needs ``error_feedback=True`` and
    ``feedback="residual"``. The checkpointed residual is the one left after the step."""

    residual_dtype: str = "auto"
    """Dtype the residuals are kept in between steps: ``"float32"`` (exact error
    feedback), ``"bfloat16"`` (half the memory; each step's residual is rounded
    stochastically, so the rounding error is zero on average and no coordinate's mass
    drifts) or ``"auto"``: bf16 where the framework shards the gradients for memory
    (FSDP2 without a replicate group, DeepSpeed ZeRO 2: their residuals are otherwise
    one unsharded fp32 copy of the gradients per rank), fp32 elsewhere. Computation is
    always in fp32 (fp64 for fp64 gradients). Quality: docs/comm-and-compressor.md,
    "Memory"."""

    feedback: str = "residual"
    """How what is not sent is kept (with ``error_feedback``). ``"residual"``: classic
    error feedback; each rank adds what it did not send to its next gradient, and the
    exchanged update is sparse. ``"estimate"``: EF21 (Richtarik, Sokolov, Fatkhullin,
    NeurIPS 2021); each rank keeps an estimate of its own gradient and every rank the
    mean of the estimates, a rank sends the top-k of its gradient minus its estimate,
    each estimate moves by what was sent, and the update handed back is the whole mean
    estimate: every coordinate receives a gradient at every step, which keeps an
    adaptive optimizer (Adam) moving where a residual releases its mass in rare bursts.
    Costs two fp32 copies of the gradient per rank (the estimates) instead of one."""

    feedback_beta: float = 0.0
    """``feedback="estimate"``: momentum of EF21-M (Fatkhullin, Tyurin, Richtarik, NeurIPS
    2023): the innovation is taken from ``v = beta v + (1 - beta) g`` instead of ``g``,
    in [0, 1); 0 = plain EF21. Not with ``momentum`` (DGC), which it replaces."""

    momentum: float = 0.0
    """Momentum correction of Deep Gradient Compression, in [0, 1): accumulate velocity
    ``u = momentum * u + g`` locally and sparsify the accumulated velocity. Use it with a
    momentum-free optimizer (the momentum then lives here). 0 = off."""

    clip_norm: float | None = None
    """Local gradient clipping (DGC): each tensor's gradient is scaled down to this L2 norm
    before it is accumulated. ``None`` = off; must be > 0."""

    warmup_steps: int = 0
    """Density warm-up length in steps: the density decays exponentially from
    ``warmup_density`` to ``density`` over these steps (DGC). 0 = off."""

    warmup_density: float = 0.25
    """Density at step 0 of the warm-up, in (0, 1]; at least ``density``."""

    dense_steps: int = 0
    """Number of first steps (per tensor) exchanged dense; the DDP hook forces at least 1
    while DDP rebuilds its buckets."""

    value_dtype: str | None = "auto"
    """Dtype of values on the wire: ``"float32"``, ``"bfloat16"``, ``"float16"``, ``None``
    (the gradient's dtype) or ``"auto"``: bf16 for the sparse steps of fp32 gradients,
    the gradient's dtype otherwise (dense steps and steps that send every entry, so that
    density 1.0 is plain dense averaging; fp64, fp16 and bf16 gradients). The rounding
    error stays in the residual, so bf16 values cost no gradient mass, only delay (the
    main job: within the seed spread of fp32 values, docs/comm-and-compressor.md,
    "Shared masks"). With ``value_bits`` set, the codec encodes every step but the dense
    ones (``dense_steps``, tensors under ``min_numel`` with ``small_tensors="dense"``),
    and this sets only their dtype: a named dtype, or float32 for ``"auto"`` and
    ``None`` (``"bfloat16"`` halves the bytes of outer synchronisation's dense start)."""

    value_bits: int | None = None
    """Compact wire codec: ``None`` (values in ``value_dtype``, byte-aligned indices) or
    1, 2, 4, 8: values quantized to that many bits (a sign bit and ``2**(bits-1)``
    magnitude levels spanning each bucket's least to largest selected magnitude, sent as
    two bfloat16 per bucket (float32 at 8 bits), or per group of at least 64 entries; 1
    bit = sign times the mean magnitude) and indices bit-packed at ``ceil(log2(bucket
    size))`` bits. The quantization error stays in the residual. ``value_dtype`` then
    sets only the dtype of dense steps. Needs ``exchange`` ``"auto"`` or ``"allgather"``
    (the only scheme that sends entries as packed)."""

    value_levels: str = "centres"
    """What each magnitude code of the ``value_bits`` codec decodes to. ``"centres"``: the
    centre of its cell of ``[least, largest]`` magnitude (two floats per group travel).
    ``"means"``: the mean magnitude of the group's entries that fell in the cell (the
    least-squares value for that partition; ``2**(bits-1)`` bfloat16 means per group
    travel: as many bytes as the range at 2 bits, four times as many at 4), after
    SparseLoCo's per-bin means (arXiv 2508.15706). Needs ``value_bits`` 1, 2 or 4 (at
    1 bit both are the mean). ``"sigma"``: the field's statistical quantizer (the one
    SparseLoCo's trainer and hivemind use): ``2**bits`` signed cells of equal width over
    6 standard deviations about the mean of all of a tensor's sent values, values beyond
    clamped into the end cells, each code decoded to its cell's mean; one table of
    ``2**bits`` bfloat16 means per tensor travels (float32 at 8 bits), no per-bucket
    ranges. Needs ``value_bits`` 2, 4 or 8."""

    sync_every: int = 1
    """Outer synchronisation period ``H`` (``distk.outer``): ranks take ``H`` local
    optimizer steps, then exchange the compressed pseudo-gradient (parameters at the last
    sync minus parameters now) and apply an outer step. 1 = every step; the DDP, FSDP
    and DeepSpeed integrations exchange gradients every step and refuse ``H > 1``."""

    outer_lr: float = 1.0
    """Outer learning rate (``distk.outer``): parameters move by ``outer_lr`` times the
    averaged pseudo-gradient step; > 0. With 1.0, no momentum and density 1.0, a sync
    averages the ranks' parameters."""

    outer_momentum: float = 0.0
    """Outer SGD momentum in [0, 1) (DiLoCo: 0.9 with Nesterov, outer_lr 0.7). 0 = no outer
    momentum: error feedback of the compressed pseudo-gradient takes its place, as in
    SparseLoCo."""

    outer_nesterov: bool = True
    """Nesterov form of the outer momentum (ignored when ``outer_momentum`` is 0)."""

    outer_average: str = "all"
    """How the ranks' sparse contributions are averaged at each position: ``"all"``
    (their sum over the number of ranks) or ``"senders"`` (their sum over the number of
    ranks that sent that position; positions nobody sent stay 0), SparseLoCo's decode
    (arXiv 2508.15706): a position picked by one rank of four is not divided by four.
    Meant for ``distk.outer`` but applied by the compressor to every sparse exchange.
    ``"senders"`` needs ``mask="local"`` and ``exchange`` ``"auto"`` or ``"allgather"``
    (the all-gather scheme, where each rank sees who sent what)."""

    outer_clip: str = "none"
    """Clipping of each rank's pseudo-gradient at a sync (``distk.outer``): ``"none"``, or
    ``"median"``: each rank's whole pseudo-gradient (all parameters together) is scaled
    down to the median of the ranks' L2 norms (the lower median for an even number of
    ranks; one all-gather of one scalar per sync) before it is compressed, so that no
    rank's contribution outweighs the typical one (SparseLoCo, arXiv 2508.15706). Only
    ``distk.outer`` applies it."""

    min_numel: int = 1024
    """Tensors with fewer entries than this are exchanged whole (sparse does not pay);
    how, ``small_tensors`` says."""

    small_tensors: str = "dense"
    """How tensors under ``min_numel`` entries (biases, norms) travel. ``"dense"``: an
    all-reduce of every entry in the gradient's dtype. ``"codec"``: every entry through
    the ``value_bits`` codec, in position order with no indices (2 bits and a bfloat16
    range per 512 entries at ``value_bits=2``), the rounding kept in the residual (needs
    ``value_bits``). In a model of a few million parameters the biases and norms sent
    dense in float32 cost as many bits as the 2-bit sparse matrices
    (docs/outer.md)."""

    exchange: str = "auto"
    """Exchange scheme: ``"auto"`` (cost model picks per call), ``"allgather"``,
    ``"reduce_scatter"`` or ``"dense"`` (all-reduce of the densified selection)."""

    mask: str = "auto"
    """Whose positions each rank sends. ``"local"``: every rank its own top-k (exchanged
    by ``exchange``: all-gather or reduce-scatter, bytes per rank growing with the number
    of ranks). ``"shared"``: every rank the same positions, agreed by ``mask_policy``, so
    one all-reduce sums the values, no index travels and the bytes per rank do not grow
    with the number of ranks. ``"auto"``: the cost model (:mod:`distk.comm.cost`) picks
    per buffer, the shared mask wherever it sends fewer bytes (never with ``value_bits``,
    whose per-bucket ranges do not sum). ``"shared"`` needs ``value_bits=None`` and
    ``exchange="auto"``."""

    mask_policy: str = "union"
    """How ranks agree on a shared mask (``distk.compressor.masks``): ``"union"`` (every
    rank proposes its own top ``k / P``, the proposals all-gathered as bit-packed bucket
    offsets; the mask is their union), ``"leader"`` (in turn one rank's top-k, broadcast;
    ScaleCom), ``"moment"`` (top entries of a moving average of the averaged updates,
    identical on every rank, plus a sweep; no collective; after SCAPE), ``"sketch"``
    (whole chunks ranked by a small all-reduced sketch of the ranks' magnitudes; after
    ARC-Top-K), ``"predicted"`` (the residuals predicted from past updates; no
    collective) or ``"oracle"`` (the exact top-k of the summed accumulators through a
    dense all-reduce: a diagnostic upper bound, never picked by the cost model). Quality
    of each: docs/comm-and-compressor.md, "Shared masks"."""

    mask_ahead: bool = False
    """``mask_policy`` ``"union"`` / ``"leader"``: agree on the next step's mask as soon as
    this step's values are launched, from the residual they leave behind, so that the
    mask is known before the next backward pass and a bucket's exchange needs no
    synchronous collective. ``False``: agree at the step itself, from the accumulator
    that holds the new gradient (one small synchronous all-gather before the values
    travel)."""

    mask_beta: float = 0.9
    """``mask_policy="moment"``: decay of the moving average per step, in [0, 1) (0: the
    previous step's update alone)."""

    mask_explore: float = 0.25
    """``mask_policy="moment"``: share of the ``k`` positions that sweep the buffer (every
    position is visited every ``numel / (mask_explore * k)`` steps), in (0, 1]."""

    nonfinite: str = "raise"
    """Policy for NaN/Inf in a gradient: ``"raise"`` (error on every rank naming the step
    and key), ``"skip"`` (the step's update is zero on every rank; residuals untouched)
    or ``"zero"`` (non-finite entries count as 0)."""

    stats_interval: int = 10
    """Compute the costlier statistics (residual norm, synchronised timings) every this
    many steps; >= 1. The residual norm is one more full pass over every gradient, hence
    not every step."""

    recall_interval: int = 50
    """Every this many steps, measure the recall of the selection against exact top-k
    (costs one exact top-k); 0 = never."""

    adam_dense_steps: int = 75
    """The Adam schedule's dense steps: under an Adam-family optimizer (see
    :func:`is_adam_family`), ``dense_steps`` is raised to at least this
    (:meth:`for_optimizer`). The DDP, FSDP and DeepSpeed integrations apply it when they
    are given or find the optimizer (``distk.ddp.enable(..., optimizer=opt)``; a DeepSpeed
    engine, HF Trainer, Lightning and Accelerate name theirs) and say so on rank 0.
    With AdamW at density 1%, error feedback's bursts cost +11.9% validation loss against
    dense without the schedule; with it (75 dense steps, a 200-step warm-up, bf16 values)
    the end-to-end protocol's runs end +0.94% / +0.58% (two seeds) over dense fp32, the
    main job +1.1% to +3.5% (three seeds) (docs/train.md, "Sparse training with AdamW").
    >= 0; 0 with ``adam_warmup_steps=0`` (and ``adam_value_dtype=None``) turns it off. Not
    applied with ``method="dense"``."""

    adam_warmup_steps: int = 200
    """The Adam schedule's density warm-up: under an Adam-family optimizer,
    ``warmup_steps`` is raised to at least this (see ``adam_dense_steps``); >= 0."""

    adam_value_dtype: str | None = "bfloat16"
    """The Adam schedule's wire dtype: under an Adam-family optimizer, when ``value_dtype``
    is ``"auto"`` (or ``None``) and ``value_bits`` unset, values (those of the dense steps
    included) travel in this dtype, which halves the cost of the dense start. The rounding error
    stays in the residual (dense steps: it is sent on the next step). ``None`` = leave the
    wire alone; otherwise one of the ``value_dtype`` names."""

    def __post_init__(self) -> None:
        if self.density != "auto":
            if not _is_number(self.density) or not 0.0 < self.density <= 1.0:
                _fail("density", self.density, "a number in (0, 1] or 'auto'")
            self.density = float(self.density)
        if self.k is not None and (not _is_int(self.k) or self.k < 1):
            _fail("k", self.k, "None or an integer >= 1")
        if self.method not in METHODS:
            _fail("method", self.method, f"one of {METHODS}")
        if not _is_number(self.recall_target) or not 0.0 < self.recall_target <= 1.0:
            _fail("recall_target", self.recall_target, "a number in (0, 1]")
        self.recall_target = float(self.recall_target)
        if self.buckets is not None and (not _is_int(self.buckets) or self.buckets < 1):
            _fail("buckets", self.buckets, "None or an integer >= 1")
        if self.k_per_bucket is not None and (not _is_int(self.k_per_bucket)
                                              or self.k_per_bucket < 1):
            _fail("k_per_bucket", self.k_per_bucket, "None or an integer >= 1")
        for name in ("interleaved", "error_feedback", "outer_nesterov", "mask_ahead"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "a bool (true or false)")
        if not _is_number(self.momentum) or not 0.0 <= self.momentum < 1.0:
            _fail("momentum", self.momentum, "a number in [0, 1)")
        self.momentum = float(self.momentum)
        if self.clip_norm is not None and (not _is_number(self.clip_norm)
                                           or not 0.0 < self.clip_norm < math.inf):
            _fail("clip_norm", self.clip_norm, "None or a finite number > 0")
        for name in ("warmup_steps", "dense_steps", "min_numel", "recall_interval",
                     "adam_dense_steps", "adam_warmup_steps"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                _fail(name, getattr(self, name), "an integer >= 0")
        if not _is_int(self.stats_interval) or self.stats_interval < 1:
            _fail("stats_interval", self.stats_interval, "an integer >= 1")
        if not _is_number(self.warmup_density) or not 0.0 < self.warmup_density <= 1.0:
            _fail("warmup_density", self.warmup_density, "a number in (0, 1]")
        self.warmup_density = float(self.warmup_density)
        if (self.warmup_steps > 0 and self.k is None and self.density != "auto"
                and self.warmup_density < self.density):
            _fail("warmup_density", self.warmup_density,
                  f"at least density={self.density} (the warm-up decays towards density)")
        if self.feedback not in FEEDBACKS:
            _fail("feedback", self.feedback, f"one of {FEEDBACKS}")
        if not _is_number(self.feedback_beta) or not 0.0 <= self.feedback_beta < 1.0:
            _fail("feedback_beta", self.feedback_beta, "a number in [0, 1)")
        self.feedback_beta = float(self.feedback_beta)
        if self.feedback == "estimate" and not self.error_feedback:
            _fail("feedback", self.feedback,
                  "'residual' when error_feedback=False (EF21's estimates are error feedback)")
        if self.feedback == "estimate" and self.momentum > 0:
            _fail("momentum", self.momentum,
                  "0 with feedback='estimate' (use feedback_beta, EF21-M's momentum)")
        if self.residual_dtype not in RESIDUAL_DTYPES:
            _fail("residual_dtype", self.residual_dtype, f"one of {RESIDUAL_DTYPES}")
        if self.value_dtype not in (None, "auto", *VALUE_DTYPES):
            _fail("value_dtype", self.value_dtype,
                  f"None, 'auto' or one of {tuple(VALUE_DTYPES)}")
        if self.adam_value_dtype is not None and self.adam_value_dtype not in VALUE_DTYPES:
            _fail("adam_value_dtype", self.adam_value_dtype,
                  f"None or one of {tuple(VALUE_DTYPES)}")
        if self.exchange not in EXCHANGES:
            _fail("exchange", self.exchange, f"one of {EXCHANGES}")
        if self.value_bits is not None:
            if not _is_int(self.value_bits) or self.value_bits not in VALUE_BITS:
                _fail("value_bits", self.value_bits, f"None or one of {VALUE_BITS}")
            if self.exchange not in ("auto", "allgather"):
                _fail("exchange", self.exchange,
                      f"'auto' or 'allgather' when value_bits={self.value_bits} is set (only "
                      "the all-gather sends packed entries)")
        if self.value_levels not in VALUE_LEVELS:
            _fail("value_levels", self.value_levels, f"one of {VALUE_LEVELS}")
        if self.value_levels == "means" and self.value_bits not in (1, 2, 4):
            _fail("value_levels", self.value_levels,
                  f"'centres' when value_bits={self.value_bits} (per-cell means need "
                  "value_bits 1, 2 or 4)")
        if self.value_levels == "sigma" and self.value_bits not in (2, 4, 8):
            _fail("value_levels", self.value_levels,
                  f"'centres' or 'means' when value_bits={self.value_bits} (the sigma grid "
                  "needs value_bits 2, 4 or 8)")
        if self.small_tensors not in SMALL_TENSORS:
            _fail("small_tensors", self.small_tensors, f"one of {SMALL_TENSORS}")
        if self.small_tensors == "codec" and self.value_bits is None:
            _fail("small_tensors", self.small_tensors,
                  f"'dense' when value_bits is None (the codec needs value_bits in {VALUE_BITS})")
        if not _is_int(self.sync_every) or self.sync_every < 1:
            _fail("sync_every", self.sync_every, "an integer >= 1")
        if self.density == "auto" and (self.sync_every == 1 or self.k is not None):
            _fail("density", self.density,
                  "a number in (0, 1]: 'auto' (outer_density of the number of ranks) needs "
                  f"outer synchronisation and no k; got sync_every={self.sync_every}, "
                  f"k={self.k}")
        if not _is_number(self.outer_lr) or not 0.0 < self.outer_lr < math.inf:
            _fail("outer_lr", self.outer_lr, "a finite number > 0")
        self.outer_lr = float(self.outer_lr)
        if not _is_number(self.outer_momentum) or not 0.0 <= self.outer_momentum < 1.0:
            _fail("outer_momentum", self.outer_momentum, "a number in [0, 1)")
        self.outer_momentum = float(self.outer_momentum)
        if self.mask not in MASKS:
            _fail("mask", self.mask, f"one of {MASKS}")
        if self.mask_policy not in MASK_POLICIES:
            _fail("mask_policy", self.mask_policy, f"one of {MASK_POLICIES}")
        if not _is_number(self.mask_beta) or not 0.0 <= self.mask_beta < 1.0:
            _fail("mask_beta", self.mask_beta, "a number in [0, 1)")
        self.mask_beta = float(self.mask_beta)
        if not _is_number(self.mask_explore) or not 0.0 < self.mask_explore <= 1.0:
            _fail("mask_explore", self.mask_explore, "a number in (0, 1]")
        self.mask_explore = float(self.mask_explore)
        if self.mask == "shared":
            if self.value_bits is not None:
                _fail("mask", self.mask,
                      f"'auto' or 'local' when value_bits={self.value_bits} is set (the "
                      "codec's per-bucket ranges differ across ranks, so its values cannot "
                      "be summed by an all-reduce; bf16, fp16 and fp32 values can)")
            if self.exchange != "auto":
                _fail("exchange", self.exchange,
                      "'auto' when mask='shared' (a shared mask is exchanged by one "
                      "all-reduce of its values)")
        if self.nonfinite not in NONFINITE_POLICIES:
            _fail("nonfinite", self.nonfinite, f"one of {NONFINITE_POLICIES}")
        if not _is_number(self.error_decay) or not 0.0 < self.error_decay <= 1.0:
            _fail("error_decay", self.error_decay, "a number in (0, 1]")
        self.error_decay = float(self.error_decay)
        if self.error_decay != 1.0 and (not self.error_feedback or self.feedback != "residual"):
            _fail("error_decay", self.error_decay,
                  "1.0 unless error_feedback=True and feedback='residual' (it decays the "
                  "residual, which only that combination keeps)")
        if self.bucket_layout not in BUCKET_LAYOUTS:
            _fail("bucket_layout", self.bucket_layout, f"one of {BUCKET_LAYOUTS}")
        if self.bucket_layout == "tile":
            if self.method == "exact":
                _fail("bucket_layout", self.bucket_layout,
                      "'flat' when method='exact' (tiles are buckets of the bucketed "
                      "selection)")
            if self.mask == "shared":
                _fail("bucket_layout", self.bucket_layout,
                      "'flat' when mask='shared' (the tile layout selects per rank: use "
                      "mask='local' or 'auto')")
        if self.outer_average not in OUTER_AVERAGES:
            _fail("outer_average", self.outer_average, f"one of {OUTER_AVERAGES}")
        if self.outer_average == "senders":
            if self.mask != "local":
                _fail("outer_average", self.outer_average,
                      f"'all' when mask={self.mask!r} (averaging over the ranks that sent a "
                      "position needs every rank's own positions: set mask='local')")
            if self.exchange not in ("auto", "allgather"):
                _fail("outer_average", self.outer_average,
                      f"'all' when exchange={self.exchange!r} (only the all-gather sees "
                      "which ranks sent each position: use 'auto' or 'allgather')")
        if self.outer_clip not in OUTER_CLIPS:
            _fail("outer_clip", self.outer_clip, f"one of {OUTER_CLIPS}")

    # -- construction -------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Names of every option, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SparsityConfig:
        """Build from a mapping (a JSON block, CLI overrides...).

        Raises:
            ValueError: for a non-mapping, an unknown key (with the closest valid key
                suggested) or an invalid value (naming key, value and what is allowed).
        """
        if d is None:
            return cls()
        if isinstance(d, SparsityConfig):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"SparsityConfig.from_dict expects a dict, got {type(d).__name__}")
        valid = cls.field_names()
        for key in d:
            if key not in valid:
                close = difflib.get_close_matches(str(key), valid, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown SparsityConfig key {key!r}{hint} "
                                 f"(valid keys: {', '.join(valid)})")
        return cls(**d)

    @classmethod
    def sparseloco(cls, **overrides: Any) -> SparsityConfig:
        """SparseLoCo's published production recipe for ``distk.outer`` (arXiv 2508.15706,
        the settings of Covenant-72B), as far as distk builds it: a sync every 30 inner
        steps; top-64 of every 64 x 64 tile (``density=64/4096``,
        ``bucket_layout="tile"``); values in 2 bits (``value_bits=2``; distk's codec, not
        the paper's per-bin means: docs/outer.md); the residual decayed by 0.95 before
        each pseudo-gradient is added, in place of outer momentum (``error_decay=0.95``,
        ``outer_momentum=0``, ``outer_lr=1``); contributions averaged over the ranks
        that sent each position (``outer_average="senders"``, ``mask="local"``); each
        rank's pseudo-gradient clipped to the median norm (``outer_clip="median"``);
        biases and norms through the same 2-bit codec (``small_tensors="codec"``); no
        dense start under Adam (``adam_dense_steps=0``, ``adam_warmup_steps=0``).
        ``overrides`` replace any of these (validated as usual)."""
        recipe: dict[str, Any] = dict(
            sync_every=30, density=64 / 4096, method="bucketed", bucket_layout="tile",
            value_bits=2, error_decay=0.95, outer_lr=1.0, outer_momentum=0.0,
            outer_average="senders", outer_clip="median", mask="local",
            small_tensors="codec", adam_dense_steps=0, adam_warmup_steps=0)
        recipe.update(overrides)
        return cls.from_dict(recipe)

    @classmethod
    def adamw_outer(cls, **overrides: Any) -> SparsityConfig:
        """The outer synchronisation that matched dense AdamW at a few % of its bytes:
        :meth:`sparseloco` with :data:`ADAMW_OUTER` (a sync every 5 inner steps, the
        first 10 syncs dense in bf16, each rank's share of a tile chosen from the number
        of ranks: ``density="auto"``, :func:`outer_density`). ``overrides`` replace any
        option (``density=64 / 4096`` fixes the share). Give it to
        ``distk.ddp.enable(..., optimizer=...)`` (or a framework callback on DDP) or to
        ``distk.outer.enable``."""
        return cls.sparseloco(**{**ADAMW_OUTER, **overrides})

    @classmethod
    def default_for(cls, optimizer: object = None, *, outer_sync: bool = True) -> SparsityConfig:
        """distk's config when the user gives none (``cfg=None`` to ``distk.ddp.enable``,
        ``distk.enable`` and the framework adapters): :meth:`adamw_outer` for an
        Adam-family ``optimizer`` where outer synchronisation can run (``outer_sync``:
        a DDP model), the setting that matched dense AdamW at a few % of its bytes;
        otherwise ``SparsityConfig()``, the per-step exchange at 1% (under an Adam-family
        optimizer with :meth:`for_optimizer`'s schedule). An explicit
        ``SparsityConfig()`` always means the per-step exchange."""
        if outer_sync and optimizer is not None and is_adam_family(optimizer):
            return cls.adamw_outer()
        return cls()

    def for_world(self, world_size: int) -> SparsityConfig:
        """This config at ``world_size`` ranks: ``density="auto"`` replaced by
        :func:`outer_density` (``world_size``); otherwise ``self``."""
        if self.density != "auto":
            return self
        return self.replace(density=outer_density(world_size))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every option (JSON-serialisable; ``from_dict`` inverts it)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> SparsityConfig:
        """A validated copy with some options changed."""
        return dataclasses.replace(self, **changes)

    def for_optimizer(self, optimizer: object) -> SparsityConfig:
        """This config under ``optimizer`` (an optimizer, a wrapper of one or a name such
        as ``"adamw"``): with an Adam-family optimizer and a sparse ``method``,
        ``dense_steps`` / ``warmup_steps`` raised to at least ``adam_dense_steps`` /
        ``adam_warmup_steps``, and ``value_dtype`` set to ``adam_value_dtype`` when neither
        it nor ``value_bits`` is set; otherwise (or when nothing changes) ``self``.
        Applying it twice changes nothing more.

        The schedule never makes a valid config invalid: there is no warm-up towards a
        ``density`` at or above ``warmup_density`` (:attr:`adam_warms_up`), and nothing
        changes at all at ``density=1.0`` (every entry is sent anyway). Outer
        synchronisation (``sync_every > 1``) is left as it is: there ``dense_steps``
        counts syncs and the per-step schedule does not apply (:data:`ADAMW_OUTER` is its
        measured AdamW setting)."""
        if (self.method == "dense" or optimizer is None or not is_adam_family(optimizer)
                or self.sync_every > 1
                or (self.k is None and self.density >= 1.0)):
            return self
        dense = max(self.dense_steps, self.adam_dense_steps)
        warmup = self.warmup_steps
        if self.adam_warms_up:
            warmup = max(warmup, self.adam_warmup_steps)
        value_dtype = self.value_dtype
        if (value_dtype in (None, "auto") and self.value_bits is None
                and self.adam_value_dtype is not None):
            value_dtype = self.adam_value_dtype
        if (dense, warmup, value_dtype) == (self.dense_steps, self.warmup_steps,
                                            self.value_dtype):
            return self
        return self.replace(dense_steps=dense, warmup_steps=warmup, value_dtype=value_dtype)

    @property
    def adam_warms_up(self) -> bool:
        """Whether :meth:`for_optimizer` adds the Adam density warm-up: only when the
        warm-up would decay towards a smaller density (``k`` set, or ``density`` below
        ``warmup_density``)."""
        return self.k is not None or (self.density != "auto"
                                      and self.density < self.warmup_density)

    # -- schedule -----------------------------------------------------------------------

    @property
    def wire_dtype(self) -> torch.dtype | None:
        """``value_dtype`` as a ``torch.dtype`` (``None``: the gradient's dtype; with
        ``"auto"`` see :meth:`wire_dtype_for`)."""
        return VALUE_DTYPES.get(self.value_dtype)

    def wire_dtype_for(self, grad_dtype: torch.dtype, whole: bool,
                       dense: bool = False) -> torch.dtype:
        """The dtype values of a ``grad_dtype`` gradient travel in, at a step that sends
        every entry (``whole``; through the dense exchange: ``dense`` too) or a sparse one
        (the codec's values decode to float32)."""
        if self.value_bits is not None:
            # The codec encodes every step but the dense exchange's; value_dtype, when
            # named, is the dense exchange's dtype.
            if dense and self.wire_dtype is not None:
                return self.wire_dtype
            return torch.float32
        if self.value_dtype == "auto":
            return torch.bfloat16 if grad_dtype == torch.float32 and not whole else grad_dtype
        return self.wire_dtype or grad_dtype

    def is_dense_step(self, numel: int, step: int) -> bool:
        """Whether a tensor of ``numel`` entries goes dense at (0-based) ``step``."""
        return (self.method == "dense" or step < self.dense_steps
                or (numel < self.min_numel and self.small_tensors == "dense"))

    def density_at(self, numel: int, step: int) -> float:
        """Fraction of the ``numel`` entries sent at (0-based) ``step``.

        After the warm-up: ``k / numel`` (when ``k`` is set) or ``density``. During
        warm-up (steps counted from the end of ``dense_steps``), it decays exponentially:
        ``start * (target / start) ** (t / warmup_steps)`` with ``start`` the larger of
        ``warmup_density`` and the target.
        """
        target = min(1.0, self.k / numel) if self.k is not None else self.density
        t = step - self.dense_steps
        if self.warmup_steps == 0 or t >= self.warmup_steps:
            return target
        start = max(self.warmup_density, target)
        return start * (target / start) ** (max(t, 0) / self.warmup_steps)

    def k_at(self, numel: int, step: int) -> int:
        """Entries sent for a tensor of ``numel`` entries at (0-based) ``step``, in [1, numel]."""
        if numel < 1:
            raise ValueError(f"numel must be >= 1, got {numel}")
        if self.k is not None and (self.warmup_steps == 0
                                   or step - self.dense_steps >= self.warmup_steps):
            return min(self.k, numel)
        return max(1, min(numel, round(self.density_at(numel, step) * numel)))
