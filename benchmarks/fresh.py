"""The headline load benchmark: every load in fresh processes, as ``torchrun -m tp_loader`` and a server's start pay it.

    python -m benchmarks.fresh                    # TP 1/2/4, warm and cold, 3 reps, writes to docs/benchmarks
    python -m benchmarks.fresh --reps 1           # a quick look at everything
    python -m benchmarks.fresh --tp 2 --systems "tp_loader zero-copy" "raw preadv" --torchrun-reps 0

Each measurement spawns one new Python process per rank (``subprocess``, with RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT as torchrun sets them; never a fork of this process). Off the clock,
each rank imports torch, the harness and its system's modules (``import s``), then sets up the gloo process group
and a 1-D mesh (``PG set-up s``), then prepares (plans, for the systems that need one). On the clock: from the
call until every local tensor is complete and every page of it has been read (``systems.touch``), so lazy
mappings count once their pages are read. The figure is the slowest rank; rows give the median of the
repetitions with min and max, systems alternating within each repetition. Warm: every file read once before the
launch. Cold: rank 0 drops the files from the page cache (``POSIX_FADV_DONTNEED``) after the set-up, between two
barriers, before every run. The first warm run of each system at each TP also checks its shards against
tp_loader's. Apart: ``torchrun -m tp_loader MODEL`` at TP 2 against a torchrun script that only sets up and
destroys the process group, each from torchrun's start to its exit. Writes fresh.json, fresh.md and fresh.png.

The module imports only the standard library at its top: it is also each rank's entry point
(``python -m benchmarks.fresh rank ...``), whose imports are timed from its first line.
"""

from __future__ import annotations

import time

STARTED = time.time()  # a rank's imports are timed from here

import argparse  # noqa: E402 - after the clock's first reading, on purpose
import gc  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.measure import (  # noqa: E402
    AnonPeak,
    add_data_argument,
    checksums,
    evict,
    machine,
    status_bytes,
    versions,
    warm,
)

REPO = Path(__file__).resolve().parents[1]
CACHES = ("warm", "cold")
TORCHRUN_TP = 2


def rank_main(system: str, root: Path, result: Path, cache: str, check: bool) -> None:
    """One rank of one measurement, in a fresh process; writes its figures as JSON to ``result``."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from benchmarks.systems import SYSTEMS, local, touch

    runner = SYSTEMS[system]()
    for name in runner.modules:
        importlib.import_module(name)
    imported = time.time()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world_size))
    dist.init_process_group("gloo", init_method="env://")
    mesh = init_device_mesh("cpu", (world_size,))
    dist.barrier()
    grouped = time.time()
    runner.prepare(root, mesh)
    gc.collect()
    if cache == "cold":
        dist.barrier()  # every rank has read its headers: rank 0 then drops every page of the files
        if rank == 0:
            evict(root)
    dist.barrier()
    modules, before = set(sys.modules), status_bytes("RssAnon")
    with AnonPeak() as peak:
        start = time.perf_counter()
        runner.load(root)
        touch(runner.state())
        seconds = time.perf_counter() - start
    loaded = time.time()
    state = runner.state()
    out = {
        "seconds": seconds,
        "started": STARTED,
        "imported": imported,
        "grouped": grouped,
        "loaded": loaded,
        "peak_anon_bytes": peak.peak - before,
        "shard_bytes": sum(local(t).numel() * local(t).element_size() for t in state.values()),
        "imported_on_clock": sorted(set(sys.modules) - modules),
    }
    if check:
        out["checksums"] = checksums(state)
    result.write_text(json.dumps(out))
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: gloo can abort in it after collectives


def bare_main() -> None:
    """What the torchrun baseline runs on each rank: import torch, set up the process group, destroy it."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    dist.destroy_process_group()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(system: str, root: Path, world_size: int, cache: str, check: bool, timeout: float = 600) -> list[dict]:
    """One measurement: ``world_size`` fresh rank processes; every rank's figures, each with the launch time."""
    with tempfile.TemporaryDirectory(prefix="tp_loader_fresh_") as tmp:
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
        }
        procs, logs = [], [Path(tmp) / f"rank{rank}.log" for rank in range(world_size)]
        launched = time.time()
        for rank in range(world_size):
            command = [sys.executable, "-m", "benchmarks.fresh", "rank", system, str(root), f"{tmp}/rank{rank}.json"]
            with open(logs[rank], "w") as log:
                procs.append(
                    subprocess.Popen(
                        [*command, cache, *(["--check"] if check else [])],
                        env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                        cwd=REPO,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # its own process group, so that a hung rank can be ended alone
                    )
                )
        deadline = time.monotonic() + timeout
        try:
            for proc in procs:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            raise RuntimeError(f"{system} at TP{world_size} ({cache}): no result within {timeout} s") from None
        for rank, proc in enumerate(procs):
            if proc.returncode != 0:
                tail = logs[rank].read_text()[-3000:]
                what = f"{system} at TP{world_size} ({cache}): rank {rank} exited {proc.returncode}"
                raise RuntimeError(f"{what}\n{tail}")
        ranks = [json.loads((Path(tmp) / f"rank{rank}.json").read_text()) for rank in range(world_size)]
    return [{**r, "launched": launched} for r in ranks]


