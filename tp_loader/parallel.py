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
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from .errors import ArgumentError, PlanError
from .index import Checkpoint, TensorInfo
from .place import contiguous_stride
from .plan import LoadPlan, TensorPlan, plan_rank
from .prefix import with_prefix
from .spec import config_values, evaluate, evaluate_size, glob_to_regex, select_spec

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


def plan_module(
    module: nn.Module, config: dict, world_size: int, rank: int, *, plan: str | os.PathLike[str] = "auto"
) -> LoadPlan:
    """The plan of ``rank``, computed from the module's state dict as if it were a checkpoint's headers."""
    infos = {
        key: TensorInfo(key, "(module)", t.dtype, tuple(t.shape), 0, t.numel() * t.element_size())
        for key, t in module.state_dict(keep_vars=True).items()
    }
    checkpoint = Checkpoint(Path("(module)"), "safetensors", config, infos)
    return plan_rank(checkpoint, world_size, rank, plan=plan, model=type(module).__name__)


def local_piece(full: torch.Tensor, item: TensorPlan) -> torch.Tensor:
    """This rank's slice of a whole (materialized) tensor, contiguous: the plan's ranges along its dim."""
    dim = item.slice.dim
    if dim is None:
        return full.detach().clone()
    return torch.cat([full.detach().narrow(dim, a, b - a) for a, b in item.slice.ranges], dim=dim).contiguous()


def planned_dtensor(item: TensorPlan, local: torch.Tensor, mesh: DeviceMesh) -> DTensor:
    """``local`` as the DTensor the plan describes (no communication)."""
    placement = Replicate() if item.slice.dim is None else Shard(item.slice.dim)
    shape = item.slice.global_shape
    return DTensor.from_local(
        local, mesh, (placement,), run_check=False, shape=torch.Size(shape), stride=contiguous_stride(shape)
    )


class _Planned:
    """Places a module's parameters as the plan says instead of splitting them evenly."""

    def __init__(self, items: dict[str, TensorPlan], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._items = items

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        for pname, param in list(module.named_parameters(recurse=False)):
            item = self._items[pname]
            local = (
                torch.empty(item.local_shape, dtype=param.dtype, device="meta")
                if param.is_meta
                else local_piece(param, item)
            )
            dtensor = planned_dtensor(item, local, device_mesh)
            module.register_parameter(pname, nn.Parameter(dtensor, requires_grad=param.requires_grad))

    _partition_embedding_fn = _partition_linear_fn

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Linear | nn.Embedding):  # a Conv1D: matmul of the input with [in, out]
            desired = (Shard(-1),) if isinstance(self, RowwiseParallel) else (Replicate(),)
            return distribute_module(
                module,
                device_mesh,
                self._partition_linear_fn,
                partial(self._prepare_input_fn, self.input_layouts, desired),
                partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
            )
        return super()._apply(module, device_mesh)  # type: ignore[misc]


class PlannedColwise(_Planned, ColwiseParallel):
    """``ColwiseParallel`` with the plan's slices (packed parts, shared KV heads, uneven vocabularies),
    also for GPT-2's ``Conv1D`` (weights stored ``[in, out]``: the plan shards their dim 1)."""


class PlannedRowwise(_Planned, RowwiseParallel):
    """``RowwiseParallel`` with the plan's slices, also for ``Conv1D``."""


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2), recognised without importing transformers."""
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2


def _style(path: str, module: nn.Module, items: dict[str, TensorPlan]) -> ParallelStyle | None:
    """The style for one module from its weight's plan, or ``None`` when the plan replicates it."""
    weight = items.get("weight")
    if weight is None or all(item.slice.dim is None for item in items.values()):
        return None
    style = weight.style
    matmul = isinstance(module, nn.Linear) or _is_conv1d(module)
    if isinstance(module, nn.Embedding) and style in ("vocab", "rowwise"):
        return PlannedRowwise(items, input_layouts=Replicate())
    if matmul and style == "vocab":
        return PlannedColwise(items, output_layouts=Replicate())
    if matmul and style in ("colwise", "packed"):
        return PlannedColwise(items)
    if matmul and style == "rowwise":
        return PlannedRowwise(items)
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
        config: the model's config (a dict or an object with ``to_dict()``); default ``module.config``.

    Returns:
        ``module``, changed in place.

    Raises:
        PlanError: a module the plan shards is not of a kind that can run sharded, or the module's
            shapes are not what the config implies.
        ShardingError: heads do not divide across the mesh.
    """
    values = module_config(module, config)
    world_size, rank = mesh.size(), mesh.get_local_rank()
    load_plan = plan_module(module, values, world_size, rank, plan=plan)
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
    by_module: dict[str, dict[str, TensorPlan]] = {}
    for item in load_plan.tensors:
        path, _, leaf = item.key.rpartition(".")
        by_module.setdefault(path, {})[leaf] = item
    styles = {}
    for path, items in by_module.items():
        style = _style(path, module.get_submodule(path), items)
        if style is not None:
            styles[path] = style
    parallelize_module(module, mesh, styles)
    for names in tied.values():  # re-tie: each module got a parameter of its own
        if len(names) > 1:
            source = module.get_parameter(names[0])
            for name in names[1:]:
                path, _, leaf = name.rpartition(".")
                setattr(module.get_submodule(path), leaf, source)
    _set_attributes(module, plan, values, load_plan, world_size)
    return module


def _set_attributes(
    module: nn.Module, plan: str | os.PathLike[str], config: dict, load_plan: LoadPlan, world_size: int
) -> None:
    spec = with_prefix(select_spec(plan, config, model=type(module).__name__), load_plan.prefix)
    if not spec.attributes:
        return
    values = config_values(spec, config)
    for group, heads in spec.heads.items():
        num = evaluate_size(heads.num_heads, values, where=f"heads.{group}.num_heads", minimum=1)
        values[f"local_heads_{group}"] = (
            1 if heads.replicate_when_fewer and num < world_size else math.ceil(num / world_size)
        )
    copied: set[tuple[int, str]] = set()
    for attribute in spec.attributes:
        pattern = re.compile(glob_to_regex(attribute.module))
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
