"""The public entry point: normalise arguments, then run the stages with every rank in step.

resolve → index → plan → (agree) → read → (agree) → place → tie → report
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.device_mesh import DeviceMesh

from . import env as envmod
from .demo import ensure_demo
from .dist import Context, agree, host_name, make_context, open_control_group, run_agreed
from .errors import DistributedError, StrictLoadError, TPLoaderError
from .index import Checkpoint, index_checkpoint
from .place import place
from .plan import LoadPlan, make_plan
from .read import ReadOptions, read_tensors
from .report import LoadReport, RankReport, build_report
from .resolve import find_weights, resolve_source
from .spec import select_spec
from .tie import apply_ties, local_tie_equality

logger = logging.getLogger("tp_loader")


@dataclass(frozen=True)
class LoadResult:
    """What :func:`load` returns on every rank.

    Attributes:
        state_dict: checkpoint key → DTensor (plain tensors in a single process without a mesh), every
            stored tensor plus tied targets; tied keys share one tensor object.
        report: the :class:`LoadReport`, identical on every rank.
        mesh: the device mesh the DTensors live on (``None`` without one).
    """

    state_dict: dict[str, torch.Tensor]
    report: LoadReport
    mesh: DeviceMesh | None


def load(
    model: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    mesh: DeviceMesh | None = None,
    plan: str | os.PathLike[str] = "auto",
    mode: str | None = None,
    strict: bool = False,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    zero_copy: bool | None = None,
) -> LoadResult:
    """Loads a Hugging Face checkpoint into this rank's tensor-parallel shards.

    Call it on every rank. Under torchrun without a process group it initializes one (gloo on CPU,
    nccl on CUDA); with ``mesh`` it uses the caller's 1-D mesh; in a plain process it loads everything
    as plain tensors.

    Args:
        model: a checkpoint directory or a Hub repository id; ``None`` loads the demo checkpoint.
        dtype: convert floating-point tensors to this dtype (``None``: as stored).
        device: where to place shards (default: the mesh's device, else ``cuda:LOCAL_RANK`` or CPU).
        mesh: a 1-D device mesh over the tensor-parallel ranks.
        plan: ``"auto"`` (by config.json), a built-in plan name, or a path to a plan file.
        mode: one of the plan's modes, merged over it: ``"ep"`` in the MoE plans loads stacked
            experts divided whole among the ranks (expert parallelism) instead of sharding every
            expert (the default, tensor-parallel experts).
        strict: raise when keys are missing, unexpected or mismatched, before reading any tensor data.
        revision: Hub branch, tag or commit.
        cache_dir: Hub cache directory.
        progress: show a progress bar on rank 0 for long loads.
        zero_copy: on CPU, without a dtype change, keep shards as views of a private copy-on-write
            mapping of the file instead of copying them: pages are read on first use and writes
            never reach the file. Row shards and replicated tensors are contiguous views, column
            shards strided views (``is_contiguous()`` is False; matmuls take them as they are);
            packed shards and converter targets are still copied. Default: ``TP_LOADER_ZERO_COPY`` (off).

    Returns:
        The :class:`LoadResult`.

    Raises:
        TPLoaderError: any failure on any rank, raised identically on every rank.
    """
    start = time.perf_counter()
    launch = envmod.launch_env()
    settings = envmod.settings(launch.local_world_size)
    if zero_copy is not None:
        settings = dataclasses.replace(settings, zero_copy=zero_copy)
    wanted = normalise_dtype(dtype)
    ctx = open_control_group(make_context(mesh, device, launch, settings))
    return _load(
        ctx,
        model,
        wanted,
        plan=plan,
        mode=mode,
        strict=strict,
        revision=revision,
        cache_dir=cache_dir,
        progress=progress and settings.progress,
        settings=settings,
        start=start,
    )


def _load(
    ctx: Context,
    model: str | os.PathLike[str] | None,
    wanted: torch.dtype | None,
    *,
    plan: str | os.PathLike[str],
    mode: str | None,
    strict: bool,
    revision: str | None,
    cache_dir: str | os.PathLike[str] | None,
    progress: bool,
    settings: envmod.Settings,
    start: float,
) -> LoadResult:

    root = _resolve(ctx, model, revision=revision, cache_dir=cache_dir, demo_dir=settings.demo_dir)

    def index_and_plan() -> tuple[Checkpoint, LoadPlan]:
        checkpoint = index_checkpoint(find_weights(root))
        spec = select_spec(plan, checkpoint.config, model=str(root), mode=mode)
        load_plan = make_plan(
            checkpoint, spec, ctx.world_size, ctx.rank, model=str(root), dequantize=wants_dequantize(wanted)
        )
        if strict:
            _refuse_key_problems(load_plan)
        return checkpoint, load_plan

    # every rank's fingerprint, and rank 0's tie decisions, which every rank then uses
    (checkpoint, load_plan), seen = run_agreed(
        ctx, "plan", index_and_plan, lambda result: (result[0].fingerprint(), result[1].ties)
    )
    fingerprints = [fingerprint for fingerprint, _ in seen]
    load_plan = dataclasses.replace(load_plan, ties=seen[0][1])
    if len(set(fingerprints)) > 1:
        differing = [r for r, fp in enumerate(fingerprints) if fp != fingerprints[0]]
        raise DistributedError(
            f"ranks {differing} see a different checkpoint (config or headers) than rank 0",
            rank=differing[0],
            hint="Make every rank see the same files (a shared filesystem or identical copies)",
        )
    if ctx.rank == 0:
        _warn_key_problems(load_plan)

    options = ReadOptions(
        wanted,
        ctx.device,
        settings.num_threads,
        settings.max_inflight_bytes,
        progress=progress and ctx.rank == 0,
        reader=settings.reader,
        fadvise=settings.fadvise,
        zero_copy=settings.zero_copy,
    )
    with _intra_op_threads(settings.num_threads):
        (local, stats), _ = run_agreed(
            ctx, "read", lambda: read_tensors(checkpoint.root, checkpoint.format, load_plan.tensors, options)
        )
    state_dict = place(local, load_plan.tensors, ctx.mesh)
    apply_ties(state_dict, load_plan.ties)

    payload = (stats, local_tie_equality(local, load_plan.ties), time.perf_counter() - start)
    gathered = agree(ctx, None, payload, stage="report")
    ranks = [
        RankReport(r, s.bytes_read, s.num_tensors, s.seconds, seconds, s.zero_copy_tensors)
        for r, (s, _, seconds) in enumerate(gathered)
    ]
    report = build_report(
        load_plan,
        dtype=_dtype_name(wanted),
        device=ctx.device.type,
        ranks=ranks,
        tie_equal=[eq for _, eq, _ in gathered],
    )
    if ctx.rank == 0:
        logger.info("loaded %d tensors from %s in %.2f s", report.num_tensors, report.model, report.seconds)
        for tie in report.ties:
            if tie.identical is False:
                logger.warning(
                    "tied keys %s and %s are both stored and differ; %s is used for both",
                    tie.source,
                    tie.target,
                    tie.source,
                )
    return LoadResult(state_dict, report, ctx.mesh)


def _resolve(
    ctx: Context,
    model: str | os.PathLike[str] | None,
    *,
    revision: str | None,
    cache_dir: str | os.PathLike[str] | None,
    demo_dir: str,
) -> Path:
    """Resolves the source; the first rank of each node fetches (download or demo generation) while
    the node's other ranks wait, then look only at what is local."""
    hosts = agree(ctx, None, host_name(), stage="start")
    fetcher = hosts.index(hosts[ctx.rank]) == ctx.rank

    def fetch(allowed: bool) -> Path:
        if model is None:
            return ensure_demo(demo_dir) if allowed else Path(demo_dir)
        return resolve_source(model, revision=revision, cache_dir=cache_dir, fetch=allowed)

    fetched, _ = run_agreed(ctx, "fetch", lambda: fetch(True) if fetcher else None)
    root, _ = run_agreed(ctx, "resolve", lambda: fetched if fetcher else fetch(False))
    return root


def _refuse_key_problems(load_plan: LoadPlan) -> None:
    """``strict=True``: any missing, unexpected or mismatched key is an error, raised before reading."""
    problems = {
        "missing": list(load_plan.missing),
        "unexpected": list(load_plan.unexpected),
        "mismatched": [m.describe() for m in load_plan.mismatched],
    }
    if any(problems.values()):
        summary = "; ".join(
            f"{len(v)} {k}: {', '.join(v[:5])}{' …' if len(v) > 5 else ''}" for k, v in problems.items() if v
        )
        raise StrictLoadError(
            f"strict load of {load_plan.model} refused: {summary}",
            hint="Fix the checkpoint or the plan, or load with strict=False to see the full report",
        )


def _warn_key_problems(load_plan: LoadPlan) -> None:
    """Names every missing, unexpected (with its size) and mismatched key, and every plan rule that
    matched nothing, in one warning each."""
    if load_plan.unexpected:
        sizes = {t.key: t.info.nbytes for t in load_plan.tensors}
        listed = ", ".join(
            f"{k} ({sizes[k]} B{', no plan rule' if k in load_plan.unmatched else ''})" for k in load_plan.unexpected
        )
        logger.warning(
            "%d unexpected keys in %s are loaded replicated: %s", len(load_plan.unexpected), load_plan.model, listed
        )
    if load_plan.missing:
        logger.warning(
            "%d keys missing from %s: %s", len(load_plan.missing), load_plan.model, ", ".join(load_plan.missing)
        )
    if load_plan.unused_rules:
        logger.warning(
            "plan %s has rules that match no key of %s: %s",
            load_plan.plan_name,
            load_plan.model,
            ", ".join(load_plan.unused_rules),
        )
    if load_plan.mismatched:
        listed = ", ".join(m.describe() for m in load_plan.mismatched)
        logger.warning(
            "%d keys of %s contradict the config and are not loaded: %s",
            len(load_plan.mismatched),
            load_plan.model,
            listed,
        )


class _intra_op_threads:
    """Caps torch's intra-op threads while loading (the reader threads already use the cores)."""

    def __init__(self, num_threads: int) -> None:
        self._num_threads = num_threads
        self._saved = 0

    def __enter__(self) -> None:
        self._saved = torch.get_num_threads()
        torch.set_num_threads(max(1, min(self._saved, self._num_threads)))

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self._saved)


def wants_dequantize(dtype: torch.dtype | None) -> bool:
    """Whether a requested dtype means block-fp8 weights are dequantized on load (any wider float)."""
    return dtype is not None and dtype.is_floating_point and dtype.itemsize > 1


def normalise_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise TPLoaderError(
            f"unknown dtype {dtype!r}", hint="Use a torch dtype name such as bfloat16, float16 or float32"
        )
    return value


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")
