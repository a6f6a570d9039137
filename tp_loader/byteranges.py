"""Which bytes of which file a rank's slice is made of, and how they merge into large reads.

Pure arithmetic on header offsets: used for ``posix_fadvise`` hints, the ``pread`` reader, the
benchmark's raw-read baseline and the tests' byte accounting.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from .plan import TensorPlan


@dataclass(frozen=True)
class ByteRange:
    """``length`` bytes of ``file`` from absolute offset ``offset``."""

    file: str
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def slice_ranges(item: TensorPlan) -> list[ByteRange]:
    """The file byte ranges of ``item``'s slice, in file order; empty for an empty slice.

    A slice along ``dim`` is, for each of the ``prod(shape[:dim])`` outer indices, one run of
    ``(stop - start) * prod(shape[dim+1:])`` elements per range; runs that touch come back as one.
    A converter target made of several stored tensors gives the ranges of every piece it reads.
    """
    info, piece = item.info, item.slice
    if item.quant is not None:  # a quantized weight dequantized on load: its stored tensors' windows
        return sorted((r for sub in item.quant_plans() for r in slice_ranges(sub)), key=lambda r: (r.file, r.offset))
    if info.segments:  # a converter target: the ranges of each stored piece it reads
        return coalesce(
            sorted((r for _, sub in item.segment_plans() for r in slice_ranges(sub)), key=lambda r: (r.file, r.offset))
        )
    itemsize = info.dtype.itemsize
    if piece.dim is None or item.nbytes == info.nbytes:
        return [ByteRange(info.file, info.begin, info.nbytes)] if info.nbytes else []
    inner = math.prod(info.shape[piece.dim + 1 :]) * itemsize
    outer = math.prod(info.shape[: piece.dim])
    stride = info.shape[piece.dim] * inner
    return coalesce(
        ByteRange(info.file, info.begin + i * stride + a * inner, (b - a) * inner)
        for i in range(outer)
        for a, b in piece.ranges
    )


def read_ranges(item: TensorPlan) -> list[ByteRange]:
    """Everything reading ``item`` touches: its slice's ranges plus, for a block-fp8 weight dequantized
    on load, the ranges of the scale blocks covering it."""
    if item.scale is None:
        return slice_ranges(item)
    return coalesce(sorted(slice_ranges(item) + slice_ranges(item.scale), key=lambda r: (r.file, r.offset)))


def coalesce(ranges: Iterable[ByteRange], max_length: int | None = None) -> list[ByteRange]:
    """Merges ranges of the same file that touch into one (up to ``max_length`` bytes each).

    Ranges must come in file order and must not overlap.

    Raises:
        ValueError: two ranges overlap (a byte would be read twice) or come out of order.
    """
    merged: list[ByteRange] = []
    for current in ranges:
        if current.length == 0:
            continue
        last = merged[-1] if merged else None
        if last is not None and last.file == current.file:
            if current.offset < last.end:
                raise ValueError(
                    f"byte ranges overlap or are out of order in {current.file}: "
                    f"[{last.offset}, {last.end}) then [{current.offset}, {current.end})"
                )
            if current.offset == last.end and (max_length is None or last.length + current.length <= max_length):
                merged[-1] = ByteRange(last.file, last.offset, last.length + current.length)
                continue
        merged.append(current)
    return merged
