"""The public entry point: normalise arguments, then run the stages with every rank in step.

resolve → index → plan → (agree) → read → (agree) → place → tie → report
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.device_mesh import DeviceMesh

from . import env as envmod
from . import sharded, sharded_save
from .arguments import (
    Fingerprint,
    check_writable,
    conversion_dtype,
    dtype_name,
    normalise_device,
    normalise_dtype,
    normalise_keep,
    normalise_share,
    write_file,
)
from .demo import ensure_demo
from .dist import Context, host_name, make_context, open_control_group, run_agreed
from .errors import DistributedError, ReadError, TPLoaderError
from .index import Checkpoint, index_checkpoint
from .place import place
from .plan import LoadPlan, TensorPlan, TieDecision, plan_rank
from .read import ReadOptions, ReadStats, read_tensors
from .report import LoadReport, StageSeconds, build_report, rank_reports
from .resolve import call_within, find_weights, resolve_source
from .share import share_with_replicas
from .tie import apply_ties, identical_everywhere, local_tie_equality

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


#: Loads in one process run one at a time: each is a sequence of collectives on the loader's group, and
#: two interleaved sequences would pair the wrong calls across ranks. Concurrent callers wait here.
_ONE_LOAD_AT_A_TIME = threading.Lock()


def load(
    model: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    mesh: DeviceMesh | None = None,
    tp_dim: str = "tp",
    tp_size: int | None = None,
    share: str = "none",
    plan: str | os.PathLike[str] = "auto",
    mode: str | None = None,
    strict: bool = False,
    allow_unmatched: bool = False,
    report: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    zero_copy: bool | None = None,
    save_sharded: str | os.PathLike[str] | None = None,
    rebuild: bool = False,
    verify: bool = False,
    keep: str | Sequence[str] | None = None,
    _into: Destinations | None = None,
) -> LoadResult:
    """Loads a Hugging Face checkpoint into this rank's tensor-parallel shards.

    Call it on every rank. Under torchrun without a process group it initializes one (gloo on CPU,
    nccl on CUDA); with ``mesh`` it uses the caller's 1-D mesh; in a plain process it loads everything
    as plain tensors. Every argument is checked, and compared across ranks, before any file is read.
    Loads in one process run one at a time: threads calling ``load`` together are served in turn (make
    such calls in the same order on every rank).

    Args:
        model: a checkpoint directory or a Hub repository id; ``None`` loads the demo checkpoint.
        dtype: convert floating-point tensors to float32, bfloat16 or float16 (names such as ``"bf16"``
            work too); an fp8 dtype keeps fp8 weights as stored; ``None`` keeps every tensor as stored.
        device: ``"cpu"``, ``"cuda"`` (``cuda:LOCAL_RANK``) or ``"cuda:N"`` (default: the mesh's device,
            else ``cuda:LOCAL_RANK`` when CUDA is present, else the CPU).
        mesh: a 1-D device mesh over the tensor-parallel ranks, or a 2-D mesh over the whole job whose
            ``tp_dim`` dimension is tensor-parallel and whose other dimension holds replicas: the shards are
            then DTensors on the whole mesh, ``Replicate()`` on the replicas' dimension.
        tp_dim: the name of a 2-D mesh's tensor-parallel dimension.
        tp_size: without ``mesh``, under torchrun: the tensor-parallel degree when smaller than the job; the job
            is then ``world_size / tp_size`` replicas on a ``("dp", "tp")`` mesh (``result.mesh``).
        share: ``"none"``: every rank reads its own slices. ``"job"``: with replicas, the nodes split the
            reading of what several replicas need, and the shards reach the others by broadcasts over each
            replica group (bitwise the same shards; the report counts bytes read per node and received).
            CPU shards only, owned memory (no zero-copy views).
        plan: ``"auto"`` (by config.json), a built-in plan name, or a path to a plan file.
        mode: one of the plan's modes, merged over it: ``"ep"`` in the MoE plans loads stacked
            experts divided whole among the ranks (expert parallelism) instead of sharding every
            expert (the default, tensor-parallel experts).
        strict: raise when keys are missing, unexpected or mismatched, before reading any tensor data.
        allow_unmatched: load even when most of the checkpoint's bytes are in tensors the plan does not
            expect (replicated on every rank); by default that is a :class:`PlanError`.
        report: rank 0 writes the report as JSON to this path (checked for writability first).
        revision: Hub branch, tag or commit.
        cache_dir: Hub cache directory.
        progress: show a progress bar on rank 0 for long loads.
        zero_copy: on CPU, without a dtype change, keep shards as views of a private copy-on-write
            mapping of the file instead of copying them: pages are read on first use and writes
            never reach the file. Row shards and replicated tensors are contiguous views, column
            shards strided views (``is_contiguous()`` is False; matmuls take them as they are);
            packed shards and converter targets are still copied. Default: on (``TP_LOADER_ZERO_COPY=0``
            turns it off): measured faster and lighter (docs/architecture.md); ``False`` gives every
            shard memory of its own, for callers that rewrite checkpoint files in place.
        save_sharded: also write every rank's shards to this directory (one file per rank and a manifest,
            README "Fast restarts"), from which ``load(DIR)`` restarts by reading each rank's file whole.
        rebuild: for a pre-sharded ``model``: when it does not match this load (world size, plan, dtype,
            source changed, a rank file missing or altered), rebuild it from its source instead of refusing.
        verify: for a pre-sharded ``model``: check every byte of the rank's file against its checksums
            (sizes and headers are always checked).
        keep: stored keys the plan skips (``[[skip]]``: tensors no model of the architecture runs, such as
            DeepSeek-V3's multi-token-prediction layer ``mtp``) to load anyway: skip-entry names or key globs.
            Kept keys that a plan rule matches are placed by it; others load replicated.
        _into: for :func:`tp_loader.load_into`: given the agreed plan, returns the tensors to read
            each key into (raising a TPLoaderError, agreed on every rank before any read, if they do
            not fit).

    Returns:
        The :class:`LoadResult`.

    Raises:
        TPLoaderError: any failure on any rank, raised identically on every rank (an
            :class:`ArgumentError` for a bad argument, a :class:`DistributedError` when ranks pass
            different arguments).
    """
    with _ONE_LOAD_AT_A_TIME:
        start = time.perf_counter()
        launch = envmod.launch_env()
        error: TPLoaderError | None = None
        kept: tuple[str, ...] = ()
        wanted: torch.dtype | None = None
        target: torch.device | None = None
        try:
            settings = envmod.settings(launch.local_world_size)
            wanted = normalise_dtype(dtype)
            target = normalise_device(device, launch.local_rank)
            share = normalise_share(share, target)
            kept = normalise_keep(keep)
        except TPLoaderError as exc:  # agreed below, once the ranks can talk
            error = exc
            settings = envmod.default_settings(launch.local_world_size)
        if zero_copy is not None:
            settings = dataclasses.replace(settings, zero_copy=zero_copy)
        ctx = open_control_group(make_context(mesh, target, launch, settings, tp_dim, tp_size))
        arguments = Fingerprint(
            dtype_name(wanted),
            os.fspath(plan),
            mode,
            strict,
            allow_unmatched,
            settings.zero_copy,
            ctx.device.type,
            share,
            kept,
        )

        def check() -> tuple[str, Fingerprint, bool, sharded.Manifest | None]:
            if error is not None:
                raise error
            if report is not None and ctx.leader:
                check_writable(report, what="report")
            presharded = sharded.find_manifest(model)  # a save-sharded directory, recognised before resolve
            return host_name(), arguments, model is not None and os.path.isdir(model), presharded

        (*_, presharded), seen = run_agreed(
            ctx, "arguments", check, lambda result: (*result[:3], sharded.digest(result[3]))
        )
        _refuse_differing_arguments([fingerprint for _, fingerprint, *_ in seen])
        nodes = [host for host, *_ in seen]
        hosts = nodes if not all(local for _, _, local, _ in seen) else None
        options = _LoadOptions(plan, mode, strict, allow_unmatched, revision, cache_dir, progress and settings.progress)
        options = dataclasses.replace(
            options,
            save_sharded=save_sharded,
            rebuild=rebuild,
            verify=verify,
            share=share,
            nodes=tuple(nodes),
            keep=kept,
        )
        sharded.refuse_differing(presharded, [digest for *_, digest in seen], model, options)
        result = _load(
            ctx, model, wanted, hosts, options, settings=settings, start=start, into=_into, presharded=presharded
        )
        if report is not None:
            _write_report(ctx, result.report, Path(report))
        return result


#: Given the agreed plan and the load's context, the tensors to read each key into.
Destinations = Callable[[LoadPlan, Context], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class _LoadOptions:
    plan: str | os.PathLike[str]
    mode: str | None
    strict: bool
    allow_unmatched: bool
    revision: str | None
    cache_dir: str | os.PathLike[str] | None
    progress: bool
    save_sharded: str | os.PathLike[str] | None = None
    rebuild: bool = False
    verify: bool = False
    share: str = "none"
    nodes: tuple[str, ...] = ()  # each rank's node, in the order of the loader's collectives
    keep: tuple[str, ...] = ()


def _refuse_differing_arguments(every: list[Fingerprint]) -> None:
    """Every rank's arguments must equal rank 0's (the error, naming the first differing rank, is the
    same on every rank)."""
    differing = [r for r, theirs in enumerate(every) if theirs != every[0]]
    if differing:
        what = "; ".join(every[differing[0]].differences(every[0]))
        raise DistributedError(
            f"ranks {differing} passed different arguments than rank 0 ({what})",
            rank=differing[0],
            hint="Call tp_loader.load with the same dtype, plan, mode, strict, allow_unmatched, zero_copy, keep and "
            "device type on every rank",
        )


def _load(
    ctx: Context,
    model: str | os.PathLike[str] | None,
    wanted: torch.dtype | None,
    hosts: list[str] | None,
    options: _LoadOptions,
    *,
    settings: envmod.Settings,
    start: float,
    into: Destinations | None = None,
    presharded: sharded.Manifest | None = None,
) -> LoadResult:
    if presharded is not None:  # a save-sharded directory: each rank reads its own file
        restarted = sharded.restart(ctx, presharded, wanted, options, settings=settings, start=start, into=into)
        if restarted is not None:
            return LoadResult(*restarted, ctx.mesh)
        model, wanted, options = sharded.rebuild_arguments(presharded, wanted, options)  # rebuild=True: stale
    # A directory every rank sees needs no fetch: it is resolved inside the plan round (no rounds of its own).
    root = None
    if hosts is not None:
        root = resolve_on_ranks(
            ctx, model, hosts, revision=options.revision, cache_dir=options.cache_dir, demo_dir=settings.demo_dir
        )

    def index_and_plan() -> tuple[Checkpoint, LoadPlan]:
        found = root if root is not None else resolve_source(model, revision=options.revision, fetch=False)
        checkpoint = index_checkpoint(find_weights(found))
        load_plan = plan_rank(
            checkpoint,
            ctx.world_size,
            ctx.rank,
            plan=options.plan,
            mode=options.mode,
            model=str(found),
            dtype=wanted,
            strict=options.strict,
            allow_unmatched=options.allow_unmatched,
            keep=options.keep,
        )
        return checkpoint, load_plan

    def bounded_index_and_plan() -> tuple[Checkpoint, LoadPlan, dict[str, torch.Tensor] | None]:
        """Reading headers on a hung network filesystem must not block this rank past the timeout. The
        destinations are checked here too, so that their refusal is agreed in the same round."""
        if ctx.control_size == 1:  # no peer waits on this rank
            checkpoint, load_plan = index_and_plan()
        else:
            checkpoint, load_plan = call_within(
                ctx.timeout_s / 2,
                index_and_plan,
                lambda: ReadError(
                    f"reading the checkpoint's headers did not finish within {ctx.timeout_s / 2:g} s (half of "
                    "TP_LOADER_TIMEOUT_S, so that every rank hears of it within the timeout)",
                    file=str(root if root is not None else model),
                    hint="The storage is not answering (a stalled network filesystem?); check the mount, or raise "
                    "TP_LOADER_TIMEOUT_S for very slow storage",
                ),
            )
        # Ties follow from the config and the keys, which the fingerprints below compare: this rank's
        # decisions are rank 0's whenever the load goes on.
        return checkpoint, load_plan, into(load_plan, ctx) if into is not None else None

    # every rank's fingerprint, and rank 0's tie decisions, which every rank then uses
    (checkpoint, load_plan, destinations), seen = run_agreed(
        ctx, "plan", bounded_index_and_plan, lambda result: (result[0].fingerprint(), result[1].ties)
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
    planned = time.perf_counter()
    if ctx.leader:
        _warn_key_problems(load_plan)

    read_options = ReadOptions.from_settings(
        settings, conversion_dtype(wanted), ctx.device, progress=options.progress and ctx.leader
    )

    def read(items: tuple[TensorPlan, ...], how: ReadOptions) -> tuple[dict[str, torch.Tensor], ReadStats]:
        return read_tensors(checkpoint.root, checkpoint.format, items, how, checkpoint.file_sizes, destinations)

    def read_and_place() -> tuple[dict[str, torch.Tensor], ReadStats, list[bool], int, StageSeconds]:
        received = 0
        with _intra_op_threads(settings.num_threads):
            if options.share == "job" and ctx.num_replicas > 1:
                owned = dataclasses.replace(read_options, zero_copy=False, progress=False)
                local, stats, received = share_with_replicas(
                    ctx, load_plan.tensors, options.nodes, lambda i: read(i, owned), read_options.dtype
                )
                # the exchange counts what this rank read itself; its slices are the plan's, however they arrived
                stats = dataclasses.replace(stats, bytes_planned=load_plan.read_bytes)
            else:
                local, stats = read(load_plan.tensors, read_options)
        placing = time.perf_counter()
        state_dict = place(local, load_plan.tensors, ctx.mesh, ctx.tp_axis)
        tying = time.perf_counter()
        apply_ties(state_dict, load_plan.ties)  # a tie stored on both sides once every rank's equality is known
        tie_equal = local_tie_equality(local, load_plan.ties)
        stats = _with_touched_views(stats, local, load_plan.ties, destinations)
        stages = StageSeconds(plan=planned - start, place=tying - placing, tie=time.perf_counter() - tying)
        return state_dict, stats, tie_equal, received, stages

    # one round agrees on the read's outcome and gathers the report's figures (place and ties talk to no rank)
    (state_dict, *_), gathered = run_agreed(
        ctx, "read", read_and_place, lambda result: (*result[1:4], time.perf_counter() - start, result[4])
    )
    tie_equal = [eq for _, eq, *_ in gathered]
    both = tuple(t for t in load_plan.ties if t.stored == "both")
    apply_ties(state_dict, both, identical_everywhere(tie_equal))
    if options.save_sharded is not None:  # every rank's shards to a pre-sharded directory
        sharded_save.save_on_ranks(ctx, options, checkpoint, load_plan, state_dict, wanted, settings, tie_equal, start)
    ranks = rank_reports(
        [(s, sec, got) for s, _, got, sec, _ in gathered],
        options.nodes,
        ctx.replica_of(),
        [stages for *_, stages in gathered],
    )
    report = build_report(
        load_plan,
        dtype=dtype_name(wanted),
        device=ctx.device.type,
        ranks=ranks,
        tie_equal=[eq for _, eq, *_ in gathered],
    )
    if ctx.leader:
        logger.info("loaded from %s: %s", report.model, report.summary())
        for tie in report.ties:
            if tie.identical is False:
                logger.warning(
                    "tied keys %s and %s are both stored and differ: each keeps its own values, as transformers "
                    "does (set tie_word_embeddings=False in config.json to say so)",
                    tie.source,
                    tie.target,
                )
    return LoadResult(state_dict, report, ctx.mesh)


def _with_touched_views(
    stats: ReadStats,
    local: dict[str, torch.Tensor],
    ties: tuple[TieDecision, ...],
    destinations: dict[str, torch.Tensor] | None,
) -> ReadStats:
    """``stats`` with the zero-copy views that comparing a tie's two stored sides read moved from mapped to read:
    those pages came from storage during the load."""
    if not stats.bytes_mapped:
        return stats
    sides = {key for t in ties if t.stored == "both" for key in (t.source, t.target)}
    touched = sum(
        local[key].nbytes
        for key in sides
        if not (destinations and key in destinations) and local[key].untyped_storage().is_shared()
    )
    return dataclasses.replace(stats, bytes_read=stats.bytes_read + touched, bytes_mapped=stats.bytes_mapped - touched)


def _write_report(ctx: Context, report: LoadReport, path: Path) -> None:
    """Rank 0 writes the report; a failure is every rank's error."""

    def write() -> None:
        if ctx.leader:
            write_file(path, report.to_json(), what="report")

    run_agreed(ctx, "write report", write)


def resolve_on_ranks(
    ctx: Context,
    model: str | os.PathLike[str] | None,
    hosts: list[str],
    *,
    revision: str | None,
    cache_dir: str | os.PathLike[str] | None,
    demo_dir: str,
) -> Path:
    """Resolves the source; the first rank of each node fetches (download or demo generation) while
    the node's other ranks wait, then look only at what is local."""
    fetcher = hosts.index(hosts[ctx.control_rank]) == ctx.control_rank

    def fetch(allowed: bool) -> Path:
        if model is None:
            return ensure_demo(demo_dir) if allowed else Path(demo_dir)
        deadline = ctx.timeout_s / 2 if allowed and ctx.control_size > 1 else None
        return resolve_source(model, revision=revision, cache_dir=cache_dir, fetch=allowed, deadline_s=deadline)

    fetched, _ = run_agreed(ctx, "fetch", lambda: fetch(True) if fetcher else None)
    root, _ = run_agreed(ctx, "resolve", lambda: fetched if fetcher else fetch(False))
    return root


def _warn_key_problems(load_plan: LoadPlan) -> None:
    """One warning that counts the missing, unexpected and mismatched keys and the plan rules that
    matched nothing, naming the first few of each; the full lists are in the report (its table and
    JSON) and at debug level."""
    problems = [
        ("unexpected (loaded replicated)", load_plan.unexpected),
        ("missing", load_plan.missing),
        ("mismatched (not loaded)", tuple(m.describe() for m in load_plan.mismatched)),
        ("plan rules matching nothing", load_plan.unused_rules),
    ]
    found = [(title, keys) for title, keys in problems if keys]
    if not found:
        return
    summary = "; ".join(
        f"{len(keys)} {title}: {', '.join(keys[:3])}{', …' if len(keys) > 3 else ''}" for title, keys in found
    )
    logger.warning("%s with plan %s: %s", load_plan.model, load_plan.plan_name, summary)
    for title, keys in found:
        logger.debug("%s, all %d: %s", title, len(keys), ", ".join(keys))


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
