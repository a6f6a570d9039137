"""The style table: how each plan style maps a stored tensor to this rank's slice and its placement.

Pure functions of (stored shape, head layout, world size, rank). Sharding follows ``torch.chunk`` and
DTensor ``Shard`` semantics, so uneven sizes work and ``full_tensor()`` rebuilds the stored tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ShardingError


@dataclass(frozen=True)
class Heads:
    """A head group with its sizes evaluated from the config."""

    name: str
    num_heads: int
    head_dim: int
    replicate_when_fewer: bool = False


@dataclass(frozen=True)
class Part:
    """One projection inside a fused tensor (``q`` of ``qkv_proj``): its rows and head layout."""

    size: int
    heads: Heads | None = None


@dataclass(frozen=True)
class Slice:
    """What one rank reads of a stored tensor, and how the result is placed.

    Attributes:
        dim: the sharded tensor dimension, or ``None`` when the whole tensor is read and replicated.
        ranges: ``(start, stop)`` index ranges read along ``dim``, concatenated in this order (one
            range, except for fused tensors whose parts are sharded separately).
        global_shape: the DTensor's global shape (differs from the stored shape only when heads are
            replicated across ranks or parts are regrouped, see ``note``).
        note: a human-readable remark for the report, or ``None``.
    """

    dim: int | None
    ranges: tuple[tuple[int, int], ...] = ()
    global_shape: tuple[int, ...] = ()
    note: str | None = None

    @property
    def start(self) -> int:
        return self.ranges[0][0] if self.ranges else 0

    @property
    def stop(self) -> int:
        return self.ranges[-1][1] if self.ranges else 0

    def local_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of this rank's piece of a stored tensor of ``shape``."""
        if self.dim is None:
            return shape
        return shape[: self.dim] + (sum(b - a for a, b in self.ranges),) + shape[self.dim + 1 :]


