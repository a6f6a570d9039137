"""Stage 4, read: the only stage that touches tensor data. Each rank reads exactly its slices."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .byteranges import read_ranges, slice_ranges
from .convert import finish_read
from .errors import ReadError, TPLoaderError
from .index import load_pickle
from .plan import TensorPlan
from .staging import StagingRing, cuda_copy

logger = logging.getLogger("tp_loader")

THREAD_NAME_PREFIX = "spawn_tp_materialize"
STAGING_BUFFER_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class ReadOptions:
    """How to read.

    Attributes:
        dtype: floating-point tensors are converted to this dtype (``None``: keep the stored dtype).
        device: where the shards end up.
        num_threads: reader threads.
        max_inflight_bytes: bytes being read at once; one tensor larger than this is read alone.
        progress: show a progress bar (rank 0 only; shown once a load takes over a second).
        reader: how safetensors files are read: ``mmap`` (default), ``safetensors`` or ``pread``.
        fadvise: hint the kernel (``POSIX_FADV_WILLNEED``) about every slice before reading.
        zero_copy: on CPU with the mmap reader and no dtype change, keep each single-range slice as a
            view of the file's private (copy-on-write) mapping instead of copying it (a column shard
            is then a strided, non-contiguous view).
    """

    dtype: torch.dtype | None
    device: torch.device
    num_threads: int
    max_inflight_bytes: int
    progress: bool = False
    reader: str = "mmap"
    fadvise: bool = False
    zero_copy: bool = False


@dataclass(frozen=True)
class ReadStats:
    """What one rank read: bytes of its slices, tensors, seconds, and how many of the tensors are
    zero-copy views of a file mapping."""

    bytes_read: int
    num_tensors: int
    seconds: float
    zero_copy_tensors: int = 0


class ByteBudget:
    """A counting semaphore over bytes: at most ``limit`` bytes in flight, but never less than one item."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._used == 0 or self._used + nbytes <= self._limit)
            self._used += nbytes
        try:
            yield
        finally:
            with self._cond:
                self._used -= nbytes
                self._cond.notify_all()


def target_dtype(stored: torch.dtype, wanted: torch.dtype | None) -> torch.dtype:
    """``wanted`` for floating-point tensors, the stored dtype otherwise (integers and bools keep theirs)."""
    if wanted is None or not stored.is_floating_point:
        return stored
    return wanted


def _take(item: TensorPlan, stored: Any, row_offset: int | None = None) -> torch.Tensor:
    """``item``'s slice of ``stored`` (a tensor, or a safetensors slice handle): a view for one range,
    the ranges concatenated along ``dim`` for a fused tensor's pieces. ``stored`` holds ``item``'s rows
    from ``row_offset`` on (default: the converter target's offset into its stored tensor); one
    indexing per piece, as safetensors slice handles take a single index."""
    piece, info = item.slice, item.info
    offset = info.row_offset if row_offset is None else row_offset
    rows = slice(offset, offset + info.shape[0]) if info.shape else slice(None)
    whole = (rows,) + tuple(slice(None) for _ in info.shape[1:]) if info.shape else ()
    if piece.dim is None:
        return stored[whole]

    def index(a: int, b: int) -> tuple[slice, ...]:
        if piece.dim == 0:
            return (slice(offset + a, offset + b),) + whole[1:]
        return whole[: piece.dim] + (slice(a, b),) + whole[piece.dim + 1 :]

    pieces = [stored[index(a, b)] for a, b in piece.ranges]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=piece.dim)


class _Source:
    """Open files of one checkpoint, each opened once on first use and closed together.

    ``slice(item)`` returns a CPU tensor with exactly ``item``'s slice, in the stored dtype: a view into
    the file's mapping, or (when ``owned``) a fresh tensor already holding the bytes.
    """

    owned = False

    def __init__(self, root: Path) -> None:
        self._root = root
        self._handles: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _handle(self, name: str) -> Any:
        with self._lock:
            handle = self._handles.get(name)
            if handle is None:
                handle = self._handles[name] = self._open(self._root / name)
            return handle

    def _open(self, path: Path) -> Any:
        raise NotImplementedError

    def slice(self, item: TensorPlan) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        self._handles.clear()


class MappedSource(_Source):
    """The fast path: each file mapped privately (``MAP_PRIVATE``: writes never reach the file) into a
    torch storage that owns the mapping, so views stay valid for as long as any tensor uses them. A
    slice is a strided view, copied once into its destination (or kept, with ``zero_copy``)."""

    def _open(self, path: Path) -> torch.Tensor:
        storage = torch.UntypedStorage.from_file(str(path), False, path.stat().st_size)
        return torch.empty(0, dtype=torch.uint8).set_(storage)

    def slice(self, item: TensorPlan) -> torch.Tensor:
        info = item.info
        if info.nbytes == 0:
            return torch.empty(item.local_shape, dtype=info.dtype)
        whole = self._handle(info.file)[info.begin : info.end]  # a converter's target: just its own rows
        if info.begin % info.dtype.itemsize:  # safetensors does not promise alignment: realign this one tensor
            whole = whole.clone()
        return _take(item, whole.view(info.dtype).view(info.shape), row_offset=0)


