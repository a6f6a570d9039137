"""Two processes of one node reading the same bytes: buffered (the page cache shares them) against O_DIRECT (each
reads them from storage). Decides whether a per-node share mode could pay (docs/benchmarks.md, "Replicas").

    sync; python -m benchmarks.direct_io FILE
"""

from __future__ import annotations

import mmap
import os
import statistics
import sys
import time
from multiprocessing import Barrier, Process, Queue
from pathlib import Path

from benchmarks.measure import evict_files

#: Bytes per preadv call (a multiple of the 4 KiB alignment O_DIRECT needs; mmap'd buffers are page-aligned).
CHUNK = 16 << 20


def _read(path: str, size: int, direct: bool, start: Barrier, out: Queue) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    buffer = mmap.mmap(-1, CHUNK)
    start.wait()
    began, offset = time.perf_counter(), 0
    while offset < size:
        offset += os.preadv(fd, [buffer], offset)
    out.put(time.perf_counter() - began)


def measure(path: str, direct: bool, readers: int, reps: int = 3) -> float:
    """Median over ``reps`` of the slowest of ``readers`` processes reading the same whole MiBs of ``path``."""
    size = os.path.getsize(path) // (1 << 20) * (1 << 20)
    times = []
    for _ in range(reps):
        evict_files([Path(path)])
        start, out = Barrier(readers), Queue()
        procs = [Process(target=_read, args=(path, size, direct, start, out)) for _ in range(readers)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        times.append(max(out.get() for _ in range(readers)))
    return statistics.median(times)


def main() -> None:
    path = sys.argv[1]
    for direct in (False, True):
        for readers in (1, 2):
            kind = "O_DIRECT" if direct else "buffered"
            print(f"{kind}, {readers} reader(s) of the same bytes: {measure(path, direct, readers):.3f} s", flush=True)


if __name__ == "__main__":
    main()
