"""Read once per job (``share="job"``): replicas of one tensor-parallel rank split the reading of their
identical shards among their nodes, and each shard reaches the others by a broadcast over the replica group.

Ranks with the same tensor-parallel coordinate in different replicas (one column of a ``(dp, tp)`` mesh) hold
bitwise the same shards. Every byte they need is therefore needed once per replica: instead of each node
reading it from storage, each shard gets one *source* (a rank of the column), chosen so that every node reads
about the same number of bytes, and the source broadcasts it to the column in bounded chunks while it reads
the next batch. The assignment is a pure function of the rank's plan and the column's node names, so every
member computes the same one without a word.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .dist import Context, group_alive
from .errors import DistributedError, LostContactError, TPLoaderError, as_loader_error
from .plan import TensorPlan
from .read import ReadStats, target_dtype

logger = logging.getLogger("tp_loader")

#: Bytes of shards read before their broadcasts start (and at most two such batches in flight).
BATCH_BYTES = 64 << 20
#: Bytes per broadcast: gloo moves a large tensor in one message; pieces let the next one start sooner.
CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class Column:
    """This rank's replica group: the ranks of every replica that hold the same shards.

    Attributes:
        ranks: global ranks, in replica order.
        nodes: the node name of each.
        me: this rank's global rank.
    """

    ranks: tuple[int, ...]
    nodes: tuple[str, ...]
    me: int


def assign_sources(items: tuple[TensorPlan, ...], column: Column) -> dict[str, int]:
    """Each key's source rank. Keys go, largest first, to the node that has been given the fewest bytes so
    far (the node listed first on a tie), and within that node to its member with the fewest bytes: every
    node requests about ``1 / num_nodes`` of the shards from storage, spread over its ranks.

    Returns:
        checkpoint key → the global rank that reads it (and broadcasts it to the column).
    """
    nodes = list(dict.fromkeys(column.nodes))
    node_bytes = dict.fromkeys(nodes, 0)
    rank_bytes = dict.fromkeys(column.ranks, 0)
    sources: dict[str, int] = {}
    for item in sorted(items, key=lambda it: (-it.read_bytes, it.key)):
        node = min(nodes, key=lambda n: (node_bytes[n], nodes.index(n)))
        members = [r for r, n in zip(column.ranks, column.nodes) if n == node]
        rank = min(members, key=lambda r: (rank_bytes[r], column.ranks.index(r)))
        node_bytes[node] += item.read_bytes
        rank_bytes[rank] += item.read_bytes
        sources[item.key] = rank
    return sources


def _batches(items: tuple[TensorPlan, ...], limit: int) -> list[tuple[TensorPlan, ...]]:
    """Items in plan order, cut into runs of at most ``limit`` shard bytes (a larger item is a batch alone)."""
    out: list[list[TensorPlan]] = [[]]
    used = 0
    for item in items:
        if out[-1] and used + item.nbytes > limit:
            out.append([])
            used = 0
        out[-1].append(item)
        used += item.nbytes
    return [tuple(batch) for batch in out if batch]


def _pieces(tensor: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    """``tensor``'s bytes (contiguous) as uint8 views of at most ``chunk`` bytes: gloo cannot move float8 or
    every dtype, but it moves bytes."""
    flat = tensor.reshape(-1).view(torch.uint8)
    return [flat[i : i + chunk] for i in range(0, flat.numel(), chunk)] or [flat]


@dataclass
class Exchanged:
    """What the exchange gave this rank: every shard, what it read itself, and what it received."""

    local: dict[str, torch.Tensor]
    stats: ReadStats
    bytes_received: int


def exchange(
    items: tuple[TensorPlan, ...],
    column: Column,
    group: Any,
    read: Callable[[tuple[TensorPlan, ...]], tuple[dict[str, torch.Tensor], ReadStats]],
    dtype: torch.dtype | None,
    *,
    rank: int,
    batch_bytes: int = BATCH_BYTES,
    chunk_bytes: int = CHUNK_BYTES,
) -> Exchanged:
    """Reads the shards this rank is the source of, and broadcasts every shard over the column's group.

    Batch by batch in plan order: the source reads its items of the batch, then every member posts the
    batch's broadcasts (asynchronous) and goes on to read the next batch while they run; a batch's
    broadcasts are waited for before the next batch's are posted, so at most two batches are in flight.
    A source whose read fails keeps broadcasting (zeros), so no member waits on it, and raises the read's
    error at the end: the caller's agreement round then makes it every rank's error.

    Args:
        items: this rank's plan (identical on every member of the column).
        column: this rank's replica group.
        group: a process group over ``column.ranks`` (gloo, the loader's timeout).
        read: reads some items as the read stage does (owned, contiguous CPU tensors).
        dtype: the load's conversion dtype (``None``: stored dtypes).
        rank: this rank's rank in the loader's collectives (its global rank), for errors.

    Returns:
        Every shard of this rank, what it read itself and the bytes it received.

    Raises:
        TPLoaderError: this rank's read failed, or a member was lost during the exchange.
    """
    start = time.perf_counter()
    sources = assign_sources(items, column)
    local: dict[str, torch.Tensor] = {}
    read_bytes = 0
    received = 0
    failed: TPLoaderError | None = None
    pending: list[Any] = []
    for batch in _batches(items, batch_bytes):
        mine = tuple(item for item in batch if sources[item.key] == column.me)
        if mine and failed is None:
            try:
                got, stats = read(mine)
                local.update(got)
                read_bytes += stats.bytes_read
            except Exception as exc:  # noqa: BLE001 - broadcast on, so that no member waits on this rank
                failed = as_loader_error(exc, rank)
        for item in batch:
            if item.key not in local:  # to receive into, or this source's zeros after a failed read
                fill = torch.zeros if sources[item.key] == column.me else torch.empty
                local[item.key] = fill(item.local_shape, dtype=target_dtype(item.info.dtype, dtype))
        _wait(pending, column, rank)
        pending = []
        for item in batch:
            source = sources[item.key]
            for piece in _pieces(local[item.key], chunk_bytes):
                pending.append(_post(piece, source, group, column, rank))
                if source != column.me:
                    received += piece.numel()
    _wait(pending, column, rank)
    if failed is not None:
        raise failed
    seconds = time.perf_counter() - start
    return Exchanged(local, ReadStats(read_bytes, len(local), seconds), received)


def _post(piece: torch.Tensor, source: int, group: Any, column: Column, rank: int) -> Any:
    try:
        return dist.broadcast(piece, src=source, group=group, async_op=True)
    except Exception as exc:  # noqa: BLE001 - a lost member surfaces here or in wait
        raise _lost(exc, column, rank) from None


def _wait(works: list[Any], column: Column, rank: int) -> None:
    for work in works:
        try:
            work.wait()
        except Exception as exc:  # noqa: BLE001 - a lost member or the group's timeout
            raise _lost(exc, column, rank) from None


def _lost(exc: Exception, column: Column, rank: int) -> LostContactError:
    cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return LostContactError(
        f"the exchange of shards with replicas {list(column.ranks)} failed: {cause}",
        rank=rank,
        hint="A replica died or hung while shards were being shared (see its log); TP_LOADER_TIMEOUT_S sets "
        "the wait, share='none' reads on every node without exchanging",
    )


#: The groups of each column, per (ranks, timeout), kept for later loads like the control group.
_GROUPS: dict[tuple[tuple[int, ...], float], Any] = {}


def column_groups(columns: list[tuple[int, ...]], me: int, timeout_s: float) -> Any:
    """The gloo group of this rank's column. ``dist.new_group`` is a collective over the whole job, so
    every rank creates every column's group, in the same order; only its own is kept in use.

    Raises:
        DistributedError: a group could not be formed.
    """
    mine = None
    for ranks in columns:
        key = (ranks, timeout_s)
        group = _GROUPS.get(key)
        if group is None or not group_alive(group):
            try:
                group = dist.new_group(list(ranks), timeout=datetime.timedelta(seconds=timeout_s), backend="gloo")
            except Exception as exc:  # noqa: BLE001 - a missing peer surfaces here
                raise DistributedError(
                    f"cannot form the replica group {list(ranks)}: {exc}",
                    rank=me,
                    hint="Check that every rank of the job calls tp_loader.load with the same mesh",
                ) from None
            _GROUPS[key] = group
        if me in ranks:
            mine = group
    return mine


def share_with_replicas(
    ctx: Context,
    items: tuple[TensorPlan, ...],
    nodes: tuple[str, ...],
    read: Callable[[tuple[TensorPlan, ...]], tuple[dict[str, torch.Tensor], ReadStats]],
    dtype: torch.dtype | None,
) -> tuple[dict[str, torch.Tensor], ReadStats, int]:
    """The read stage of ``share="job"``: this rank's column, its group, and the exchange.

    Args:
        ctx: the load's context (a 2-D mesh over the whole job: control ranks are global ranks).
        items: this rank's plan.
        nodes: every rank's node name, by global rank.
        read: reads some items into owned CPU tensors.
        dtype: the load's conversion dtype.

    Returns:
        Every shard, what this rank read itself, and the bytes it received.
    """
    columns = ctx.columns()
    group = column_groups(columns, ctx.control_rank, ctx.timeout_s)
    ranks = columns[ctx.rank]
    column = Column(ranks, tuple(nodes[r] for r in ranks), ctx.control_rank)
    out = exchange(items, column, group, read, dtype, rank=ctx.control_rank)
    logger.debug(
        "rank %d read %d bytes and received %d from replicas %s",
        ctx.control_rank,
        out.stats.bytes_read,
        out.bytes_received,
        list(ranks),
    )
    return out.local, out.stats, out.bytes_received
