"""Serving room 2: load a checkpoint straight into a model's own tensors (``load_into``).

The destinations are checked against the plan on every rank (and the check agreed) before any byte is
read; then the read stage writes each slice into its destination's storage. A destination on ``meta``
is materialized once, inside the same ``Parameter`` object (``torch.utils.swap_tensors``); any other is
overwritten in place, so a reload keeps every ``data_ptr`` (CUDA graphs and compiled code stay valid).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement

from .arguments import normalise_dtype
from .dist import Context
from .errors import ArgumentError, ShardingError, StrictLoadError
from .loader import load
from .parallel import composed_tensors, planned_dtensor, to_module_name
from .place import as_parameter, describe_mesh
from .plan import LoadPlan
from .read import copies_on_write
from .report import LoadReport

logger = logging.getLogger("tp_loader")


def _module_tensors(target: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Name → tensor of the target: a module's parameters and persistent buffers (tied names included)."""
    if isinstance(target, dict):
        return dict(target)
    if isinstance(target, nn.Module):
        return dict(target.state_dict(keep_vars=True))
    raise ArgumentError(
        f"load_into target is a {type(target).__name__}, not an nn.Module or a dict of tensors",
        key="target",
        hint="Pass the model (nn.Module) or a dict of its tensors",
    )


def _mapped(key: str, key_map: dict[str, str] | None) -> str:
    """``key`` renamed by the first ``key_map`` pattern that matches it (``re.sub``), else unchanged."""
    for pattern, replacement in (key_map or {}).items():
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    return key


def _layout(tensor: torch.Tensor) -> str:
    if isinstance(tensor, DTensor):
        return f"DTensor {list(tensor.shape)} {tensor.placements} local {list(tensor.to_local().shape)} {tensor.dtype}"
    return f"tensor {list(tensor.shape)} {tensor.dtype}"


@dataclass(frozen=True)
class _Layout:
    """What the plan gives one destination: its local shard, global shape and sharded dim."""

    key: str  # the checkpoint key, or the first one of a composed module tensor
    local_shape: tuple[int, ...]
    global_shape: tuple[int, ...]
    dim: int | None
    dtype: torch.dtype  # as stored (a weight dequantized on load: float32)

    @property
    def placements(self) -> tuple[Placement, ...]:
        return (Replicate() if self.dim is None else Shard(self.dim),)


def _planned(item: _Layout) -> str:
    return f"global {list(item.global_shape)} ({item.placements[0]!r},) local {list(item.local_shape)}"


def _same_ranks(a: DeviceMesh, b: DeviceMesh) -> bool:
    return a.device_type == b.device_type and a.mesh.tolist() == b.mesh.tolist()


@dataclass(frozen=True)
class _MeshChoice:
    """The mesh a load into ``target`` runs on, and the refusal (raised in the agreed round) when there is none."""

    mesh: DeviceMesh | None
    problem: str | None = None
    key: str | None = None


def _choose_mesh(tensors: dict[str, torch.Tensor], given: DeviceMesh | None) -> _MeshChoice:
    """The destinations' own mesh when they are DTensors (the forward needs every DTensor on one mesh object, so
    a ``mesh=`` over the same ranks is replaced by it); ``given`` for plain destinations."""
    carried: dict[DeviceMesh, str] = {}  # mesh → the first destination on it, by name
    for name in sorted(tensors):
        tensor = tensors[name]
        if isinstance(tensor, DTensor) and not any(tensor.device_mesh is m for m in carried):
            carried.setdefault(tensor.device_mesh, name)
    if len(carried) > 1:
        (first, a), (second, b) = list(carried.items())[:2]
        return _MeshChoice(
            given or first,
            f"the destinations are DTensors on more than one mesh: {a!r} on {describe_mesh(first)}, {b!r} on "
            f"{describe_mesh(second)}",
            key=a,
        )
    if not carried:
        return _MeshChoice(given)
    ((mesh, name),) = carried.items()
    if given is None or given is mesh or _same_ranks(given, mesh):
        return _MeshChoice(mesh)
    return _MeshChoice(
        given, f"the destinations are DTensors on {describe_mesh(mesh)}, but mesh= is {describe_mesh(given)}", key=name
    )


def _refuse_collisions(names: dict[str, str]) -> None:
    """Two checkpoint keys renamed to one destination: one would silently win."""
    seen: dict[str, str] = {}
    for key in sorted(names):
        name = names[key]
        if name in seen:
            raise ArgumentError(
                f"key_map sends two checkpoint keys to one destination: {seen[name]!r} and {key!r} both become "
                f"{name!r}",
                key=name,
                hint="Make the key_map patterns give each checkpoint key a name of its own (the first pattern that "
                "matches a key renames it)",
            )
        seen[name] = key


