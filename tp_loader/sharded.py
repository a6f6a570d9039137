"""Pre-sharded directories: each rank's shards written once, then read back by that rank in one sequential read.

``load(MODEL, save_sharded=OUT)`` (or ``python -m tp_loader save-sharded MODEL OUT --tp N``) writes, for a world
size N, one safetensors file per rank, ``rank-{r:05d}-of-{N:05d}.safetensors``, holding exactly the local shards a
load gives that rank, and a manifest, ``tp_loader-sharded.json``: format version, tp_loader version, world size, the
load's arguments, the plan's name and each rank's layout digest, dtype, the source checkpoint (its directory, its
files' names, sizes and modification times, its config and header index) and each rank file's size, header digest
and block checksums. Every file is written under a temporary name and renamed into place once every rank has written
its own; the manifest comes last, so a directory without one is never taken for a complete one.

``load(OUT)`` recognises the manifest. Instead of resolving and indexing a checkpoint it re-plans the load from the
source index kept in the manifest (no I/O), and refuses (:class:`StaleShardsError`, on every rank) unless the plan
gives the layout the files were written for, the source (when still reachable) is unchanged and this rank's file
has the size and header it was written with. The rank then reads its file in file order through the read stage and
places the shards as a normal load does. Data checksums are checked on request (``verify=True``): see
docs/benchmarks.md for the measurement behind that.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import re
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch.distributed.tensor import DTensor

from . import env as envmod
from ._version import __version__
from .arguments import Fingerprint, conversion_dtype, dtype_name, normalise_dtype
from .dist import Context, run_agreed
from .dryrun import plan_every_rank
from .errors import ArgumentError, CheckpointError, DistributedError, ReadError, StaleShardsError, TPLoaderError
from .index import DTYPES, MAX_HEADER_BYTES, Checkpoint, TensorInfo
from .place import place
from .plan import LoadPlan, TensorPlan, plan_rank
from .read import ReadOptions, ReadStats, read_tensors, target_dtype
from .report import LoadReport, build_report, rank_reports
from .resolve import PICKLE_INDEX, SAFETENSORS_INDEX
from .spec import builtin_plan_paths
from .styles import Slice
from .tie import apply_ties, local_tie_equality

logger = logging.getLogger("tp_loader")

MANIFEST = "tp_loader-sharded.json"
FORMAT = "tp_loader-sharded"
#: Bumped whenever the files or the manifest change meaning; a directory of another version is refused.
FORMAT_VERSION = 1
#: Rank files carry one crc32 per block of this many bytes (checked in parallel, one block per thread).
CHECKSUM_BLOCK_BYTES = 64 * 1024 * 1024
WRITE_CHUNK_BYTES = 64 * 1024 * 1024
VERIFY_PIECE_BYTES = 1024 * 1024

#: torch dtype → its safetensors name (every dtype the index stage reads).
_SAFETENSORS_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_RANK_FILE = re.compile(r"rank-(\d{5})-of-(\d{5})\.safetensors")
#: Every name save-sharded writes (final and temporary): a directory holding anything else is not overwritten.
_OURS = re.compile(
    r"\.?(rank-\d{5}-of-\d{5}\.safetensors|tp_loader-sharded\.json|config\.json)(\.[0-9a-f]{32})?(\.tmp)?"
)


def rank_file(rank: int, world_size: int) -> str:
    """The name of rank ``rank``'s file in a directory written for ``world_size`` ranks."""
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


def _temporary(name: str, unique: bool = False) -> str:
    """A rank file's temporary name; ``unique`` for files that several writers (one per node) may write at once."""
    return f".{name}.{uuid.uuid4().hex}.tmp" if unique else f".{name}.tmp"


def _rebuild_hint(source: str, out: Path, world_size: int) -> str:
    return (
        f"Re-run save-sharded (python -m tp_loader save-sharded {source} {out} --tp {world_size}), "
        "or load with rebuild=True (--rebuild) to rebuild it from the source"
    )


# ---------------------------------------------------------------------------------------------------------------
# the manifest


