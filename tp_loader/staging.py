"""Host-to-device copies through a small ring of reused pinned buffers.

A reader thread copies a slice (in row chunks) out of the file mapping into the next free pinned
buffer, then queues a ``non_blocking`` copy of that buffer to the device; the buffer is reused only
once that copy has finished, so reading the next chunk overlaps the previous transfer. The device copy
and its completion event are injected, so the ring's ordering and reuse logic is tested on CPU with a
CPU tensor standing in for the device.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

import torch


class Event(Protocol):
    def synchronize(self) -> None: ...


#: ``copy(dst, src) -> event``: starts copying ``src`` (a staging buffer view) into ``dst``.
CopyFn = Callable[[torch.Tensor, torch.Tensor], Event]


class StagingRing:
    """``num_buffers`` host buffers of ``buffer_bytes`` each, handed out round-robin.

    Args:
        num_buffers: buffers in the ring (2 or more lets a read overlap the previous copy).
        buffer_bytes: size of each buffer; a row larger than this gets a buffer of its own size.
        copy: starts the device copy and returns an event to wait on before the buffer is reused.
        pin: allocate pinned (page-locked) memory, needed for truly asynchronous CUDA copies.
    """

    def __init__(self, num_buffers: int, buffer_bytes: int, copy: CopyFn, *, pin: bool = False) -> None:
        self._buffers = [
            torch.empty(buffer_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(max(1, num_buffers))
        ]
        self._pending: list[Event | None] = [None] * len(self._buffers)
        self._free = list(range(len(self._buffers)))
        self._cond = threading.Condition()
        self._copy = copy
        self._pin = pin

    def _acquire(self) -> int:
        with self._cond:
            self._cond.wait_for(lambda: bool(self._free))
            index = self._free.pop(0)
        event = self._pending[index]
        if event is not None:
            event.synchronize()  # the previous copy out of this buffer has finished
            self._pending[index] = None
        return index

    def _release(self, index: int, event: Event) -> None:
        self._pending[index] = event
        with self._cond:
            self._free.append(index)
            self._cond.notify()

    def transfer(self, view: torch.Tensor, dest: torch.Tensor) -> None:
        """Copies ``view`` (a CPU tensor of any strides) into ``dest`` (contiguous, same shape, any
        dtype and device) in chunks of whole rows along dim 0, through the ring."""
        if view.dim() == 0 or view.numel() == 0:
            dest.copy_(view)
            return
        row_bytes = max(1, dest[0].numel() * dest.element_size())
        rows_per_chunk = max(1, self._buffers[0].numel() // row_bytes)
        for start in range(0, view.shape[0], rows_per_chunk):
            stop = min(start + rows_per_chunk, view.shape[0])
            index = self._acquire()
            nbytes = (stop - start) * row_bytes
            if self._buffers[index].numel() < nbytes:
                self._buffers[index] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._pin)
            staged = self._buffers[index][:nbytes].view(dest.dtype).view(stop - start, *dest.shape[1:])
            staged.copy_(view[start:stop])  # the read: file mapping -> pinned host memory (dtype converted)
            self._release(index, self._copy(dest[start:stop], staged))

    def drain(self) -> None:
        """Waits for every queued copy."""
        for index, event in enumerate(self._pending):
            if event is not None:
                event.synchronize()
                self._pending[index] = None


def cuda_copy(stream: torch.cuda.Stream) -> CopyFn:
    """A ``non_blocking`` copy on ``stream`` and an event recorded after it."""

    def copy(dst: torch.Tensor, src: torch.Tensor) -> Event:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return event

    return copy
