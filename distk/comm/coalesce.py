"""Many small exchanges in a few collectives: :func:`coalesced`.

Every collective costs a fixed amount on top of its bytes: a round of messages between
the ranks (latency) and, on gloo's TCP transport, about 2.3 KB per all-gather and 4.6 KB
per all-reduce per rank on the wire at 4 ranks whatever the payload (measured:
docs/comm-and-compressor.md, "Coalesced exchanges"). A caller that exchanges one tensor
at a time (outer synchronisation: one exchange per parameter, 50 or more per sync) pays
that per tensor. Inside ``with coalesced(group):`` the asynchronous all-gathers and
all-reduces that :mod:`distk.comm.exchange` launches on ``group`` are held back instead;
they go out together when the block ends (or when ``cap_bytes`` is reached): one
all-gather of every held payload and one all-reduce per dtype, whose results are copied
back into each exchange's own buffers before its future completes.

An all-gather moves bytes, so its results are bitwise those of separate all-gathers. An
all-reduce sums each entry over the ranks as before, but the backend may add the ranks'
contributions in another order at another offset, so floating-point sums can differ from
separate all-reduces in the last bit (every rank still gets the same result). Every rank
must launch the same exchanges inside the block, in the same order (as without it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from distk.comm.group import all_gather_flat, collective_errors

__all__ = ["COALESCE_CAP_BYTES", "all_gather_async", "all_reduce_async", "coalesced"]

COALESCE_CAP_BYTES = 32 * 2**20
"""Held-back payload (per rank, before the all-gather multiplies it by the ranks) at which
:func:`coalesced` sends what it holds, inside the block: the transient copy a batch costs
stays near this (DDP's bucket is 25 MB for the same reason)."""


class _Batch:
    """The collectives held back on one group: all-gathers and all-reduces by dtype."""

    def __init__(self, group: Any, cap_bytes: int) -> None:
        self.group = group
        self.cap_bytes = cap_bytes
        self.held = 0
        # (kind, dtype) -> [(output, input, placeholder future, what)]
        self.items: dict[tuple[str, torch.dtype], list[tuple[Any, ...]]] = {}

    def add(self, kind: str, out: torch.Tensor, inp: torch.Tensor,
            what: str) -> torch.futures.Future:
        future: torch.futures.Future = torch.futures.Future()
        self.items.setdefault((kind, inp.dtype), []).append((out, inp, future, what))
        self.held += inp.numel() * inp.element_size()
        if self.held >= self.cap_bytes:
            self.flush()
        return future

    def flush(self) -> None:
        """Send everything held, in the order the kinds were first held (the same on
        every rank); each held future completes once its result is copied back."""
        items, self.items, self.held = list(self.items.items()), {}, 0
        for i, ((kind, _), held) in enumerate(items):
            try:
                if kind == "all_gather":
                    _send_gathers(held, self.group)
                else:
                    _send_reduces(held, self.group)
            except BaseException as err:  # what was not sent fails with the same error
                for _, rest in items[i + 1:]:
                    for *_, future, _what in rest:
                        future.set_exception(err)
                raise

    def abandon(self, err: BaseException) -> None:
        """The block raised: nothing held is sent; every held future fails with ``err``."""
        for held in self.items.values():
            for *_, future, _what in held:
                future.set_exception(err)
        self.items, self.held = {}, 0


_active: list[_Batch] = []


@contextlib.contextmanager
def coalesced(group: Any = None, *, cap_bytes: int = COALESCE_CAP_BYTES) -> Iterator[None]:
    """Hold back the asynchronous exchanges launched on ``group`` inside the block and
    send them as one all-gather and one all-reduce per dtype when it ends (see the module
    docstring); the block's end waits for those collectives (on NCCL the stream waits,
    not the host) and copies each result back. Wait on the exchanges after the block:
    one waited on inside it is refused (it would never complete). If the block raises,
    nothing held is sent and the held exchanges fail with the same error. ``cap_bytes``
    (> 0): once what is held reaches it, it is sent (inside the block; the same exchanges
    reach it at the same point on every rank)."""
    if not isinstance(cap_bytes, int) or cap_bytes <= 0:
        raise ValueError(f"coalesced: cap_bytes must be a positive int, got {cap_bytes!r}")
    batch = _Batch(group, cap_bytes)
    _active.append(batch)
    try:
        yield
    except BaseException as err:
        _active.remove(batch)
        batch.abandon(err)
        raise
    _active.remove(batch)
    batch.flush()


def refuse_held(future: torch.futures.Future, what: str) -> None:
    """Raise RuntimeError when ``future`` is held by an open :func:`coalesced` block: it
    completes only after the block ends, so waiting on it inside would never return."""
    for batch in _active:
        for held in batch.items.values():
            if any(item[2] is future for item in held):
                raise RuntimeError(
                    f"distk.comm: {what} was waited on inside the coalesced() block that "
                    "holds it; it is sent when the block ends, so wait after the block")


def _batch_for(group: Any) -> _Batch | None:
    """The innermost open batch of ``group`` (compared by identity), or None."""
    for batch in reversed(_active):
        if batch.group is group:
            return batch
    return None


def all_gather_async(out: torch.Tensor, inp: torch.Tensor, group: Any,
                     what: str = "an all-gather") -> torch.futures.Future:
    """Every rank's flat ``inp`` into ``out`` (``world * inp.numel()`` entries), started
    now or, inside :func:`coalesced` on ``group``, with the rest of the batch. A future
    completed when ``out`` holds the result."""
    batch = _batch_for(group)
    if batch is None:
        return all_gather_flat(out, inp, group, what=what, async_op=True).get_future()
    return batch.add("all_gather", out, inp, what)


def all_reduce_async(tensor: torch.Tensor, group: Any,
                     what: str = "an all-reduce") -> torch.futures.Future:
    """The sum of every rank's flat ``tensor``, in place, started now or, inside
    :func:`coalesced` on ``group``, with the rest of the batch. A future completed when
    ``tensor`` holds the sum."""
    batch = _batch_for(group)
    if batch is None:
        with collective_errors(what, group):
            return dist.all_reduce(tensor, group=group, async_op=True).get_future()
    return batch.add("all_reduce", tensor, tensor, what)


def _whats(held: list[tuple[Any, ...]]) -> str:
    """What a combined collective carries, for its error message."""
    names = sorted({item[3] for item in held})
    return f"{len(held)} coalesced exchanges ({', '.join(names)})"


def _complete(work: Any, held: list[tuple[Any, ...]], what: str, group: Any,
              copy_back: Callable[[], None]) -> None:
    """Wait for the combined collective ``work`` (on NCCL: the current stream waits, the
    host does not; on gloo: the host), copy every result back on the current stream,
    then complete each held future; or fail each with the collective's error and raise
    it. Sending happens when the caller would wait anyway (the block's end), so nothing
    is lost by waiting here, and the copies are ordered after the collective by the
    stream, with no callback thread involved."""
    try:
        with collective_errors(what, group):
            work.wait()
        copy_back()
    except BaseException as err:
        for *_, future, _what in held:
            future.set_exception(err)
        raise
    for *_, future, _what in held:
        future.set_result(None)


def _send_gathers(held: list[tuple[Any, ...]], group: Any) -> None:
    if len(held) == 1:
        out, inp, _, what = held[0]
        work = all_gather_flat(out, inp, group, what=what, async_op=True)
        _complete(work, held, what, group, lambda: None)
        return
    inputs = [inp.reshape(-1) for _, inp, _, _ in held]
    combined = torch.cat(inputs)
    world = dist.get_world_size(group)
    gathered = torch.empty(world * combined.numel(), dtype=combined.dtype,
                           device=combined.device)
    what = _whats(held)
    work = all_gather_flat(gathered, combined, group, what=what, async_op=True)

    def copy_back() -> None:
        rows = gathered.view(world, -1)
        offset = 0
        for (out, _, _, _), inp in zip(held, inputs, strict=True):
            length = inp.numel()
            out.view(world, length).copy_(rows[:, offset:offset + length])
            offset += length

    _complete(work, held, what, group, copy_back)


def _send_reduces(held: list[tuple[Any, ...]], group: Any) -> None:
    if len(held) == 1:
        tensor, _, _, what = held[0]
        with collective_errors(what, group):
            work = dist.all_reduce(tensor, group=group, async_op=True)
        _complete(work, held, what, group, lambda: None)
        return
    combined = torch.cat([tensor.reshape(-1) for tensor, _, _, _ in held])
    what = _whats(held)
    with collective_errors(what, group):
        work = dist.all_reduce(combined, group=group, async_op=True)

    def copy_back() -> None:
        offset = 0
        for tensor, _, _, _ in held:
            length = tensor.numel()
            tensor.view(-1).copy_(combined[offset:offset + length])
            offset += length

    _complete(work, held, what, group, copy_back)
