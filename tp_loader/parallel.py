"""Serving room 1: turn a plan into torch ``ParallelStyle``s and apply them to an ``nn.Module``.

The plan stage runs on the module's own state (names, shapes, dtypes) exactly as it runs on a
checkpoint's headers, so each parameter becomes a DTensor with the placement, global shape and local
slice that :func:`tp_loader.load` gives the same key: fused parts, KV heads shared by ranks and uneven
vocabularies included. The forward hooks are torch's own ``ColwiseParallel`` / ``RowwiseParallel``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from .convert import fill
from .errors import ArgumentError, PlanError
from .index import Checkpoint, TensorInfo
from .place import as_dtensor, as_parameter, contiguous_stride, describe_mesh
from .plan import LoadPlan, TensorPlan, plan_rank
from .prefix import detect_prefix, with_prefix
from .spec import ExpertModuleSpec, PlanSpec, config_values, evaluate, evaluate_size, glob_to_regex, select_spec
from .styles import chunk_range

logger = logging.getLogger("tp_loader")


def module_config(module: nn.Module, config: Any) -> dict:
    """``config`` as a dict (a dict, or an object with ``to_dict()`` such as a transformers config), or
    the module's own ``config``."""
    config = getattr(module, "config", None) if config is None else config
    if isinstance(config, dict):
        return config
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise ArgumentError(
        f"{type(module).__name__} has no config and none was passed",
        key="config",
        hint="Pass config= the model's config.json as a dict (or a transformers config)",
    )


def to_module_name(key: str, spec: PlanSpec | None) -> str:
    """A checkpoint key under the module's own names (the plan's ``renames``)."""
    for checkpoint, module in spec.renames if spec is not None else ():
        key = key.replace(checkpoint, module)
    return key


def to_checkpoint_name(name: str, spec: PlanSpec) -> str:
    """A module's name for a tensor under the checkpoint's key (the plan's ``renames``, reversed)."""
    for checkpoint, module in spec.renames:
        name = name.replace(module, checkpoint)
    return name


def plan_module(
    module: nn.Module,
    config: dict,
    world_size: int,
    rank: int,
    *,
    plan: str | os.PathLike[str] = "auto",
    mode: str | None = None,
) -> LoadPlan:
    """The plan of ``rank``, computed from the module's state dict as if it were a checkpoint's headers:
    module names renamed back to checkpoint names, and each module tensor that a plan target composes
    (fused experts) split back into the checkpoint tensors it is made of."""
    return _plan_state(type(module).__name__, module.state_dict(keep_vars=True), config, world_size, rank, plan, mode)


def _plan_state(
    model: str,
    state: dict[str, torch.Tensor],
    config: dict,
    world_size: int,
    rank: int,
    plan: str | os.PathLike[str],
    mode: str | None,
) -> LoadPlan:
    """:func:`plan_module` of a module (class name ``model``) whose state dict is ``state``."""
    spec = select_spec(plan, config, model=model, mode=mode, keys=state.keys())
    if spec.targets:  # only composed targets are matched here (1 ms a fresh process spends on the prefix otherwise)
        spec = with_prefix(spec, detect_prefix(spec, state))
    stored: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, tensor in state.items():
        parts = _split_target(spec, name, tuple(tensor.shape))
        if parts is None:
            stored[to_checkpoint_name(name, spec)] = (tuple(tensor.shape), tensor.dtype)
        else:
            stored.update({part: (part_shape, tensor.dtype) for part, part_shape in parts.items()})
    infos = {
        key: TensorInfo(key, "(module)", dtype, shape, 0, math.prod(shape) * dtype.itemsize)
        for key, (shape, dtype) in stored.items()
    }
    checkpoint = Checkpoint(Path("(module)"), "safetensors", config, infos)
    return plan_rank(checkpoint, world_size, rank, plan=plan, mode=mode, model=model)


def _split_target(spec: PlanSpec, key: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]] | None:
    """The checkpoint tensors (per expert, as stored) that module tensor ``key`` is made of, or ``None``."""
    for target in spec.targets:
        found = _template_regex(target.key).fullmatch(key)
        if found is None or len(shape) < 2:
            continue
        at = {"layer": int(found["layer"])} if "layer" in found.groupdict() else {}
        rows = shape[1] // len(target.parts)
        return {
            fill(part, {**at, "expert": expert}): (rows, *shape[2:])
            for part in target.parts
            for expert in range(shape[0])
        }
    return None


