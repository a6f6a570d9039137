"""Load-time benchmark: tp_loader, the raw-read limit, naive, DCP and transformers, in one run.

    python -m benchmarks.run                       # full run: TP 1/2/4 and the size sweep, 5 reps
    python -m benchmarks.run --reps 1 --tp 2 --sweep   # a quick look

Each measurement forks fresh gloo ranks; each rank times its own load from the call to a complete
state dict, and the measurement is the slowest rank. Systems alternate within each repetition and
medians are reported. Writes results.json, results.md and load_times.png to --out.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.checkpoint import BASE, checkpoint_bytes, ensure_checkpoint, sweep_config
from benchmarks.systems import SYSTEMS, Transformers, rank_plan
from tp_loader.testing import run_ranks, values


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class AnonPeak:
    """Samples RssAnon (anonymous memory, not file-backed pages) every millisecond; keeps the peak."""

    def __init__(self) -> None:
        self.peak = _status("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status("RssAnon"))
            time.sleep(0.001)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status("RssAnon"))


def _measure(rank: int, world_size: int, system: str, root: Path) -> dict:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    importlib.import_module(
        "torch._dynamo"
    )  # a fresh process's first DTensor imports it (~1 s): a library import, not load cost, for every system alike
    runner = SYSTEMS[system]()
    runner.prepare(root)
    shard_bytes = rank_plan(root).read_bytes
    gc.collect()
    dist.barrier()
    before = _status("RssAnon")
    with AnonPeak() as peak:
        start = time.perf_counter()
        bytes_read = runner.load(root)
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "bytes_read": bytes_read,
        "shard_bytes": shard_bytes,
        "peak_anon_bytes": peak.peak - before,
    }


def measure(system: str, root: Path, world_size: int) -> dict:
    """One load by every rank; the slowest rank's time, every rank's memory and bytes."""
    ranks = values(run_ranks(world_size, _measure, system, root, timeout=600))
    return {
        "seconds": max(r["seconds"] for r in ranks),
        "peak_anon_bytes": [r["peak_anon_bytes"] for r in ranks],
        "bytes_read": [r["bytes_read"] for r in ranks],
        "shard_bytes": [r["shard_bytes"] for r in ranks],
    }


def machine() -> dict:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    mem = _meminfo_total()
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def _meminfo_total() -> int:
    with open("/proc/meminfo") as meminfo:
        return int(meminfo.readline().split()[1]) * 1024


def warm(root: Path) -> None:
    """Reads every file once so the page cache is warm."""
    for path in sorted(root.glob("*.safetensors")):
        with open(path, "rb") as handle:
            while handle.read(64 << 20):
                pass


def run_grid(cases: list[tuple[str, Path, int]], systems: list[str], reps: int, log) -> list[dict]:
    """Every (case, system) ``reps`` times, systems alternating within each repetition."""
    rows: dict[tuple[str, str], dict] = {}
    for rep in range(reps):
        for label, root, world_size in cases:
            warm(root)
            for system in systems:
                result = measure(system, root, world_size)
                row = rows.setdefault(
                    (label, system),
                    {
                        "case": label,
                        "system": system,
                        "world_size": world_size,
                        "checkpoint_gb": checkpoint_bytes(root) / 1e9,
                        "runs": [],
                    },
                )
                row["runs"].append(result)
                log(f"rep {rep + 1}/{reps} {label:>10} {system:>12}: {result['seconds']:.3f} s")
    for row in rows.values():
        row["median_s"] = statistics.median(r["seconds"] for r in row["runs"])
        row["peak_anon_bytes"] = max(max(r["peak_anon_bytes"]) for r in row["runs"])
        row["bytes_read"] = row["runs"][0]["bytes_read"]
        row["shard_bytes"] = row["runs"][0]["shard_bytes"]
    return list(rows.values())


def _generate_apart(wanted: dict[Path, dict]) -> None:
    """Generates missing checkpoints in a child process. Generating them here would leave this
    process's heap holding gigabytes of freed but resident pages, which every forked rank inherits:
    systems that allocate from the heap would then write into copy-on-write pages (slower than fresh
    ones, and invisible to the anonymous-memory peak), and the comparison would no longer be fair."""
    import multiprocessing

    def generate() -> None:
        for root, config in wanted.items():
            ensure_checkpoint(root, config)

    child = multiprocessing.get_context("fork").Process(target=generate)
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"generating benchmark checkpoints failed (exit code {child.exitcode})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("TP_LOADER_BENCH_DIR", "/tmp/tp_loader_bench")),
        help="where checkpoints are generated",
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--sweep", type=float, nargs="*", default=[0.25, 0.5, 1.0, 2.0], help="checkpoint sizes in GB (empty: no sweep)"
    )
    parser.add_argument("--sweep-tp", type=int, default=2)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    # Ranks are forked from this process: it must never start OpenMP's thread pool, or a forked rank
    # can deadlock on a lock one of those threads held (seen here while generating checkpoints).
    torch.set_num_threads(1)

    notes = []
    systems = list(args.systems)
    if "transformers" in systems and (reason := Transformers.available()):
        systems.remove("transformers")
        notes.append(f"transformers {reason}")

    def log(text: str) -> None:
        print(text, flush=True)

    wanted = {
        args.data / "base": BASE,
        **{args.data / f"sweep-{gb:g}GB": sweep_config(gb) for gb in args.sweep if sweep_config(gb) != BASE},
    }
    _generate_apart(wanted)
    base = ensure_checkpoint(args.data / "base", BASE)
    sweep_roots = {
        gb: (base if sweep_config(gb) == BASE else ensure_checkpoint(args.data / f"sweep-{gb:g}GB", sweep_config(gb)))
        for gb in args.sweep
    }
    started = time.time()
    tp_rows = run_grid([(f"TP{tp}", base, tp) for tp in args.tp], systems, args.reps, log)
    sweep_rows = (
        run_grid([(f"{gb:g}GB", root, args.sweep_tp) for gb, root in sweep_roots.items()], systems, args.reps, log)
        if args.sweep
        else []
    )
    result = {
        "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "reps": args.reps,
        "notes": notes,
        "tp": tp_rows,
        "sweep": sweep_rows,
        "sweep_tp": args.sweep_tp,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    from benchmarks.report import markdown, plot

    (args.out / "results.md").write_text(markdown(result))
    plot(result, args.out / "load_times.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
