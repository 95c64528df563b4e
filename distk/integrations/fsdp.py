"""FSDP integration: sparse gradient reduction for FSDP2 (``fully_shard``) and FSDP1.

Usage::

    # FSDP2
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    state = distk.fsdp.enable(model, distk.SparsityConfig(density=0.01))

    # FSDP1
    model = FullyShardedDataParallel(model, auto_wrap_policy=...)
    state = distk.fsdp.enable(model, distk.SparsityConfig(density=0.01))

How it works. FSDP reduces the gradient of each FSDP unit (an ``fully_shard``-ed module
or an FSDP1 wrapper) as one flat buffer holding the *unsharded* gradients of all its
parameters, padded so it splits into ``world_size`` equal shards, and keeps on each rank
only that rank's shard of the average. distk replaces that reduction: the whole flat
buffer goes through the one :class:`~distk.compressor.GradientCompressor` (selection on
the unsharded gradient, so the top-k is global over the unit, with error feedback), the
sparse exchange returns the rank-averaged dense update, and each rank keeps its shard.
The residual of a unit is kept unsharded on every rank (memory: one extra unsharded
gradient per unit, like DDP's residuals). Compressor key = the unit's module name.

- FSDP2: a custom reduce-scatter (``FSDPModule.set_custom_reduce_scatter``) on every
  FSDP module, with ``set_force_sum_reduction_for_comms(True)`` so FSDP always asks for
  a SUM and applies its own divide factor afterwards (the custom comm then never has to
  interpret AVG or PREMUL_SUM reductions).
- FSDP1: ``FullyShardedDataParallel.register_comm_hook`` on the root, with one hook state
  per FSDP unit so that each unit keeps its own residual.
- HSDP (``enable(model, cfg, replicate_group=...)``, the model sharded with FSDP2 over the
  shard dimension of a 2-D mesh): FSDP2's own dense reduce-scatter runs inside the shard
  group (the fast intra-node links) and ``FSDPModule.set_all_reduce_hook`` hands each
  rank's reduced shard to distk, which exchanges it sparsely across the replicas (the
  slow inter-node links). Residuals are then per shard.

Why FSDP reduces synchronously (DDP and DeepSpeed overlap the exchange with backward):
torch 2.13's FSDP2 has no seam that waits for work a custom comm hands back.
``torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py:foreach_reduce`` calls the
custom reduce-scatter as ``reduce_scatter_comm(output_tensor=..., input_tensor=...,
group=..., op=...)``, without ``async_op`` and dropping what it returns, and calls the
all-reduce hook as ``all_reduce_hook(reduce_output)`` (typed ``Callable[[Tensor], None]``).
Completion is expressed only as CUDA stream order (the call runs on FSDP's reduce-scatter
or all-reduce stream; ``FSDPParamGroup.post_backward`` and ``finalize_backward`` wait on
events recorded after it), and right after the call the same function reads the output
on the host thread: ``_div_if_needed(reduce_output, postdivide_factor)`` (the divide
``set_force_sum_reduction_for_comms`` asks for), the cast to the parameter dtype, and
``sharded_param.grad._local_tensor += ...`` (accumulation) or post-accumulate-grad hooks.
distk's exchange finishes on the host (a future whose callback unpacks and scatter-adds),
so an exchange still in flight when the comm returns would be read before it is written.
FSDP1's comm hook (``_fsdp1_hook``) is likewise called for its side effect.

Refused (ValueError naming the configuration): FSDP2 on a 2-D mesh (native HSDP would
all-reduce across replicas densely; use ``replicate_group`` as above), FSDP1 hybrid strategies
(HYBRID_SHARD, _HYBRID_SHARD_ZERO2: torch has no comm hook for them), FSDP2 modules
with several parameter groups (per-parameter meshes), a model that is neither FSDP1
nor FSDP2, or a model mixing both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, ShardingStrategy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

try:  # the interface FSDPModule.set_custom_reduce_scatter documents (private path, torch 2.13)
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter as _ReduceScatterBase
except ImportError:  # pragma: no cover - FSDP only duck-types allocate() and __call__
    _ReduceScatterBase = object

from distk.comm import check_same_config
from distk.compressor import as_sparsity_config
from distk.config import SparsityConfig
from distk.integrations.state import (
    CompressionState,
    residuals_for_sharding,
    schedule_for_optimizer,
)

__all__ = ["FSDPCompressionState", "SparseReduceScatter", "enable"]

_FSDP1_WRAPPED_PREFIX = "_fsdp_wrapped_module."
_FSDP1_UNSUPPORTED = (ShardingStrategy.HYBRID_SHARD, ShardingStrategy._HYBRID_SHARD_ZERO2)


class FSDPCompressionState(CompressionState):
    """State returned by :func:`enable` for FSDP1 and FSDP2 models.

    See :class:`~distk.integrations.CompressionState` for ``compressor``, ``stats``,
    ``iteration``, ``reduce``, ``state_dict`` and ``load_state_dict``. Units reduce
    synchronously (``reduce``): FSDP reads the output as soon as its comm seams return
    (see the module docstring for where in torch).

    Attributes:
        flavour: ``"fsdp2"``, ``"hsdp"`` (FSDP2 with ``replicate_group``) or ``"fsdp1"``.
        unit_names: the compressor keys, one per FSDP unit that owns parameters.
    """

    __slots__ = ("flavour", "unit_names")

    def __init__(self, cfg: SparsityConfig | dict[str, Any],
                 process_group: dist.ProcessGroup | None, flavour: str,
                 unit_names: Sequence[str], model: nn.Module | None = None) -> None:
        super().__init__(cfg, process_group, model=model, entry="distk.fsdp.enable")
        self.flavour = flavour
        self.unit_names = tuple(unit_names)

    def _extra_getstate(self) -> dict[str, Any]:
        return {"flavour": self.flavour, "unit_names": self.unit_names}

    def _extra_setstate(self, state: dict[str, Any]) -> None:
        self.flavour = state["flavour"]
        self.unit_names = tuple(state["unit_names"])

    def shard_of(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a flat buffer split into ``world_size`` equal chunks."""
        return full.view(self.world_size, -1)[self.rank]