def local_piece(full: torch.Tensor, item: TensorPlan) -> torch.Tensor:
    """This rank's slice of a whole (materialized) tensor, contiguous: the plan's ranges along its dim."""
    dim = item.slice.dim
    if dim is None:
        return full.detach().clone()
    return torch.cat([full.detach().narrow(dim, a, b - a) for a, b in item.slice.ranges], dim=dim).contiguous()


def planned_dtensor(
    local: torch.Tensor, mesh: DeviceMesh, dim: int | None, shape: tuple[int, ...], specs: dict | None = None
) -> DTensor:
    """``local`` as a DTensor sharded on ``dim`` (replicated for ``None``) with global ``shape``, as the plan
    describes it (no communication). A tensor that requires grad goes through ``DTensor.from_local``, whose
    autograd function keeps the graph; anything else (parameters, meta tensors, inference activations) is
    wrapped as the load wraps its shards, at a tenth of the cost and without importing ``torch._dynamo``
    (``specs``: as for :func:`tp_loader.place.as_dtensor`)."""
    if not local.requires_grad:
        return as_dtensor(local, mesh, dim, shape, specs)
    placement = Replicate() if dim is None else Shard(dim)
    return DTensor.from_local(
        local, mesh, (placement,), run_check=False, shape=torch.Size(shape), stride=contiguous_stride(shape)
    )


def place_parameters(
    module: nn.Module,
    items: dict[str, TensorPlan],
    mesh: DeviceMesh,
    names: list[str] | None = None,
    specs: dict | None = None,
) -> None:
    """Each of ``module``'s own parameters (or those ``names``) becomes a Parameter holding its planned
    DTensor: this rank's piece of the values it holds, or a meta piece of the plan's local shape
    (``specs``: the DTensor specs of the layouts placed so far, shared by the modules of one model)."""
    for name in names if names is not None else [n for n, _ in module.named_parameters(recurse=False)]:
        param, item = module._parameters[name], items[name]
        local = (
            torch.empty(item.local_shape, dtype=param.dtype, device="meta")
            if param.is_meta
            else local_piece(param, item)
        )
        dtensor = planned_dtensor(local, mesh, item.slice.dim, item.slice.global_shape, specs)
        module.register_parameter(name, as_parameter(dtensor, param.requires_grad))


