"""What a restart pays to fingerprint the source's files (``tp_loader.sharded_manifest.content_fingerprint``): 8
fixed 4 KiB pages of each file and its size, hashed with blake2b, against the ``stat`` a restart made before.

    python -m benchmarks.fingerprint                # files of 1 MiB, 64 MiB and 2 GiB, 200 warm and 20 cold runs
    python -m benchmarks.fingerprint --sizes-mib 1 64

Each file is written once with random bytes under --data. Warm: the file's pages in the page cache (read once
first). Cold: the file's pages dropped before each run (``POSIX_FADV_DONTNEED``); on a VM the host's cache may still
serve them, so "cold" is a floor for a real disk. Writes fingerprint.json and fingerprint.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from benchmarks.measure import add_data_argument, evict_files, machine, warm_files
from tp_loader import __version__
from tp_loader.sharded_manifest import FINGERPRINT_PAGE_BYTES, FINGERPRINT_PAGES, content_fingerprint

CHUNK = 64 * 1024 * 1024


def _file(root: Path, size: int) -> Path:
    path = root / f"fingerprint-{size}.bin"
    if not path.is_file() or path.stat().st_size != size:
        root.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            for first in range(0, size, CHUNK):
                handle.write(os.urandom(min(CHUNK, size - first)))
    return path


def _timed(path: Path, cold: bool) -> tuple[float, float]:
    """Seconds of ``stat`` alone and of ``stat`` plus the fingerprint."""
    if cold:
        evict_files([path])
    start = time.perf_counter()
    size = os.stat(path).st_size
    stat_s = time.perf_counter() - start
    content_fingerprint(path, size)
    return stat_s, time.perf_counter() - start


def measure(path: Path, warm_reps: int, cold_reps: int) -> dict:
    warm_files([path])
    warm = [_timed(path, cold=False) for _ in range(warm_reps)]
    cold = [_timed(path, cold=True) for _ in range(cold_reps)]
    return {
        "size": path.stat().st_size,
        "warm_ms": _summary([total for _, total in warm]),
        "warm_stat_ms": _summary([stat_s for stat_s, _ in warm]),
        "cold_ms": _summary([total for _, total in cold]),
    }


def _summary(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1e3 for s in seconds]
    return {"median": statistics.median(ms), "min": min(ms), "max": max(ms), "runs": len(ms)}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Source fingerprints at restart (`python -m benchmarks.fingerprint`)\n",
        f"Machine: {m['cpu']}, {m['cores']} cores; tp_loader {result['version']}; run {result['started']}, load "
        f"average (1 min) {result['load_before']:.1f} before and {result['load_after']:.1f} after. "
        f"{result['pages']} pages of {result['page_bytes']} bytes per file. Milliseconds per file, median (min–max), "
        "stat and fingerprint together.\n",
        "| file | warm ms | warm, stat alone ms | cold ms |",
        "|---|---|---|---|",
    ]
    for row in result["files"]:

        def cell(s: dict) -> str:
            return f"{s['median']:.3f} ({s['min']:.3f}–{s['max']:.3f})"

        lines.append(
            f"| {row['size'] / 2**20:.0f} MiB | {cell(row['warm_ms'])} | {cell(row['warm_stat_ms'])} | "
            f"{cell(row['cold_ms'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 64, 2048])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--cold-reps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args(argv)
    paths = [_file(args.data, mib * 2**20) for mib in args.sizes_mib]
    load_before = os.getloadavg()[0]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = [measure(path, args.reps, args.cold_reps) for path in paths]
    result = {
        "machine": machine(),
        "version": __version__,
        "started": started,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "pages": FINGERPRINT_PAGES,
        "page_bytes": FINGERPRINT_PAGE_BYTES,
        "files": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fingerprint.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "fingerprint.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
