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

from . import env as envmod
from ._version import __version__
from .arguments import conversion_dtype, dtype_name, normalise_dtype
from .dist import Context, run_agreed
from .errors import ArgumentError, CheckpointError, DistributedError, ReadError, StaleShardsError
from .index import DTYPES, MAX_HEADER_BYTES, Checkpoint, TensorInfo
from .place import place
from .plan import LoadPlan, TensorPlan, plan_rank
from .read import ReadOptions, ReadStats, read_tensors, target_dtype
from .report import LoadReport, build_report, rank_reports
from .resolve import PICKLE_INDEX, SAFETENSORS_INDEX
from .spec import builtin_plan_paths
from .styles import Slice
from .tie import apply_ties

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
SAFETENSORS_NAMES = {dtype: name for name, dtype in DTYPES.items()}
RANK_FILE = re.compile(r"rank-(\d{5})-of-(\d{5})\.safetensors")
#: Every name save-sharded writes (final and temporary): a directory holding anything else is not overwritten.
OWN_FILE = re.compile(
    r"\.?(rank-\d{5}-of-\d{5}\.safetensors|tp_loader-sharded\.json|config\.json)(\.[0-9a-f]{32})?(\.tmp)?"
)


def rank_file(rank: int, world_size: int) -> str:
    """The name of rank ``rank``'s file in a directory written for ``world_size`` ranks."""
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


def temporary_name(name: str, unique: bool = False) -> str:
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
            incomplete = root.is_dir() and any(OWN_FILE.fullmatch(p.name) and "rank-" in p.name for p in root.iterdir())
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


def source_files(root: Path, weight_files: list[str]) -> list[list[Any]]:
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
                f"{format_time(st.st_mtime_ns)}; it was {size} bytes, modified {format_time(mtime_ns)}",
                file=root / name,
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
        if found != (SAFETENSORS_NAMES[want], shape):
            raise _stale(
                manifest,
                f"rank file holds {found}, the plan gives ({SAFETENSORS_NAMES[want]!r}, {shape})",
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