class SparseReduceScatter(_ReduceScatterBase):
    """FSDP2 ``ReduceScatter`` comm that sparsifies the reduction of one FSDP module.

    FSDP2 calls it with the flat reduce-scatter input (every parameter's padded
    gradient, laid out as ``world_size`` rows, row ``r`` holding rank ``r``'s shards) and
    an output of one row. The whole input is compressed under ``key``, exchanged, and
    this rank's row of the result is written to the output. Compression works on the
    input as a flat vector, so the row-major layout is irrelevant to selection.
    """

    def __init__(self, state: FSDPCompressionState, key: str) -> None:
        self.state = state
        self.key = key

    def allocate(self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
        """A plain temporary buffer; the exchange writes its result into it."""
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                 group: dist.ProcessGroup, op: Any, async_op: bool = False) -> None:
        """Reduce ``input_tensor`` over ``group`` into this rank's ``output_tensor``.

        ``op`` is SUM (forced by :func:`enable`; FSDP divides afterwards) or AVG; the
        compressor averages, so a SUM is the average times the group size (exact for
        power-of-two group sizes; otherwise within an ulp of a true sum).
        """
        # FSDP (torch 2.13, _fsdp_collectives.foreach_reduce) never passes async_op and
        # drops the return value, then reads output_tensor: the exchange completes here.
        del async_op
        state = self.state
        if group.size() != state.world_size:
            raise RuntimeError(
                f"distk FSDP2 comm for module {self.key!r} was called on a group of size "
                f"{group.size()}, but the compressor averages over {state.world_size} ranks"
            )
        if op == dist.ReduceOp.SUM:
            scale = float(group.size())
        elif op == dist.ReduceOp.AVG:
            scale = 1.0
        else:
            raise RuntimeError(
                f"distk FSDP2 comm for module {self.key!r} got reduce op {op}; only SUM and "
                "AVG are supported (distk.fsdp.enable sets set_force_sum_reduction_for_comms"
                "(True); do not turn it off afterwards)"
            )
        # The input is FSDP's temporary (from allocate): averaged in place.
        averaged = state.reduce(input_tensor, self.key)
        shard = state.shard_of(averaged)
        if scale != 1.0:
            torch.mul(shard, scale, out=output_tensor)
        else:
            output_tensor.copy_(shard)
        return None


