"""Stage 4, read: the only stage that touches tensor data. Each rank reads exactly its slices."""

from __future__ import annotations

import contextlib
import logging
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

from .errors import ReadError, TPLoaderError
from .index import load_pickle
from .plan import TensorPlan

logger = logging.getLogger("tp_loader")

THREAD_NAME_PREFIX = "spawn_tp_materialize"


@dataclass(frozen=True)
class ReadOptions:
    """How to read.

    Attributes:
        dtype: floating-point tensors are converted to this dtype (``None``: keep the stored dtype).
        device: where the shards end up.
        num_threads: reader threads.
        max_inflight_bytes: bytes being read at once; one tensor larger than this is read alone.
        progress: show a progress bar (rank 0 only; shown once a load takes over a second).
    """

    dtype: torch.dtype | None
    device: torch.device
    num_threads: int
    max_inflight_bytes: int
    progress: bool = False


@dataclass(frozen=True)
class ReadStats:
    """What one rank read: bytes copied out of the checkpoint files, tensors, seconds."""

    bytes_read: int
    num_tensors: int
    seconds: float


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


def _index(item: TensorPlan) -> tuple[slice, ...]:
    piece = item.slice
    if piece.dim is None:
        return tuple(slice(None) for _ in item.info.shape)
    return tuple(slice(piece.start, piece.stop) if d == piece.dim else slice(None) for d in range(len(item.info.shape)))


class _Sources:
    """Open handles on the checkpoint's files, one per file, closed together."""

    def __init__(self, root: Path, fmt: str) -> None:
        self._root = root
        self._fmt = fmt
        self._handles: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stack = contextlib.ExitStack()

    def view(self, item: TensorPlan) -> torch.Tensor:
        """A view (into the file's mapping) of exactly ``item``'s slice."""
        with self._lock:
            handle = self._handles.get(item.info.file)
            if handle is None:
                path = self._root / item.info.file
                if self._fmt == "safetensors":
                    handle = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
                else:
                    handle = load_pickle(path)
                self._handles[item.info.file] = handle
        if self._fmt == "safetensors":
            if not item.info.shape:
                return handle.get_tensor(item.key)
            return handle.get_slice(item.key)[_index(item)]
        return handle[item.key][_index(item)]

    def close(self) -> None:
        self._handles.clear()
        self._stack.close()


def read_tensors(root: Path, fmt: str, items: tuple[TensorPlan, ...], options: ReadOptions) -> tuple[dict[str, torch.Tensor], ReadStats]:
    """Reads every item's slice into a fresh contiguous tensor on ``options.device``.

    Items are read in file and byte-offset order by a bounded pool of threads; each slice is converted
    to the target dtype and device as it is copied out of the file's mapping.

    Returns:
        Checkpoint key → local tensor, and what was read.

    Raises:
        ReadError: a file or slice could not be read (names the file and key).
    """
    start = time.perf_counter()
    if fmt != "safetensors":
        logger.warning("%s holds .bin weights: each rank maps whole files, slice-only reads are impossible for that format", root)
    ordered = sorted(items, key=lambda item: (item.info.file, item.info.begin, item.key))
    total = sum(item.nbytes for item in ordered)
    sources = _Sources(root, fmt)
    budget = ByteBudget(options.max_inflight_bytes)
    out: dict[str, torch.Tensor] = {}
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tp_loader", delay=1.0, disable=not options.progress)

    def read_one(item: TensorPlan) -> tuple[str, torch.Tensor, int]:
        nbytes = item.nbytes
        with budget.hold(nbytes):
            try:
                view = sources.view(item)
                local = torch.empty(item.local_shape, dtype=target_dtype(item.info.dtype, options.dtype), device=options.device)
                local.copy_(view)
            except TPLoaderError:
                raise
            except Exception as exc:  # noqa: BLE001 - any read failure is reported with its file and key
                raise ReadError(f"cannot read slice {item.slice.start}:{item.slice.stop} of dim {item.slice.dim}: {exc}", file=str(root / item.info.file), key=item.key, hint="The file may be truncated or corrupt: re-download it") from None
        return item.key, local, nbytes

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
        sources.close()
    if options.device.type == "cuda":
        torch.cuda.synchronize(options.device)
    return out, ReadStats(read, len(out), time.perf_counter() - start)


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
