"""Communication layer: wire format of selected entries and sparse collectives.

* :mod:`distk.comm.wire`: :class:`WireFormat` packs ``(indices, values)`` into bytes
  (int32/16-bit absolute indices or implicit-bucket offsets; values in the tensor's
  dtype or bf16/fp16; with ``value_bits``, the compact codec of :mod:`distk.comm.codec`:
  1/2/4/8-bit values in per-bucket ranges and bit-packed indices);
* :mod:`distk.comm.cost`: bytes per rank of each exchange scheme and the choice;
* :mod:`distk.comm.exchange`: :func:`sparse_allreduce`, :func:`exchange` (all-gather,
  reduce-scatter and dense schemes, metadata checks across ranks), its asynchronous
  halves :func:`launch_exchange` / :class:`PendingExchange`, and
  :func:`check_same_config`; a collective that fails because a peer rank died or stalled
  past the process group's timeout raises :class:`CollectiveError`.

This layer knows nothing of models: it moves ``(indices, values)`` of flat tensors.
"""

from distk.comm.cost import SCHEMES, choose_scheme, scheme_bytes
from distk.comm.exchange import (
    CollectiveError,
    ExchangeResult,
    PendingExchange,
    RankMismatchError,
    check_same_config,
    dense_allreduce_bytes,
    exchange,
    launch_exchange,
    rank_and_world,
    sparse_allreduce,
)
from distk.comm.wire import WireFormat

__all__ = [
    "SCHEMES",
    "CollectiveError",
    "ExchangeResult",
    "PendingExchange",
    "RankMismatchError",
    "WireFormat",
    "check_same_config",
    "choose_scheme",
    "dense_allreduce_bytes",
    "exchange",
    "launch_exchange",
    "rank_and_world",
    "scheme_bytes",
    "sparse_allreduce",
]