def _fsdp1_hook(unit_state: _FSDP1UnitState, grad: torch.Tensor,
                output: torch.Tensor | None = None) -> None:
    """FSDP1 comm hook: average ``grad`` (NO_SHARD, in place) or write this rank's shard."""
    # In place: FSDP1 frees the unsharded gradient after the hook (NO_SHARD keeps it).
    averaged = unit_state.shared.reduce(grad, unit_state.key)
    if output is not None:
        output.copy_(unit_state.shared.shard_of(averaged.view(-1)))


class _FSDP1UnitState:
    """Per-unit FSDP1 hook state: the shared state plus the unit's compressor key."""

    __slots__ = ("shared", "key")

    def __init__(self, shared: FSDPCompressionState, key: str) -> None:
        self.shared = shared
        self.key = key


def _fsdp2_units(model: nn.Module) -> list[tuple[str, FSDPModule, list[nn.Parameter]]]:
    """``(name, module, params)`` of each FSDPModule that directly manages parameters.

    A module manages its parameters minus those of FSDPModules nested inside it.
    """
    units = []
    for name, module in model.named_modules():
        if not isinstance(module, FSDPModule):
            continue
        nested = {
            id(p)
            for sub_name, sub in module.named_modules()
            if sub_name and isinstance(sub, FSDPModule)
            for p in sub.parameters()
        }
        owned = [p for p in module.parameters() if id(p) not in nested]
        if owned:
            units.append((name, module, owned))
    return units


def _hsdp_hook(state: FSDPCompressionState, key: str) -> Any:
    """FSDP2 all-reduce hook: average this rank's reduce-scattered shard across the
    replicas (``state.process_group``) through distk, in place, before returning (FSDP
    divides and shards the output right after the hook returns)."""

    def hook(reduce_output: torch.Tensor) -> None:
        state.reduce(reduce_output, key)

    return hook


def _enable_fsdp2(model: nn.Module, cfg: SparsityConfig | dict[str, Any],
                  replicate_group: dist.ProcessGroup | None = None) -> FSDPCompressionState:
    for method in ("set_custom_reduce_scatter", "set_force_sum_reduction_for_comms",
                   "set_all_reduce_hook"):
        if not hasattr(FSDPModule, method):
            raise RuntimeError(
                f"distk.fsdp.enable needs FSDPModule.{method}, which this torch "
                f"({torch.__version__}) lacks; FSDP2 support is tested with torch 2.13"
            )
    units = _fsdp2_units(model)
    if not units:
        raise ValueError("distk.fsdp.enable: the FSDP2 model has no parameters to reduce")
    meshes = []
    for name, _, params in units:
        for param in params:
            mesh = getattr(param, "device_mesh", None)
            if mesh is None:
                raise ValueError(
                    f"distk.fsdp.enable: a parameter of module {name or '<root>'!r} is not "
                    "an FSDP2 DTensor; call enable after fully_shard"
                )
            if mesh.ndim != 1:
                raise ValueError(
                    f"distk.fsdp.enable: module {name or '<root>'!r} is sharded over a "
                    f"{mesh.ndim}-D device mesh {tuple(mesh.mesh_dim_names or ())}; only a "
                    "1-D mesh is supported (FSDP+TP is not; for HSDP shard over the shard "
                    "dimension, fully_shard(module, mesh=mesh['shard']), and pass "
                    "replicate_group=mesh['replicate'].get_group())"
                )
            if all(mesh is not seen for seen in meshes):
                meshes.append(mesh)
    groups = {tuple(dist.get_process_group_ranks(m.get_group())) for m in meshes}
    if len(groups) != 1:
        raise ValueError(
            f"distk.fsdp.enable: FSDP2 modules are sharded over {len(groups)} different rank "
            f"groups {sorted(groups)}; distk needs one data-parallel group"
        )
    group = meshes[0].get_group()
    names = [name or "<root>" for name, _, _ in units]
    if replicate_group is not None:
        return _enable_hsdp(model, cfg, group, replicate_group, units, names)
    cfg = residuals_for_sharding(cfg, True, "distk.fsdp.enable")
    state = FSDPCompressionState(cfg, group, "fsdp2", names, model=model)

    def install(module: FSDPModule, key: str) -> None:
        module.set_custom_reduce_scatter(SparseReduceScatter(state, key))
        module.set_force_sum_reduction_for_comms(True)

    _install_on_units(units, names, "a custom reduce-scatter", install)
    return state