class _Planned:
    """Places a module's parameters as the plan says instead of splitting them evenly."""

    def __init__(self, items: dict[str, TensorPlan], specs: dict | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._items = items
        self._specs = {} if specs is None else specs

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        place_parameters(module, self._items, device_mesh, specs=self._specs)

    _partition_embedding_fn = _partition_linear_fn

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        """torch's ``_apply`` of the two styles (the same hooks as ``distribute_module`` registers), also for
        ``Conv1D`` (a matmul of the input with ``[in, out]``)."""
        rowwise = isinstance(self, RowwiseParallel)
        desired = (Replicate(),) if not rowwise or isinstance(module, nn.Embedding) else (Shard(-1),)
        self.desired_input_layouts = desired
        input_fn = partial(self._prepare_input_fn, self.input_layouts, desired)
        output_fn = partial(self._prepare_output_fn, self.output_layouts, self.use_local_output)
        if not _plain_layer(module, self._items):
            return distribute_module(module, device_mesh, self._partition_linear_fn, input_fn, output_fn)
        # NOTE: what distribute_module does for a layer whose parameters the plan places all and that holds no
        # buffer or submodule, without its walk of the submodules and the two inspect.signature calls of each hook
        # (about 0.1 ms a layer, a third of parallelize's time on a 6-layer Llama in a fresh process)
        place_parameters(module, self._items, device_mesh, specs=self._specs)
        module.register_forward_pre_hook(lambda mod, inputs: input_fn(mod, inputs, device_mesh))
        module.register_forward_hook(lambda mod, inputs, outputs: output_fn(mod, outputs, device_mesh))
        module._distribute_module_applied = True  # type: ignore[assignment]
        return module


def _plain_layer(module: nn.Module, items: dict[str, TensorPlan]) -> bool:
    """Whether ``distribute_module`` would only place ``module``'s own parameters (all in ``items``) and
    register its hooks: no submodule, no buffer, no parameter left for it to replicate."""
    return (
        not module._modules
        and not any(buffer is not None for buffer in module._buffers.values())
        and all(param is None or name in items for name, param in module._parameters.items())
    )


class PlannedColwise(_Planned, ColwiseParallel):
    """``ColwiseParallel`` with the plan's slices (packed parts, shared KV heads, uneven vocabularies),
    also for GPT-2's ``Conv1D`` (weights stored ``[in, out]``: the plan shards their dim 1)."""


class PlannedRowwise(_Planned, RowwiseParallel):
    """``RowwiseParallel`` with the plan's slices, also for ``Conv1D``."""

    @staticmethod
    def _prepare_input_fn(input_layouts, desired_input_layouts, mod, inputs, device_mesh):  # noqa: ANN001, ANN205
        """torch's, with the input's global size taken from the weight: torch infers it as the local size
        times the world size, which is wrong for the plan's uneven shards (42 features over 4 ranks)."""
        x = inputs[0]
        if not isinstance(x, DTensor) and input_layouts[0].is_shard():
            features = mod.weight.shape[0] if _is_conv1d(mod) else mod.weight.shape[-1]
            shape = (*x.shape[:-1], features)
            x = DTensor.from_local(
                x, device_mesh, input_layouts, run_check=False, shape=torch.Size(shape), stride=contiguous_stride(shape)
            )
        return RowwiseParallel._prepare_input_fn(
            input_layouts, desired_input_layouts, mod, (x, *inputs[1:]), device_mesh
        )


class LocalShards(ParallelStyle):
    """A module's own parameters that the plan shards outside a linear layer (GPT-OSS's attention
    ``sinks``, one logit per query head, sharded with the heads): DTensors with the plan's placement,
    and the module's forward run on the local shards, as it runs on this rank's heads only."""

    def __init__(self, items: dict[str, TensorPlan]) -> None:
        super().__init__()
        self._items = items

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        sharded = [name for name, item in self._items.items() if item.slice.dim is not None]
        place_parameters(module, self._items, device_mesh, sharded)
        saved: dict[str, torch.Tensor] = {}

        def to_local(mod: nn.Module, args: tuple) -> None:
            for name in sharded:
                saved[name] = mod._parameters[name]
                mod._parameters[name] = saved[name].to_local()

        def restore(mod: nn.Module, args: tuple, output: Any) -> None:
            mod._parameters.update(saved)

        module.register_forward_pre_hook(to_local)
        module.register_forward_hook(restore)
        return module


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2), recognised without importing transformers."""
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2


def _style(path: str, module: nn.Module, items: dict[str, TensorPlan], specs: dict) -> ParallelStyle | None:
    """The style for one module from its weight's plan, or ``None`` when the plan replicates it."""
    weight = items.get("weight")
    if all(item.slice.dim is None for item in items.values()):
        return None
    if weight is None:  # parameters of the module's own, not a layer's weight (attention sinks)
        return LocalShards(items)
    style = weight.style
    matmul = isinstance(module, nn.Linear) or _is_conv1d(module)
    if isinstance(module, nn.Embedding) and style in ("vocab", "rowwise"):
        return PlannedRowwise(items, specs, input_layouts=Replicate())
    if matmul and style == "vocab":
        return PlannedColwise(items, specs, output_layouts=Replicate())
    if matmul and style in ("colwise", "packed"):
        return PlannedColwise(items, specs)
    if matmul and style == "rowwise":
        return PlannedRowwise(items, specs)
    raise PlanError(
        f"cannot run module {path!r} ({type(module).__name__}) tensor-parallel with style {style!r}",
        key=weight.key,
        hint="parallelize supports nn.Linear and Conv1D (colwise, packed, rowwise, vocab) and nn.Embedding "
        "(vocab, rowwise); "
        "give this module a replicate rule, or load its shards with tp_loader.load_into into your own layers",
    )