def chunk_range(size: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of ``rank``'s piece of ``torch.chunk(range(size), world_size)``; may be empty."""
    step = -(-size // world_size) if size else 0
    start = min(rank * step, size)
    return start, min(start + step, size)


def replicate(
    shape: tuple[int, ...],
    heads: Heads | None,
    world_size: int,
    rank: int,
    parts: tuple[Part, ...] = (),
    transposed: bool = False,
) -> Slice:
    return Slice(None, global_shape=shape)


def _out_dim(shape: tuple[int, ...], transposed: bool) -> int:
    """The output-features dim: 0 for a Linear weight ``[out, in]`` and any bias, 1 for a transposed
    (Conv1D) weight ``[in, out]``."""
    return 1 if transposed and len(shape) == 2 else 0


def _shard(dim: int, shape: tuple[int, ...], heads: Heads | None, world_size: int, rank: int) -> Slice:
    if heads is None:
        return Slice(dim, (chunk_range(shape[dim], world_size, rank),), shape)
    n, hd = heads.num_heads, heads.head_dim
    if shape[dim] != n * hd:
        raise ShardingError(
            f"dim {dim} has size {shape[dim]}, not {n} {heads.name} heads x {hd}",
            hint="The plan applies a head group to a tensor that is not made of those heads: fix its rule",
        )
    if n % world_size == 0:
        per_rank = n // world_size * hd
        return Slice(dim, ((rank * per_rank, (rank + 1) * per_rank),), shape)
    if heads.replicate_when_fewer and n < world_size and world_size % n == 0:
        head = rank * n // world_size
        global_shape = shape[:dim] + (world_size * hd,) + shape[dim + 1 :]
        return Slice(
            dim,
            ((head * hd, (head + 1) * hd),),
            global_shape,
            f"{n} {heads.name} heads replicated {world_size // n}x over {world_size} ranks",
        )
    raise ShardingError(
        f"{n} {heads.name} heads cannot be split over {world_size} ranks",
        hint="Use a world size that divides the head count",
    )


def colwise(
    shape: tuple[int, ...],
    heads: Heads | None,
    world_size: int,
    rank: int,
    parts: tuple[Part, ...] = (),
    transposed: bool = False,
) -> Slice:
    """Output features sharded (dim 0; dim 1 of a transposed weight), for a weight and its bias alike."""
    return _shard(_out_dim(shape, transposed), shape, heads, world_size, rank)


def rowwise(
    shape: tuple[int, ...],
    heads: Heads | None,
    world_size: int,
    rank: int,
    parts: tuple[Part, ...] = (),
    transposed: bool = False,
) -> Slice:
    """Input features sharded (dim 1; dim 0 of a transposed weight); a 1-D bias is replicated (it is
    added once, after the reduction)."""
    if len(shape) < 2:
        return replicate(shape, heads, world_size, rank)
    return _shard(0 if transposed else 1, shape, heads, world_size, rank)


def vocab(
    shape: tuple[int, ...],
    heads: Heads | None,
    world_size: int,
    rank: int,
    parts: tuple[Part, ...] = (),
    transposed: bool = False,
) -> Slice:
    """Embedding or LM head rows (the vocabulary, dim 0) sharded; uneven vocabularies allowed."""
    return _shard(0, shape, None, world_size, rank)


def experts(
    shape: tuple[int, ...],
    heads: Heads | None,
    world_size: int,
    rank: int,
    parts: tuple[Part, ...] = (),
    transposed: bool = False,
) -> Slice:
    """Expert parallelism: stacked experts ``[experts, ...]`` divided whole among the ranks (dim 0,
    ``torch.chunk`` over the experts, so uneven counts work); a rank reads only its experts."""
    return _shard(0, shape, None, world_size, rank)


def packed(
    shape: tuple[int, ...],
    heads: Heads | None,
    world_size: int,
    rank: int,
    parts: tuple[Part, ...] = (),
    transposed: bool = False,
) -> Slice:
    """A fused projection (``qkv_proj``, ``gate_up_proj``, GPT-2's ``c_attn``): parts stacked on the
    output dim, each sharded on its own (on head boundaries, KV heads replicated when fewer than
    ranks); this rank's shard is its piece of every part, concatenated. The DTensor is ``Shard`` of
    that rank-major regrouping."""
    dim = _out_dim(shape, transposed)
    if sum(p.size for p in parts) != shape[dim]:
        raise ShardingError(
            f"dim {dim} has size {shape[dim]} but the plan's parts add up to {sum(p.size for p in parts)}",
            hint="Fix the parts' sizes in the plan",
        )
    ranges, notes, offset = [], [], 0
    for part in parts:
        if part.heads is None and part.size % world_size:
            raise ShardingError(
                f"a fused part of {part.size} rows cannot be split evenly over {world_size} ranks",
                hint="Use a world size that divides every part",
            )
        piece = _shard(0, (part.size,), part.heads, world_size, rank)
        ranges.append((offset + piece.start, offset + piece.stop))
        notes += [piece.note] if piece.note else []
        offset += part.size
    local_rows = sum(b - a for a, b in ranges)
    note = (
        "; ".join([f"fused parts {[p.size for p in parts]} regrouped rank by rank", *notes]) if world_size > 1 else None
    )
    return Slice(dim, tuple(ranges), shape[:dim] + (world_size * local_rows,) + shape[dim + 1 :], note)


def stacked(style: StyleFn, shape: tuple[int, ...], *args: Any, **kwargs: Any) -> Slice:
    """``style`` applied to each matrix of a stack along dim 0 (transformers 5's fused experts
    ``[experts, out, in]``, or ``[experts, in, out]`` when transposed): the style sees one matrix's
    shape, and its dims shift by one. Every expert is sharded alike; a rank reads its rows or columns
    of every expert."""
    piece = style(shape[1:], *args, **kwargs)
    if piece.dim is None:
        return Slice(None, global_shape=shape)
    return Slice(piece.dim + 1, piece.ranges, shape[:1] + piece.global_shape, piece.note)


def block_slice(
    piece: Slice,
    weight_shape: tuple[int, ...],
    scale_shape: tuple[int, ...],
    block: tuple[int, int],
    *,
    covering: bool = False,
) -> Slice:
    """The slice of a block-fp8 weight's scale tensor (one entry per ``block`` of the weight) that
    goes with the weight's ``piece``.

    Args:
        covering: read the blocks covering the piece even where its boundaries cut a block (for
            dequantizing on load): one range, from the first block touched to the last.

    Raises:
        ShardingError: (unless ``covering``) a shard boundary falls inside a block.
    """
    if piece.dim is None:
        return Slice(None, global_shape=scale_shape)
    dim, size = piece.dim, block[piece.dim]
    global_shape = scale_shape[:dim] + (-(-piece.global_shape[dim] // size),) + scale_shape[dim + 1 :]
    if covering:
        touched = [(a, b) for a, b in piece.ranges if b > a] or [(0, 0)]
        return Slice(dim, ((touched[0][0] // size, -(-touched[-1][1] // size)),), global_shape)
    ranges = []
    for a, b in piece.ranges:
        if a < b and (a % size or (b % size and b != weight_shape[dim])):
            raise ShardingError(
                f"the shard [{a}, {b}) of dim {dim} cuts the weight's {block[0]}x{block[1]} fp8 scale blocks",
                hint="Load with a wider dtype (dtype=bfloat16) to dequantize each slice on load, "
                "or use a world size whose shards fall on block boundaries",
            )
        ranges.append((a // size, -(-b // size)) if a < b else (a // size, a // size))
    return Slice(dim, tuple(ranges), global_shape)


StyleFn = Callable[..., Slice]

#: Style name → function. Plans name styles; adding a layout trick means adding an entry here.
STYLES: dict[str, StyleFn] = {
    "replicate": replicate,
    "colwise": colwise,
    "rowwise": rowwise,
    "vocab": vocab,
    "packed": packed,
    "experts": experts,
}


def head_world_sizes(groups: list[Heads], limit: int = 64) -> list[int]:
    """World sizes up to ``limit`` over which every head group can be sharded."""

    def fits(group: Heads, world: int) -> bool:
        n = group.num_heads
        return n % world == 0 or (group.replicate_when_fewer and n < world and world % n == 0)

    return [w for w in range(1, limit + 1) if all(fits(g, w) for g in groups)]
