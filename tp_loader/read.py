"""Stage 4, read: the only stage that touches tensor data. Each rank reads exactly its slices."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import math
import mmap
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
from .env import Settings
from .errors import ReadError, TPLoaderError
from .index import load_pickle
from .plan import TensorPlan
from .quant import dequantize as dequantize_quantized
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
        stall_s: a read that makes no progress (no slice finished, no bytes arrived) for this long is
            a ReadError.
    """

    dtype: torch.dtype | None
    device: torch.device
    num_threads: int
    max_inflight_bytes: int
    progress: bool = False
    reader: str = "mmap"
    fadvise: bool = False
    zero_copy: bool = False
    stall_s: float = math.inf

    @classmethod
    def from_settings(
        cls, settings: Settings, dtype: torch.dtype | None, device: torch.device, *, progress: bool = False
    ) -> ReadOptions:
        """The options the environment's settings give a load converting to ``dtype`` on ``device``."""
        return cls(
            dtype,
            device,
            settings.num_threads,
            settings.max_inflight_bytes,
            progress=progress,
            reader=settings.reader,
            fadvise=settings.fadvise,
            zero_copy=settings.zero_copy,
            stall_s=settings.timeout_s / 2,
        )


@dataclass(frozen=True)
class ReadStats:
    """What one rank's read stage did with its slices.

    Attributes:
        bytes_read: bytes of slices read during the load: copied out of the files (``preadv``, or a copy out
            of a mapping, as a dtype conversion or the ``safetensors`` reader makes). Never a zero-copy view's.
        num_tensors: tensors it returned.
        seconds: the read stage's wall time.
        zero_copy_tensors: how many of the tensors are views of a file mapping.
        bytes_mapped: bytes of slices left as views of a file mapping, read from storage only when first
            touched (after the load, or by a later stage: see the report's ``bytes_read``).
        bytes_planned: bytes of the slices of every item asked for (``TensorPlan.read_bytes``), however they
            arrive; default: ``bytes_read + bytes_mapped``.
    """

    bytes_read: int
    num_tensors: int
    seconds: float
    zero_copy_tensors: int = 0
    bytes_mapped: int = 0
    bytes_planned: int | None = None

    def __post_init__(self) -> None:
        if self.bytes_planned is None:
            object.__setattr__(self, "bytes_planned", self.bytes_read + self.bytes_mapped)


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
    a file mapping, or (when ``owned``) a fresh tensor already holding the bytes. ``view(item)``, where
    ``can_view(item)``, returns the slice as a view of a private file mapping without reading it.
    """

    owned = False
    #: reads this source has completed, counted in chunks: a stall watchdog sees whether reads progress
    ticks = 0

    def __init__(self, root: Path, file_sizes: dict[str, int]) -> None:
        self._root = root
        self._file_sizes = file_sizes
        self._handles: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _handle(self, name: str) -> Any:
        with self._lock:
            handle = self._handles.get(name)
            if handle is None:
                self._check_size(name)
                handle = self._handles[name] = self._open(self._root / name)
            return handle

    def _check_size(self, name: str, key: str | None = None) -> None:
        """Raises a ReadError if ``name`` is now shorter than when its header was read."""
        path = self._root / name
        size, indexed = path.stat().st_size, self._file_sizes.get(name, 0)
        if size < indexed:
            raise ReadError(
                f"file is {size} bytes, {indexed - size} fewer than when its header was read: it shrank "
                "during the load",
                file=str(path),
                key=key,
                hint="Another process truncated or is rewriting the file; replace checkpoint files by renaming a "
                "complete new file over them, never in place, and load again",
            )

    def _open(self, path: Path) -> Any:
        raise NotImplementedError

    def slice(self, item: TensorPlan) -> torch.Tensor:
        raise NotImplementedError

    def can_view(self, item: TensorPlan) -> bool:
        return False

    def view(self, item: TensorPlan) -> torch.Tensor:
        raise NotImplementedError

    def check_sizes(self) -> None:
        """Raises a ReadError if a file this source opened is now shorter than when its header was read."""
        for name in list(self._handles):
            self._check_size(name)

    def close(self) -> None:
        self._handles.clear()


def _buffer(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable in place."""
    nbytes = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B") if nbytes else memoryview(b"")


