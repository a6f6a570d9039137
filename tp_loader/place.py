"""Stage 5, place: wrap each local shard as a DTensor on the mesh, without communication."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

from .plan import TensorPlan


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides of ``shape``."""
    stride = []
    running = 1
    for size in reversed(shape):
        stride.append(running)
        running *= max(size, 1)
    return tuple(reversed(stride))


def place(
    local: dict[str, torch.Tensor], items: tuple[TensorPlan, ...], mesh: DeviceMesh | None, tp_axis: int = 0
) -> dict[str, torch.Tensor]:
    """Wraps local shards as DTensors (``Shard(dim)`` or ``Replicate()``) with their global shape.

    What ``DTensor.from_local(run_check=False, shape=, stride=)`` does, without its autograd function,
    and with one (immutable) spec shared by every tensor of the same placement, shape and dtype:
    about 7 µs a tensor instead of 100 µs, which matters for MoE checkpoints of 10^5 tensors.

    Args:
        local: checkpoint key → this rank's shard.
        items: the plan of each key.
        mesh: the mesh; ``None`` returns the local tensors unchanged (a plain single process). On a 2-D
            mesh the shards are ``Replicate()`` on the replicas' dimension.
        tp_axis: the mesh dimension the plan shards over.

    Returns:
        Checkpoint key → DTensor (or plain tensor without a mesh), in plan order.
    """
    if mesh is None:
        return {item.key: local[item.key] for item in items}
    specs: dict[tuple, DTensorSpec] = {}
    return {
        item.key: _new_dtensor(
            local[item.key],
            _cached_spec(specs, mesh, item.slice.dim, item.slice.global_shape, local[item.key].dtype, tp_axis),
        )
        for item in items
    }


def as_dtensor(
    local: torch.Tensor, mesh: DeviceMesh, dim: int | None, shape: tuple[int, ...], specs: dict | None = None
) -> DTensor:
    """One shard as :func:`place` wraps it: ``Shard(dim)`` (``Replicate()`` for ``None``), global ``shape``,
    row-major strides, no autograd history (for parameters and buffers, not activations). ``specs``: a dict
    that keeps the spec of each layout for the next tensors of the same layout, as :func:`place` does within
    one load (a model's layers repeat a few layouts); pass the same dict only for the same ``mesh``."""
    return _new_dtensor(local, _cached_spec({} if specs is None else specs, mesh, dim, shape, local.dtype))


def _cached_spec(
    specs: dict, mesh: DeviceMesh, dim: int | None, shape: tuple[int, ...], dtype: torch.dtype, tp_axis: int = 0
) -> DTensorSpec:
    """The spec of one layout on ``mesh``, made once per ``specs`` (which must hold specs of ``mesh`` only)."""
    spec = specs.get((dim, shape, dtype))
    if spec is None:
        placement = Replicate() if dim is None else Shard(dim)
        spec = specs[(dim, shape, dtype)] = _spec(mesh, placement, shape, dtype, tp_axis)
    return spec


def as_parameter(tensor: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    """``nn.Parameter(tensor, requires_grad)``. For a DTensor that is a DTensor flagged ``_is_param`` made from
    ``tensor.detach()``; this builds the same object without that ``detach()``, which dispatches through DTensor's
    sharding propagation: about 3 ms for each new layout in a fresh process, a third of ``parallelize``'s time on
    a 6-layer Llama (``tests/test_place.py`` pins the result against ``nn.Parameter``)."""
    if not isinstance(tensor, DTensor):
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)
    out = DTensor.__new__(DTensor, tensor._local_tensor, tensor._spec, requires_grad=requires_grad)
    out._is_param = True  # what Parameter.__new__ sets on a tensor subclass: isinstance(out, Parameter) holds
    return out


def _spec(
    mesh: DeviceMesh, placement: Placement, shape: tuple[int, ...], dtype: torch.dtype, tp_axis: int = 0
) -> DTensorSpec:
    """``placement`` on the tensor-parallel dimension, ``Replicate()`` on any other."""
    placements = tuple(placement if axis == tp_axis else Replicate() for axis in range(mesh.ndim))
    return DTensorSpec(mesh, placements, tensor_meta=TensorMeta(torch.Size(shape), contiguous_stride(shape), dtype))


def _new_dtensor(local: torch.Tensor, spec: DTensorSpec) -> DTensor:
    """``DTensor(local, spec, requires_grad=False)`` without its ``__init__``: that ``__init__`` only
    calls ``Tensor.__init__``, but it is wrapped in ``torch._disable_dynamo``, whose first call imports
    ``torch._dynamo`` (0.5 s here, most of a small load in a fresh process). ``__new__`` builds the
    whole tensor; ``tests/test_place.py`` pins the result against ``DTensor.from_local``."""
    return DTensor.__new__(DTensor, local, spec, requires_grad=False)


def describe_mesh(mesh: DeviceMesh) -> str:
    """A mesh as errors name it: device type, shape, global ranks and dimension names."""
    ranks = mesh.mesh.flatten().tolist()
    return f"mesh {mesh.device_type} {tuple(mesh.shape)} ranks {ranks} dims {mesh.mesh_dim_names}"