#: Destinations whose spans interleave are compared element by element over a byte mask of at most this size;
#: beyond it (never seen in a real model) spans that intersect count as shared.
_OVERLAP_MASK_BYTES = 1 << 27


def _extent(tensor: torch.Tensor) -> tuple[int, int]:
    """The bytes ``[start, stop)`` from ``tensor``'s first element to one past its last (torch strides are >= 0)."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    start = tensor.data_ptr()
    return start, start + span * tensor.element_size()


def _byte_view(mask: torch.Tensor, tensor: torch.Tensor, base: int) -> torch.Tensor:
    """The bytes of ``mask`` (one per address from ``base``) that ``tensor``'s elements occupy."""
    size = tensor.element_size()
    strides = tuple(stride * size for stride in tensor.stride()) + (1,)
    return mask.as_strided((*tensor.shape, size), strides, tensor.data_ptr() - base)


def _share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors whose extents intersect hold a byte in common (strided views can interleave)."""
    if a.is_contiguous() and b.is_contiguous():
        return True
    (a_start, a_stop), (b_start, b_stop) = _extent(a), _extent(b)
    base, stop = min(a_start, b_start), max(a_stop, b_stop)
    if stop - base > _OVERLAP_MASK_BYTES:
        return True
    mask = torch.zeros(stop - base, dtype=torch.bool)
    _byte_view(mask, a, base).fill_(True)
    return bool(_byte_view(mask, b, base).any())


def _refuse_overlaps(locals_: dict[str, torch.Tensor], tied: set[frozenset[str]], rank: int) -> None:
    """Two destinations sharing memory: whichever is written last holds its values in both. Only one tensor under
    two names the plan ties passes (both are written the same values)."""
    spans = sorted(
        (tensor.device, *_extent(tensor), name)
        for name, tensor in locals_.items()
        if tensor.numel() and not tensor.is_meta
    )
    active: list[tuple[torch.device, int, str]] = []  # the spans not yet ended at the current start
    for device, start, stop, name in spans:
        active = [span for span in active if span[0] == device and span[1] > start]
        for _, _, other in active:
            a, b = locals_[other], locals_[name]
            same = (a.data_ptr(), a.shape, a.stride(), a.dtype) == (b.data_ptr(), b.shape, b.stride(), b.dtype)
            if (same and frozenset((name, other)) in tied) or not _share_elements(a, b):
                continue
            first, second = sorted((name, other))
            raise ShardingError(
                f"destinations {first!r} and {second!r} share memory: one would hold the other's values",
                key=first,
                rank=rank,
                hint="Give every destination memory of its own (one tensor under two names only where the checkpoint "
                "ties those two keys)",
            )
        active.append((device, stop, name))


class _Destinations:
    """The ``_into`` hook of :func:`tp_loader.load`: checks every destination against the agreed plan,
    materializes meta ones, and returns checkpoint key → the local tensor to read into."""

    def __init__(
        self,
        target: nn.Module | dict[str, torch.Tensor],
        key_map: dict[str, str] | None,
        dtype: torch.dtype | None,
        strict: bool,
        mesh: DeviceMesh | None,
    ) -> None:
        self.target = target
        self.tensors = _module_tensors(target)
        self.mesh = _choose_mesh(self.tensors, mesh)
        self.key_map = key_map
        self.dtype = dtype
        self.strict = strict
        self.ties: list[tuple[str, str]] = []
        self.adopted: dict[str, str] = {}
        self.one_tensor: dict[str, str] = {}  # tie targets stored too whose destination is the source's tensor
        meta_dtypes = {t.dtype for t in self.tensors.values() if t.is_meta and t.dtype.is_floating_point}
        #: the dtype the load converts to: the one asked for, else the one every meta tensor has
        self.load_dtype = dtype if dtype is not None else meta_dtypes.pop() if len(meta_dtypes) == 1 else None
        self.module_missing: tuple[str, ...] = ()
        self.checkpoint_extra: tuple[str, ...] = ()

    def __call__(self, load_plan: LoadPlan, ctx: Context) -> dict[str, torch.Tensor]:
        if self.mesh.problem is not None:
            raise ShardingError(
                self.mesh.problem,
                key=self.mesh.key,
                rank=ctx.rank,
                hint="Pass the mesh the model was parallelized on (or no mesh=: load_into takes the destinations' "
                "own), and parallelize every module on that one mesh",
            )
        spec = load_plan.spec

        def module_name(key: str) -> str:
            return _mapped(to_module_name(key, spec), self.key_map)

        names = {item.key: module_name(item.key) for item in load_plan.tensors}
        _refuse_collisions(names)
        shapes = {name: tuple(t.shape) for name, t in self.tensors.items()}
        composed = composed_tensors(spec, load_plan, shapes) if spec is not None else {}
        part_of = {key: c for c in composed.values() for key, *_ in c.parts}
        extra = tuple(sorted(k for k, name in names.items() if name not in self.tensors and k not in part_of))
        covered = {names[k] for k in names if k not in extra and k not in part_of} | set(composed)
        self.ties = []
        for tie in load_plan.ties:  # the side a checkpoint lacks is the stored side's tensor (shared below)
            kept, other = (tie.source, tie.target) if tie.stored in ("source", "both") else (tie.target, tie.source)
            kept_name, other_name = module_name(kept), module_name(other)
            if tie.stored != "neither" and kept_name in covered and other_name in self.tensors:
                covered.add(other_name)
                self.ties.append((kept_name, other_name))
        shared = {id(t): name for name, t in self.tensors.items() if name in covered}
        missing = tuple(sorted(n for n, t in self.tensors.items() if n not in covered and id(t) not in shared))
        if self.strict and (extra or missing):
            raise StrictLoadError(
                f"the module and the checkpoint differ: {len(missing)} module tensors have no checkpoint key "
                f"({', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}), {len(extra)} checkpoint keys "
                f"have no module tensor ({', '.join(extra[:5])}{' …' if len(extra) > 5 else ''})",
                file=load_plan.model,
                hint="Map names with key_map= (regex → replacement), or pass strict=False to load what matches",
            )
        self.module_missing, self.checkpoint_extra = missing, extra
        items = {item.key: item for item in load_plan.tensors}
        # a tie stored on both sides into one module tensor (the module ties what the checkpoint stores twice):
        # the tensor takes the source's values, and the target is read into memory of its own only to be compared
        one_tensor = {
            tie.target
            for tie in load_plan.ties
            if tie.stored == "both"
            and (source := self.tensors.get(names.get(tie.source, ""))) is not None
            and source is self.tensors.get(names.get(tie.target, ""))
        }
        self.one_tensor = {key: names[key] for key in one_tensor}
        layouts = {
            names[key]: _Layout(key, item.local_shape, item.slice.global_shape, item.slice.dim, item.info.dtype)
            for key, item in items.items()
            if key not in extra and key not in part_of and key not in one_tensor
        }
        layouts.update(
            {
                c.name: _Layout(c.parts[0][0], c.local_shape, c.global_shape, c.dim, items[c.parts[0][0]].info.dtype)
                for c in composed.values()
            }
        )
        checked, refused = {}, []
        for name, layout in layouts.items():
            try:
                checked[name] = self._check(name, layout, ctx)
            except ShardingError as exc:
                refused.append(exc)
        if refused:
            first = refused[0]
            if len(refused) > 1:
                more = f" (and {len(refused) - 1} more destinations that do not fit)"
                raise ShardingError(first.message + more, key=first.key, rank=first.rank, hint=first.hint)
            raise first
        # a meta tensor that one checkpoint tensor fills, in the load's dtype, takes the loaded shard itself
        # (a view of the file mapping when zero-copy applies): no allocation, no copy. Only plain keys
        # have layouts under their own names, so a composed tensor is never adopted.
        self.adopted = {
            key: name
            for key, name in names.items()
            if checked.get(name)
            and key not in part_of
            and (self.tensors[name].dtype == self.load_dtype or not self.tensors[name].dtype.is_floating_point)
        }
        tied = {frozenset((module_name(tie.source), module_name(tie.target))) for tie in load_plan.ties}
        _refuse_overlaps({name: self._local(name) for name, must in checked.items() if not must}, tied, ctx.rank)
        locals_ = {
            name: self._materialize(name, layouts[name], ctx) if must else self._local(name)
            for name, must in checked.items()
            if name not in self.adopted.values()
        }
        out = {
            key: locals_[name]
            for key, name in names.items()
            if name in locals_ and key not in part_of and key not in one_tensor
        }
        for c in composed.values():
            out.update(c.views(locals_[c.name], items))
        mapped = [local for local in locals_.values() if copies_on_write(local)]
        if mapped and ctx.leader:
            logger.warning(
                "%s: %d destinations (%.2f GB on this rank) are views of a file mapping (a model loaded zero-copy): "
                "writing them first copies each of their pages into new memory, several times as slow as writing "
                "memory of their own. Load with zero_copy=False a model you will reload in place",
                load_plan.model,
                len(mapped),
                sum(local.nbytes for local in mapped) / 1e9,
            )
        return out

    def adopt(self, shards: dict[str, torch.Tensor]) -> None:
        """After the read: each adopted meta tensor becomes its loaded shard, inside the same object."""
        for key, name in self.adopted.items():
            tensor, shard = self.tensors[name], shards[key]
            if isinstance(shard, DTensor) and not isinstance(tensor, DTensor):  # a plain destination's local shard
                shard = shard.to_local()
            self._replace(name, shard)

    def share_ties(self) -> None:
        """After the read: each tied name the checkpoint does not fill becomes the filled tensor (the
        same Parameter in a module; a copy into its own storage in a dict, whose pointers are kept)."""
        for kept, other in self.ties:
            source = self.tensors[kept]
            if isinstance(self.target, nn.Module):
                if self.target.get_parameter(other) is not self.target.get_parameter(kept):
                    path, _, leaf = other.rpartition(".")
                    setattr(self.target.get_submodule(path), leaf, self.target.get_parameter(kept))
            elif self.target[other] is not source:
                self._local(other).copy_(self._local(kept))

    def untie(self, report: LoadReport, shards: dict[str, torch.Tensor]) -> None:
        """After the read: a tie the target holds as one tensor, but the checkpoint stores as two that differ (on
        some rank), is untied as transformers unties it: the target name gets a tensor of its own holding its
        stored values, and the source's tensor keeps the source's."""
        differ = {t.target for t in report.ties if t.stored == "both" and t.identical is False}
        for key, name in self.one_tensor.items():
            if key not in differ:
                continue
            old, shard = self.tensors[name], shards[key]
            if isinstance(shard, DTensor) and not isinstance(old, DTensor):
                shard = shard.to_local()
            if shard.dtype != old.dtype:  # the load's dtype was not the destinations' (they were allocated)
                shard = shard.to(old.dtype)
            if isinstance(self.target, nn.Module):
                path, _, leaf = name.rpartition(".")
                owner = self.target.get_submodule(path)
                new = as_parameter(shard, old.requires_grad) if isinstance(old, nn.Parameter) else shard
                setattr(owner, leaf, new)
            else:
                self.target[name] = shard
            self.tensors[name] = shard

    def _local(self, name: str) -> torch.Tensor:
        """The storage to write ``name``'s shard into (detached: a parameter is written in place)."""
        tensor = self.tensors[name]  # a DTensor's local tensor as it holds it (to_local() is an autograd call)
        return (tensor._local_tensor if isinstance(tensor, DTensor) else tensor).detach()

    def _check(self, name: str, item: _Layout, ctx: Context) -> bool:
        """Whether ``name`` must be materialized (it is on meta); raises if its layout is not the plan's."""
        tensor = self.tensors[name]
        local = self._local(name)
        fits = tuple(local.shape) == item.local_shape and (
            tuple(tensor.shape) == item.global_shape and tuple(tensor.placements) == item.placements
            if isinstance(tensor, DTensor)
            else True
        )
        if not fits:
            raise ShardingError(
                f"destination {name!r} is {_layout(tensor)}, but the plan gives it {_planned(item)}",
                key=item.key,
                rank=ctx.rank,
                hint="Build the module with tp_loader.parallelize (same plan and mesh), or allocate the "
                "destination with the plan's local shape",
            )
        if tensor.dtype != item.dtype and not (tensor.dtype.is_floating_point and item.dtype.is_floating_point):
            raise ShardingError(
                f"destination {name!r} is {tensor.dtype}, but the checkpoint stores it as {item.dtype}: load_into "
                "converts floating point to floating point only",
                key=item.key,
                rank=ctx.rank,
                hint="Give the destination a floating-point dtype for a floating-point tensor, and the stored dtype "
                "itself for an integer or bool one",
            )
        if self.dtype is not None and tensor.dtype != self.dtype and tensor.dtype.is_floating_point:
            raise ShardingError(
                f"destination {name!r} is {tensor.dtype}, but dtype={self.dtype} was asked for",
                key=item.key,
                rank=ctx.rank,
                hint="Pass no dtype (the destination's dtype is used) or build the model in that dtype",
            )
        if local.is_meta:
            return True
        if local.device != ctx.device:  # a strided destination (a zero-copy column shard) is written through a copy
            raise ShardingError(
                f"destination {name!r} is on {local.device}, but the load is on {ctx.device}",
                key=item.key,
                rank=ctx.rank,
                hint="Allocate destinations on the load's device (device=)",
            )
        return False

    def _materialize(self, name: str, item: _Layout, ctx: Context) -> torch.Tensor:
        """Replaces a meta tensor by real storage on ``ctx.device`` inside the same Python object."""
        tensor = self.tensors[name]
        dtype = self.dtype if self.dtype is not None and tensor.dtype.is_floating_point else tensor.dtype
        local = torch.empty(item.local_shape, dtype=dtype, device=ctx.device)
        is_dtensor = isinstance(tensor, DTensor)
        self._replace(name, planned_dtensor(local, ctx.mesh, item.dim, item.global_shape) if is_dtensor else local)
        return self._local(name)

    def _replace(self, name: str, new: torch.Tensor) -> None:
        """Puts ``new`` inside ``name``'s tensor object (a Parameter stays the same Parameter)."""
        tensor = self.tensors[name]
        if isinstance(tensor, nn.Parameter):
            new = as_parameter(new, tensor.requires_grad)
        torch.utils.swap_tensors(tensor, new)
        if isinstance(self.target, dict):
            self.target[name] = tensor


