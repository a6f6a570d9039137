"""Load-time benchmark in warm processes (the second table; ``benchmarks.fresh`` is the headline): tp_loader, the
raw-read limit, naive, DCP, transformers and fastsafetensors, in one run.

    python -m benchmarks.run                       # full run: TP 1/2/4 and the size sweep, 5 reps
    python -m benchmarks.run --reps 3 --sweep      # TP 1/2/4 only (what docs/benchmarks.md shows)
    python -m benchmarks.run --reps 1 --tp 2 --sweep   # a quick look

Each measurement forks gloo ranks from this process, which has imported torch already (a warm process); each
rank times its own load from the call to a complete state dict whose every page has been read (a page walk inside
the timed region), and the measurement is the slowest rank. Systems alternate within each repetition; medians
with min and max are reported. Before the timed repetitions, each configuration has an untimed cold pass: storage
bytes read per rank and every system's shards checked against tp_loader's. Writes results.json, results.md and
load_times.png to --out.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from benchmarks.checkpoint import BASE, TINY, checkpoint_bytes, ensure_checkpoint, sweep_config
from benchmarks.measure import (
    AnonPeak,
    add_data_argument,
    checksums,
    compare,
    evict,
    faults,
    io_counters,
    machine,
    status_bytes,
    versions,
    warm,
)
from benchmarks.report import rows_with_limit, timing
from benchmarks.systems import PAGE, REFERENCE, SYSTEMS, rank_plan, runnable, touch
from tp_loader.byteranges import slice_ranges
from tp_loader.testing import run_ranks, values


def rank_root(root: Path, rank: int) -> Path:
    """Rank ``rank``'s own copy of the checkpoint for the cold pass: a page one rank reads from storage
    is then never served from the cache to another, so each rank's storage reads are its own."""
    return root if rank == 0 else root.with_name(f"{root.name}-rank{rank}")