@dataclass(frozen=True)
class RankFile:
    """One rank's file as the manifest describes it: its size, the sha256 of its header (8-byte length and JSON),
    the crc32 of each :data:`CHECKSUM_BLOCK_BYTES` block, and the sha256 of the layout it was written for."""

    rank: int
    name: str
    size: int
    header_sha256: str
    layout_sha256: str
    crc32: tuple[int, ...]


@dataclass(frozen=True)
class Manifest:
    """A parsed ``tp_loader-sharded.json``. Fields past ``source_root`` are empty when the format version is not
    this tp_loader's (such a directory is refused, but can still be rebuilt from its source)."""

    root: Path
    digest: str
    format_version: int
    version: str
    source_root: str
    world_size: int = 0
    plan: str = ""
    dtype: str | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    block_bytes: int = CHECKSUM_BLOCK_BYTES
    files: tuple[RankFile, ...] = ()
    source_model: str = ""
    source_format: str = "safetensors"
    source_fingerprint: str = ""
    source_files: tuple[tuple[str, int, int], ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    tensors: tuple[tuple[str, str, str, tuple[int, ...], int, int], ...] = ()
    tie_equal: tuple[tuple[bool, ...], ...] = ()

    @property
    def path(self) -> Path:
        return self.root / MANIFEST


def find_manifest(model: str | os.PathLike[str] | None) -> Manifest | None:
    """The manifest when ``model`` is a pre-sharded directory, else ``None``.

    Raises:
        CheckpointError: the manifest cannot be read or parsed, or the directory holds rank files but no
            manifest (save-sharded did not finish).
    """
    if model is None:
        return None
    root = Path(model).expanduser()
    path = root / MANIFEST
    if not path.exists():
        try:
            incomplete = root.is_dir() and any(_OURS.fullmatch(p.name) and "rank-" in p.name for p in root.iterdir())
        except OSError:  # not listable: the load's own stages say why
            incomplete = False
        if incomplete:
            raise CheckpointError(
                f"the directory holds rank files but no {MANIFEST}: save-sharded did not finish writing it",
                file=str(root),
                hint="Re-run save-sharded into it (python -m tp_loader save-sharded SOURCE DIR --tp N)",
            )
        return None
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
        return _parse(root, hashlib.sha256(raw).hexdigest(), data)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise CheckpointError(
            f"cannot read the pre-sharded directory's manifest: {type(exc).__name__}: {exc}",
            file=str(path),
            hint="Re-run save-sharded into the directory (python -m tp_loader save-sharded SOURCE DIR --tp N)",
        ) from None


def _parse(root: Path, digest: str, data: dict[str, Any]) -> Manifest:
    if data.get("format") != FORMAT:
        raise ValueError(f"format is {data.get('format')!r}, not {FORMAT!r}")
    source = data["source"]
    head = Manifest(root, digest, int(data["format_version"]), str(data["tp_loader_version"]), str(source["root"]))
    if head.format_version != FORMAT_VERSION:
        return head
    files = tuple(
        RankFile(
            int(f["rank"]), str(f["name"]), int(f["size"]), f["header_sha256"], f["layout_sha256"], tuple(f["crc32"])
        )
        for f in data["files"]
    )
    if [f.rank for f in files] != list(range(int(data["world_size"]))) or any(
        f.name != rank_file(f.rank, int(data["world_size"])) for f in files
    ):
        raise ValueError("files do not list one rank file per rank")
    return dataclasses.replace(
        head,
        world_size=int(data["world_size"]),
        plan=str(data["plan"]),
        dtype=data["dtype"],
        arguments=dict(data["arguments"]),
        block_bytes=int(data["checksum"]["block_bytes"]),
        files=files,
        source_model=str(source["model"]),
        source_format=str(source["format"]),
        source_fingerprint=str(source["fingerprint"]),
        source_files=tuple((str(n), int(s), int(m)) for n, s, m in source["files"]),
        config=dict(source["config"]),
        tensors=tuple((str(k), str(f), str(d), tuple(s), int(b), int(e)) for k, f, d, s, b, e in source["tensors"]),
        tie_equal=tuple(tuple(bool(x) for x in per_rank) for per_rank in data["tie_equal"]),
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

    def check() -> tuple[LoadPlan, RankFile, dict[str, torch.Tensor] | None]:
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
        return load_plan, entry, into(load_plan, ctx) if into is not None else None

    # every rank's plan (and destinations, checked in the same round); rank 0's tie decisions, which every rank
    # then uses (as a load does)
    (load_plan, entry, destinations), seen = run_agreed(ctx, "check pre-sharded", check, lambda result: result[0].ties)
    load_plan = dataclasses.replace(load_plan, ties=seen[0])
    read_options = ReadOptions.from_settings(settings, conversion, ctx.device, progress=options.progress and ctx.leader)

    def read_and_place() -> tuple[dict[str, torch.Tensor], ReadStats]:
        items = _file_items(manifest, entry, load_plan, conversion)
        if options.verify:
            _verify_blocks(manifest, entry, settings.num_threads)
        sizes = {entry.name: entry.size}
        local, stats = read_tensors(manifest.root, "safetensors", items, read_options, sizes, destinations)
        state_dict = place(local, load_plan.tensors, ctx.mesh, ctx.tp_axis)
        apply_ties(state_dict, load_plan.ties)
        return state_dict, stats

    # one round agrees on the read and gathers the report's figures (place and ties talk to no rank)
    (state_dict, _), gathered = run_agreed(
        ctx, "read pre-sharded", read_and_place, lambda result: (result[1], time.perf_counter() - start)
    )
    ranks = rank_reports([(s, seconds, 0) for s, seconds in gathered], options.nodes, ctx.replica_of())
    # a tie stored on both sides was saved as its source (what the load keeps): its report comes from the manifest
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


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"manifest names an unknown dtype {name!r}", key=name)
    return dtype


def _source_checkpoint(manifest: Manifest) -> Checkpoint:
    """The source as its headers were when the directory was written, from the manifest's copy (checked against
    the loader's own fingerprint of it, so an edited or damaged copy is refused)."""
    tensors = {
        key: TensorInfo(key, file, _torch_dtype(dtype), shape, begin, end)
        for key, file, dtype, shape, begin, end in manifest.tensors
    }
    checkpoint = Checkpoint(Path(manifest.source_model), manifest.source_format, manifest.config, tensors)
    if checkpoint.fingerprint() != manifest.source_fingerprint:
        raise _stale(manifest, "the manifest's copy of the source's config and headers does not match its digest")
    return checkpoint


def _source_files(root: Path, weight_files: list[str]) -> list[list[Any]]:
    """``[name, size, mtime_ns]`` of config.json, the index (if any) and every weight file."""
    names = ["config.json"] + [n for n in (SAFETENSORS_INDEX, PICKLE_INDEX) if (root / n).is_file()] + weight_files
    stats = [(name, (root / name).stat()) for name in names]
    return [[name, st.st_size, st.st_mtime_ns] for name, st in stats]


def _check_source(manifest: Manifest) -> None:
    """Refuses when the source is still there but a file of it changed (size or modification time): a checkpoint
    rewritten in place with new weights keeps its headers, so only the files' times tell."""
    root = Path(manifest.source_root)
    if not root.is_dir():
        logger.debug("source %s is gone: not checked for changes", root)
        return
    for name, size, mtime_ns in manifest.source_files:
        try:
            st = (root / name).stat()
        except OSError:
            raise _stale(manifest, f"the source changed since save-sharded: {name} is gone", file=root / name) from None
        if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
            raise _stale(
                manifest,
                f"the source changed since save-sharded: {name} is {st.st_size} bytes, modified "
                f"{_when(st.st_mtime_ns)}; it was {size} bytes, modified {_when(mtime_ns)}",
                file=root / name,
            )


def _when(mtime_ns: int) -> str:
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
        size = path.stat().st_size
    except FileNotFoundError:
        raise _stale(manifest, f"rank {entry.rank}'s file is missing", file=path) from None
    if size != entry.size:
        raise _stale(manifest, f"rank file is {size} bytes; save-sharded wrote {entry.size}", file=path)


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


def _read_exact(fd: int, length: int, offset: int, path: Path) -> bytes:
    out = b""
    while len(out) < length:
        got = os.pread(fd, length - len(out), offset + len(out))
        if not got:
            raise ReadError(f"file ends {offset + len(out)} bytes in", file=str(path), hint="Re-run save-sharded")
        out += got
    return out


def _file_items(
    manifest: Manifest, entry: RankFile, load_plan: LoadPlan, dtype: torch.dtype | None
) -> tuple[TensorPlan, ...]:
    """This rank's file's tensors as whole-tensor reads for the read stage, after its header is checked against
    the manifest's digest and against the plan (every key, dtype and local shape, byte ranges in the file)."""
    path = manifest.root / entry.name
    fd = os.open(path, os.O_RDONLY)
    try:
        prefix = _read_exact(fd, 8, 0, path)
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, entry.size - 8):
            raise _stale(manifest, f"rank file's header length {length} does not fit the file", file=path)
        text = _read_exact(fd, length, 8, path)
    finally:
        os.close(fd)
    if hashlib.sha256(prefix + text).hexdigest() != entry.header_sha256:
        raise _stale(manifest, "rank file's header differs from the one save-sharded wrote", file=path)
    header = json.loads(text)
    header.pop("__metadata__", None)
    data_start, items = 8 + length, []
    for item in load_plan.tensors:
        want, shape = target_dtype(item.info.dtype, dtype), item.local_shape
        stored = header.pop(item.key, None)
        found = (stored["dtype"], tuple(stored["shape"])) if stored else None
        if found != (_SAFETENSORS_NAMES[want], shape):
            raise _stale(
                manifest,
                f"rank file holds {found}, the plan gives ({_SAFETENSORS_NAMES[want]!r}, {shape})",
                file=path,
                key=item.key,
            )
        begin, end = (data_start + offset for offset in stored["data_offsets"])
        if end - begin != math.prod(shape) * want.itemsize or end > entry.size:
            raise _stale(manifest, f"rank file's byte range [{begin}, {end}) does not fit the tensor", file=path)
        info = TensorInfo(item.key, entry.name, want, shape, begin, end)
        items.append(TensorPlan(info, Slice(None, global_shape=shape), "replicate", None))
    if header:
        raise _stale(
            manifest, f"rank file holds {len(header)} tensors the plan does not", file=path, key=next(iter(header))
        )
    return tuple(items)