class PreadSource(_Source):
    """``os.preadv`` of each slice straight into a fresh tensor. Reading with system calls, never by
    touching a mapping, makes a file that shrinks mid-load a short read (a ReadError), not a SIGBUS.

    Runs of at least ``EXACT_RUN_BYTES`` (rows, and long column runs) are read exactly; a slice made of
    shorter runs (a column shard of narrow rows) is read as whole row blocks of at most
    ``STAGING_BUFFER_BYTES`` into a staging buffer and its columns copied out: one system call per
    block instead of one per row.
    """

    owned = True
    EXACT_RUN_BYTES = 64 * 1024
    #: whole rows read at a time for a slice of short runs: small enough that the block is still in the CPU's
    #: cache when its columns are copied out (docs/performance.md: 32 MiB blocks cost TP 2's column shards 35%)
    BLOCK_BYTES = 1024 * 1024
    #: fault each destination's pages in with one system call before reading into it, when one thread reads
    #: (``read_tensors`` sets it): 0.15 s instead of 0.19 s for TP 2's 366 MB of row shards. With two threads it
    #: cost more than it saved (0.31 s against 0.26 s at TP 1): a fault-in holds the address space's lock, and the
    #: other thread's allocations wait for it
    prefault = False
    #: bytes per system call: a slow read still shows progress every chunk
    CHUNK_BYTES = 16 * 1024 * 1024
    #: bytes converted to another dtype at a time: read and widened while still in the CPU cache
    CONVERT_BYTES = 1024 * 1024

    def __init__(self, root: Path, file_sizes: dict[str, int]) -> None:
        super().__init__(root, file_sizes)
        self._thread = threading.local()  # each reader thread's staging buffer

    def _open(self, path: Path) -> int:
        return os.open(path, os.O_RDONLY)

    def _staging(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """This thread's staging buffer, as ``numel`` elements of ``dtype``: one buffer per reader thread, kept
        for the read and grown when a block needs more. A fresh buffer per block left the allocator holding
        several (glibc serves blocks under 32 MiB from its heap once one has been freed): a reload of 2.2 GB a
        rank grew by 128 MiB with one reader thread, against the 32 MiB of one block; now by 32 MiB."""
        nbytes = numel * dtype.itemsize
        buffer = getattr(self._thread, "buffer", None)
        if buffer is None or buffer.numel() < nbytes:
            self._thread.buffer = buffer = None  # the old one goes first: never two alive in one thread
            # its own anonymous mapping, unmapped when the last view of it goes: no allocator keeps it
            buffer = self._thread.buffer = torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=torch.uint8)
        return buffer[:nbytes].view(dtype)

    def _pread(self, item: TensorPlan, buffer: memoryview, offset: int) -> None:
        done = 0
        while done < len(buffer):
            got = os.preadv(self._handle(item.info.file), [buffer[done : done + self.CHUNK_BYTES]], offset + done)
            if got == 0:
                self._check_size(item.info.file, item.key)
                raise ReadError(
                    f"file ends {offset + done} bytes in, inside the slice",
                    file=str(self._root / item.info.file),
                    key=item.key,
                    hint="The file is truncated: re-download it",
                )
            done += got
            self.ticks += 1

    def slice(self, item: TensorPlan) -> torch.Tensor:
        out = torch.empty(item.local_shape, dtype=item.info.dtype)
        self.read_into(item, out)
        return out

    def read_into(self, item: TensorPlan, out: torch.Tensor) -> None:
        """Reads ``item``'s slice into ``out`` (contiguous, on the CPU, of ``item``'s local shape): straight
        into it in the stored dtype, else through a staging buffer of ``CONVERT_BYTES``, converted block by
        block while the block is still in the CPU's cache (a column shard of short rows: see
        :meth:`_read_row_blocks`)."""
        if self.prefault:
            prefault_for_writing(out)  # one call instead of a page fault per 4 KiB page inside the reads
        ranges = slice_ranges(item)
        if item.slice.dim and len(ranges) > 1 and item.nbytes < self.EXACT_RUN_BYTES * len(ranges):
            self._read_row_blocks(item, out)
            return
        if out.dtype == item.info.dtype:
            buffer, position = _buffer(out), 0
            for piece in ranges:
                self._pread(item, buffer[position : position + piece.length], piece.offset)
                position += piece.length
            return
        itemsize = item.info.dtype.itemsize
        staging = self._staging(min(item.nbytes, self.CONVERT_BYTES) // itemsize, item.info.dtype)
        flat, position = out.view(-1), 0
        for piece in ranges:
            for first in range(0, piece.length, self.CONVERT_BYTES):
                length = min(self.CONVERT_BYTES, piece.length - first)
                block = staging[: length // itemsize]
                self._pread(item, _buffer(block), piece.offset + first)
                flat[position : position + block.numel()].copy_(block)
                position += block.numel()

    def _read_row_blocks(self, item: TensorPlan, out: torch.Tensor) -> None:
        """A slice along dim >= 1: blocks of whole outer rows read into a staging buffer, then the
        slice's ranges of each block copied into ``out``."""
        info, dim = item.info, item.slice.dim
        outer = math.prod(info.shape[:dim])
        inner = math.prod(info.shape[dim + 1 :])
        row_elems = info.shape[dim] * inner
        rows_per_block = max(1, self.BLOCK_BYTES // max(1, row_elems * info.dtype.itemsize))
        staging = self._staging(min(outer, rows_per_block) * row_elems, info.dtype)
        dest = out.view(outer, -1, inner)
        for first in range(0, outer, rows_per_block):
            count = min(rows_per_block, outer - first)
            block = staging[: count * row_elems]
            self._pread(item, _buffer(block), info.begin + first * row_elems * info.dtype.itemsize)
            block = block.view(count, info.shape[dim], inner)
            column = 0
            for a, b in item.slice.ranges:
                dest[first : first + count, column : column + b - a].copy_(block[:, a:b])
                column += b - a

    def close(self) -> None:
        for fd in self._handles.values():
            os.close(fd)
        self._thread = threading.local()  # every thread's staging buffer goes with the old one
        super().close()


class MappedSource(PreadSource):
    """The default: copies are read with ``preadv`` (as :class:`PreadSource`); a zero-copy shard is a
    view of the file's private (``MAP_PRIVATE``: writes never reach the file) mapping, held by a torch
    storage that owns it, so the view stays valid for as long as any tensor uses it. A view's pages
    are read at its first use, after the load; the load checks that no mapped file shrank meanwhile."""

    def __init__(self, root: Path, file_sizes: dict[str, int]) -> None:
        super().__init__(root, file_sizes)
        self._maps: dict[str, torch.Tensor] = {}  # file → its bytes
        self._typed: dict[tuple[str, torch.dtype], torch.Tensor] = {}  # (file, dtype) → its elements

    def can_view(self, item: TensorPlan) -> bool:
        """One range of one stored tensor, as stored, at an offset aligned for its dtype (safetensors does not
        promise alignment: a misaligned tensor is read as a copy)."""
        info = item.info
        aligned = info.begin % info.dtype.itemsize == 0
        return (
            len(item.slice.ranges) <= 1 and not info.segments and item.scale is None and item.quant is None and aligned
        )

    def view(self, item: TensorPlan) -> torch.Tensor:
        info = item.info
        if info.nbytes == 0:
            return torch.empty(item.local_shape, dtype=info.dtype)
        self._handle(info.file)  # checks the size
        typed = self._typed.get((info.file, info.dtype))
        if typed is None:
            typed = self._typed_file(info.file, info.dtype)
        # one as_strided of the file's elements instead of a slice, two views and an index per tensor, which cost
        # three times as much per view (docs/performance.md): the same storage, offset and strides
        itemsize = info.dtype.itemsize
        shape = list(info.shape)
        strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
        offset = info.begin // itemsize  # can_view: aligned
        dim = item.slice.dim
        first, stop = (0, 0) if dim is None else item.slice.ranges[0]
        # as_strided checks bounds against the whole file only: the tensor's own span and the slice's range are
        # checked here, as the slicing this replaced did (the header parser and the planner already keep both)
        if info.end - info.begin != info.nbytes or (dim is not None and not 0 <= first <= stop <= shape[dim]):
            raise ReadError(
                f"the view of bytes [{info.begin}, {info.end}) as {list(info.shape)} or of its range "
                f"[{first}, {stop}) on dim {dim} is out of bounds",
                file=str(self._root / info.file),
                key=item.key,
                hint="This is a tp_loader defect: report it with the checkpoint's header",
            )
        if dim is not None:
            offset += first * strides[dim]
            shape[dim] = stop - first
        return typed.as_strided(shape, strides, offset)

    def _typed_file(self, file: str, dtype: torch.dtype) -> torch.Tensor:
        """The whole of ``file``, mapped once, as elements of ``dtype`` (a trailing partial element left out)."""
        with self._lock:
            mapped = self._maps.get(file)
            if mapped is None:
                path = self._root / file
                size = self._file_sizes.get(file) or path.stat().st_size
                storage = torch.UntypedStorage.from_file(str(path), False, size)
                mapped = self._maps[file] = torch.empty(0, dtype=torch.uint8).set_(storage)
            typed = self._typed.get((file, dtype))
            if typed is None:
                whole = mapped[: mapped.numel() // dtype.itemsize * dtype.itemsize]
                typed = self._typed[(file, dtype)] = whole.view(dtype)
            return typed

    def close(self) -> None:
        self._maps.clear()
        self._typed.clear()
        super().close()


class SafetensorsSource(_Source):
    """The plain path: ``safe_open(...).get_slice(key)[...]``. Its copies touch safetensors' own
    mapping: a file that shrinks before a slice is read is a ReadError, but one truncated during the
    copy of a slice ends the process with SIGBUS, as any reader of that library does."""

    def __init__(self, root: Path, file_sizes: dict[str, int]) -> None:
        super().__init__(root, file_sizes)
        self._stack = contextlib.ExitStack()

    def _open(self, path: Path) -> Any:
        return self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))

    def slice(self, item: TensorPlan) -> torch.Tensor:
        self._check_size(item.info.file, item.key)
        handle = self._handle(item.info.file)
        if not item.info.shape:
            return handle.get_tensor(item.info.source_key)
        return _take(item, handle.get_slice(item.info.source_key))

    def close(self) -> None:
        super().close()
        self._stack.close()


class PickleSource(PreadSource):
    """``.bin`` files: a tensor stored as one contiguous run of its zip record (as ``torch.save`` and
    ``save_pretrained`` write them) is read exactly like a safetensors slice; any other is sliced out of
    the file mapped by ``torch.load(weights_only=True, mmap=True)``."""

    def __init__(self, root: Path, file_sizes: dict[str, int]) -> None:
        super().__init__(root, file_sizes)
        self._states: dict[str, dict[str, torch.Tensor]] = {}

    def slice(self, item: TensorPlan) -> torch.Tensor:
        if item.info.begin >= 0:
            return super().slice(item)
        with self._lock:
            state = self._states.get(item.info.file)
            if state is None:
                self._check_size(item.info.file, item.key)
                state = self._states[item.info.file] = load_pickle(self._root / item.info.file)
        return _take(item, state[item.info.source_key])

    def close(self) -> None:
        self._states.clear()
        super().close()


#: ``TP_LOADER_READER`` value → source for safetensors checkpoints.
READERS: dict[str, type[_Source]] = {"mmap": MappedSource, "safetensors": SafetensorsSource, "pread": PreadSource}


def _read_slice(source: _Source, item: TensorPlan) -> torch.Tensor:
    """``item``'s slice in the stored dtype; a converter target's is assembled from reads of each
    stored piece it needs, concatenated along dim 0; a quantized weight's is dequantized (float32) from
    the windows of its stored tensors covering it."""
    if item.quant is not None:
        return dequantize_quantized(item.quant, lambda info, piece: source.slice(TensorPlan(info, piece, "", None)))
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


#: ``madvise`` advice (Linux 5.14): fault in every page of a range, writable.
MADV_POPULATE_WRITE = 23
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_PREFAULT = threading.Lock()  # one caller at a time sets _MADVISE up
_MADVISE: list[Any] = []  # the C library's madvise, or None once it proved unavailable


def copies_on_write(tensor: torch.Tensor) -> bool:
    """Whether writing ``tensor`` may copy its pages first: a contiguous CPU tensor in a mapping (``is_shared()``:
    a zero-copy shard is a view of a private file mapping). Plain memory, and strided views (a column shard's
    span holds other ranks' columns, whose pages a prefault would make this process's own too), are not."""
    return tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.untyped_storage().is_shared()


def prefault_for_writing(tensor: torch.Tensor) -> None:
    """Faults in the pages of a contiguous CPU tensor, writable, in one system call.

    A model loaded zero-copy and reloaded in place is written through its private file mapping, which copies
    each page on its first write. Faulted page by page inside the readers' copies, with two reader threads
    contending for the process's page tables, the reload of ``benchmarks.ready``'s 0.53 GB model took 0.81 s
    at TP 1, against 0.36 s with one thread. :func:`read_tensors` therefore faults every such destination in
    with this, in one reader task, before any reader writes (docs/benchmarks.md has the reload with it). Where
    the kernel (before Linux 5.14) or the platform lacks it, nothing happens.
    """
    if tensor.numel() == 0:
        return
    with _PREFAULT:  # the set-up only: reader threads fault their destinations in at the same time
        if not _MADVISE:
            try:
                madvise = ctypes.CDLL(None, use_errno=True).madvise
                madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            except (OSError, AttributeError, TypeError):  # no C library by that name (Windows), or no madvise
                madvise = None
            _MADVISE.append(madvise)
        madvise = _MADVISE[0]
    if madvise is None:
        return
    start = tensor.data_ptr() // _PAGE * _PAGE
    length = -(-(tensor.data_ptr() + tensor.nbytes - start) // _PAGE) * _PAGE
    if madvise(start, length, MADV_POPULATE_WRITE) != 0 and ctypes.get_errno() == errno.EINVAL:
        _MADVISE[0] = None  # a kernel without the advice: the writes fault the pages in themselves


def _prefault_all(tensors: list[torch.Tensor]) -> list:
    """A reader task: :func:`prefault_for_writing` of each tensor; it reads no tensor (an empty result)."""
    for tensor in tensors:
        prefault_for_writing(tensor)
    return []


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
    root: Path,
    fmt: str,
    items: tuple[TensorPlan, ...],
    options: ReadOptions,
    file_sizes: dict[str, int] | None = None,
    destinations: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], ReadStats]:
    """Reads every item's slice into a fresh contiguous tensor on ``options.device``, or into the
    tensor ``destinations`` gives for its key (of the item's local shape, on ``options.device``, checked
    by the caller; a strided one is written through a copy), converted to that tensor's dtype.

    Items are read in file and byte-offset order by a bounded pool of threads; each slice is converted
    to the target dtype and device as it is copied out of the file (through a ring of pinned buffers
    for CUDA devices).

    Returns:
        Checkpoint key → local tensor, and what was read: the bytes of the slices copied (``bytes_read``) and
        of those left as zero-copy views (``bytes_mapped``: no page of them is read here).

    Raises:
        ReadError: a file or slice could not be read (names the file and key).
    """
    start = time.perf_counter()
    if fmt == "safetensors":
        source: _Source = READERS[options.reader](root, file_sizes or {})
        if isinstance(source, PreadSource):
            source.prefault = options.num_threads == 1
        if options.fadvise:
            _advise(root, items)
    else:
        mapped_whole = sorted({item.info.file for item in items if item.info.begin < 0 and item.info.nbytes})
        if mapped_whole:
            logger.warning(
                "%s: .bin files %s hold tensors that are not one contiguous run of their record; each rank "
                "maps those files whole to slice them",
                root,
                mapped_whole,
            )
        source = PickleSource(root, file_sizes or {})
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
    mapped: list[int] = []  # bytes of each zero-copy view; list.append is atomic under the GIL
    planned = sum(item.read_bytes for item in ordered)
    bar = tqdm(
        total=planned,
        unit="B",
        unit_scale=True,
        desc="tp_loader",
        delay=1.0,
        disable=not options.progress,
    )

    def viewable(item: TensorPlan) -> bool:
        """Whether ``item``'s shard is a view of the file's mapping (zero-copy: no bytes read now)."""
        return (
            options.zero_copy
            and options.device.type == "cpu"
            and not (destinations and item.key in destinations)
            and source.can_view(item)
            and target_dtype(item.info.dtype, options.dtype) == item.info.dtype
        )

    def failed(item: TensorPlan, exc: Exception) -> ReadError:
        return ReadError(
            f"cannot read ranges {list(item.slice.ranges)} of dim {item.slice.dim}: {exc}",
            file=str(root / item.info.file),
            key=item.key,
            hint="The file may be truncated or corrupt: re-download it",
        )

    def view_all(items: list[TensorPlan]) -> list[tuple[str, torch.Tensor, int]]:
        """Views of a run of zero-copy items, in one task: a thread hand-off per view cost more than the
        view (about 0.1 ms each, 20 ms for a 22-layer model)."""
        out = []
        for item in items:
            try:
                out.append((item.key, source.view(item), item.read_bytes))
            except TPLoaderError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure is reported with its file and key
                raise failed(item, exc) from None
            mapped.append(item.read_bytes)
        return out

    def read_one(item: TensorPlan) -> list[tuple[str, torch.Tensor, int]]:
        with budget.hold(item.nbytes):
            try:
                wanted = target_dtype(item.info.dtype, options.dtype)
                given = destinations.get(item.key) if destinations else None
                if given is not None:
                    wanted = given.dtype
                if (
                    isinstance(source, PreadSource)
                    and options.device.type == "cpu"
                    and (given is None or given.is_contiguous())
                    and not item.info.segments
                    and item.scale is None
                    and item.quant is None
                    and item.info.begin >= 0
                ):
                    local = given if given is not None else torch.empty(item.local_shape, dtype=wanted)
                    source.read_into(item, local)
                else:
                    piece = _read_slice(source, item)
                    if item.scale is not None:
                        piece = dequantize(piece, source.slice(item.scale), item)
                    local = (
                        given
                        if given is not None
                        else torch.empty(item.local_shape, dtype=wanted, device=options.device)
                    )
                    if ring is not None:
                        ring.transfer(piece, local)
                    else:
                        local.copy_(piece)
            except TPLoaderError:
                raise
            except Exception as exc:  # noqa: BLE001 - any read failure is reported with its file and key
                raise failed(item, exc) from None
        return [(item.key, local, item.read_bytes)]

    read = 0
    pool = ThreadPoolExecutor(max_workers=options.num_threads, thread_name_prefix=THREAD_NAME_PREFIX)
    pending: dict[Future, TensorPlan] = {}
    stalled = False
    try:
        written = [given for given in (destinations or {}).values() if copies_on_write(given)]
        if written and ordered:  # by one thread, before any write, watched for stalls as the reads are
            pending[pool.submit(_prefault_all, written)] = ordered[0]
            read += _drain(pending, out, bar, source, options.stall_s, every=True)
        views: list[TensorPlan] = []
        for item in ordered:
            if viewable(item):
                views.append(item)
                continue
            if views:
                pending[pool.submit(view_all, views)] = views[0]
                views = []
            pending[pool.submit(read_one, item)] = item
            if len(pending) >= 2 * options.num_threads:
                read += _drain(pending, out, bar, source, options.stall_s, every=False)
        if views:
            pending[pool.submit(view_all, views)] = views[0]
        read += _drain(pending, out, bar, source, options.stall_s, every=True)
        source.check_sizes()
    except _Stalled as exc:
        stalled = True
        item = exc.item
        raise ReadError(
            f"no read made progress for {options.stall_s:g} s (half of TP_LOADER_TIMEOUT_S, so that every rank "
            "hears of it within the timeout)",
            file=str(root / item.info.file),
            key=item.key,
            hint="The storage is not answering (a stalled network filesystem?); check the mount, or raise "
            "TP_LOADER_TIMEOUT_S for very slow storage",
        ) from None
    finally:
        # a stalled read cannot be interrupted: leave its thread (and the files it reads) behind
        pool.shutdown(wait=not stalled, cancel_futures=True)
        bar.close()
        if ring is not None and not stalled:
            ring.drain()
        if not stalled:
            source.close()
    bytes_mapped = sum(mapped)
    return out, ReadStats(
        bytes_read=read - bytes_mapped,
        num_tensors=len(out),
        seconds=time.perf_counter() - start,
        zero_copy_tensors=len(mapped),
        bytes_mapped=bytes_mapped,
        bytes_planned=planned,
    )


class _Stalled(Exception):
    def __init__(self, item: TensorPlan) -> None:
        self.item = item


def _drain(
    pending: dict[Future, TensorPlan],
    out: dict[str, torch.Tensor],
    bar: tqdm,
    source: _Source,
    stall_s: float,
    *,
    every: bool,
) -> int:
    """Collects finished reads (at least one, or ``every`` one); re-raises the first failure after
    cancelling the rest.

    Raises:
        _Stalled: no read finished and no bytes arrived for ``stall_s`` seconds (names the oldest read).
    """
    read = 0
    ticks, since = source.ticks, time.monotonic()
    while pending:
        done, _ = wait(pending, timeout=min(1.0, stall_s), return_when=FIRST_COMPLETED)
        if not done:
            if source.ticks != ticks:
                ticks, since = source.ticks, time.monotonic()
            elif time.monotonic() - since >= stall_s:
                raise _Stalled(next(iter(pending.values())))
            continue
        ticks, since = source.ticks, time.monotonic()
        for future in done:
            del pending[future]
            error = future.exception()
            if error is not None:
                for other in pending:
                    other.cancel()
                raise error
            for key, local, nbytes in future.result():
                out[key] = local
                read += nbytes
                bar.update(nbytes)
        if not every:
            break
    return read