def parallelize(
    module: nn.Module,
    *,
    mesh: DeviceMesh,
    plan: str | os.PathLike[str] = "auto",
    mode: str | None = None,
    config: Any = None,
) -> nn.Module:
    """Makes ``module`` run tensor-parallel on ``mesh`` with the layout :func:`tp_loader.load` gives.

    Parameters may be on ``meta`` (then :func:`tp_loader.load_into` fills them) or materialized (then
    each rank keeps its slice). Tied parameters stay tied. Attributes that depend on this rank's head
    counts (``num_key_value_groups`` when KV heads are shared by ranks) are set as the plan says.

    Args:
        module: the model, with checkpoint-named parameters (``model.layers.0.self_attn.q_proj.weight``).
        mesh: the 1-D tensor-parallel mesh.
        plan: ``"auto"``, a built-in plan name or a path.
        mode: the plan's mode (``"ep"``: expert parallelism), as for :func:`tp_loader.load`.
        config: the model's config (a dict or an object with ``to_dict()``); default ``module.config``.

    Returns:
        ``module``, changed in place.

    Raises:
        PlanError: a module the plan shards is not of a kind that can run sharded, or the module's
            shapes are not what the config implies.
        ShardingError: heads do not divide across the mesh.
    """
    state = module.state_dict(keep_vars=True)
    _refuse_parallelized(state)
    values = module_config(module, config)
    world_size, rank = mesh.size(), mesh.get_local_rank()
    load_plan = _plan_state(type(module).__name__, state, values, world_size, rank, plan, mode)
    if load_plan.mismatched:
        bad = load_plan.mismatched[0]
        raise PlanError(
            f"module parameter has shape {bad.found}, but the config implies {bad.expected}",
            key=bad.key,
            hint="Pass the config the module was built from",
        )
    tied: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    spec = load_plan.spec
    shapes = {key: tuple(t.shape) for key, t in state.items()}
    composed = composed_tensors(spec, load_plan, shapes) if spec is not None else {}
    parts = {key for c in composed.values() for key, *_ in c.parts}
    by_module: dict[str, dict[str, TensorPlan]] = {}
    for item in load_plan.tensors:
        if item.key not in parts:
            path, _, leaf = to_module_name(item.key, spec).rpartition(".")
            by_module.setdefault(path, {})[leaf] = item
    items_by_key = {item.key: item for item in load_plan.tensors}
    styles: dict[str, ParallelStyle] = {}
    specs: dict = {}  # one DTensor spec per layout, shared by every module
    modules = dict(module.named_modules(remove_duplicate=False))  # a module shared under two paths: both
    for path, items in by_module.items():
        expert_module = _expert_module(spec, path)
        if expert_module is not None:  # experts stored as the module holds them (fused, stacked)
            stored = {leaf: _stored(f"{path}.{leaf}", item) for leaf, item in items.items()}
            styles[path] = ExpertsParallel(stored, items_by_key, expert_module)
        elif spec is not None and any(getattr(spec.match(item.key), "gathered_norm", False) for item in items.values()):
            styles[path] = GatheredNorm(items)
        elif (style := _style(path, modules[path], items, specs)) is not None:
            styles[path] = style
    by_owner: dict[str, dict[str, Composed]] = {}
    for name, tensor in composed.items():
        path, _, leaf = name.rpartition(".")
        by_owner.setdefault(path, {})[leaf] = tensor
    for path, tensors in by_owner.items():
        styles[path] = ExpertsParallel(tensors, items_by_key, _expert_module(spec, path))
    for path, style in styles.items():  # exact paths: no walk of the module tree matching patterns per entry
        parallelize_module(modules[path], mesh, style)
    for names in tied.values():  # re-tie: each module got a parameter of its own
        if len(names) > 1:
            source = module.get_parameter(names[0])
            for name in names[1:]:
                path, _, leaf = name.rpartition(".")
                setattr(module.get_submodule(path), leaf, source)
    _set_attributes(module, values, load_plan, world_size)
    return module


def _refuse_parallelized(state: dict[str, torch.Tensor]) -> None:
    """torch's ``distribute_module`` refuses a second call on a module with a RuntimeError that names neither the
    module nor its mesh; a module holding DTensors already (in its state dict ``state``) is refused here, before
    anything changes."""
    for name, tensor in sorted(state.items()):
        if isinstance(tensor, DTensor):
            raise ArgumentError(
                f"the module is already parallelized: {name!r} is a DTensor on {describe_mesh(tensor.device_mesh)}",
                key=name,
                hint="parallelize each module once; to load new weights into it, call tp_loader.load_into "
                "(it rewrites the parameters in place)",
            )