def _verify_blocks(manifest: Manifest, entry: RankFile, num_threads: int) -> None:
    """Reads the rank's file once more and checks every block's crc32, blocks spread over threads (zlib and
    ``os.preadv`` release the GIL), each read in pieces of :data:`VERIFY_PIECE_BYTES` into a buffer the thread
    reuses, so the checksum runs over bytes still in the CPU's cache."""
    path = manifest.root / entry.name
    block = manifest.block_bytes
    starts = range(0, entry.size, block)
    if len(starts) != len(entry.crc32):
        raise _stale(manifest, "the manifest's checksums do not cover the rank file", file=path)
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


# ---------------------------------------------------------------------------------------------------------------
# writing


class _BlockChecksums:
    """crc32 of each ``block``-byte block of a stream written in pieces of any size."""

    def __init__(self, block: int) -> None:
        self.block = block
        self.done: list[int] = []
        self.crc = 0
        self.filled = 0

    def update(self, data: memoryview) -> None:
        position = 0
        while position < len(data):
            take = min(self.block - self.filled, len(data) - position)
            self.crc = zlib.crc32(data[position : position + take], self.crc)
            self.filled += take
            position += take
            if self.filled == self.block:
                self.done.append(self.crc)
                self.crc = self.filled = 0

    def result(self) -> list[int]:
        return self.done + ([self.crc] if self.filled else [])


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _write_error(path: Path, exc: OSError) -> ArgumentError:
    return ArgumentError(
        f"cannot write the pre-sharded directory: {exc.strerror or exc}",
        file=str(path),
        key="save_sharded",
        hint="Pass a directory on a writable filesystem with room for every rank's shards",
    )