class SafetensorsSource(_Source):
    """The plain path: ``safe_open(...).get_slice(key)[...]``."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self._stack = contextlib.ExitStack()

    def _open(self, path: Path) -> Any:
        return self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))

    def slice(self, item: TensorPlan) -> torch.Tensor:
        handle = self._handle(item.info.file)
        if not item.info.shape:
            return handle.get_tensor(item.info.source_key)
        return _take(item, handle.get_slice(item.info.source_key))

    def close(self) -> None:
        super().close()
        self._stack.close()


class PreadSource(_Source):
    """``os.preadv`` of each coalesced byte range straight into a fresh tensor: for filesystems where
    mapping files is slow (some network and FUSE filesystems)."""

    owned = True

    def _open(self, path: Path) -> int:
        return os.open(path, os.O_RDONLY)

    def slice(self, item: TensorPlan) -> torch.Tensor:
        out = torch.empty(item.local_shape, dtype=item.info.dtype)
        fd = self._handle(item.info.file)
        buffer = (
            memoryview((ctypes.c_char * item.nbytes).from_address(out.data_ptr())).cast("B")
            if item.nbytes
            else memoryview(b"")
        )
        position = 0
        for piece in slice_ranges(item):
            done = 0
            while done < piece.length:
                got = os.preadv(fd, [buffer[position + done : position + piece.length]], piece.offset + done)
                if got == 0:
                    raise ReadError(
                        f"file ends {piece.offset + done} bytes in, inside the slice",
                        file=str(self._root / item.info.file),
                        key=item.key,
                        hint="The file is truncated: re-download it",
                    )
                done += got
            position += piece.length
        return out

    def close(self) -> None:
        for fd in self._handles.values():
            os.close(fd)
        super().close()


class PickleSource(_Source):
    """``.bin`` fallback: the whole file memory-mapped through ``torch.load(weights_only=True, mmap=True)``."""

    def _open(self, path: Path) -> dict[str, torch.Tensor]:
        return load_pickle(path)

    def slice(self, item: TensorPlan) -> torch.Tensor:
        return _take(item, self._handle(item.info.file)[item.info.source_key])


#: ``TP_LOADER_READER`` value → source for safetensors checkpoints.
READERS: dict[str, type[_Source]] = {"mmap": MappedSource, "safetensors": SafetensorsSource, "pread": PreadSource}


def _read_slice(source: _Source, item: TensorPlan) -> torch.Tensor:
    """``item``'s slice in the stored dtype; a converter target's is assembled from reads of each
    stored piece it needs, concatenated along dim 0."""
    if not item.info.segments:
        return source.slice(item)
    pieces = [finish_read(read, source.slice(sub)) for read, sub in item.segment_plans()]
    if not pieces:
        return torch.empty(item.local_shape, dtype=item.info.dtype)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def dequantize(piece: torch.Tensor, scale: torch.Tensor, item: TensorPlan) -> torch.Tensor:
    """A block-fp8 slice times its scale blocks (float32): ``scale`` holds the blocks covering
    ``item``'s slice; each is widened to its block, then cut to the slice's rows and columns."""
    assert item.scale is not None
    rows, cols = item.block
    widened = scale.float().repeat_interleave(rows, 0).repeat_interleave(cols, 1)
    dim = item.slice.dim
    if dim is not None:
        first = item.scale.slice.ranges[0][0] * item.block[dim]
        widened = torch.cat([widened.narrow(dim, a - first, b - a) for a, b in item.slice.ranges], dim)
    widened = widened[: piece.shape[0], : piece.shape[1]]
    return piece.float() * widened


def _advise(root: Path, items: tuple[TensorPlan, ...]) -> None:
    """``POSIX_FADV_WILLNEED`` over each slice's span (first to last byte; a column slice's span also
    holds other ranks' columns, which is harmless for a hint): the kernel reads ahead, from disk on a
    cold cache, while the first slices are copied. One call per tensor: a call per row of a column
    slice costs more than the reads on a warm cache."""
    if not hasattr(os, "posix_fadvise"):
        return
    spans: dict[str, list[tuple[int, int]]] = {}
    for item in items:
        by_file: dict[str, list[int]] = {}
        for r in read_ranges(item):  # a slice, and the scale blocks of a weight dequantized on load
            first_last = by_file.setdefault(r.file, [r.offset, r.end])
            first_last[1] = r.end
        for name, (first, last) in by_file.items():
            spans.setdefault(name, []).append((first, last - first))
    for name, file_spans in spans.items():
        fd = os.open(root / name, os.O_RDONLY)
        try:
            for offset, length in file_spans:
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def read_tensors(
    root: Path, fmt: str, items: tuple[TensorPlan, ...], options: ReadOptions
) -> tuple[dict[str, torch.Tensor], ReadStats]:
    """Reads every item's slice into a fresh contiguous tensor on ``options.device``.

    Items are read in file and byte-offset order by a bounded pool of threads; each slice is converted
    to the target dtype and device as it is copied out of the file (through a ring of pinned buffers
    for CUDA devices).

    Returns:
        Checkpoint key → local tensor, and what was read.

    Raises:
        ReadError: a file or slice could not be read (names the file and key).
    """
    start = time.perf_counter()
    if fmt == "safetensors":
        source: _Source = READERS[options.reader](root)
        if options.fadvise:
            _advise(root, items)
    else:
        logger.warning(
            "%s holds .bin weights: each rank maps whole files, slice-only reads are impossible for that format", root
        )
        source = PickleSource(root)
    ordered = sorted(items, key=lambda item: (item.info.file, item.info.begin, item.key))
    ring = (
        StagingRing(
            2 * options.num_threads, STAGING_BUFFER_BYTES, cuda_copy(torch.cuda.Stream(options.device)), pin=True
        )
        if options.device.type == "cuda"
        else None
    )
    budget = ByteBudget(options.max_inflight_bytes)
    out: dict[str, torch.Tensor] = {}
    zero_copied: list[str] = []  # list.append is atomic under the GIL
    bar = tqdm(
        total=sum(item.read_bytes for item in ordered),
        unit="B",
        unit_scale=True,
        desc="tp_loader",
        delay=1.0,
        disable=not options.progress,
    )

    def read_one(item: TensorPlan) -> tuple[str, torch.Tensor, int]:
        with budget.hold(item.nbytes):
            try:
                piece = _read_slice(source, item)
                if item.scale is not None:
                    piece = dequantize(piece, source.slice(item.scale), item)
                wanted = target_dtype(item.info.dtype, options.dtype)
                # one range of one stored tensor is a view of the mapping: contiguous rows, or a
                # strided column shard (a matmul takes it as is; a packed shard needs a copy)
                single_view = (
                    isinstance(source, MappedSource)
                    and len(item.slice.ranges) <= 1
                    and not item.info.segments
                    and item.scale is None
                )
                kept_as_is = (source.owned and not item.info.segments) or (options.zero_copy and single_view)
                if kept_as_is and wanted == piece.dtype and options.device.type == "cpu":
                    local = piece
                    if not source.owned:
                        zero_copied.append(item.key)
                else:
                    local = torch.empty(item.local_shape, dtype=wanted, device=options.device)
                    if ring is not None:
                        ring.transfer(piece, local)
                    else:
                        local.copy_(piece)
            except TPLoaderError:
                raise
            except Exception as exc:  # noqa: BLE001 - any read failure is reported with its file and key
                raise ReadError(
                    f"cannot read ranges {list(item.slice.ranges)} of dim {item.slice.dim}: {exc}",
                    file=str(root / item.info.file),
                    key=item.key,
                    hint="The file may be truncated or corrupt: re-download it",
                ) from None
        return item.key, local, item.read_bytes

    read = 0
    try:
        with ThreadPoolExecutor(max_workers=options.num_threads, thread_name_prefix=THREAD_NAME_PREFIX) as pool:
            pending: set[Future] = set()
            for item in ordered:
                pending.add(pool.submit(read_one, item))
                if len(pending) >= 2 * options.num_threads:
                    read += _drain(pending, out, bar, wait_for=FIRST_COMPLETED)
            read += _drain(pending, out, bar, wait_for=None)
    finally:
        bar.close()
        if ring is not None:
            ring.drain()
        source.close()
    return out, ReadStats(read, len(out), time.perf_counter() - start, len(zero_copied))


def _drain(pending: set[Future], out: dict[str, torch.Tensor], bar: tqdm, wait_for: str | None) -> int:
    """Collects finished reads (the first one, or all); re-raises the first failure after cancelling the rest."""
    done, not_done = wait(pending, return_when=wait_for or "ALL_COMPLETED")
    pending.intersection_update(not_done)
    read = 0
    for future in done:
        error = future.exception()
        if error is not None:
            for other in pending:
                other.cancel()
            raise error
        key, local, nbytes = future.result()
        out[key] = local
        read += nbytes
        bar.update(nbytes)
    return read