def load_into(
    target: nn.Module | dict[str, torch.Tensor],
    model: str | os.PathLike[str] | None = None,
    *,
    plan: str | os.PathLike[str] = "auto",
    key_map: dict[str, str] | None = None,
    dtype: torch.dtype | str | None = None,
    strict: bool = True,
    mesh: DeviceMesh | None = None,
    **options: Any,
) -> LoadReport:
    """Loads ``model`` straight into ``target``'s own tensors, reading each rank's slices into them.

    Destinations are DTensors (a module from :func:`tp_loader.parallelize`) or plain local tensors of
    the plan's local shapes (a server with its own parallel layers). Each is checked against the plan
    on every rank before anything is read. Meta tensors are materialized once on the load's device,
    keeping their ``Parameter`` objects; others are overwritten in place (a reload keeps ``data_ptr``).
    Floating-point slices are converted to each destination's dtype.

    Args:
        target: an ``nn.Module`` or a dict of tensors, named as the checkpoint (after ``key_map``).
        model: a directory or Hub id, as for :func:`tp_loader.load`.
        plan: the plan, as for :func:`tp_loader.load`.
        key_map: regex → replacement applied to checkpoint keys to give the target's names (the first
            pattern that matches wins), like transformers' ``key_mapping``.
        dtype: every floating-point destination must be of this dtype (default: whatever it is).
        strict: refuse, before reading, unless every target tensor gets a checkpoint key and every
            checkpoint key a target tensor (tied names sharing one tensor count once).
        mesh: the tensor-parallel mesh. Default: the mesh the destinations' DTensors carry (a model from
            :func:`tp_loader.parallelize`), else as :func:`tp_loader.load`. A mesh over the same ranks as the
            destinations' is replaced by theirs (a forward needs one mesh object); one over other ranks is refused.
        options: other :func:`tp_loader.load` arguments (``revision``, ``cache_dir``, ``progress``, …).

    Returns:
        The load's report, with ``missing_keys`` the target tensors that got no checkpoint key and
        ``unexpected_keys`` the checkpoint keys the target lacks.

    Raises:
        ShardingError: a destination's layout, dtype or device differs from the plan's, the destinations are
            on several meshes, or ``mesh`` spans other ranks than theirs.
        StrictLoadError: ``strict`` and the names differ.
        TPLoaderError: as :func:`tp_loader.load`.
    """
    hook = _Destinations(target, key_map, normalise_dtype(dtype), strict, mesh)
    mesh = hook.mesh.mesh
    if (mesh is not None and mesh.ndim != 1) or options.get("tp_size") is not None:
        raise ArgumentError(
            "load_into fills one tensor-parallel group's model: it takes a 1-D mesh, not a mesh with replicas",
            key="mesh",
            hint="Pass mesh['tp'] (each replica loads into its own model), or use tp_loader.load for the whole "
            "(dp, tp) mesh",
        )
    result = load(model, plan=plan, mesh=mesh, dtype=hook.load_dtype, _into=hook, **options)
    hook.adopt(result.state_dict)
    hook.share_ties()
    hook.untie(result.report, result.state_dict)
    return dataclasses.replace(result.report, missing_keys=hook.module_missing, unexpected_keys=hook.checkpoint_extra)