def summarize_run(ranks: list[dict]) -> dict:
    """One measurement as the table reads it: the slowest rank's load; the slowest rank's imports; the process
    group set-up, from the last rank's imports to the last rank's mesh; launch to the last rank's end of load."""
    run = {
        "seconds": max(r["seconds"] for r in ranks),
        "import_s": max(r["imported"] - r["started"] for r in ranks),
        "pg_s": max(r["grouped"] for r in ranks) - max(r["imported"] for r in ranks),
        "launch_to_loaded_s": max(r["loaded"] for r in ranks) - ranks[0]["launched"],
        "rank_seconds": [r["seconds"] for r in ranks],
        "peak_anon_bytes": [r["peak_anon_bytes"] for r in ranks],
        "shard_bytes": [r["shard_bytes"] for r in ranks],
        "imported_on_clock": sorted({m for r in ranks for m in r["imported_on_clock"]}),
    }
    if "checksums" in ranks[0]:
        run["checksums"] = [r["checksums"] for r in ranks]
    return run


def run_grid(root: Path, tps: list[int], systems: list[str], reps: int, log) -> list[dict]:
    """Every (TP, cache, system) ``reps`` times, systems alternating within each repetition; the first warm run
    of each (TP, system) checks the shards."""
    from benchmarks.measure import compare
    from benchmarks.report import rows_with_limit, timing
    from benchmarks.systems import REFERENCE

    rows: dict[tuple[int, str, str], dict] = {}
    for rep in range(reps):
        for tp in tps:
            for cache in CACHES:
                for system in systems:
                    row = rows.setdefault(
                        (tp, cache, system),
                        {"case": f"TP{tp} {cache}", "tp": tp, "cache": cache, "system": system, "runs": []},
                    )
                    if cache == "warm":
                        warm(root)
                    run = summarize_run(launch(system, root, tp, cache, check=rep == 0 and cache == "warm"))
                    row["runs"].append(run)
                    log(f"rep {rep + 1}/{reps} TP{tp} {cache} {system:>20}: {run['seconds']:.3f} s")
    for (tp, cache, _), row in rows.items():
        row |= timing([r["seconds"] for r in row["runs"]])
        for key in ("import_s", "pg_s", "launch_to_loaded_s"):
            row[key] = statistics.median(r[key] for r in row["runs"])
        row["peak_anon_bytes"] = max(max(r["peak_anon_bytes"]) for r in row["runs"])
        row["shard_bytes"] = row["runs"][0]["shard_bytes"]
        row["imported_on_clock"] = sorted({m for r in row["runs"] for m in r["imported_on_clock"]})
        reference = rows.get((tp, "warm", REFERENCE))
        if cache == "warm" and reference:
            problems = compare(reference["runs"][0]["checksums"], row["runs"][0]["checksums"])
            row["check"] = {"same": not problems, "differences": problems[:20], "num_differences": len(problems)}
    for row in rows.values():
        for run in row["runs"]:
            run.pop("checksums", None)
    return rows_with_limit(list(rows.values()))


def torchrun_cost(root: Path, reps: int, log) -> dict:
    """``torchrun -m tp_loader MODEL`` at TP 2 against a torchrun script that only sets up and destroys the process
    group: seconds from starting torchrun to its exit (the report printed), warm cache, alternating."""
    start = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={TORCHRUN_TP}"]
    commands = {
        "bare": [*start, "-m", "benchmarks.fresh", "bare"],
        "tp_loader": [*start, "-m", "tp_loader", str(root)],
    }
    out: dict[str, list[float]] = {name: [] for name in commands}
    for rep in range(reps):
        for name, command in commands.items():
            warm(root)
            begin = time.perf_counter()
            done = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            seconds = time.perf_counter() - begin
            if done.returncode != 0:
                raise RuntimeError(f"torchrun {name} exited {done.returncode}:\n{done.stderr[-3000:]}")
            out[name].append(seconds)
            log(f"torchrun rep {rep + 1}/{reps} {name:>10}: {seconds:.2f} s")
    return {"world_size": TORCHRUN_TP, "bare_s": out["bare"], "tp_loader_s": out["tp_loader"]}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.systems import SYSTEMS, runnable

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    add_data_argument(parser)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--torchrun-reps", type=int, default=3, help="torchrun launches of each kind (0: none)")
    args = parser.parse_args(argv)

    from benchmarks.checkpoint import BASE, checkpoint_bytes, ensure_checkpoint
    from benchmarks.report import fresh_markdown, fresh_plot

    def log(text: str) -> None:
        print(text, flush=True)

    systems, notes = runnable(args.systems)
    root = ensure_checkpoint(args.data / "base", BASE)  # ranks are spawned, so this heap is never theirs
    started, load_before = time.time(), os.getloadavg()
    rows = run_grid(root, args.tp, systems, args.reps, log)
    torchrun = torchrun_cost(root, args.torchrun_reps, log) if args.torchrun_reps else None
    result = {
        "machine": machine(),
        "versions": versions(),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "reps": args.reps,
        "load_average": {"before": load_before, "after": os.getloadavg()},  # other work on the machine
        "checkpoint_gb": checkpoint_bytes(root) / 1e9,
        "notes": notes,
        "rows": rows,
        "torchrun": torchrun,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fresh.json").write_text(json.dumps(result, indent=1))
    (args.out / "fresh.md").write_text(fresh_markdown(result))
    fresh_plot(result, args.out / "fresh.png")
    print(fresh_markdown(result))
    return 0


def _rank_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="benchmarks.fresh rank")
    parser.add_argument("system")
    parser.add_argument("root", type=Path)
    parser.add_argument("result", type=Path)
    parser.add_argument("cache", choices=CACHES)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    rank_main(args.system, args.root, args.result, args.cache, args.check)


if __name__ == "__main__":
    if sys.argv[1:2] == ["rank"]:
        _rank_command(sys.argv[2:])
    elif sys.argv[1:2] == ["bare"]:
        bare_main()
    else:
        raise SystemExit(main())
