"""The compressor's packed selection with no host synchronisation.

``GradientCompressor._select`` computes, for a packed plan (no second stage, bucket ids
implicit on the wire)::

    keys = per_bucket_topk(acc.view(1, -1), plan.buckets, plan.k_per_bucket,
                           cfg.interleaved, True, pending)
    positions = positions_of(keys).reshape(-1)

which, with a sampled floor on CUDA, costs one device-to-host sync (the host decides
whether a row must be redone without the floor). :func:`select_packed` returns the same
positions with none: the floor is sampled on the device (and last step's reused when the
device finds it still valid), every shape is a capacity fixed on the host, and the redo
kernel is launched every time and exits at once when no bucket was short. It can be
called under ``torch.cuda.set_sync_debug_mode("error")`` and captured in a CUDA graph.

:class:`PackedSelector` is the compressor's per-key wrapper: it keeps the key's floor
state and, with ``DISTK_CUDA_GRAPHS=1``, replays the selection from a CUDA graph instead
of launching its kernels from Python (on a DDP bucket the launches, not the kernels, are
most of the time: docs/selection.md).
"""

from __future__ import annotations

import math
import os

import torch

from distk.selection import _backend, bucket_candidates, per_bucket_topk
from distk.selection.reference import positions_of

__all__ = ["FLOOR_STATE_UNSET", "PackedSelector", "cuda_graphs_enabled", "new_floor_state",
           "select_packed"]

FLOOR_STATE_UNSET = 2**31 - 1
"""Floor state value that is never reused (no sample entry lies above it)."""


def new_floor_state(device: torch.device | str) -> torch.Tensor:
    """A ``(1,)`` int32 floor state for :func:`select_packed`, with no floor to reuse."""
    return torch.full((1,), FLOOR_STATE_UNSET, dtype=torch.int32, device=device)