def _install_on_units(units: list[tuple[str, FSDPModule, list[nn.Parameter]]],
                      names: list[str], what: str, install: Any) -> None:
    """``install(module, key)`` on every unit; torch's ValueError names the module."""
    for (_, module, _), key in zip(units, names):
        try:
            install(module, key)
        except ValueError as err:
            raise ValueError(
                f"distk.fsdp.enable: module {key!r} cannot take {what}: {err}") from err


def _enable_hsdp(model: nn.Module, cfg: SparsityConfig | dict[str, Any],
                 shard_group: dist.ProcessGroup, replicate_group: dist.ProcessGroup,
                 units: list[tuple[str, FSDPModule, list[nn.Parameter]]],
                 names: list[str]) -> FSDPCompressionState:
    """HSDP: FSDP2's own dense reduce-scatter inside the shard group (fast links), then
    distk's sparse exchange of each rank's shard across the replicas (slow links), through
    ``set_all_reduce_hook`` (torch's seam for a custom replica all-reduce on a 1-D mesh)."""
    shard_ranks = set(dist.get_process_group_ranks(shard_group))
    replica_ranks = set(dist.get_process_group_ranks(replicate_group))
    if shard_ranks & replica_ranks != {dist.get_rank()}:
        raise ValueError(
            "distk.fsdp.enable: replicate_group must hold this rank and one rank of every "
            f"other replica, none of its own shard group; got shard group "
            f"{sorted(shard_ranks)} and replicate group {sorted(replica_ranks)}")
    # Every rank, not just each replica group, must agree (collective over the world).
    check_same_config(as_sparsity_config(cfg))
    state = FSDPCompressionState(cfg, replicate_group, "hsdp", names, model=model)
    _install_on_units(units, names, "an all-reduce hook",
                      lambda module, key: module.set_all_reduce_hook(_hsdp_hook(state, key)))
    return state


def _enable_fsdp1(model: FSDP1, cfg: SparsityConfig | dict[str, Any]) -> FSDPCompressionState:
    units = FSDP1.fsdp_modules(model)  # the model itself and every nested unit
    for unit in units:
        if unit.sharding_strategy in _FSDP1_UNSUPPORTED:
            raise ValueError(
                f"distk.fsdp.enable: FSDP1 sharding_strategy={unit.sharding_strategy.name} is "
                "not supported (torch has no communication hook for hybrid strategies); use "
                "FULL_SHARD, SHARD_GRAD_OP or NO_SHARD, or FSDP2"
            )
    named = {id(m): name for name, m in model.named_modules()}
    # Units without a flat parameter (all parameters owned by nested units) never reduce.
    # ``_handle`` is FSDP1's private handle attribute; tests/test_fsdp.py checks the seam.
    owning = [u for u in units if getattr(u, "_handle", None) is not None]
    keys = [named[id(u)].replace(_FSDP1_WRAPPED_PREFIX, "") or "<root>" for u in owning]
    state = FSDPCompressionState(cfg, model.process_group, "fsdp1", keys, model=model)
    model.register_comm_hook(_FSDP1UnitState(state, "<unused>"), _fsdp1_hook)
    # register_comm_hook gives every unit the same hook state; each unit needs its own key
    # so that residuals are per unit. ``_comm_hook_state`` is the attribute FSDP1 passes to
    # the hook (torch/distributed/fsdp/_runtime_utils.py); the seam is tested.
    for unit, key in zip(owning, keys):
        if not hasattr(unit, "_comm_hook_state"):
            raise RuntimeError(
                f"distk.fsdp.enable: this torch ({torch.__version__}) FSDP1 has no "
                "_comm_hook_state; per-unit residuals cannot be set up"
            )
        unit._comm_hook_state = _FSDP1UnitState(state, key)
    return state


