"""Stage 5, place: wrap each local shard as a DTensor on the mesh, without communication."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from .plan import TensorPlan


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides of ``shape``."""
    stride = []
    running = 1
    for size in reversed(shape):
        stride.append(running)
        running *= max(size, 1)
    return tuple(reversed(stride))


def place(local: dict[str, torch.Tensor], items: tuple[TensorPlan, ...], mesh: DeviceMesh | None) -> dict[str, torch.Tensor]:
    """Wraps local shards as DTensors (``Shard(dim)`` or ``Replicate()``) with their global shape.

    Args:
        local: checkpoint key → this rank's shard.
        items: the plan of each key.
        mesh: the 1-D mesh; ``None`` returns the local tensors unchanged (a plain single process).

    Returns:
        Checkpoint key → DTensor (or plain tensor without a mesh), in plan order.
    """
    if mesh is None:
        return {item.key: local[item.key] for item in items}
    out: dict[str, torch.Tensor] = {}
    for item in items:
        piece = item.slice
        placement = Replicate() if piece.dim is None else Shard(piece.dim)
        shape = piece.global_shape
        out[item.key] = DTensor.from_local(local[item.key], mesh, [placement], run_check=False, shape=torch.Size(shape), stride=contiguous_stride(shape))
    return out
