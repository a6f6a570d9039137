"""The copying path against the raw read: what a GPU load does on the host (every slice copied out of the files into
memory of its own, ``tp_loader.load(..., zero_copy=False)``), against the raw reads of the same byte ranges.

    python -m benchmarks.copy_path                     # TP 1/2/4, warm and cold, 5 repetitions
    python -m benchmarks.copy_path --reps 1 --tp 2     # a quick look

Every measurement is ``benchmarks.fresh``'s: one new process per rank, as many as the TP degree, imports and the
process group set up off the clock, timed from the load call until every page of every local tensor has been read,
slowest rank. Warm: every file read once before the launch. Cold: after the set-up, between two barriers, rank 0
drops every safetensors file of the checkpoint from the page cache (``posix_fadvise(POSIX_FADV_DONTNEED)``,
``benchmarks.measure.evict``). The systems alternate within each repetition; each row is the median (min–max).

The raw reads (``benchmarks.systems``) read exactly each rank's byte ranges into fresh tensors, planned before the
clock: ``os.preadv`` on one thread, on two threads, and ``mmap`` plus ``Tensor.copy_``. The ratio is tp_loader's
median over the fastest raw read's median at the same TP and cache, measured in the same run; the target is 1.1.
The first warm run at each TP checks that tp_loader's shards equal ``raw preadv``'s, byte for byte.
Writes ``copy_path.json`` and ``copy_path.md`` (``--out``; default docs/benchmarks).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.fresh import CACHES, launch, summarize_run
from benchmarks.measure import add_data_argument, compare, machine, versions, warm
from benchmarks.report import timing

COPYING = "tp_loader copying"
RAW = ("raw preadv", "raw preadv ×2", "raw mmap+copy")
CHECK_AGAINST = "raw preadv"
TARGET = 1.1


def run(root: Path, tps: list[int], reps: int, log) -> list[dict]:
    """Every (TP, cache, system) ``reps`` times, alternating; the rows with their ratio to the fastest raw read."""
    rows: dict[tuple[int, str, str], dict] = {}
    for rep in range(reps):
        for tp in tps:
            for cache in CACHES:
                checks = {}
                for system in (COPYING, *RAW):
                    row = rows.setdefault((tp, cache, system), {"tp": tp, "cache": cache, "system": system, "runs": []})
                    if cache == "warm":
                        warm(root)
                    check = rep == 0 and cache == "warm" and system in (COPYING, CHECK_AGAINST)
                    result = summarize_run(launch(system, root, tp, cache, check=check))
                    if check:
                        checks[system] = result.pop("checksums")
                    row["runs"].append(result["seconds"])
                    log(f"rep {rep + 1}/{reps} TP{tp} {cache} {system:>17}: {result['seconds']:.3f} s")
                if checks:
                    problems = compare(checks[CHECK_AGAINST], checks[COPYING])
                    if problems:
                        raise AssertionError(f"TP{tp}: tp_loader's shards differ from the raw read's: {problems[:5]}")
                    rows[(tp, cache, COPYING)]["checked"] = True
    for row in rows.values():
        row |= timing(row["runs"])
    for (tp, cache, system), row in rows.items():
        if system == COPYING:
            fastest = min((rows[(tp, cache, raw)] for raw in RAW), key=lambda r: r["median_s"])
            row["limit_system"], row["limit_s"] = fastest["system"], fastest["median_s"]
            row["ratio"] = row["median_s"] / fastest["median_s"]
    return list(rows.values())


def markdown(result: dict) -> str:
    rows = result["rows"]
    by = {(r["tp"], r["cache"], r["system"]): r for r in rows}
    lines = [
        f"`python -m benchmarks.copy_path --reps {result['reps']}`, {result['checkpoint_gb']:.2f} GB bf16; run "
        f"{result['started']}, load average {result['load_average']['before'][0]:.1f} before, "
        f"{result['load_average']['after'][0]:.1f} after; {result['machine']['cpu']}, "
        f"{result['machine']['cores']} cores. Seconds of the slowest rank, median (min–max) of {result['reps']}.",
        "",
        "| TP | cache | tp_loader copying | raw preadv | raw preadv ×2 | raw mmap+copy | × fastest raw | ≤ 1.1 |",
        "|---:|---|---|---|---|---|---:|---|",
    ]

    def cell(row: dict) -> str:
        return f"{row['median_s']:.3f} ({row['min_s']:.3f}–{row['max_s']:.3f})"

    for tp, cache, system in by:
        if system != COPYING:
            continue
        ours = by[(tp, cache, COPYING)]
        raws = [cell(by[(tp, cache, raw)]) for raw in RAW]
        verdict = "PASS" if ours["ratio"] <= TARGET else "FAIL"
        lines.append(f"| {tp} | {cache} | {cell(ours)} | {' | '.join(raws)} | {ours['ratio']:.2f} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    add_data_argument(parser)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args(argv)

    from benchmarks.checkpoint import BASE, checkpoint_bytes, ensure_checkpoint

    root = ensure_checkpoint(args.data / "base", BASE)
    started, load_before = time.time(), os.getloadavg()
    rows = run(root, args.tp, args.reps, lambda text: print(text, flush=True))
    result = {
        "machine": machine(),
        "versions": versions(),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "reps": args.reps,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "checkpoint_gb": checkpoint_bytes(root) / 1e9,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "copy_path.json").write_text(json.dumps(result, indent=1))
    (args.out / "copy_path.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
