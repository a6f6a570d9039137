"""Full scale without the disk: dry runs and zero-copy loads of full-size sparse checkpoints (benchmarks/fullsize.py:
real headers, data left as holes), in fresh processes.

    python -m benchmarks.scale                                 # every model, TP 8, writes docs/benchmarks/scale.*
    python -m benchmarks.scale --models deepseek_v3 --tp 8 --reps 3

Per model: ``python -m tp_loader DIR --dry-run TP`` (wall time and peak RSS of that process), then ``torchrun
--nproc-per-node TP -m benchmarks.scale rank DIR OUT`` where every rank calls ``tp_loader.load(DIR)`` and records the
report's figures and its own peak RSS (``VmHWM``); the clock starts after tp_loader's loader is imported and the process
group is up (a barrier), as a server that loads has both already. Zero-copy is the CPU default, so the holes are mapped,
never read: what is measured is every cost that scales with the tensor count (headers, planning, views, DTensors, the
report), which a real load of the same checkpoint pays on top of its reads. The per-tensor cost is the slowest rank's
time over the tensors it holds. On a 2-core machine TP 8 runs 8 processes on 2 cores: each rank's figure holds about 4x
its own CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE.parent / "docs" / "benchmarks"


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith("VmHWM:"))


def rank_main(root: str, out: str) -> None:
    """One rank of a load: the report's figures and this rank's peak RSS, as JSON in ``out``.RANK."""
    import torch.distributed as dist

    import tp_loader

    load = tp_loader.load  # imports the loader (and torch.distributed.tensor: 4 s with 8 ranks on 2 cores) here
    # the process group first, off the clock: with 8 ranks on 2 cores the last rank finishes importing torch
    # seconds after the first, and a clock started before the rendezvous would time that wait
    dist.init_process_group("gloo")
    dist.barrier()
    start = time.perf_counter()
    result = load(root, progress=False)
    seconds = time.perf_counter() - start
    report = result.report
    rank = int(os.environ["RANK"])
    mine = report.ranks[rank]
    data = {
        "rank": rank,
        "seconds": seconds,
        "report_seconds": report.seconds,
        "read_seconds": report.read_seconds,
        "stages": {k: getattr(mine, k) for k in ("plan_seconds", "read_seconds", "place_seconds", "tie_seconds")},
        "num_tensors": mine.num_tensors,
        "bytes_planned": mine.bytes_planned,
        "bytes_read": mine.bytes_read,
        "bytes_mapped": mine.bytes_mapped,
        "skipped": [[s.name, len(s.keys), s.nbytes] for s in report.skipped],
        "peak_rss": _peak_rss_bytes(),
    }
    Path(f"{out}.{rank}").write_text(json.dumps(data))
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def _timed(command: list[str], timeout: float) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if status != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({status}): {stderr[-2000:]}")
    if seconds > timeout:
        raise RuntimeError(f"{' '.join(command)} took {seconds:.0f} s")
    return seconds, usage.ru_maxrss * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_at(root: Path, tp: int, timeout: float) -> dict:
    """A torchrun load at ``tp``: every rank's record, and the launch's wall time."""
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "rank")
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={tp}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
            "-m",
            "benchmarks.scale",
            "rank",
            str(root),
            out,
        ]
        wall, _ = _timed(command, timeout)
        ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(tp)]
    return {"wall": wall, "ranks": ranks}


def measure(name: str, data: Path, tp: int, reps: int, timeout: float, log) -> dict:
    from benchmarks import fullsize

    root = data / name
    totals = fullsize.write(root, name)
    log(f"{name}: {totals['tensors']} tensors, {totals['bytes'] / 1e9:.1f} GB in {totals['files']} files (sparse)")
    dry = [
        _timed([sys.executable, "-m", "tp_loader", str(root), "--dry-run", str(tp), "-q"], timeout) for _ in range(reps)
    ]
    loads = [load_at(root, tp, timeout) for _ in range(reps)]
    slowest = [max(r["seconds"] for r in load["ranks"]) for load in loads]
    tensors = loads[0]["ranks"][0]["num_tensors"]
    row = {
        "model": name,
        "tp": tp,
        "tensors_stored": totals["tensors"],
        "bytes_stored": totals["bytes"],
        "tensors_per_rank": tensors,
        "bytes_per_rank": loads[0]["ranks"][0]["bytes_planned"],
        "bytes_mapped_per_rank": loads[0]["ranks"][0]["bytes_mapped"],
        "skipped": loads[0]["ranks"][0]["skipped"],
        "dry_run_s": statistics.median(s for s, _ in dry),
        "dry_run_rss": max(m for _, m in dry),
        "load_slowest_rank_s": statistics.median(slowest),
        "load_read_s": statistics.median(load["ranks"][0]["read_seconds"] for load in loads),
        "torchrun_wall_s": statistics.median(load["wall"] for load in loads),
        "peak_rss_per_rank": max(r["peak_rss"] for load in loads for r in load["ranks"]),
        "us_per_tensor": statistics.median(slowest) / tensors * 1e6,
        # the slowest rank's seconds per stage of the report, in the median load
        "stages_slowest_rank": max(
            sorted(loads, key=lambda load: max(r["seconds"] for r in load["ranks"]))[len(loads) // 2]["ranks"],
            key=lambda r: r["seconds"],
        )["stages"],
    }
    log(
        f"  dry run {row['dry_run_s']:.2f} s, load at TP {tp}: slowest rank {row['load_slowest_rank_s']:.2f} s "
        f"({row['us_per_tensor']:.0f} us a tensor), peak RSS {row['peak_rss_per_rank'] / 2**30:.2f} GiB a rank"
    )
    return row


def markdown(rows: list[dict], machine: dict) -> str:
    lines = [
        "# Full scale: sparse full-size checkpoints (`python -m benchmarks.scale`)",
        "",
        f"Machine: {machine}. Zero-copy loads (the holes are mapped, never read); medians of the repetitions.",
        "",
        "| model | tensors stored | a rank holds | skipped | dry run | load, slowest rank | per tensor | "
        "torchrun wall | peak RSS a rank | dry-run RSS |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        skipped = ", ".join(f"{n}: {k} keys, {b / 2**30:.2f} GiB" for n, k, b in r["skipped"]) or "none"
        lines.append(
            f"| {r['model']} (TP {r['tp']}) | {r['tensors_stored']:,} ({r['bytes_stored'] / 1e9:.0f} GB) | "
            f"{r['tensors_per_rank']:,} ({r['bytes_per_rank'] / 2**30:.2f} GiB) | {skipped} | {r['dry_run_s']:.2f} s | "
            f"{r['load_slowest_rank_s']:.2f} s | {r['us_per_tensor']:.0f} µs | {r['torchrun_wall_s']:.1f} s | "
            f"{r['peak_rss_per_rank'] / 2**20:.0f} MiB | {r['dry_run_rss'] / 2**20:.0f} MiB |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["rank"]:
        rank_main(argv[1], argv[2])
        return 0
    from benchmarks import fullsize
    from benchmarks.measure import machine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(fullsize.MODELS), choices=list(fullsize.MODELS))
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--data", type=Path, default=None, help="where the sparse checkpoints go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        data = args.data or Path(scratch)
        rows = [measure(name, data, args.tp, args.reps, args.timeout, print) for name in args.models]
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine()
    (args.out / "scale.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    (args.out / "scale.md").write_text(markdown(rows, info))
    print(markdown(rows, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
