"""Pre-sharded directories: each rank's shards written once, then read back by that rank in one sequential read.

``load(MODEL, save_sharded=OUT)`` (or ``python -m tp_loader save-sharded MODEL OUT --tp N``) writes, for a world
size N, one safetensors file per rank, ``rank-{r:05d}-of-{N:05d}.safetensors``, holding exactly the local shards a
load gives that rank, and a manifest, ``tp_loader-sharded.json``: format version, tp_loader version, world size, the
load's arguments, the plan's name and each rank's layout digest, dtype, the save's id (also in every rank file's
header), the source checkpoint (its directory, its files' names, sizes, modification times and content
fingerprints, its config and header index) and each rank file's size, header digest and block checksums. Every file
is written under a temporary name and renamed into place once every rank has written its own; the manifest comes
last, so a directory without one is never taken for a complete one. The format and the manifest's parsing, which
checks every field, are in :mod:`tp_loader.sharded_manifest`; the writer is :mod:`tp_loader.sharded_save`.

``load(OUT)`` recognises the manifest. Instead of resolving and indexing a checkpoint it re-plans the load from the
source index kept in the manifest (no I/O), and refuses (:class:`StaleShardsError`, on every rank, before any rank
reads data) unless the plan gives the layout the files were written for, the source (when still reachable) is
unchanged and this rank's file has the size and the header it was written with: the same save id and rank, the
manifest's digest, and byte ranges that pass a source header's validation. The rank then reads its file in file
order through the read stage and places the shards as a normal load does. Data checksums are checked on request
(``verify=True``): see docs/benchmarks.md for the measurement behind that.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import stat
import struct
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from . import env as envmod
from ._version import __version__
from .arguments import conversion_dtype, dtype_name, normalise_dtype
from .dist import Context, run_agreed
from .errors import ArgumentError, CheckpointError, DistributedError, ReadError, StaleShardsError
from .index import MAX_HEADER_BYTES, Checkpoint, read_safetensors_header
from .place import place
from .plan import LoadPlan, TensorPlan, plan_rank
from .read import ReadOptions, ReadStats, read_tensors, target_dtype
from .report import LoadReport, build_report, rank_reports
from .sharded_manifest import (
    FORMAT_VERSION,
    MANIFEST,
    SAFETENSORS_NAMES,
    Manifest,
    RankFile,
    content_fingerprint,
    read_exact,
)
from .sharded_manifest import find_manifest as find_manifest
from .sharded_manifest import rank_file as rank_file
from .spec import builtin_plan_paths
from .styles import Slice
from .tie import apply_ties, identical_everywhere

logger = logging.getLogger("tp_loader")

VERIFY_PIECE_BYTES = 1024 * 1024


def _rebuild_hint(source: str, out: Path, world_size: int) -> str:
    return (
        f"Re-run save-sharded (python -m tp_loader save-sharded {source} {out} --tp {world_size}), "
        "or load with rebuild=True (--rebuild) to rebuild it from the source"
    )


class LoadOptions(Protocol):
    """The load options this module reads (the loader's own options object)."""

    plan: str | os.PathLike[str]
    mode: str | None
    strict: bool
    allow_unmatched: bool
    progress: bool
    save_sharded: str | os.PathLike[str] | None
    rebuild: bool
    verify: bool
    nodes: tuple[str, ...]  # each rank's node, in the order of the loader's collectives


Options = TypeVar("Options", bound=LoadOptions)


def digest(manifest: Manifest | None) -> str | None:
    """What ranks compare to agree that they see the same manifest (or none)."""
    return manifest.digest if manifest is not None else None


def refuse_differing(
    manifest: Manifest | None, digests: list[str | None], model: str | os.PathLike[str] | None, options: LoadOptions
) -> None:
    """Checks, identically on every rank, what the ranks found at ``model`` (every rank's :func:`digest`).

    Raises:
        DistributedError: ranks see different manifests (or some none).
        ArgumentError: ``rebuild`` or ``verify`` for a model that is not a pre-sharded directory, or
            ``save_sharded`` for one that is.
    """
    differing = [r for r, found in enumerate(digests) if found != digests[0]]
    if differing:
        raise DistributedError(
            f"ranks {differing} see a different {MANIFEST} (or none) at the model path they pass than rank 0",
            rank=differing[0],
            hint="Make every rank see the same pre-sharded directory (a shared filesystem, or the same copy on each "
            "node)",
        )
    if manifest is None and (options.rebuild or options.verify):
        flag = "rebuild" if options.rebuild else "verify"
        raise ArgumentError(
            f"{flag}=True applies to a pre-sharded directory, and {model} has no {MANIFEST}",
            key=flag,
            hint="Pass the directory save-sharded wrote, or leave the flag off",
        )
    if manifest is not None and options.save_sharded is not None:
        raise ArgumentError(
            f"save_sharded={options.save_sharded} with a model that is already pre-sharded ({manifest.root})",
            key="save_sharded",
            hint="Load the source checkpoint with save_sharded=, or copy the directory",
        )


# ---------------------------------------------------------------------------------------------------------------
# restart: load from a pre-sharded directory


def restart(
    ctx: Context,
    manifest: Manifest,
    wanted: torch.dtype | None,
    options: LoadOptions,
    *,
    settings: envmod.Settings,
    start: float,
    into: Callable[[LoadPlan, Context], dict[str, torch.Tensor]] | None = None,
) -> tuple[dict[str, torch.Tensor], LoadReport] | None:
    """Loads this rank's shards from a pre-sharded directory: the same DTensors, ties and report as a load of the
    source with the arguments the directory was written with.

    Arguments left at their defaults (``dtype=None``, ``plan="auto"``, ``mode=None``) take the directory's; any
    given must give the same layout.

    Returns:
        The state dict and the report; ``None`` when ``options.rebuild`` and the directory does not match this
        load (every rank agrees): the caller then rebuilds it from the source (:func:`rebuild_arguments`).

    Raises:
        StaleShardsError: the directory does not match this load (format version, world size, plan or dtype, a
            changed source, a missing, resized or altered rank file), naming what differs.
        TPLoaderError: as a load (a strict load with key problems, a failed read), on every rank.
    """
    try:
        return _restart(ctx, manifest, wanted, options, settings=settings, start=start, into=into)
    except StaleShardsError as exc:
        if not options.rebuild:
            raise
        run_agreed(ctx, "rebuild", lambda stale=exc: _check_rebuildable(manifest, stale))
        if ctx.leader:
            logger.warning("%s; rebuilding it from %s", exc.message, manifest.source_root)
        return None


def rebuild_arguments(
    manifest: Manifest, wanted: torch.dtype | None, options: Options
) -> tuple[str, torch.dtype | None, Options]:
    """The source, dtype and options with which to rebuild ``manifest``'s directory: the caller's, and the
    directory's where the caller left the default."""
    saved = manifest.arguments
    dtype = wanted if wanted is not None else normalise_dtype(saved.get("dtype"))
    rebuilt = dataclasses.replace(
        options,
        plan=options.plan if os.fspath(options.plan) != "auto" else saved.get("plan", "auto"),
        mode=options.mode if options.mode is not None else saved.get("mode"),
        allow_unmatched=options.allow_unmatched or bool(saved.get("allow_unmatched")),
        save_sharded=manifest.root,
        rebuild=False,
        verify=False,
    )
    return manifest.source_root, dtype, rebuilt


def _check_rebuildable(manifest: Manifest, stale: StaleShardsError) -> None:
    if not Path(manifest.source_root).is_dir():
        raise StaleShardsError(
            f"{stale.message}; rebuild=True cannot rebuild it: its source {manifest.source_root} is gone",
            file=stale.file,
            key=stale.key,
            hint="Load the source checkpoint from where it is now with save_sharded=DIR",
        )


def _restart(
    ctx: Context,
    manifest: Manifest,
    wanted: torch.dtype | None,
    options: LoadOptions,
    *,
    settings: envmod.Settings,
    start: float,
    into: Callable[[LoadPlan, Context], dict[str, torch.Tensor]] | None,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    _, dtype, asked = rebuild_arguments(manifest, wanted, options)
    plan, mode, allow_unmatched = asked.plan, asked.mode, asked.allow_unmatched
    if os.fspath(plan) == "auto" and manifest.plan in builtin_plan_paths():
        plan = manifest.plan  # what "auto" chose: reading that one plan file is a third of a restart's planning
    conversion = conversion_dtype(dtype)

    def check() -> tuple[LoadPlan, RankFile, tuple[TensorPlan, ...], dict[str, torch.Tensor] | None]:
        _check_format(manifest, ctx.world_size)
        checkpoint = _source_checkpoint(manifest)
        _check_source(manifest)
        load_plan = plan_rank(
            checkpoint,
            ctx.world_size,
            ctx.rank,
            plan=plan,
            mode=mode,
            model=manifest.source_model,
            dtype=dtype,
            strict=options.strict,
            allow_unmatched=allow_unmatched,
        )
        entry = manifest.files[ctx.rank]
        if layout_digest(load_plan, conversion) != entry.layout_sha256:
            asking = {"dtype": dtype_name(dtype), "plan": load_plan.plan_name, "mode": mode}
            _refuse_layout(manifest, asking, entry)
        _check_rank_file(manifest, entry)
        items = _file_items(manifest, entry, load_plan, conversion)  # its header only: no rank has read data yet
        return load_plan, entry, items, into(load_plan, ctx) if into is not None else None

    # every rank's plan (and destinations, checked in the same round); rank 0's tie decisions, which every rank
    # then uses (as a load does)
    (load_plan, entry, items, destinations), seen = run_agreed(
        ctx, "check pre-sharded", check, lambda result: result[0].ties
    )
    load_plan = dataclasses.replace(load_plan, ties=seen[0])
    read_options = ReadOptions.from_settings(settings, conversion, ctx.device, progress=options.progress and ctx.leader)

    def read_and_place() -> tuple[dict[str, torch.Tensor], ReadStats]:
        _check_tie_equal(manifest, load_plan)
        if options.verify:
            _verify_blocks(manifest, entry, settings.num_threads)
        sizes = {entry.name: entry.size}
        local, stats = read_tensors(manifest.root, "safetensors", items, read_options, sizes, destinations)
        state_dict = place(local, load_plan.tensors, ctx.mesh, ctx.tp_axis)
        both = [t for t in load_plan.ties if t.stored == "both"]
        identical = identical_everywhere(manifest.tie_equal) if manifest.tie_equal else [False] * len(both)
        apply_ties(state_dict, load_plan.ties, identical)
        return state_dict, stats

    # one round agrees on the read and gathers the report's figures (place and ties talk to no rank)
    (state_dict, _), gathered = run_agreed(
        ctx, "read pre-sharded", read_and_place, lambda result: (result[1], time.perf_counter() - start)
    )
    ranks = rank_reports([(s, seconds, 0) for s, seconds in gathered], options.nodes, ctx.replica_of())
    # a tie stored on both sides was saved with each side's own values: whether they are equal is the manifest's
    tie_equal = [list(per_rank) for per_rank in manifest.tie_equal]
    report = build_report(load_plan, dtype=dtype_name(dtype), device=ctx.device.type, ranks=ranks, tie_equal=tie_equal)
    if ctx.leader:
        logger.info(
            "restarted %d tensors of %s from pre-sharded %s: read in %.2f s, %.2f s in all (slowest rank)",
            report.num_tensors,
            report.model,
            manifest.root,
            report.read_seconds,
            report.seconds,
        )
    return state_dict, report


def _stale(manifest: Manifest, message: str, *, file: Path | None = None, key: str | None = None) -> StaleShardsError:
    return StaleShardsError(
        message,
        file=str(file or manifest.path),
        key=key,
        hint=_rebuild_hint(manifest.source_root, manifest.root, manifest.world_size or 1),
    )


def _check_format(manifest: Manifest, world_size: int) -> None:
    if manifest.format_version != FORMAT_VERSION:
        raise _stale(
            manifest,
            f"pre-sharded directory is in format version {manifest.format_version} (written by tp_loader "
            f"{manifest.version}); this tp_loader ({__version__}) reads version {FORMAT_VERSION}",
        )
    if manifest.world_size != world_size:
        raise StaleShardsError(
            f"pre-sharded directory was written for {manifest.world_size} ranks; this load has {world_size}",
            file=str(manifest.path),
            hint=_rebuild_hint(manifest.source_root, manifest.root, world_size)
            + f" (or launch {manifest.world_size} ranks)",
        )


def _source_checkpoint(manifest: Manifest) -> Checkpoint:
    """The source as its headers were when the directory was written, from the manifest's copy (checked against
    the loader's own fingerprint of it, so an edited or damaged copy is refused)."""
    tensors = {info.key: info for info in manifest.tensors}
    checkpoint = Checkpoint(Path(manifest.source_model), manifest.source_format, manifest.config, tensors)
    if checkpoint.fingerprint() != manifest.source_fingerprint:
        raise _stale(manifest, "the manifest's copy of the source's config and headers does not match its digest")
    return checkpoint


def _check_source(manifest: Manifest) -> None:
    """Refuses when the source is still there but a file of it changed: its size or modification time, or else
    the few pages of it that :func:`tp_loader.sharded_manifest.content_fingerprint` hashes (a checkpoint rewritten
    in place with new weights keeps its headers; one copied over with its times kept keeps its times too)."""
    root = Path(manifest.source_root)
    if not root.is_dir():
        logger.debug("source %s is gone: not checked for changes", root)
        return
    for recorded in manifest.source_files:
        name, path = recorded.name, root / recorded.name
        try:
            st = path.stat()
        except OSError:
            raise _stale(manifest, f"the source changed since save-sharded: {name} is gone", file=path) from None
        if (st.st_size, st.st_mtime_ns) != (recorded.size, recorded.mtime_ns):
            raise _stale(
                manifest,
                f"the source changed since save-sharded: {name} is {st.st_size} bytes, modified "
                f"{format_time(st.st_mtime_ns)}; it was {recorded.size} bytes, modified "
                f"{format_time(recorded.mtime_ns)}",
                file=path,
            )
        if not stat.S_ISREG(st.st_mode):  # opening a FIFO would block
            raise _stale(manifest, f"the source changed since save-sharded: {name} is not a regular file", file=path)
        try:
            fingerprint = content_fingerprint(path, st.st_size)
        except OSError as exc:
            raise _stale(manifest, f"the source's {name} cannot be read: {exc.strerror or exc}", file=path) from None
        if fingerprint != recorded.fingerprint:
            raise _stale(
                manifest,
                f"the source changed since save-sharded: {name} has the same size ({st.st_size} bytes) and "
                "modification time but other content (copied over with times kept, as cp -p or rsync -t do)",
                file=path,
            )


def format_time(mtime_ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(mtime_ns / 1e9)) + f".{mtime_ns % 10**9:09d} UTC"


def _refuse_layout(manifest: Manifest, asking: dict[str, Any], entry: RankFile) -> None:
    saved = {"dtype": manifest.dtype, "plan": manifest.plan, "mode": manifest.arguments.get("mode")}
    differing = [f"{name} {saved[name]!r} → {asking[name]!r}" for name in saved if saved[name] != asking[name]]
    what = (
        ", ".join(differing)
        if differing
        else f"the plan gives other slices than when it was written (tp_loader {manifest.version} then, "
        f"{__version__} now, or the plan file changed)"
    )
    raise _stale(
        manifest, f"pre-sharded directory does not match this load's plan: {what}", file=manifest.root / entry.name
    )


def _check_rank_file(manifest: Manifest, entry: RankFile) -> None:
    path = manifest.root / entry.name
    try:
        st = path.stat()
    except FileNotFoundError:
        raise _stale(manifest, f"rank {entry.rank}'s file is missing", file=path) from None
    except OSError as exc:
        raise _stale(manifest, f"rank {entry.rank}'s file cannot be read: {exc.strerror or exc}", file=path) from None
    if not stat.S_ISREG(st.st_mode):  # opening a FIFO would block
        raise _stale(manifest, f"rank {entry.rank}'s file is not a regular file", file=path)
    if st.st_size != entry.size:
        raise _stale(manifest, f"rank file is {st.st_size} bytes; save-sharded wrote {entry.size}", file=path)


def _check_tie_equal(manifest: Manifest, load_plan: LoadPlan) -> None:
    both = sum(tie.stored == "both" for tie in load_plan.ties)
    for rank, per_rank in enumerate(manifest.tie_equal):
        if len(per_rank) != both:
            raise _stale(
                manifest,
                f"manifest field tie_equal[{rank}] lists {len(per_rank)} ties, and the plan stores {both} on both "
                "sides",
                key=f"tie_equal[{rank}]",
            )


def layout_digest(load_plan: LoadPlan, dtype: torch.dtype | None) -> str:
    """A digest of everything a rank's file holds and how it is placed: every key's style, sharded dim, ranges,
    global and local shape and dtype (``dtype``: the load's conversion dtype), the plan's name and the ties."""
    digest = hashlib.sha256(f"{load_plan.plan_name}|{load_plan.world_size}|{load_plan.rank}\n".encode())
    for item in load_plan.tensors:
        piece = item.slice
        digest.update(
            f"{item.key}|{item.style}|{piece.dim}|{piece.ranges}|{piece.global_shape}|{item.local_shape}|"
            f"{target_dtype(item.info.dtype, dtype)}\n".encode()
        )
    for tie in load_plan.ties:
        digest.update(f"tie|{tie.source}|{tie.target}|{tie.stored}\n".encode())
    return digest.hexdigest()


def _file_items(
    manifest: Manifest, entry: RankFile, load_plan: LoadPlan, dtype: torch.dtype | None
) -> tuple[TensorPlan, ...]:
    """This rank's file's tensors as whole-tensor reads for the read stage, from its header alone. The header must
    be the one save-sharded wrote for this save and this rank (its save id and rank, the manifest's digest of it),
    pass the validation a source header passes (:func:`tp_loader.index.read_safetensors_header`: byte ranges that
    match the shapes, in the file, neither overlapping nor leaving gaps) and hold exactly the plan's keys, dtypes
    and local shapes."""
    path = manifest.root / entry.name
    prefix, text = _read_header(manifest, entry, path)
    metadata = _metadata(text)
    save_id = metadata.get("save_id")
    if save_id is not None and save_id != manifest.save_id:
        raise _stale(
            manifest,
            f"rank {entry.rank}'s file was written by another save (save id {save_id}; the manifest's is "
            f"{manifest.save_id}): the directory mixes the files of two saves",
            file=path,
        )
    if metadata.get("rank", str(entry.rank)) != str(entry.rank):
        raise _stale(manifest, f"rank {entry.rank}'s file holds rank {metadata['rank']}'s shards", file=path)
    if hashlib.sha256(prefix + text).hexdigest() != entry.header_sha256:
        raise _stale(manifest, "rank file's header differs from the one save-sharded wrote", file=path)
    try:
        stored = {info.key: info for info in read_safetensors_header(manifest.root, entry.name)}
    except CheckpointError as exc:
        raise _stale(manifest, f"rank {entry.rank}'s file: {exc.message}", file=path, key=exc.key) from None
    if save_id is None:
        raise _stale(manifest, f"rank {entry.rank}'s file carries no save id", file=path)
    items = []
    for item in load_plan.tensors:
        want, shape = target_dtype(item.info.dtype, dtype), item.local_shape
        info = stored.pop(item.key, None)
        found = (SAFETENSORS_NAMES[info.dtype], info.shape) if info is not None else None
        if info is None or found != (SAFETENSORS_NAMES[want], shape):
            raise _stale(
                manifest,
                f"rank file holds {found}, the plan gives ({SAFETENSORS_NAMES[want]!r}, {shape})",
                file=path,
                key=item.key,
            )
        items.append(TensorPlan(info, Slice(None, global_shape=shape), "replicate", None))
    if stored:
        raise _stale(
            manifest, f"rank file holds {len(stored)} tensors the plan does not", file=path, key=next(iter(stored))
        )
    return tuple(items)


def _read_header(manifest: Manifest, entry: RankFile, path: Path) -> tuple[bytes, bytes]:
    """A rank file's 8-byte header length and its JSON header, as bytes."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise _stale(manifest, f"rank {entry.rank}'s file cannot be read: {exc.strerror or exc}", file=path) from None
    try:
        prefix = read_exact(fd, 8, 0, path)
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, entry.size - 8):
            raise _stale(manifest, f"rank file's header length {length} does not fit the file", file=path)
        return prefix, read_exact(fd, length, 8, path)
    finally:
        os.close(fd)


def _metadata(text: bytes) -> dict[str, str]:
    """The string entries of a header's ``__metadata__``; empty when the header does not parse (the header's
    validation then says why). save-sharded writes the metadata first, so it is parsed alone when it comes first
    and once (a rank file's header of 90,000 tensors parses in 0.6 s, which the validation pays once more)."""
    lead = b'{"__metadata__":'
    metadata: object = None
    if text.startswith(lead) and text.count(b'"__metadata__"') == 1:
        try:
            metadata, _ = json.JSONDecoder().raw_decode(text[len(lead) : len(lead) + 65536].decode(errors="replace"))
        except ValueError:
            metadata = None
    if not isinstance(metadata, dict):
        try:
            metadata = json.loads(text).get("__metadata__")
        except (ValueError, AttributeError, RecursionError):
            return {}
    return {k: v for k, v in metadata.items() if isinstance(v, str)} if isinstance(metadata, dict) else {}


def _verify_blocks(manifest: Manifest, entry: RankFile, num_threads: int) -> None:
    """Reads the rank's file once more and checks every block's crc32, blocks spread over threads (zlib and
    ``os.preadv`` release the GIL), each read in pieces of :data:`VERIFY_PIECE_BYTES` into a buffer the thread
    reuses, so the checksum runs over bytes still in the CPU's cache."""
    path = manifest.root / entry.name
    block = manifest.block_bytes
    starts = range(0, entry.size, block)  # one crc32 each: the manifest's parse checked the count
    fd = os.open(path, os.O_RDONLY)
    buffers = threading.local()

    def crc(first: int) -> int:
        if not hasattr(buffers, "piece"):
            buffers.piece = memoryview(bytearray(VERIFY_PIECE_BYTES))
        value, position, end = 0, first, min(first + block, entry.size)
        while position < end:
            got = os.preadv(fd, [buffers.piece[: min(VERIFY_PIECE_BYTES, end - position)]], position)
            if got == 0:
                raise ReadError(f"file ends {position} bytes in", file=str(path), hint="Re-run save-sharded")
            value = zlib.crc32(buffers.piece[:got], value)
            position += got
        return value

    try:
        with ThreadPoolExecutor(max(1, num_threads), thread_name_prefix="tp_loader_verify") as pool:
            found = list(pool.map(crc, starts))
    finally:
        os.close(fd)
    for index, (got, want) in enumerate(zip(found, entry.crc32)):
        if got != want:
            first = index * block
            raise _stale(
                manifest,
                f"rank file's bytes [{first}, {min(first + block, entry.size)}) fail their checksum "
                f"(crc32 {got:08x}, save-sharded wrote {want:08x}): the file is damaged",
                file=path,
            )