def select_packed(acc: torch.Tensor, buckets: int, k_per_bucket: int,
                  interleaved: bool = True, add: torch.Tensor | None = None,
                  floor_state: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of every bucket's top ``k_per_bucket`` entries of ``|acc|``, with no
    device-to-host synchronisation on CUDA.

    What the compressor calls for a packed plan when the flat kernels are selected
    (``flat_kernels_selected``: on CUDA by default; ``GradientCompressor._select_local``,
    in place of ``per_bucket_topk`` + ``positions_of``), through one
    :class:`PackedSelector` per key, which keeps the key's floor state (created once
    with :func:`new_floor_state`, then passed at every step)::

        positions = select_packed(acc, plan.buckets, plan.k_per_bucket, cfg.interleaved,
                                  add=pending, floor_state=selector.floor_state)

    Contract:

    * ``acc``: the 1-D accumulator of ``n`` entries (fp32, bf16 or fp16; contiguous);
      ``add`` (optional, same shape and dtype, contiguous): ``acc += add`` in place
      first, fused into the selection's pass on CUDA; bitwise the sums of ``add_``.
    * Returns int64 positions of shape ``(buckets * kept,)``, ``kept =
      min(k_per_bucket, ceil(n / buckets))``, bucket-major: bucket ``j``'s ``kept``
      positions by descending ``|acc|`` (ties to the lower position), bucket ``j`` being
      the positions ``i % buckets == j`` (interleaved) or ``[j n // b, (j + 1) n // b)``.
      Identical to ``positions_of(per_bucket_topk(acc.view(1, -1), buckets,
      k_per_bucket, interleaved, True, add)).reshape(-1)``.
    * ``floor_state``: ``(1,)`` int32 on ``acc``'s device, read (last step's floor,
      reused when the sample still puts it in its band) and overwritten in place with
      this step's floor: a static buffer, as a CUDA graph needs. ``None``: no reuse.
    * CUDA: no host synchronisation, static shapes (the buffers are capacities), so the
      call can run under ``torch.cuda.set_sync_debug_mode("error")`` and be captured in
      a CUDA graph. Uses the flat kernels (``triton_flat.py``) when a floor applies (rows
      of at least 2^17 entries, ``kept < ceil(n / buckets)``), else the default Triton
      kernels with no floor (which need no sync either).
    * CPU: ``per_bucket_topk`` (the C++ kernel); ``floor_state`` is left untouched.
    """
    if acc.dim() != 1:
        raise ValueError(f"acc must be a 1-D tensor, got shape {tuple(acc.shape)}")
    n = acc.numel()
    if not (isinstance(buckets, int) and 1 <= buckets <= n):
        raise ValueError(f"buckets must be an integer in [1, n={n}], got {buckets!r}")
    if not (isinstance(k_per_bucket, int) and k_per_bucket >= 1):
        raise ValueError(f"k_per_bucket must be an integer >= 1, got {k_per_bucket!r}")
    x = acc.view(1, n)
    if not (acc.is_cuda or _backend() == "triton"):
        return positions_of(per_bucket_topk(x, buckets, k_per_bucket, interleaved, True,
                                            None if add is None else add.view(1, n))).reshape(-1)
    from distk.selection.triton_flat import flat_candidates

    length = -(-n // buckets)
    kept = min(k_per_bucket, length)
    if kept < length:
        above = kept + 6 * math.sqrt(kept) + 4  # per bucket, as per_bucket_topk
        flat = flat_candidates(x, buckets, k_per_bucket, interleaved, True, above / (n / buckets),
                               add=None if add is None else add.view(1, n),
                               floor_state=floor_state)
        if flat is not None:
            return positions_of(flat.candidates).reshape(-1)
    if add is not None:
        acc.add_(add)
    return positions_of(bucket_candidates(x, buckets, k_per_bucket, interleaved,
                                          True)).reshape(-1)


def cuda_graphs_enabled() -> bool:
    """``DISTK_CUDA_GRAPHS``: ``"1"`` replays the compressor's packed selection from CUDA
    graphs (:class:`PackedSelector`), ``"0"`` (the default) launches it each time."""
    value = os.environ.get("DISTK_CUDA_GRAPHS", "0")
    if value not in ("0", "1"):
        raise ValueError(f"DISTK_CUDA_GRAPHS must be '0' or '1', got {value!r}")
    return value == "1"


class PackedSelector:
    """:func:`select_packed` for one key of the compressor: its floor state, and, with
    ``DISTK_CUDA_GRAPHS=1`` on CUDA, a CUDA graph of the call replayed at later steps.

    The graph is recorded for fixed addresses: the first call with a new ``(acc, add)``
    pair (or plan) runs eagerly, then records the same call (recording runs nothing);
    calls with the same pair replay it, writing the positions into the graph's own
    output tensor, valid until this selector's next call. A key whose tensors move more
    than ``MAX_CAPTURES`` times goes back to eager calls for good.
    """

    MAX_CAPTURES = 4

    def __init__(self, device: torch.device | str) -> None:
        self.floor_state = new_floor_state(device)
        self.captures = 0
        self._signature: tuple | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._positions: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.floor_state.device

    def __call__(self, acc: torch.Tensor, buckets: int, k_per_bucket: int,
                 interleaved: bool = True, add: torch.Tensor | None = None) -> torch.Tensor:
        def call() -> torch.Tensor:
            return select_packed(acc, buckets, k_per_bucket, interleaved, add,
                                 self.floor_state)

        if (not acc.is_cuda or self.captures > self.MAX_CAPTURES
                or not cuda_graphs_enabled()):
            return call()
        signature = (acc.data_ptr(), acc.numel(), acc.dtype,
                     None if add is None else add.data_ptr(), buckets, k_per_bucket,
                     bool(interleaved))
        if signature == self._signature:
            self._graph.replay()
            return self._positions
        positions = call()  # eager: compiles what it needs; acc += add happens once
        self.captures += 1
        if self.captures > self.MAX_CAPTURES:  # the tensors keep moving: stay eager
            self._graph = self._positions = self._signature = None
            return positions
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._positions = call()
        self._graph, self._signature = graph, signature
        return positions
