"""Sparse activation exchange for tensor-parallel layers.

In a row-parallel linear layer every rank holds a slice of the input features and
computes a *partial* output; the layer's output is the sum of the partials over ranks
(normally a dense all-reduce). ``SparseAllReduce`` instead keeps only the top-k entries
(by magnitude) of each row of each rank's partial, all-gathers those ``(index, value)``
pairs, and sums them:

    out = sum_r  mask_r * partial_r            (mask_r: rank r's selection)

The result is identical (bitwise) on every rank: partials are added in rank order.

**Gradient.** The backward pass is the exact vector-Jacobian product of the op computed,
treating each rank's output as a separate output of one collective function:

    d L / d partial_r = mask_r * (sum over ranks r' of d L / d out_{r'})

i.e. the all-reduced output gradient, masked by the rank's own selection; the same
convention as ``torch.distributed.nn.functional.all_reduce``. The total objective is
therefore the *sum* of the ranks' losses: when every rank computes the same (replicated)
loss, divide it by the group size to get the gradient of one copy (see
docs/activations.md). Because all ranks' indices are known after the forward, the
backward only exchanges ``world_size * k`` gradient values per row (or the dense gradient
when that is smaller).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from distk.comm.wire import decode_indices, encode_indices, index_dtype_for
from distk.nn.functional import _bucket_parameters, check_selection_args, resolve_k
from distk.selection import topk

__all__ = ["RowParallelLinear", "SparseAllReduce", "sparse_all_reduce"]


def _group_size_and_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialised: call "
                           "torch.distributed.init_process_group first")
    return dist.get_world_size(group), dist.get_rank(group)


class SparseAllReduce(torch.autograd.Function):
    """Autograd function: sum over ranks of the per-row top-``k`` (by magnitude) of each
    rank's ``partial`` along its last dimension. See the module docstring for the gradient.

    ``SparseAllReduce.apply(partial, k, group, method, buckets, k_per_bucket,
    interleaved)`` with ``k`` an int in ``[1, partial.shape[-1]]``; for argument checking
    and ``density`` use :func:`sparse_all_reduce`. Every rank of ``group`` must call it
    with the same shape, ``k`` and selection arguments.

    Saves only the gathered indices ``(world_size, rows, k)`` for backward (in the
    narrowest integer dtype of ``distk.comm.wire``: int16 for rows up to 65536 entries).
    """

    @staticmethod
    def forward(ctx, partial: torch.Tensor, k: int, group: dist.ProcessGroup | None,
                method: str, buckets: int | None, k_per_bucket: int | None,
                interleaved: bool) -> torch.Tensor:
        world_size, rank = _group_size_and_rank(group)
        n = partial.shape[-1]
        rows = partial.reshape(-1, n)
        values, indices = topk(rows, k, dim=-1, method=method, by_magnitude=True,
                               buckets=buckets, k_per_bucket=k_per_bucket,
                               interleaved=interleaved)
        # One all-gather of a byte payload per rank: the values, then the positions in the
        # narrowest integer dtype of distk's wire format (2 bytes for rows up to 65536).
        encoded = encode_indices(indices, index_dtype_for(n)).contiguous()
        value_bytes = values.contiguous().view(torch.uint8).reshape(-1)
        payload = torch.cat([value_bytes, encoded.view(torch.uint8).reshape(-1)])
        gathered = [torch.empty_like(payload) for _ in range(world_size)]
        dist.all_gather(gathered, payload, group=group)
        split = value_bytes.numel()
        out = torch.zeros_like(rows)
        all_encoded = []
        for source in gathered:  # rank order: the result is identical on every rank
            # Fresh copies start at offset 0, so they can be viewed as the wider dtypes.
            source_values = source[:split].clone().view(values.dtype).view(indices.shape)
            source_encoded = source[split:].clone().view(encoded.dtype).view(indices.shape)
            # A rank's positions are distinct within a row: one addition per entry.
            out.scatter_add_(-1, decode_indices(source_encoded), source_values)
            all_encoded.append(source_encoded)
        ctx.save_for_backward(torch.stack(all_encoded))
        ctx.rank = rank
        ctx.group = group
        return out.reshape(partial.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (all_encoded,) = ctx.saved_tensors  # (world_size, rows, k)
        all_indices = decode_indices(all_encoded)
        world_size, rows, k = all_indices.shape
        n = grad_out.shape[-1]
        grad = grad_out.reshape(-1, n)
        own = all_indices[ctx.rank]
        if world_size * k < n:
            # Each rank needs the summed gradient only where it selected: gather this
            # rank's output gradient at every rank's selection and all-reduce those.
            at_selections = grad.gather(-1, all_indices.permute(1, 0, 2).reshape(rows, -1))
            dist.all_reduce(at_selections, group=ctx.group)
            own_grad = at_selections.reshape(rows, world_size, k)[:, ctx.rank]
        else:
            summed = grad.contiguous().clone()
            dist.all_reduce(summed, group=ctx.group)
            own_grad = summed.gather(-1, own)
        grad_partial = torch.zeros_like(grad).scatter(-1, own, own_grad)
        return grad_partial.reshape(grad_out.shape), None, None, None, None, None, None


def sparse_all_reduce(partial: torch.Tensor, k: int | None = None,
                      density: float | None = None, group: dist.ProcessGroup | None = None,
                      method: str = "bucketed", buckets: int | None = None,
                      k_per_bucket: int | None = None, recall_target: float | None = None,
                      interleaved: bool = True) -> torch.Tensor:
    """Sum over the ranks of ``group`` of each rank's per-row top-``k`` (by magnitude)
    of ``partial`` along the last dimension, differentiably.

    Args:
        partial: this rank's partial activations ``(..., n)``; same shape on every rank.
        k: entries each rank contributes per row, in ``[1, n]``; exactly one of ``k`` and
            ``density`` (``k = max(1, round(density * n))``).
        group: process group (default: the world).
        method, buckets, k_per_bucket, recall_target, interleaved: selection, as in
            ``distk.topk``.

    Returns:
        The summed sparse partials, shaped like ``partial``, identical on every rank.
        Backward: ``mask_r * all_reduce(grad_out)`` (see the module docstring).
    """
    check_selection_args(k, density, method, recall_target)
    if not isinstance(partial, torch.Tensor) or not partial.is_floating_point() \
            or partial.dim() == 0:
        raise ValueError("partial must be a floating-point tensor with at least one dim")
    n = partial.shape[-1]
    k = resolve_k(n, k, density)
    if method == "bucketed":
        buckets, k_per_bucket = _bucket_parameters(n, k, buckets, k_per_bucket, recall_target)
    return SparseAllReduce.apply(partial, k, group, method, buckets, k_per_bucket, interleaved)


class _ScatterToShard(torch.autograd.Function):
    """Forward: this rank's slice of a replicated input's last dim. Backward: all-gather
    of the slices' gradients (the gradient of the replicated input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        world_size, rank = _group_size_and_rank(group)
        ctx.group = group
        ctx.world_size = world_size
        return x.chunk(world_size, dim=-1)[rank].contiguous()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_out = grad_out.contiguous()
        pieces = [torch.empty_like(grad_out) for _ in range(ctx.world_size)]
        dist.all_gather(pieces, grad_out, group=ctx.group)
        return torch.cat(pieces, dim=-1), None