def write_rank(out: Path, load_plan: LoadPlan, local: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict:
    """Writes one rank's shards under the rank file's temporary name (synced to storage) and returns its manifest
    entry. Tensors are laid out widest dtype first, so every one is aligned to its element size.

    Raises:
        ArgumentError: the file cannot be written, or a shard is not of the dtype and shape the plan gives
            (a destination of another dtype in :func:`tp_loader.load_into`).
    """
    name = rank_file(load_plan.rank, load_plan.world_size)
    meta = {"format": FORMAT, "rank": str(load_plan.rank), "world_size": str(load_plan.world_size)}
    header: dict[str, Any] = {"__metadata__": meta}
    wanted = {item.key: target_dtype(item.info.dtype, dtype) for item in load_plan.tensors}
    order = sorted(load_plan.tensors, key=lambda item: -wanted[item.key].itemsize)
    offset = 0
    for item in order:
        tensor = local[item.key]
        if tensor.dtype != wanted[item.key] or tuple(tensor.shape) != item.local_shape:
            raise ArgumentError(
                f"shard is {tensor.dtype} {list(tensor.shape)}, the plan gives {wanted[item.key]} "
                f"{list(item.local_shape)}: it cannot be saved pre-sharded",
                key=item.key,
                hint="Save from tp_loader.load (or load_into a model of the load's dtype)",
            )
        nbytes = tensor.numel() * tensor.element_size()
        header[item.key] = {
            "dtype": _SAFETENSORS_NAMES[tensor.dtype],
            "shape": list(item.local_shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    prefix = struct.pack("<Q", len(text)) + text
    checksums = _BlockChecksums(CHECKSUM_BLOCK_BYTES)
    path = out / _temporary(name)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:  # one tensor's bytes at a time: a strided or CUDA shard is copied to contiguous CPU memory alone
            for piece in itertools.chain([memoryview(prefix)], (_bytes_of(local[item.key]) for item in order)):
                checksums.update(piece)
                for first in range(0, len(piece), WRITE_CHUNK_BYTES):
                    chunk = piece[first : first + WRITE_CHUNK_BYTES]
                    while chunk:
                        chunk = chunk[os.write(fd, chunk) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _write_error(path, exc) from None
    return {
        "rank": load_plan.rank,
        "name": name,
        "size": len(prefix) + offset,
        "header_sha256": hashlib.sha256(prefix).hexdigest(),
        "layout_sha256": layout_digest(load_plan, dtype),
        "crc32": checksums.result(),
    }


def prepare(out: Path, source: Path, world_size: int) -> None:
    """Makes ``out`` ready to be written: refuses the source's own directory and a directory holding files
    save-sharded does not write; removes the manifest (the directory is no longer a pre-sharded one until the new
    manifest is in place) and rank files of other world sizes.

    Raises:
        ArgumentError: naming the directory and the reason.
    """
    try:
        if out.exists() and not out.is_dir():
            raise ArgumentError(
                "save_sharded names a file, not a directory",
                file=str(out),
                key="save_sharded",
                hint="Pass a new or empty directory",
            )
        if out.is_dir() and source.is_dir() and os.path.samefile(out, source):
            raise ArgumentError(
                "save_sharded is the source checkpoint's own directory",
                file=str(out),
                key="save_sharded",
                hint="Pass a new or empty directory",
            )
        out.mkdir(parents=True, exist_ok=True)
        foreign = sorted(p.name for p in out.iterdir() if not _OURS.fullmatch(p.name))
        if foreign:
            raise ArgumentError(
                f"save_sharded directory holds files save-sharded does not write ({', '.join(foreign[:3])}"
                f"{', …' if len(foreign) > 3 else ''})",
                file=str(out),
                key="save_sharded",
                hint="Pass a new or empty directory, or one save-sharded wrote",
            )
        (out / MANIFEST).unlink(missing_ok=True)
        for path in out.iterdir():
            match = _RANK_FILE.fullmatch(path.name)
            if (match and int(match.group(2)) != world_size) or path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
    except OSError as exc:
        raise _write_error(out, exc) from None


def discard(out: Path, rank: int, world_size: int) -> None:
    """Removes rank ``rank``'s temporary file, if any (a failed save leaves nothing half-written behind)."""
    try:
        (out / _temporary(rank_file(rank, world_size))).unlink(missing_ok=True)
    except OSError:
        logger.debug("cannot remove a temporary file in %s", out, exc_info=True)


def commit(out: Path, rank: int, world_size: int) -> None:
    """Renames rank ``rank``'s temporary file into place (every rank has written its own by now)."""
    name = rank_file(rank, world_size)
    try:
        os.replace(out / _temporary(name), out / name)
        _sync_directory(out)
    except OSError as exc:
        raise _write_error(out / name, exc) from None


def _sync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def source_state(checkpoint: Checkpoint, started_ns: int) -> list[list[Any]]:
    """``[name, size, mtime_ns]`` of the source's config.json, index and weight files, as the manifest records them.

    Raises:
        CheckpointError: a source file was modified after the load started (its shards may mix old and new bytes).
    """
    root = checkpoint.root
    try:
        stats = _source_files(root, list(checkpoint.file_sizes))
    except OSError as exc:
        raise CheckpointError(
            f"cannot stat the source's files: {exc.strerror or exc}", file=str(root), hint="Save again"
        ) from None
    for name, _, mtime_ns in stats:
        if mtime_ns > started_ns:
            raise CheckpointError(
                f"source file was modified at {_when(mtime_ns)}, after this load started: the shards may mix old "
                "and new bytes, so they are not saved",
                file=str(root / name),
                hint="Save again once the source is no longer being written",
            )
    return stats


def manifest_data(
    checkpoint: Checkpoint,
    load_plan: LoadPlan,
    files: list[dict],
    arguments: Fingerprint,
    stats: list[list[Any]],
    tie_equal: list[list[bool]],
) -> dict[str, Any]:
    """The manifest: what the files were written from (``stats``: :func:`source_state`) and for; ``tie_equal``:
    per rank, for each tie stored on both sides, whether the two were equal (for the report)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tp_loader_version": __version__,
        "world_size": load_plan.world_size,
        "plan": load_plan.plan_name,
        "dtype": arguments.dtype,
        "arguments": dataclasses.asdict(arguments),
        "checksum": {"algorithm": "crc32", "block_bytes": CHECKSUM_BLOCK_BYTES},
        "files": sorted(files, key=lambda f: f["rank"]),
        "tie_equal": tie_equal,
        "source": {
            "model": load_plan.model,
            "root": os.path.abspath(checkpoint.root),
            "format": checkpoint.format,
            "fingerprint": checkpoint.fingerprint(),
            "files": stats,
            "config": checkpoint.config,
            "tensors": [
                [i.key, i.file, dtype_name(i.dtype), list(i.shape), i.begin, i.end] for i in checkpoint.tensors.values()
            ],
        },
    }


def write_manifest(out: Path, data: dict[str, Any]) -> None:
    """Writes config.json (a copy of the source's, for tools that build the model from the directory) and then
    the manifest, each under a temporary name renamed into place, synced to storage."""
    try:
        for name, text in (
            ("config.json", json.dumps(data["source"]["config"], indent=2)),
            (MANIFEST, json.dumps(data, separators=(",", ":"))),
        ):
            temporary = out / _temporary(name, unique=True)
            with open(temporary, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, out / name)
        _sync_directory(out)
    except OSError as exc:
        raise _write_error(out, exc) from None


def save_on_ranks(
    ctx: Context,
    options: LoadOptions,
    checkpoint: Checkpoint,
    load_plan: LoadPlan,
    state_dict: dict[str, torch.Tensor],
    wanted: torch.dtype | None,
    settings: envmod.Settings,
    tie_equal: list[list[bool]],
    start: float,
) -> None:
    """The ranks of the first replica write their shards of the loaded ``state_dict`` to ``options.save_sharded``;
    once all have, each renames its file into place, and then the first rank of each node writes the manifest (each
    node's copy, should the directory be node-local). A failure on any rank is every rank's error, and leaves no
    manifest.

    Args:
        tie_equal: every rank's tie equality (for each tie stored on both sides) from the load's read round.
        start: when the load started (``time.perf_counter()``): a source modified since is not saved.

    Raises:
        ArgumentError: the directory cannot be written (or holds other files).
        CheckpointError: the source changed during the load.
    """
    assert options.save_sharded is not None
    target = Path(options.save_sharded).expanduser()
    arguments = Fingerprint(
        dtype_name(wanted),
        os.fspath(options.plan),
        options.mode,
        options.strict,
        options.allow_unmatched,
        settings.zero_copy,
        ctx.device.type,
    )
    started_ns = time.time_ns() - int((time.perf_counter() - start) * 1e9)
    writes = ctx.replica == 0  # replicas hold the same shards
    nodes = options.nodes or ("",)
    dtype = conversion_dtype(wanted)
    local = {item.key: _local(state_dict[item.key]) for item in load_plan.tensors}

    def begin() -> list[list[Any]]:
        prepare(target, checkpoint.root, ctx.world_size)  # on every rank: each step is idempotent
        return source_state(checkpoint, started_ns)

    stats, _ = run_agreed(ctx, "prepare save-sharded", begin)
    try:
        _, written = run_agreed(
            ctx,
            "write save-sharded",
            lambda: write_rank(target, load_plan, local, dtype) if writes else None,
            lambda entry: entry,
        )
        run_agreed(ctx, "rename save-sharded", lambda: commit(target, ctx.rank, ctx.world_size) if writes else None)
    except TPLoaderError:
        if writes:
            discard(target, ctx.rank, ctx.world_size)
        raise
    files = [entry for entry in written if entry is not None]

    def finish() -> None:
        if nodes.index(nodes[ctx.control_rank]) == ctx.control_rank:  # the first rank on this node
            write_manifest(target, manifest_data(checkpoint, load_plan, files, arguments, stats, tie_equal))

    run_agreed(ctx, "manifest save-sharded", finish)
    if ctx.leader:
        logger.info("saved %d rank files to %s (%d bytes)", len(files), target, sum(f["size"] for f in files))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def save_offline(
    model: str | os.PathLike[str] | None,
    out: str | os.PathLike[str],
    world_size: int,
    *,
    dtype: torch.dtype | str | None = None,
    plan: str | os.PathLike[str] = "auto",
    mode: str | None = None,
    strict: bool = False,
    allow_unmatched: bool = False,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[dict]:
    """Writes a pre-sharded directory for ``world_size`` ranks in this one process, on the CPU: every rank is
    planned first (any refusal comes before a byte is written), then each rank's slices are read and written in
    turn. The files are the ones ``world_size`` ranks of ``load(model, save_sharded=out)`` write.

    Returns:
        Each rank file's manifest entry.

    Raises:
        ArgumentError: a bad argument or an unwritable directory.
        TPLoaderError: what a load of ``model`` would raise.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ArgumentError(
            f"the world size to write for must be a whole number of at least 1, got {world_size!r}",
            key="tp",
            hint="Pass --tp N, the number of tensor-parallel ranks that will load the directory",
        )
    wanted = normalise_dtype(dtype)
    settings = envmod.settings(1)
    started_ns = time.time_ns()
    checkpoint, plans = plan_every_rank(
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
    )
    arguments = Fingerprint(
        dtype_name(wanted), os.fspath(plan), mode, strict, allow_unmatched, settings.zero_copy, "cpu"
    )
    conversion = conversion_dtype(wanted)
    options = dataclasses.replace(ReadOptions.from_settings(settings, conversion, torch.device("cpu")), fadvise=False)
    target = Path(out).expanduser()
    stats = source_state(checkpoint, started_ns)
    prepare(target, checkpoint.root, world_size)
    files, tie_equal = [], []
    try:
        for load_plan in plans:
            local, _ = read_tensors(
                checkpoint.root, checkpoint.format, load_plan.tensors, options, checkpoint.file_sizes
            )
            tie_equal.append(local_tie_equality(local, load_plan.ties))
            state_dict = dict(local)
            apply_ties(state_dict, load_plan.ties)  # a tie stored on both sides is saved as the load keeps it
            files.append(write_rank(target, load_plan, state_dict, conversion))
            del local, state_dict
        for rank in range(world_size):
            commit(target, rank, world_size)
    except BaseException:
        for rank in range(world_size):
            discard(target, rank, world_size)
        raise
    stats = source_state(checkpoint, started_ns)
    write_manifest(target, manifest_data(checkpoint, plans[0], files, arguments, stats, tie_equal))
    return files
