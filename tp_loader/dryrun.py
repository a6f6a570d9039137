"""A dry run: plan every rank of a load in one process, reading headers only.

Runs the first stages of a load (resolve, index, plan) once per rank, without a process group and
without reading tensor data, and sums up what each rank would read and hold.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from . import env as envmod
from .arguments import conversion_dtype, dtype_name, normalise_dtype, normalise_keep
from .demo import ensure_demo
from .errors import ArgumentError
from .index import Checkpoint, index_checkpoint
from .plan import LoadPlan, plan_ranks
from .read import target_dtype
from .report import PlanSummary, RankPlan, key_account, placements
from .resolve import find_weights, resolve_source


def plan_load(
    model: str | os.PathLike[str] | None = None,
    *,
    world_size: int,
    dtype: torch.dtype | str | None = None,
    plan: str | os.PathLike[str] = "auto",
    mode: str | None = None,
    strict: bool = False,
    allow_unmatched: bool = False,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    keep: str | Sequence[str] | None = None,
) -> PlanSummary:
    """Plans a load over ``world_size`` ranks without loading: which bytes each rank would read, how
    each tensor would be placed, each rank's local shapes and memory. No process group is created and
    no tensor data is read (only headers, config.json and the index), so it runs on a laptop for any
    world size.

    Args:
        model: a checkpoint directory or a Hub repository id; ``None`` plans the demo checkpoint.
        world_size: the number of tensor-parallel ranks to plan for.
        dtype, plan, mode, strict, allow_unmatched, revision, cache_dir, keep: as for :func:`tp_loader.load`,
            and checked the same way (``strict`` refuses key problems here as a load would).

    Returns:
        The :class:`PlanSummary`; ``to_json()`` gives a load report's schema with placements.

    Raises:
        TPLoaderError: what :func:`tp_loader.load` would raise before reading tensor data.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ArgumentError(
            f"world_size must be a whole number of ranks of at least 1, got {world_size!r}",
            key="world_size",
            hint="Pass the number of tensor-parallel ranks",
        )
    wanted = normalise_dtype(dtype)
    kept = normalise_keep(keep)
    settings = envmod.settings(1)
    _, plans = plan_every_rank(
        model,
        world_size,
        wanted,
        settings,
        plan=plan,
        mode=mode,
        strict=strict,
        allow_unmatched=allow_unmatched,
        revision=revision,
        cache_dir=cache_dir,
        keep=kept,
    )
    ranks = tuple(_rank_plan(p, conversion_dtype(wanted), settings.max_inflight_bytes) for p in plans)
    local_shapes = [_local_shapes(p) for p in plans]
    account = key_account(plans[0], dtype=dtype_name(wanted))
    account["placements"] = placements(plans[0], local_shapes)
    return PlanSummary(**account, ranks=ranks)


def plan_every_rank(
    model: str | os.PathLike[str] | None,
    world_size: int,
    wanted: torch.dtype | None,
    settings: envmod.Settings,
    *,
    plan: str | os.PathLike[str],
    mode: str | None,
    strict: bool,
    allow_unmatched: bool,
    revision: str | None,
    cache_dir: str | os.PathLike[str] | None,
    keep: tuple[str, ...] = (),
) -> tuple[Checkpoint, list[LoadPlan]]:
    """Resolves and indexes ``model`` in this process and plans each of ``world_size`` ranks (no process group,
    no tensor data): what a dry run prints and what ``save-sharded --tp N`` writes rank by rank."""
    root = (
        ensure_demo(settings.demo_dir)
        if model is None
        else resolve_source(model, revision=revision, cache_dir=cache_dir)
    )
    checkpoint = index_checkpoint(find_weights(root))
    plans = plan_ranks(
        checkpoint,
        world_size,
        range(world_size),
        plan=plan,
        mode=mode,
        model=str(root),
        dtype=wanted,
        strict=strict,
        allow_unmatched=allow_unmatched,
        keep=keep,
    )
    return checkpoint, plans


def _local_shapes(load_plan: LoadPlan) -> list[tuple[int, ...]]:
    """Each tensor's local shape, computed once per distinct slice and stored shape (see :func:`_rank_plan`)."""
    shapes: dict[tuple[int, tuple[int, ...]], tuple[int, ...]] = {}
    out = []
    for item in load_plan.tensors:
        memo = (id(item.slice), item.info.shape)
        if (shape := shapes.get(memo)) is None:
            shape = shapes[memo] = item.local_shape
        out.append(shape)
    return out


def _rank_plan(load_plan: LoadPlan, dtype: torch.dtype | None, max_inflight_bytes: int) -> RankPlan:
    # Summed per distinct (slice, shape, dtype) rather than per tensor: a rank's 90k tensors in DeepSeek-V3 share a
    # few hundred slices (the planner memoizes them by rule and shape), and the ids are stable while the plan lives.
    sizes: dict[tuple[int, tuple[int, ...], torch.dtype], tuple[int, int]] = {}
    shard_bytes = read_bytes = 0
    for item in load_plan.tensors:
        info = item.info
        memo = (id(item.slice), info.shape, info.dtype)
        if (found := sizes.get(memo)) is None:
            numel = math.prod(item.slice.local_shape(info.shape))
            found = sizes[memo] = (numel * target_dtype(info.dtype, dtype).itemsize, numel * info.dtype.itemsize)
        shard_bytes += found[0]
        plain = item.quant is None and item.scale is None and not info.segments  # reads exactly its slice
        read_bytes += found[1] if plain else item.read_bytes
    return RankPlan(
        load_plan.rank,
        read_bytes,
        len(load_plan.tensors),
        shard_bytes,
        shard_bytes + min(max_inflight_bytes, read_bytes),
    )