class _AddReplicatedBias(torch.autograd.Function):
    """``out + bias`` where ``out`` is replicated over the group; the bias gradient is
    summed over the group (same sum-of-rank-losses convention as ``SparseAllReduce``)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, bias: torch.Tensor,
                group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return out + bias

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        dist.all_reduce(grad_bias, group=ctx.group)
        return grad_out, grad_bias, None


class RowParallelLinear(nn.Module):
    """Linear layer with its input features sharded over the ranks of ``group``; the
    partial outputs are combined by :class:`SparseAllReduce` (top-``k`` per row and rank).

    Rank ``r`` holds ``weight[:, r*m:(r+1)*m]`` (``m = in_features / world_size``) and
    computes ``x_r @ weight_r.T``; the sparse sum of these partials plus ``bias`` (added
    once, after the sum) is the output, identical on every rank. With ``k = out_features``
    (or ``density=1``) this is an ordinary ``nn.Linear`` split over ranks.

    Args:
        in_features: total input features (all ranks); divisible by the group size.
        out_features: output features.
        bias: learn an additive bias (replicated on every rank).
        k, density: entries each rank contributes per output row; exactly one.
        method, buckets, k_per_bucket, recall_target, interleaved: selection of the
            partial outputs, as in ``distk.topk`` (by magnitude).
        input_is_parallel: ``x`` is already this rank's shard ``(..., m)`` (e.g. the
            output of a column-parallel layer); otherwise ``x`` is the full replicated
            input ``(..., in_features)`` and each rank takes its slice.
        group: process group (default: the world).
        device, dtype: of the parameters.

    Initialisation matches ``nn.Linear`` on the full matrix: every rank draws the full
    weight with the default generator (so ranks must share the seed) and keeps its slice.
    Gradients follow the sum-of-rank-losses convention (see ``distk.nn.parallel``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 k: int | None = None, density: float | None = None,
                 method: str = "bucketed", buckets: int | None = None,
                 k_per_bucket: int | None = None, recall_target: float | None = None,
                 interleaved: bool = True, input_is_parallel: bool = True,
                 group: dist.ProcessGroup | None = None,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_selection_args(k, density, method, recall_target)
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        world_size, rank = _group_size_and_rank(group)
        if in_features % world_size:
            raise ValueError(f"in_features={in_features} must be divisible by the group "
                             f"size {world_size}")
        resolve_k(out_features, k, density)  # k <= out_features
        self.in_features = in_features
        self.out_features = out_features
        self.local_in_features = in_features // world_size
        self.k, self.density, self.method = k, density, method
        self.buckets, self.k_per_bucket = buckets, k_per_bucket
        self.recall_target, self.interleaved = recall_target, interleaved
        self.input_is_parallel = input_is_parallel
        self.group = group
        self.rank, self.world_size = rank, world_size

        full = torch.empty(out_features, in_features, device=device, dtype=dtype)
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default (kaiming_uniform, a=sqrt(5))
        nn.init.uniform_(full, -bound, bound)
        self.weight = nn.Parameter(self._shard(full).clone())
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
            nn.init.uniform_(self.bias, -bound, bound)
        else:
            self.register_parameter("bias", None)

    def _shard(self, full_weight: torch.Tensor) -> torch.Tensor:
        m = self.local_in_features
        return full_weight[:, self.rank * m:(self.rank + 1) * m]

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> RowParallelLinear:
        """Shard an existing ``nn.Linear`` (identical on every rank) over the group;
        ``kwargs`` are the selection/group arguments of the constructor."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(layer._shard(linear.weight))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(..., in_features / world_size)`` when ``input_is_parallel`` else
        ``(..., in_features)``. Returns ``(..., out_features)``, identical on every rank."""
        if not self.input_is_parallel:
            if x.shape[-1] != self.in_features:
                raise ValueError(f"x.shape[-1] must be in_features={self.in_features}, "
                                 f"got {x.shape[-1]}")
            x = _ScatterToShard.apply(x, self.group)
        elif x.shape[-1] != self.local_in_features:
            raise ValueError(f"x.shape[-1] must be in_features / world_size = "
                             f"{self.local_in_features} (input_is_parallel=True), "
                             f"got {x.shape[-1]}")
        partial = x @ self.weight.t()
        out = sparse_all_reduce(partial, k=self.k, density=self.density, group=self.group,
                                method=self.method, buckets=self.buckets,
                                k_per_bucket=self.k_per_bucket,
                                recall_target=self.recall_target, interleaved=self.interleaved)
        if self.bias is not None:
            out = _AddReplicatedBias.apply(out, self.bias, self.group)
        return out

    def extra_repr(self) -> str:
        size = f"k={self.k}" if self.k is not None else f"density={self.density}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"local_in_features={self.local_in_features}, bias={self.bias is not None}, "
                f"{size}, method={self.method!r}, world_size={self.world_size}")
