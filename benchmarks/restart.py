"""Restart from a pre-sharded directory (``save-sharded``) against a first load, at TP 2, on the 0.98 GB bf16
benchmark checkpoint (``benchmarks.checkpoint.BASE``), with the raw read of each rank's file as the reference.

    python -m benchmarks.restart                          # 3 warm and 2 cold runs of each system
    python -m benchmarks.restart --reps 1 --cold-reps 1   # a quick look

Every run forks fresh gloo ranks from this process (imports are done here, off the clock; ``torch._dynamo`` is
imported in the rank before the clock, as in ``benchmarks.ready``). Each rank times, from the call until every 4 KiB
page of every local shard has been read (a page walk, so a zero-copy view is faulted in as a first use would), and
the figure is the slowest rank. Warm runs read every file of the source and of the directory first; cold runs drop
their pages first (``POSIX_FADV_DONTNEED`` on every file). Systems:

- ``first load``: ``tp_loader.load(SOURCE)`` (zero-copy, the default on CPU: views of the source files' mappings);
- ``first load, copies``: ``tp_loader.load(SOURCE, zero_copy=False)``;
- ``restart``: ``tp_loader.load(DIR)`` (zero-copy, the default on CPU: views of the rank file's mapping);
- ``restart, copies``: ``tp_loader.load(DIR, zero_copy=False)``;
- ``restart, verify``: ``tp_loader.load(DIR, verify=True)`` (every block's crc32 checked first);
- ``raw read``: ``os.open`` + ``os.preadv`` of the whole rank file into one buffer: the reference (target: a restart
  within 1.05x of it).

The first run of each restart system checks every shard against the first load's (sha256 of each local shard).
Also measured, in this process: one-thread throughput of zlib.crc32, hashlib.blake2b and sha256 over 256 MiB in
memory, against a warm one-thread ``preadv`` of a rank file. Writes restart.json and restart.md to --out.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import statistics
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import tp_loader
from benchmarks.checkpoint import BASE, checkpoint_bytes, ensure_checkpoint
from benchmarks.measure import evict_files, machine, warm_files
from benchmarks.systems import local, touch
from tp_loader import sharded
from tp_loader.testing import run_ranks, values

TP = 2
CHUNK = 64 * 1024 * 1024
SYSTEMS = ("first load", "first load, copies", "restart", "restart, copies", "restart, verify", "raw read")


def _files(*roots: Path) -> list[Path]:
    return [path for root in roots for path in sorted(root.glob("*.safetensors"))]


def _raw_read(path: Path) -> torch.Tensor:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        out = torch.empty(size, dtype=torch.uint8)
        view = memoryview(out.numpy())
        done = 0
        while done < size:
            done += os.preadv(fd, [view[done : done + CHUNK]], done)
    finally:
        os.close(fd)
    return out


def _measure(rank: int, world_size: int, system: str, source: Path, out: Path, check: bool) -> dict:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    importlib.import_module("torch._dynamo")  # a fresh process's first DTensor imports it: not load cost
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    mesh = init_device_mesh("cpu", (world_size,))
    dist.barrier()
    start = time.perf_counter()
    if system == "raw read":
        tensors = [_raw_read(out / sharded.rank_file(rank, world_size))]
        state = None
    else:
        options = {"zero_copy": False} if system.endswith("copies") else {}
        options |= {"verify": True} if system == "restart, verify" else {}
        state = tp_loader.load(
            source if system.startswith("first load") else out, mesh=mesh, progress=False, **options
        ).state_dict
        tensors = [local(t) for t in state.values()]
    built = time.perf_counter() - start
    touch(dict(enumerate(tensors)))
    result = {"seconds": time.perf_counter() - start, "built_s": built}
    if check and state is not None:
        result["digests"] = {
            k: hashlib.sha256(local(t).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, t in state.items()
        }
    return result


def _save(rank: int, world_size: int, source: Path, out: Path) -> float:
    start = time.perf_counter()
    tp_loader.load(source, save_sharded=out, progress=False)
    return time.perf_counter() - start


def checksum_throughput(rank_file: Path) -> dict[str, float]:
    """GB/s of one thread: checksums over 256 MiB in memory, and a warm ``preadv`` of ``rank_file``."""
    data = memoryview(os.urandom(1 << 20) * 256)
    out = {}
    for name, fn in (
        ("zlib.crc32", lambda: zlib.crc32(data)),
        ("hashlib.blake2b", lambda: hashlib.blake2b(data).digest()),
        ("hashlib.sha256", lambda: hashlib.sha256(data).digest()),
    ):
        best = min(_timed(fn) for _ in range(3))
        out[name] = len(data) / best / 1e9
    warm_files([rank_file])
    best = min(_timed(lambda: _raw_read(rank_file)) for _ in range(3))
    out["preadv into new memory (warm)"] = rank_file.stat().st_size / best / 1e9
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Restart from a pre-sharded directory (`python -m benchmarks.restart`)\n",
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}; tp_loader {result['version']}, torch "
        f"{result['torch']}; gloo on CPU, TP {TP}. Checkpoint: {result['checkpoint_gb']:.2f} GB bf16 in 4 files; "
        f"rank files {result['rank_file_mb']:.0f} MB each. Run {result['started']}; load average (1 min) "
        f"{result['load_average']['before'][0]:.1f} before, {result['load_average']['after'][0]:.1f} after. Slowest "
        "rank, median (min–max); fresh ranks each run; every page of every shard read inside the timed region.",
        "",
        "| cache | system | ready s | before page walk s | × raw read | runs |",
        "|---|---|---|---:|---:|---:|",
    ]
    raw = {r["cache"]: r["median_s"] for r in result["rows"] if r["system"] == "raw read"}
    for r in result["rows"]:
        lines.append(
            f"| {r['cache']} | {r['system']} | {r['median_s']:.3f} ({r['min_s']:.3f}–{r['max_s']:.3f}) "
            f"| {r['built_median_s']:.3f} | {r['median_s'] / raw[r['cache']]:.2f} | {len(r['runs'])} |"
        )
    lines += [
        "",
        f"Writing the directory (`load(SOURCE, save_sharded=DIR)`, TP {TP}, warm): {result['save_s']:.2f} s.",
        "",
    ]
    lines += ["One-thread throughput, GB/s: " + ", ".join(f"{k} {v:.2f}" for k, v in result["throughput"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    data = Path(os.environ.get("TP_LOADER_BENCH_DIR", "/tmp/tp_loader_bench"))
    parser.add_argument("--data", type=Path, default=data, help="where the checkpoint and the directory are written")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cold-reps", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the parent never starts OpenMP's pool: forked ranks could deadlock on it
    tp_loader.load  # noqa: B018 - the pipeline's import, off the clock
    source = ensure_checkpoint(args.data / "base", BASE)
    out = args.data / f"base-sharded-tp{TP}"
    warm_files(_files(source))
    save_s = max(values(run_ranks(TP, _save, source, out, timeout=900)))
    throughput = checksum_throughput(out / sharded.rank_file(0, TP))
    started, load_before = time.time(), os.getloadavg()
    runs: dict[tuple[str, str], list[dict]] = {}
    plan = [(rep, "warm") for rep in range(args.reps)] + [(rep, "cold") for rep in range(args.cold_reps)]
    for rep, cache in plan:
        for system in SYSTEMS:
            (evict_files if cache == "cold" else warm_files)(_files(source, out))
            found = runs.setdefault((cache, system), [])
            ranks = values(run_ranks(TP, _measure, system, source, out, not found, timeout=900))
            run = {"seconds": max(r["seconds"] for r in ranks), "built_s": max(r["built_s"] for r in ranks)}
            if "digests" in ranks[0]:
                run["digests"] = [r["digests"] for r in ranks]
            found.append(run)
            print(f"{cache} rep {rep + 1} {system:>16}: {run['seconds']:.3f} s", flush=True)
    reference = runs[("warm", "first load")][0]["digests"]
    for (cache, system), found in runs.items():
        if "digests" in found[0] and found[0]["digests"] != reference:
            raise AssertionError(f"{system} ({cache}) gives other shards than the first load")
        for run in found:
            run.pop("digests", None)
    rows = []
    for (cache, system), found in runs.items():
        times = [r["seconds"] for r in found]
        rows.append(
            {
                "cache": cache,
                "system": system,
                "median_s": statistics.median(times),
                "min_s": min(times),
                "max_s": max(times),
                "built_median_s": statistics.median(r["built_s"] for r in found),
                "runs": found,
            }
        )
    result = {
        "machine": machine(),
        "version": tp_loader.__version__,
        "torch": torch.__version__,
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "checkpoint_gb": checkpoint_bytes(source) / 1e9,
        "rank_file_mb": (out / sharded.rank_file(0, TP)).stat().st_size / 1e6,
        "save_s": save_s,
        "throughput": throughput,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "restart.json").write_text(json.dumps(result, indent=1))
    (args.out / "restart.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
