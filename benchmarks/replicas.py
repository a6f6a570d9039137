"""Replicas reading one checkpoint: ``share="none"`` against ``share="job"`` at 2 nodes x TP 2, on one machine.

    python -m benchmarks.replicas                 # warm and cold, 3 runs each, plus the 200 MB/s simulation
    python -m benchmarks.replicas --reps 1        # a quick look

Four forked gloo ranks form a ``(dp, tp) = (2, 2)`` mesh; ranks 0-1 call themselves node0 and ranks 2-3 node1
(``TP_LOADER_NODE``). Timed on each rank: from the call until every local tensor is complete and every page of
it has been read (``systems.touch``); the figure is the slowest rank. Storage bytes per node are what the node's
ranks requested from storage (the report's ``bytes_read_per_node``): on one machine both "nodes" share one page
cache, so the kernel's own count (``read_bytes``, also recorded) credits a page to whichever rank faulted it first.

**Slow-storage simulation (benchmark only, labelled as such in the output):** every rank reads with ``pread``
through a reader throttled to ``--node-mbps`` / ranks per node (each node's bandwidth split evenly between its
ranks; a rank that finishes early does not pass its share on). It stands in for a network filesystem, where
the storage and not the copy limits the load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch.distributed.device_mesh import init_device_mesh

import tp_loader
import tp_loader.read
from benchmarks.checkpoint import checkpoint_bytes, ensure_checkpoint, sweep_config
from benchmarks.measure import add_data_argument, evict, io_counters, machine, versions, warm
from benchmarks.systems import touch
from tp_loader.testing import run_ranks, values

NODES, RANKS_PER_NODE = 2, 2


def _throttle(rank_bps: float) -> None:
    """Makes every ``pread`` of this process wait so that its reads never run ahead of ``rank_bps``."""
    real = tp_loader.read.PreadSource._pread
    state = {"start": None, "bytes": 0}

    def throttled(self, item, buffer, offset):
        if state["start"] is None:
            state["start"] = time.perf_counter()
        real(self, item, buffer, offset)
        state["bytes"] += len(buffer)
        ahead = state["start"] + state["bytes"] / rank_bps - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)

    tp_loader.read.PreadSource._pread = throttled


def _measure(rank: int, world_size: int, root: Path, share: str, zero_copy: bool, rank_bps: float | None) -> dict:
    torch.set_num_threads(1)
    os.environ["TP_LOADER_NODE"] = f"node{rank // RANKS_PER_NODE}"
    if rank_bps:
        os.environ["TP_LOADER_READER"] = "pread"
        _throttle(rank_bps)
    mesh = init_device_mesh("cpu", (NODES, RANKS_PER_NODE), mesh_dim_names=("dp", "tp"))
    io = io_counters()["read_bytes"]
    start = time.perf_counter()
    result = tp_loader.load(root, mesh=mesh, share=share, zero_copy=zero_copy, progress=False)
    touch(result.state_dict)
    seconds = time.perf_counter() - start
    report = result.report
    return {
        "seconds": seconds,
        "kernel_read_bytes": io_counters()["read_bytes"] - io,
        "per_node": report.bytes_read_per_node,
        "received": report.bytes_received,
    }


def _run(root: Path, share: str, zero_copy: bool, cache: str, rank_bps: float | None) -> dict:
    (evict if cache == "cold" else warm)(root)
    ranks = values(run_ranks(NODES * RANKS_PER_NODE, _measure, root, share, zero_copy, rank_bps, timeout=900))
    kernel: dict[str, int] = {}
    for rank, r in enumerate(ranks):
        node = f"node{rank // RANKS_PER_NODE}"
        kernel[node] = kernel.get(node, 0) + r["kernel_read_bytes"]
    return {
        "seconds": max(r["seconds"] for r in ranks),
        "per_node": ranks[0]["per_node"],
        "kernel_per_node": kernel,
        "received": ranks[0]["received"],
    }


def model_seconds(node_bytes: float, storage_bps: float, exchange_bytes: float, link_bps: float, fixed: float) -> float:
    """The load-time model: storage and the exchange overlap, so the slower of the two sets the time."""
    return max(node_bytes / storage_bps, exchange_bytes / link_bps if link_bps else 0.0) + fixed


def predictions(storage_bps: float = 2e9, link_bps: float = 50e9) -> list[dict]:
    """Llama-3-70B (bf16) and DeepSeek-V3 (fp8 with scales) on 4 and 16 nodes x 8 GPUs, one replica per node
    (TP 8), with ``storage_bps`` of shared storage for the whole job and ``link_bps`` per node (400 Gb/s).

    ``share="none"``: every node reads the whole checkpoint, all nodes through the one storage, so the job
    moves N checkpoints through it. ``share="job"``: the job reads one checkpoint, each node 1/N of it, and each
    node receives the other (N-1)/N over its link (a pipelined broadcast moves about the shard once per link).
    """
    out = []
    for name, size in (("Llama-3-70B bf16", 141e9), ("DeepSeek-V3 fp8", 689e9)):
        for nodes in (4, 16):
            none = model_seconds(nodes * size, storage_bps, 0, 0, 0)
            job = model_seconds(size, storage_bps, size * (nodes - 1) / nodes, link_bps, 0)
            out.append({"model": name, "nodes": nodes, "none_s": none, "job_s": job})
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Replicas: share='none' against share='job' (`python -m benchmarks.replicas`)\n",
        f"Machine: {m['cpu']}, {m['cores']} cores; tp_loader {result['versions']['tp_loader']}, torch "
        f"{result['versions']['torch']}. 2 nodes x TP 2 as 4 gloo ranks on this one machine "
        f"(`TP_LOADER_NODE`). Checkpoint: {result['checkpoint_gb']:.2f} GB bf16 Llama. Run {result['started']}; "
        f"load average {result['load_average'][0]:.1f} before. Slowest rank, median (min-max) of "
        f"{result['reps']} runs.",
        "",
        "| storage | cache | share | zero-copy | seconds | requested from storage per node MB | kernel read per "
        "node MB | exchanged MB |",
        "|---|---|---|---|---:|---|---|---:|",
    ]
    for row in result["rows"]:
        per_node = ", ".join(f"{v / 1e6:.0f}" for v in row["per_node"].values())
        kernel = ", ".join(f"{v / 1e6:.0f}" for v in row["kernel_per_node"].values())
        times = row["times"]
        lines.append(
            f"| {row['storage']} | {row['cache']} | {row['share']} | {'yes' if row['zero_copy'] else 'no'} | "
            f"{statistics.median(times):.2f} ({min(times):.2f}-{max(times):.2f}) | {per_node} | {kernel} | "
            f"{row['received'] / 1e6:.0f} |"
        )
    lines += ["", "Model predictions (docs/benchmarks.md explains the model):", ""]
    lines += ["| checkpoint | nodes | share='none' s | share='job' s |", "|---|---:|---:|---:|"]
    lines += [f"| {p['model']} | {p['nodes']} | {p['none_s']:.0f} | {p['job_s']:.0f} |" for p in result["predictions"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    add_data_argument(parser)
    parser.add_argument("--gb", type=float, default=0.5, help="checkpoint size")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--node-mbps", type=float, default=200.0, help="simulated storage bandwidth per node")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    root = ensure_checkpoint(args.data / f"replicas-{args.gb:g}gb", sweep_config(args.gb))
    rank_bps = args.node_mbps * 1e6 / RANKS_PER_NODE
    cases = [("local disk", cache, share, zc, None) for cache in ("warm", "cold") for share, zc in
             (("none", True), ("none", False), ("job", False))]  # fmt: skip
    simulated = f"simulated {args.node_mbps:g} MB/s per node"
    cases += [(simulated, "cold", share, False, rank_bps) for share in ("none", "job")]
    started, load = time.time(), os.getloadavg()
    rows = []
    for storage, cache, share, zero_copy, bps in cases:
        runs = [_run(root, share, zero_copy, cache, bps) for _ in range(args.reps)]
        row = {"storage": storage, "cache": cache, "share": share, "zero_copy": zero_copy}
        row |= {k: runs[-1][k] for k in ("per_node", "kernel_per_node", "received")}
        row["times"] = [r["seconds"] for r in runs]
        rows.append(row)
        print(f"{storage:>28} {cache} share={share:<4} zero_copy={zero_copy!s:<5}: "
              f"{statistics.median(row['times']):.2f} s", flush=True)  # fmt: skip
    result = {"machine": machine(), "versions": versions(), "rows": rows, "reps": args.reps}
    result |= {"checkpoint_gb": checkpoint_bytes(root) / 1e9, "node_mbps": args.node_mbps}
    result |= {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)), "load_average": load}
    result["predictions"] = predictions()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "replicas.json").write_text(json.dumps(result, indent=1))
    (args.out / "replicas.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
