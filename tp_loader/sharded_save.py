"""Writing pre-sharded directories (``save-sharded``, ``load(..., save_sharded=OUT)``): each rank's shards as one
safetensors file with block checksums, the manifest last, everything under temporary names until every rank has
written (the format and the restart are in :mod:`tp_loader.sharded`)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from . import env as envmod
from ._version import __version__
from .arguments import Fingerprint, conversion_dtype, dtype_name, normalise_dtype
from .dist import Context, run_agreed
from .dryrun import plan_every_rank
from .errors import ArgumentError, CheckpointError, TPLoaderError
from .index import Checkpoint
from .plan import LoadPlan
from .read import ReadOptions, read_tensors, target_dtype
from .sharded import LoadOptions, format_time, layout_digest
from .sharded_manifest import (
    CHECKSUM_BLOCK_BYTES,
    FORMAT,
    FORMAT_VERSION,
    ID_HEX,
    MANIFEST,
    OWN_FILE,
    RANK_FILE,
    SAFETENSORS_NAMES,
    rank_file,
    source_files,
    temporary_name,
)
from .tie import apply_ties, local_tie_equality

logger = logging.getLogger("tp_loader")

WRITE_CHUNK_BYTES = 64 * 1024 * 1024


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


def write_rank(
    out: Path, load_plan: LoadPlan, local: dict[str, torch.Tensor], dtype: torch.dtype | None, save_id: str
) -> dict:
    """Writes one rank's shards under the rank file's temporary name (synced to storage) and returns its manifest
    entry. Tensors are laid out widest dtype first, so every one is aligned to its element size; the header's
    ``__metadata__`` names the format, the rank, the world size and the save (:func:`save_id`).

    Raises:
        ArgumentError: the file cannot be written, or a shard is not of the dtype and shape the plan gives
            (a destination of another dtype in :func:`tp_loader.load_into`).
    """
    name = rank_file(load_plan.rank, load_plan.world_size)
    meta = {
        "format": FORMAT,
        "rank": str(load_plan.rank),
        "world_size": str(load_plan.world_size),
        "save_id": save_id,
    }
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
            "dtype": SAFETENSORS_NAMES[tensor.dtype],
            "shape": list(item.local_shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    prefix = struct.pack("<Q", len(text)) + text
    checksums = _BlockChecksums(CHECKSUM_BLOCK_BYTES)
    path = out / temporary_name(name)
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
        foreign = sorted(p.name for p in out.iterdir() if not OWN_FILE.fullmatch(p.name))
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
            match = RANK_FILE.fullmatch(path.name)
            if (match and int(match.group(2)) != world_size) or path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
    except OSError as exc:
        raise _write_error(out, exc) from None


def discard(out: Path, rank: int, world_size: int) -> None:
    """Removes rank ``rank``'s temporary file, if any (a failed save leaves nothing half-written behind)."""
    try:
        (out / temporary_name(rank_file(rank, world_size))).unlink(missing_ok=True)
    except OSError:
        logger.debug("cannot remove a temporary file in %s", out, exc_info=True)


def commit(out: Path, rank: int, world_size: int) -> None:
    """Renames rank ``rank``'s temporary file into place (every rank has written its own by now)."""
    name = rank_file(rank, world_size)
    try:
        os.replace(out / temporary_name(name), out / name)
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
    """``[name, size, mtime_ns, fingerprint]`` of the source's config.json, index and weight files, as the manifest
    records them (:func:`tp_loader.sharded_manifest.source_files`).

    Raises:
        CheckpointError: a source file was modified after the load started (its shards may mix old and new bytes).
    """
    root = checkpoint.root
    try:
        stats = source_files(root, list(checkpoint.file_sizes))
    except OSError as exc:
        raise CheckpointError(
            f"cannot read the source's files: {exc.strerror or exc}", file=str(root), hint="Save again"
        ) from None
    for name, _, mtime_ns, _ in stats:
        if mtime_ns > started_ns:
            raise CheckpointError(
                f"source file was modified at {format_time(mtime_ns)}, after this load started: the shards may mix old "
                "and new bytes, so they are not saved",
                file=str(root / name),
                hint="Save again once the source is no longer being written",
            )
    return stats


