"""CUDA readiness: tp_loader loading to a GPU through its ring of pinned staging buffers (``tp_loader/staging.py``),
for a sweep of ring sizes, against the raw read plus a plain ``.to("cuda")`` of the same bytes.

    python -m benchmarks.cuda                                    # without CUDA: says that it skips, exits 0
    python -m benchmarks.cuda --reps 5 --buffer-mib 4 16 32 128 --threads 1 2 4

One process, TP 1, warm page cache, the 1 GB bf16 checkpoint of ``benchmarks.fresh``. The ring holds
2 × ``TP_LOADER_NUM_THREADS`` buffers of ``tp_loader.read.STAGING_BUFFER_BYTES`` (32 MiB) each. No environment
variable sets the buffer size, so each point of the sweep sets that module constant (read at every load) and the
variable. Timed: ``tp_loader.load(root, device="cuda")`` until ``torch.cuda.synchronize()`` returns (CUDA context
and the caching allocator warmed by one untimed load first). Reference, per repetition: ``os.preadv`` of the same
byte ranges into pageable host tensors (raw s), then ``.to("cuda")`` of those tensors and a synchronize (H2D s).
No overlap would take raw + H2D; full overlap max(raw, H2D). The untimed load's tensors must equal the raw read's,
byte for byte, or the run fails. ``--device cpu`` runs the same steps without a ring (``zero_copy=False``): a check
of this script on a machine without a GPU, not a measurement of the ring.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.checkpoint import BASE, ensure_checkpoint
from benchmarks.measure import add_data_argument, machine, versions, warm
from benchmarks.report import timing
from benchmarks.systems import RawRead, rank_plan


def _load(root: Path, device: str) -> tuple[dict[str, torch.Tensor], float]:
    import tp_loader

    _synchronize(device)
    start = time.perf_counter()
    state = tp_loader.load(root, device=device, progress=False, zero_copy=False).state_dict
    _synchronize(device)
    return state, time.perf_counter() - start


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _raw_and_h2d(root: Path, raw: RawRead, device: str) -> tuple[float, float, dict[str, torch.Tensor]]:
    """The raw read of the rank's bytes into host memory, then a plain copy of those tensors to ``device``."""
    start = time.perf_counter()
    raw.load(root)
    read = time.perf_counter() - start
    _synchronize(device)
    start = time.perf_counter()
    moved = {key: tensor.to(device) for key, tensor in raw.state().items()}
    _synchronize(device)
    return read, time.perf_counter() - start, moved


def sweep(root: Path, device: str, buffer_mib: list[int], threads: list[int], reps: int, log) -> dict:
    import tp_loader.read

    raw = RawRead()
    raw.items = list(rank_plan(root, world_size=1, rank=0).tensors)  # what RawRead.prepare plans, for TP 1
    warm(root)
    state, _ = _load(root, device)  # untimed: CUDA context, allocator, pinned memory; and the check
    _, _, reference = _raw_and_h2d(root, raw, device)
    differ = [key for key, tensor in reference.items() if not torch.equal(state[key], tensor)]
    if differ or set(state) != set(reference):
        raise AssertionError(f"tp_loader's tensors on {device} differ from the raw read: {differ[:5]}")
    del state, reference
    saved = tp_loader.read.STAGING_BUFFER_BYTES, os.environ.get("TP_LOADER_NUM_THREADS")
    rows = {
        (mib, n): {"buffer_mib": mib, "num_threads": n, "num_buffers": 2 * n, "runs": []}
        for mib in buffer_mib
        for n in threads
    }
    references: list[dict] = []
    try:
        for rep in range(reps):
            read, h2d, moved = _raw_and_h2d(root, raw, device)
            del moved
            references.append({"raw_s": read, "h2d_s": h2d})
            log(f"rep {rep + 1}/{reps} raw read {read:.3f} s, .to({device}) {h2d:.3f} s")
            for (mib, n), row in rows.items():
                tp_loader.read.STAGING_BUFFER_BYTES = mib << 20
                os.environ["TP_LOADER_NUM_THREADS"] = str(n)
                state, seconds = _load(root, device)
                del state
                row["runs"].append(seconds)
                log(f"rep {rep + 1}/{reps} ring {2 * n} × {mib} MiB: {seconds:.3f} s")
    finally:
        tp_loader.read.STAGING_BUFFER_BYTES = saved[0]
        if saved[1] is None:
            os.environ.pop("TP_LOADER_NUM_THREADS", None)
        else:
            os.environ["TP_LOADER_NUM_THREADS"] = saved[1]
    raw_s = statistics.median(r["raw_s"] for r in references)
    h2d_s = statistics.median(r["h2d_s"] for r in references)
    for row in rows.values():
        row |= timing(row["runs"])
    return {"device": device, "raw_s": raw_s, "h2d_s": h2d_s, "references": references, "rows": list(rows.values())}


def markdown(result: dict) -> str:
    raw, h2d = result["raw_s"], result["h2d_s"]
    lines = [
        f"Device {result['device_name']}; {result['checkpoint_gb']:.2f} GB bf16, TP 1, warm page cache, "
        f"{result['reps']} repetitions; run {result['started']}.",
        "",
        f'Raw read {raw:.3f} s, then `.to("{result["device"]}")` {h2d:.3f} s (medians): no overlap '
        f"{raw + h2d:.3f} s, full overlap {max(raw, h2d):.3f} s.",
        "",
        "| reader threads | ring buffers × MiB | load s, median (min–max) | × (raw + H2D) | × max(raw, H2D) |",
        "|---:|---|---|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['num_threads']} | {r['num_buffers']} × {r['buffer_mib']} "
            f"| {r['median_s']:.3f} ({r['min_s']:.3f}–{r['max_s']:.3f}) "
            f"| {r['median_s'] / (raw + h2d):.2f} | {r['median_s'] / max(raw, h2d):.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    add_data_argument(parser)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--buffer-mib", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4], help="TP_LOADER_NUM_THREADS values")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: checks this script only")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks.cuda: skipped, torch.cuda.is_available() is False (no GPU, or a CPU build of torch)")
        return 0
    root = ensure_checkpoint(args.data / "base", BASE)
    started = time.time()
    result = sweep(root, args.device, args.buffer_mib, args.threads, args.reps, lambda text: print(text, flush=True))
    result |= {
        "machine": machine(),
        "versions": versions(),
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (harness check, no ring)",
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "reps": args.reps,
        "checkpoint_gb": sum(p.stat().st_size for p in root.glob("*.safetensors")) / 1e9,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.device}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{args.device}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
