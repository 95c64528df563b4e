"""Communication layer: wire format of selected entries and sparse collectives.

* :mod:`distk.comm.wire`: :class:`WireFormat` packs ``(indices, values)`` into bytes
  (int32/16-bit absolute indices or implicit-bucket offsets; values in the tensor's
  dtype or bf16/fp16; with ``value_bits``, the compact codec of :mod:`distk.comm.codec`:
  1/2/4/8-bit values in per-bucket ranges and bit-packed indices);
* :mod:`distk.comm.cost`: bytes per rank of each exchange scheme and the choice;
* :mod:`distk.comm.group`: the collective device, ranks agreeing, digests, ring bytes;
* :mod:`distk.comm.coalesce`: :func:`coalesced`, the exchanges launched inside one block
  sent as one all-gather and one all-reduce per dtype (outer synchronisation's many
  per-parameter exchanges);
* :mod:`distk.comm.exchange`: :func:`sparse_allreduce`, :func:`exchange` (all-gather,
  reduce-scatter, dense and shared-mask schemes, metadata checks across ranks), its
  asynchronous halves :func:`launch` (an :class:`ExchangeRequest`) /
  :func:`launch_exchange` / :class:`PendingExchange`, and
  :func:`check_same_config`; a collective that fails because a peer rank died or stalled
  past the process group's timeout raises :class:`CollectiveError`.

This layer knows nothing of models: it moves ``(indices, values)`` of flat tensors.
"""

from distk.comm.coalesce import coalesced
from distk.comm.cost import LOCAL_SCHEMES, SCHEMES, choose_scheme, meta_bytes, scheme_bytes
from distk.comm.exchange import (
    CollectiveError,
    ExchangeRequest,
    ExchangeResult,
    PendingExchange,
    RankMismatchError,
    check_same_config,
    check_same_digest,
    dense_allreduce_bytes,
    exchange,
    launch,
    launch_exchange,
    rank_and_world,
    sparse_allreduce,
    verify_layout,
)
from distk.comm.group import ring_allreduce_bytes
from distk.comm.wire import WireFormat

__all__ = [
    "LOCAL_SCHEMES",
    "SCHEMES",
    "CollectiveError",
    "ExchangeRequest",
    "ExchangeResult",
    "PendingExchange",
    "RankMismatchError",
    "WireFormat",
    "check_same_config",
    "check_same_digest",
    "choose_scheme",
    "coalesced",
    "dense_allreduce_bytes",
    "exchange",
    "launch",
    "launch_exchange",
    "meta_bytes",
    "rank_and_world",
    "ring_allreduce_bytes",
    "scheme_bytes",
    "sparse_allreduce",
    "verify_layout",
]