def page_bytes(plan) -> int:
    """Bytes of the distinct 4 KiB file pages that hold this rank's byte ranges: the least a reader
    can bring in from storage, since the page cache works in pages."""
    pages = set()
    for item in plan.tensors:
        for r in slice_ranges(item):
            if r.length:
                pages.update((r.file, p) for p in range(r.offset // PAGE, (r.offset + r.length - 1) // PAGE + 1))
    return len(pages) * PAGE


def _measure(rank: int, world_size: int, system: str, root: Path, cold: bool) -> dict:
    """One load on this rank, timed from the call to a complete state dict whose every page was read.

    Warm (timed): page cache warm. Cold (the check pass, not timed): the rank reads its own copy of the
    checkpoint, evicted from the page cache, so ``/proc/self/io`` read_bytes counts every byte this rank
    made the kernel read from storage (readahead included); the shards' checksums are taken after."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    # A fresh process's first DTensor imports torch._dynamo (torch wraps DTensor.__new__ in
    # torch._disable_dynamo). That is a one-off library import, measured apart by fixed_cost().
    importlib.import_module("torch._dynamo")
    if cold:
        root = rank_root(root, rank)
    runner = SYSTEMS[system]()
    runner.prepare(root, init_device_mesh("cpu", (world_size,)))
    planned = rank_plan(root).read_bytes
    gc.collect()
    if cold:
        evict(root)
    dist.barrier()
    before, io_before, faults_before = status_bytes("RssAnon"), io_counters(), faults()
    with AnonPeak() as peak:
        start = time.perf_counter()
        runner.load(root)
        touch(runner.state())
        seconds = time.perf_counter() - start
    io_after, faults_after = io_counters(), faults()
    out = {
        "seconds": seconds,
        "planned_bytes": planned,
        "read_syscall_bytes": io_after["rchar"] - io_before["rchar"],
        "minor_faults": faults_after[0] - faults_before[0],
        "major_faults": faults_after[1] - faults_before[1],
        "peak_anon_bytes": peak.peak - before,
    }
    if cold:
        out["page_bytes"] = page_bytes(rank_plan(root))
        out["storage_read_bytes"] = io_after["read_bytes"] - io_before["read_bytes"]
        out["checksums"] = checksums(runner.state())
    return out


def measure(system: str, root: Path, world_size: int, cold: bool = False) -> list[dict]:
    """One load by every rank; every rank's figures."""
    return values(run_ranks(world_size, _measure, system, root, cold, timeout=600))


def _first_and_second(rank: int, world_size: int, root: Path) -> dict:
    import tp_loader

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    mesh = init_device_mesh("cpu", (world_size,))
    dist.barrier()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        tp_loader.load(root, mesh=mesh, progress=False)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    importlib.import_module("torch._dynamo")  # already imported by the first load: should cost nothing
    return {"first_s": times[0], "second_s": times[1], "dynamo_after_s": time.perf_counter() - start}


def _dynamo_import(rank: int, world_size: int) -> float:
    start = time.perf_counter()
    importlib.import_module("torch._dynamo")
    return time.perf_counter() - start


def fixed_cost(root: Path, world_size: int, reps: int) -> dict:
    """A fresh rank's first tp_loader load against its second, on a tiny checkpoint; and the time of
    importing torch._dynamo alone in a fresh rank."""
    runs = [values(run_ranks(world_size, _first_and_second, root, timeout=600)) for _ in range(reps)]
    imports = [max(values(run_ranks(world_size, _dynamo_import, timeout=600))) for _ in range(reps)]
    return {
        "world_size": world_size,
        "checkpoint_bytes": checkpoint_bytes(root),
        "first_s": [max(r["first_s"] for r in run) for run in runs],
        "second_s": [max(r["second_s"] for r in run) for run in runs],
        "dynamo_import_s": imports,
    }


def check_pass(label: str, root: Path, world_size: int, systems: list[str], log) -> dict[str, dict]:
    """Once per configuration, untimed: every system loads from a cold cache, each rank from its own copy;
    storage bytes read per rank, and each system's shards checked against tp_loader's."""
    found = {system: measure(system, root, world_size, cold=True) for system in systems}
    reference = [r["checksums"] for r in found.get(REFERENCE, [])]
    out = {}
    for system, ranks in found.items():
        problems = compare(reference, [r["checksums"] for r in ranks]) if reference else [f"no {REFERENCE} run"]
        out[system] = {
            "storage_read_bytes": [r["storage_read_bytes"] for r in ranks],
            "page_bytes": [r["page_bytes"] for r in ranks],
            "read_syscall_bytes": [r["read_syscall_bytes"] for r in ranks],
            "num_keys": [len(r["checksums"]) for r in ranks],
            "same_shards_as_tp_loader": not problems,
            "differences": problems[:20],
            "num_differences": len(problems),
        }
        log(
            f"check {label:>6} {system:>20}: storage read "
            f"{', '.join(f'{b / 1e6:.0f}' for b in out[system]['storage_read_bytes'])} MB; "
            f"shards {'same' if not problems else f'{len(problems)} differences: {problems[:3]}'}"
        )
    return out


def run_grid(cases: list[tuple[str, Path, int]], systems: list[str], reps: int, log, check: bool = True) -> list[dict]:
    """Every (case, system) ``reps`` times, systems alternating within each repetition; before that, the
    cold check pass of each case."""
    rows: dict[tuple[str, str], dict] = {}
    for label, root, world_size in cases:
        checked = check_pass(label, root, world_size, systems, log) if check else {}
        for system in systems:
            rows[(label, system)] = {
                "case": label,
                "system": system,
                "world_size": world_size,
                "checkpoint_gb": checkpoint_bytes(root) / 1e9,
                "check": checked.get(system),
                "runs": [],
            }
    for rep in range(reps):
        for label, root, world_size in cases:
            warm(root)
            for system in systems:
                ranks = measure(system, root, world_size)
                run = {key: [r[key] for r in ranks] for key in ranks[0]}
                run["seconds"] = max(run.pop("seconds"))  # the slowest rank
                rows[(label, system)]["runs"].append(run)
                log(f"rep {rep + 1}/{reps} {label:>10} {system:>20}: {run['seconds']:.3f} s")
    for row in rows.values():
        row |= timing([r["seconds"] for r in row["runs"]])
        row["peak_anon_bytes"] = max(max(r["peak_anon_bytes"]) for r in row["runs"])
        row["planned_bytes"] = row["runs"][0]["planned_bytes"]
        row["read_syscall_bytes"] = row["runs"][-1]["read_syscall_bytes"]
    return rows_with_limit(list(rows.values()))


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
    add_data_argument(parser)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--sweep", type=float, nargs="*", default=[0.25, 0.5, 1.0, 2.0], help="checkpoint sizes in GB (empty: no sweep)"
    )
    parser.add_argument("--sweep-tp", type=int, default=2)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--fixed-reps", type=int, default=3, help="fresh-process first/second load pairs (0: none)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    # Ranks are forked from this process: it must never start OpenMP's thread pool, or a forked rank
    # can deadlock on a lock one of those threads held (seen here while generating checkpoints).
    torch.set_num_threads(1)

    systems, notes = runnable(args.systems)

    def log(text: str) -> None:
        print(text, flush=True)

    wanted = {
        args.data / "base": BASE,
        args.data / "tiny": TINY,
        **{args.data / f"sweep-{gb:g}GB": sweep_config(gb) for gb in args.sweep if sweep_config(gb) != BASE},
    }
    _generate_apart(wanted)
    base = ensure_checkpoint(args.data / "base", BASE)
    sweep_roots = {
        gb: (base if sweep_config(gb) == BASE else ensure_checkpoint(args.data / f"sweep-{gb:g}GB", sweep_config(gb)))
        for gb in args.sweep
    }
    for rank in range(1, max(args.tp, default=1)):  # the cold pass's per-rank copies
        copy = rank_root(base, rank)
        if (
            not (copy / "config.json").is_file()
            or (copy / "config.json").read_text() != (base / "config.json").read_text()
        ):
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(base, copy)
    started, load_before = time.time(), os.getloadavg()
    fixed = fixed_cost(args.data / "tiny", 2, args.fixed_reps) if args.fixed_reps else None
    if fixed:
        log(
            f"fixed cost: first load {fixed['first_s']}, second {fixed['second_s']}, "
            f"dynamo import {fixed['dynamo_import_s']}"
        )
    tp_rows = run_grid([(f"TP{tp}", base, tp) for tp in args.tp], systems, args.reps, log)
    sweep_rows = (
        run_grid(
            [(f"{gb:g}GB", root, args.sweep_tp) for gb, root in sweep_roots.items()],
            systems,
            args.reps,
            log,
            check=False,
        )
        if args.sweep
        else []
    )
    result = {
        "machine": machine(),
        "versions": versions(),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "reps": args.reps,
        "load_average": {"before": load_before, "after": os.getloadavg()},  # other work on the machine
        "notes": notes,
        "tp": tp_rows,
        "sweep": sweep_rows,
        "sweep_tp": args.sweep_tp,
        "fixed_cost": fixed,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    from benchmarks.report import markdown, plot

    (args.out / "results.md").write_text(markdown(result))
    plot(result, args.out / "load_times.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