def save_id(checkpoint: Checkpoint, arguments: Fingerprint, stats: list[list[Any]], world_size: int) -> str:
    """The id written into every file of one save: a digest of what the files are written from and for (the format,
    tp_loader's version, the world size, the arguments that shape the files, the source's config and headers and
    its files' :func:`source_state`). A file of another save of another source state (another fine-tune of the same
    shapes) carries another id; two saves of one source state with the same arguments write the same files and the
    same id, so one process and the ranks of a load write the very same bytes."""
    shaping = [arguments.dtype, arguments.plan, arguments.mode, arguments.allow_unmatched]
    what = [FORMAT_VERSION, __version__, world_size, shaping, checkpoint.fingerprint(), stats]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:ID_HEX]


def manifest_data(
    checkpoint: Checkpoint,
    load_plan: LoadPlan,
    files: list[dict],
    arguments: Fingerprint,
    stats: list[list[Any]],
    tie_equal: list[list[bool]],
    identity: str,
) -> dict[str, Any]:
    """The manifest: what the files were written from (``stats``: :func:`source_state`) and for; ``tie_equal``:
    per rank, for each tie stored on both sides, whether the two were equal (for the report); ``identity``: the
    save's id (:func:`save_id`), also in every rank file's header."""
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
        "save_id": identity,
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
            temporary = out / temporary_name(name, unique=True)
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

    def begin() -> tuple[list[list[Any]], str]:
        prepare(target, checkpoint.root, ctx.world_size)  # on every rank: each step is idempotent
        stats = source_state(checkpoint, started_ns)
        return stats, save_id(checkpoint, arguments, stats, ctx.world_size)

    (stats, _), ids = run_agreed(ctx, "prepare save-sharded", begin, lambda result: result[1])
    identity = ids[0]  # rank 0's: one id for every file, should nodes see their source files differently
    try:
        _, written = run_agreed(
            ctx,
            "write save-sharded",
            lambda: write_rank(target, load_plan, local, dtype, identity) if writes else None,
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
            write_manifest(target, manifest_data(checkpoint, load_plan, files, arguments, stats, tie_equal, identity))

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
    identity = save_id(checkpoint, arguments, stats, world_size)
    prepare(target, checkpoint.root, world_size)
    files, tie_equal = [], []
    try:
        for load_plan in plans:
            local, _ = read_tensors(
                checkpoint.root, checkpoint.format, load_plan.tensors, options, checkpoint.file_sizes
            )
            tie_equal.append(local_tie_equality(local, load_plan.ties))
            state_dict = dict(local)
            apply_ties(state_dict, load_plan.ties)  # a tie stored on both sides: each side saved with its own values
            files.append(write_rank(target, load_plan, state_dict, conversion, identity))
            del local, state_dict
        for rank in range(world_size):
            commit(target, rank, world_size)
    except BaseException:
        for rank in range(world_size):
            discard(target, rank, world_size)
        raise
    _check_unchanged(checkpoint, stats, source_state(checkpoint, started_ns))
    write_manifest(target, manifest_data(checkpoint, plans[0], files, arguments, stats, tie_equal, identity))
    return files


def _check_unchanged(checkpoint: Checkpoint, before: list[list[Any]], after: list[list[Any]]) -> None:
    """Refuses a source whose files changed while they were read (with times kept: their content fingerprint)."""
    for old, new in zip(before, after):
        if old != new:
            raise CheckpointError(
                "source file changed while save-sharded read it: the shards may mix old and new bytes, so no "
                "manifest is written",
                file=str(checkpoint.root / old[0]),
                hint="Save again once the source is no longer being written",
            )