def _expert_module(spec: PlanSpec | None, path: str) -> ExpertModuleSpec | None:
    for expert_module in spec.expert_modules if spec is not None else ():
        if re.fullmatch(glob_to_regex(expert_module.module), path):
            return expert_module
    return None


class ExpertsParallel(ParallelStyle):
    """A module of stacked experts (transformers 5's ``MixtralExperts``): each parameter a DTensor with
    the plan's placement, the forward run on the local shards, its output summed over the ranks.

    Tensor-parallel experts (parameters sharded on dim 1 or 2) give each rank a part of every expert's
    intermediate features: the sum after the expert sum completes every token's output; a replicated
    output bias (a rowwise rule's) is added by the first rank only. Expert
    parallelism (dim 0: whole experts) renumbers the routed expert ids to this rank's experts and gives
    a token routed elsewhere weight 0, so that only the other ranks add its outputs, in the same sum.
    """

    def __init__(
        self, tensors: dict[str, Composed], items: dict[str, TensorPlan], spec: ExpertModuleSpec | None
    ) -> None:
        super().__init__()
        self._tensors = tensors
        self._items = items
        self._spec = spec

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for leaf, tensor in self._tensors.items():
            param = module.get_parameter(leaf)
            local = (
                torch.empty(tensor.local_shape, dtype=param.dtype, device="meta")
                if param.is_meta
                else _compose_local(param, tensor, self._items)
            )
            dtensor = planned_dtensor(local, device_mesh, tensor.dim, tensor.global_shape)
            setattr(module, leaf, as_parameter(dtensor, param.requires_grad))
        expert_dim = {tensor.dim for tensor in self._tensors.values()}
        first = None
        if expert_dim == {0}:
            key = next(iter(self._tensors.values())).parts[0][0]  # a stacked part: its slice is the experts
            first, stop = self._items[key].slice.ranges[0]
            if self._spec is None:
                raise PlanError(
                    f"module {type(module).__name__} holds whole experts per rank, but the plan names no "
                    "expert_modules entry for it (the routed expert ids must be renumbered)",
                    hint="Add an [[expert_modules]] entry to the plan",
                )
            setattr(module, self._spec.num_experts, stop - first)
        group = device_mesh.get_group()
        saved: dict[str, torch.Tensor] = {}
        num_experts = next(iter(self._tensors.values())).global_shape[0]
        stacked_rows: list[int] = []  # routing "stacked": each expert's tokens, set per forward
        # a replicated tensor under a rowwise rule (GPT-OSS's down_proj_bias) is added after the reduction:
        # the first rank adds it, the others add zeros, so that the sum over the ranks counts it once
        once = {
            leaf
            for leaf, tensor in self._tensors.items()
            if tensor.dim is None and self._items[tensor.parts[0][0]].style == "rowwise"
        }
        zeroed = once if device_mesh.get_local_rank() else set()

        def to_local(mod: nn.Module, args: tuple) -> tuple:
            for leaf in self._tensors:
                saved[leaf] = mod._parameters[leaf]
                local = saved[leaf].to_local()
                mod._parameters[leaf] = torch.zeros_like(local) if leaf in zeroed else local
            if first is not None and self._spec is not None:
                spec = self._spec
                local = getattr(mod, spec.num_experts)
                renumbered = list(args)
                if spec.routing == "stacked":  # this rank's experts' rows of [experts * tokens, hidden]
                    rows = args[spec.input_arg].shape[0] // num_experts
                    stacked_rows[:] = [rows]
                    renumbered[spec.input_arg] = args[spec.input_arg][first * rows : (first + local) * rows]
                else:
                    index, weights = args[spec.index_arg], args[spec.weights_arg]
                    mine = (index >= first) & (index < first + local)
                    renumbered[spec.index_arg] = torch.where(mine, index - first, 0)
                    renumbered[spec.weights_arg] = torch.where(mine, weights, 0)
                args = tuple(renumbered)
            return args

        def summed(mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            mod._parameters.update(saved)
            if stacked_rows:  # zero in the other ranks' experts' rows
                rows = stacked_rows.pop()
                full = output.new_zeros((num_experts * rows, *output.shape[1:]))
                output = full.index_copy_(0, torch.arange(first * rows, first * rows + len(output)), output)
            if device_mesh.size() > 1:
                dist.all_reduce(output, group=group)
            return output

        module.register_forward_pre_hook(to_local)
        module.register_forward_hook(summed)
        return module


def _stored(name: str, item: TensorPlan) -> Composed:
    """A module tensor that is one checkpoint tensor as stored (fused experts ``[experts, ...]``)."""
    return Composed(name, ((item.key, None, 0, 0),), item.slice.dim, item.local_shape, item.slice.global_shape)


class GatheredNorm(ParallelStyle):
    """A norm over features that the ranks hold in parts (OLMo 2's ``q_norm`` over every head of a
    colwise ``q_proj``), its weight sharded with them. The statistic needs every feature: the forward
    gathers the input's parts from all ranks, runs the norm on the whole features, and keeps this rank's
    part. The elementwise weight (and bias) need no gathering: each is this rank's shard placed at its
    offset in a tensor of the whole size, whose other entries only touch outputs that are dropped."""

    def __init__(self, items: dict[str, TensorPlan]) -> None:
        super().__init__()
        self._items = items

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        place_parameters(module, self._items, device_mesh)
        size = next(item.slice.global_shape[0] for item in self._items.values() if item.slice.dim is not None)
        start, stop = chunk_range(size, device_mesh.size(), device_mesh.get_local_rank())  # as Shard(0) lays out
        saved: dict[str, torch.Tensor] = {}

        def gather(mod: nn.Module, args: tuple) -> tuple:
            for name, param in list(mod._parameters.items()):
                saved[name] = param
                local = param.to_local()
                if param.placements[0].is_shard():
                    local = local.new_zeros(size).index_copy_(0, torch.arange(start, stop), local)
                mod._parameters[name] = local
            x = args[0].contiguous()
            parts = planned_dtensor(x, device_mesh, x.dim() - 1, (*x.shape[:-1], size))
            return (parts.full_tensor(), *args[1:])

        def split(mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            mod._parameters.update(saved)
            return output[..., start:stop].contiguous()

        module.register_forward_pre_hook(gather)
        module.register_forward_hook(split)
        return module


def _compose_local(param: torch.Tensor, tensor: Composed, items: dict[str, TensorPlan]) -> torch.Tensor:
    """This rank's shard of a materialized module tensor: each part's slice, placed as ``tensor`` says."""
    full = param.detach()
    local = torch.empty(tensor.local_shape, dtype=param.dtype, device=param.device)
    views = tensor.views(local, items)
    size = full.shape[1] // tensor.num_parts  # each part's rows (per expert) or columns (stacked)
    for key, expert, _, index in tensor.parts:
        part = full[expert].narrow(0, index * size, size) if expert is not None else full.narrow(1, index * size, size)
        views[key].copy_(local_piece(part, items[key]))
    return local


def _set_attributes(module: nn.Module, config: dict, load_plan: LoadPlan, world_size: int) -> None:
    spec = load_plan.spec
    if spec is None or not spec.attributes:
        return
    values = config_values(spec, config)
    for group, heads in spec.heads.items():
        num = evaluate_size(heads.num_heads, values, where=f"heads.{group}.num_heads", minimum=1)
        values[f"local_heads_{group}"] = (
            1 if heads.replicate_when_fewer and num < world_size else math.ceil(num / world_size)
        )
    copied: set[tuple[int, str]] = set()
    for attribute in spec.attributes:  # module patterns under the module's own names (the plan's renames)
        pattern = re.compile(glob_to_regex(to_module_name(attribute.module + ".", spec).removesuffix(".")))
        owner_path, _, leaf = attribute.name.rpartition(".")
        value = None
        for path, sub in module.named_modules():
            if not pattern.fullmatch(path):
                continue
            owner = _owner(sub, owner_path, copied)
            if owner is None or not hasattr(owner, leaf):
                continue
            if value is None:
                value = evaluate(attribute.value, values, where=f"attribute {attribute.name}")
            setattr(owner, leaf, value)


def _owner(module: nn.Module, path: str, copied: set[tuple[int, str]]) -> Any:
    """The object that holds a dotted attribute of ``module`` (``config`` for ``config.num_attention_heads``),
    copied once per module first, so that a value for this rank's heads never reaches an object that
    other modules (or the caller) share."""
    if not path:
        return module
    owner: Any = module
    for part in path.split("."):
        if not hasattr(owner, part):
            return None
        parent, owner = owner, getattr(owner, part)
        if (id(module), part) not in copied:
            owner = copy.copy(owner)
            setattr(parent, part, owner)
            copied.add((id(module), part))
    return owner


@dataclass(frozen=True)
class Composed:
    """A module tensor made of checkpoint tensors (a plan target), as this rank holds it.

    Attributes:
        name: the module tensor's name.
        parts: ``(checkpoint key, expert or None for a stacked part, offset, part index)`` per
            checkpoint tensor: where its local shard lies in the module tensor's local shard
            (``local[expert]`` rows ``offset...`` of dim 0, or ``local`` columns ``offset...`` of dim 1
            when stacked), and which of the target's parts it is.
        dim: the sharded dim of the module tensor, or ``None`` when replicated.
        local_shape: this rank's shard of it.
        global_shape: the module tensor's shape.
    """

    name: str
    parts: tuple[tuple[str, int | None, int, int], ...]
    dim: int | None
    local_shape: tuple[int, ...]
    global_shape: tuple[int, ...]

    @property
    def num_parts(self) -> int:
        return 1 + max(index for *_, index in self.parts)

    def views(self, local: torch.Tensor, items: dict[str, TensorPlan]) -> dict[str, torch.Tensor]:
        """Checkpoint key → the view of ``local`` (this rank's shard) that its shard fills."""
        out = {}
        for key, expert, offset, _ in self.parts:
            shape = items[key].local_shape
            out[key] = (
                local[expert].narrow(0, offset, shape[0]) if expert is not None else local.narrow(1, offset, shape[1])
            )
        return out


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d+)"))


def composed_tensors(spec: PlanSpec, load_plan: LoadPlan, names: dict[str, tuple[int, ...]]) -> dict[str, Composed]:
    """The module tensors among ``names`` (name → shape) that the plan's targets compose from the
    planned checkpoint tensors: per expert (the part keys planned as they are) or stacked (the part
    keys merged by a converter)."""
    items = {item.key: item for item in load_plan.tensors}
    stacked_of = {c.sources[0]: c.targets[0] for c in spec.converters if c.op == "merge_modulelist"}
    out = {}
    for target in spec.targets:
        pattern = _template_regex(target.key)
        for name, shape in names.items():
            found = pattern.fullmatch(name)
            if found is None:
                continue
            at = {"layer": int(found["layer"])} if "layer" in found.groupdict() else {}
            composed = _compose(name, shape, target.parts, at, items, stacked_of)
            if composed is not None:
                out[name] = composed
    return out


def _compose(
    name: str,
    shape: tuple[int, ...],
    templates: tuple[str, ...],
    at: dict[str, int],
    items: dict[str, TensorPlan],
    stacked_of: dict[str, str],
) -> Composed | None:
    parts: list[tuple[str, int | None, int, int]] = []
    dims: set[int | None] = set()
    if all(fill(t, {**at, "expert": 0}) in items for t in templates):  # per expert
        offset = 0
        for index, template in enumerate(templates):
            first = items[fill(template, {**at, "expert": 0})]
            for expert in range(shape[0]):
                item = items.get(fill(template, {**at, "expert": expert}))
                if item is None:
                    return None
                parts.append((item.key, expert, offset, index))
                dims.add(None if item.slice.dim is None else item.slice.dim + 1)
            offset += first.local_shape[0]
        rows = offset
        local = (shape[0], rows, *first.local_shape[1:])
    elif all(fill(stacked_of.get(t, "\0"), at) in items for t in templates):  # stacked by a converter
        offset = 0
        for index, template in enumerate(templates):
            item = items[fill(stacked_of[template], at)]
            parts.append((item.key, None, offset, index))
            dims.add(item.slice.dim)
            offset += item.local_shape[1]
        local = (item.local_shape[0], offset, *item.local_shape[2:])
    else:
        return None
    if len(dims) != 1:
        raise PlanError(
            f"the parts of module tensor {name!r} are placed differently ({sorted(map(str, dims))})",
            key=name,
            hint="Give the parts of one module tensor the same style in the plan",
        )
    return Composed(name, tuple(parts), dims.pop(), local, shape)