def enable(model: nn.Module, cfg: SparsityConfig | dict[str, Any] | None = None, *,
           replicate_group: dist.ProcessGroup | None = None,
           optimizer: Any = None) -> FSDPCompressionState:
    """Sparsify the gradient reduction of an FSDP2 (``fully_shard``) or FSDP1 model.

    Args:
        model: the root module after ``fully_shard`` (FSDP2; every FSDPModule inside is
            set up), or the root ``FullyShardedDataParallel`` (FSDP1). Call before the
            first backward pass.
        cfg: a :class:`~distk.config.SparsityConfig` (or a dict for
            ``SparsityConfig.from_dict``); must be the same on every rank (checked
            collectively; a mismatch raises on every rank). ``None`` (the default): the
            per-step ``SparsityConfig()`` (FSDP cannot run outer synchronisation, which
            is distk's default for Adam-family optimizers on DDP), announced on rank 0.
        replicate_group: HSDP (FSDP2 only): the model is sharded over the shard
            dimension of a 2-D mesh (``fully_shard(m, mesh=mesh["shard"])``) and this is
            ``mesh["replicate"].get_group()``. FSDP2's dense reduce-scatter stays inside
            the shard group; distk exchanges each rank's reduced shard sparsely across
            the replicas (residuals are then per shard).
        optimizer: the training optimizer, optional; an Adam-family one gets the Adam
            schedule (``cfg.adam_*``; as in
            :func:`distk.ddp.enable`).

    Returns:
        The :class:`FSDPCompressionState` (``.compressor``, ``.stats``, ``state_dict()``,
        ``load_state_dict()``). Residuals are unsharded and identical in shape on every
        rank; each rank checkpoints its own (they differ: they hold what that rank did not
        send).

    Raises:
        TypeError: ``model`` is neither FSDP2 nor FSDP1, or cfg has the wrong type.
        ValueError: an unsupported configuration (HSDP or a 2-D mesh, FSDP1 hybrid
            sharding, several FSDP2 parameter groups per module, FSDP1 and FSDP2 mixed),
            or configs that differ across ranks.
    """
    has_fsdp2 = any(isinstance(m, FSDPModule) for m in model.modules())
    has_fsdp1 = any(isinstance(m, FSDP1) for m in model.modules())
    if has_fsdp1 and has_fsdp2:
        raise ValueError("distk.fsdp.enable: the model mixes FSDP1 and FSDP2 modules")
    if replicate_group is not None and not has_fsdp2:
        raise ValueError("distk.fsdp.enable: replicate_group (HSDP) needs an FSDP2 model "
                         "(fully_shard over the shard dimension of the mesh)")
    cfg = schedule_for_optimizer(cfg, optimizer, "distk.fsdp.enable")
    if has_fsdp2:
        return _enable_fsdp2(model, cfg, replicate_group)
    if isinstance(model, FSDP1):
        return _enable_fsdp1(model, cfg)
    if has_fsdp1:
        raise ValueError("distk.fsdp.enable: pass the root FullyShardedDataParallel module")
    raise TypeError(
        "distk.fsdp.enable expects a model sharded with torch.distributed.fsdp.fully_shard "
        f"(FSDP2) or wrapped in FullyShardedDataParallel (FSDP1), got {type(model).__name__};"
        " for DDP use distk.ddp.enable"
    )
