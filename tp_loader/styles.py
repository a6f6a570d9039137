"""The style table: how each plan style maps a stored tensor to this rank's slice and its placement.

Pure functions of (stored shape, head layout, world size, rank). Sharding follows ``torch.chunk`` and
DTensor ``Shard`` semantics, so uneven sizes work and ``full_tensor()`` rebuilds the stored tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import ShardingError


@dataclass(frozen=True)
class Heads:
    """A head group with its sizes evaluated from the config."""

    name: str
    num_heads: int
    head_dim: int
    replicate_when_fewer: bool = False


@dataclass(frozen=True)
class Slice:
    """What one rank reads of a stored tensor, and how the result is placed.

    Attributes:
        dim: the sharded tensor dimension, or ``None`` when the whole tensor is read and replicated.
        start: first index read along ``dim``.
        stop: one past the last index read along ``dim``.
        global_shape: the DTensor's global shape (differs from the stored shape only when heads are
            replicated across ranks, see ``note``).
        note: a human-readable remark for the report, or ``None``.
    """

    dim: int | None
    start: int = 0
    stop: int = 0
    global_shape: tuple[int, ...] = ()
    note: str | None = None

    def local_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of this rank's piece of a stored tensor of ``shape``."""
        if self.dim is None:
            return shape
        return shape[: self.dim] + (self.stop - self.start,) + shape[self.dim + 1 :]


def chunk_range(size: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of ``rank``'s piece of ``torch.chunk(range(size), world_size)``; may be empty."""
    step = -(-size // world_size) if size else 0
    start = min(rank * step, size)
    return start, min(start + step, size)


def replicate(shape: tuple[int, ...], heads: Heads | None, world_size: int, rank: int) -> Slice:
    return Slice(None, global_shape=shape)


def _shard(dim: int, shape: tuple[int, ...], heads: Heads | None, world_size: int, rank: int) -> Slice:
    if heads is None:
        start, stop = chunk_range(shape[dim], world_size, rank)
        return Slice(dim, start, stop, shape)
    n, hd = heads.num_heads, heads.head_dim
    if shape[dim] != n * hd:
        raise ShardingError(f"dim {dim} has size {shape[dim]}, not {n} {heads.name} heads x {hd}", hint="The plan applies a head group to a tensor that is not made of those heads: fix its rule")
    if n % world_size == 0:
        per_rank = n // world_size * hd
        return Slice(dim, rank * per_rank, (rank + 1) * per_rank, shape)
    if heads.replicate_when_fewer and n < world_size and world_size % n == 0:
        head = rank * n // world_size
        global_shape = shape[:dim] + (world_size * hd,) + shape[dim + 1 :]
        return Slice(dim, head * hd, (head + 1) * hd, global_shape, f"{n} {heads.name} heads replicated {world_size // n}x over {world_size} ranks")
    raise ShardingError(f"{n} {heads.name} heads cannot be split over {world_size} ranks", hint="Use a world size that divides the head count")


def colwise(shape: tuple[int, ...], heads: Heads | None, world_size: int, rank: int) -> Slice:
    """Output features (dim 0) sharded, for a Linear weight and its bias alike."""
    return _shard(0, shape, heads, world_size, rank)


def rowwise(shape: tuple[int, ...], heads: Heads | None, world_size: int, rank: int) -> Slice:
    """Input features (dim 1) sharded; a 1-D bias is replicated (it is added once, after the reduction)."""
    if len(shape) < 2:
        return replicate(shape, heads, world_size, rank)
    return _shard(1, shape, heads, world_size, rank)


def vocab(shape: tuple[int, ...], heads: Heads | None, world_size: int, rank: int) -> Slice:
    """Embedding or LM head rows (the vocabulary, dim 0) sharded; uneven vocabularies allowed."""
    return _shard(0, shape, None, world_size, rank)


StyleFn = Callable[[tuple[int, ...], "Heads | None", int, int], Slice]

#: Style name → function. Plans name styles; adding a layout trick means adding an entry here.
STYLES: dict[str, StyleFn] = {
    "replicate": replicate,
    "colwise": colwise,
    "rowwise": rowwise,
    "vocab": vocab,
}


def head_world_sizes(groups: list[Heads], limit: int = 64) -> list[int]:
    """World sizes up to ``limit`` over which every head group can be sharded."""

    def fits(group: Heads, world: int) -> bool:
        n = group.num_heads
        return n % world == 0 or (group.replicate_when_fewer and n < world and world % n == 0)

    return [w for w in range(1, limit + 1) if all(fits(g, w) for g in groups)]
