"""The compressor: error feedback, selection (local or shared masks) and exchange.

* :mod:`distk.compressor.core`: :class:`GradientCompressor`, one step of a buffer as six
  named stages (plan, accumulate, select, encode, send, finish) passing typed records;
* :mod:`distk.compressor.plan`: which selection (bucketed, packed, exact) a size uses;
* :mod:`distk.compressor.masks`: shared-mask policies (leader, moment, sketch), how ranks
  agree on one set of positions so that one all-reduce sums the values.
"""

from distk.compressor.core import (
    FUSE_ADD_MIN_NUMEL,
    STATE_VERSION,
    CompressorWork,
    GradientCompressor,
    NonFiniteGradientError,
    StepPlan,
    StepRequest,
    as_sparsity_config,
)
from distk.compressor.masks import MASK_POLICIES, MaskPolicy
from distk.compressor.plan import (
    MAX_PACKED_K_PER_BUCKET,
    SelectionPlan,
    packed_k_per_bucket,
    poisson_limit_recall,
)

__all__ = [
    "FUSE_ADD_MIN_NUMEL",
    "MASK_POLICIES",
    "MAX_PACKED_K_PER_BUCKET",
    "STATE_VERSION",
    "CompressorWork",
    "GradientCompressor",
    "MaskPolicy",
    "NonFiniteGradientError",
    "SelectionPlan",
    "StepPlan",
    "StepRequest",
    "as_sparsity_config",
    "packed_k_per_bucket",
    "poisson_limit_recall",
]
