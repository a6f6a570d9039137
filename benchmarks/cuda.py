"""CUDA readiness: tp_loader loading to a GPU through its ring of pinned staging buffers (``tp_loader/staging.py``),
for a sweep of ring sizes, against the raw read plus a plain ``.to("cuda")`` of the same bytes, and against a raw
pinned copy: the host-to-device throughput the card gives from pinned memory, measured in the same run.

    python -m benchmarks.cuda                                    # without CUDA: says that it skips, exits 0
    python -m benchmarks.cuda --require-gpu                      # without CUDA: says what it checked, exits 1
    python -m benchmarks.cuda --reps 5 --buffer-mib 4 16 32 128 --threads 1 2 4

One process, TP 1, warm page cache, the 1 GB bf16 checkpoint of ``benchmarks.fresh``. The ring holds
2 × ``TP_LOADER_NUM_THREADS`` buffers of ``tp_loader.read.STAGING_BUFFER_BYTES`` (32 MiB) each. No environment
variable sets the buffer size, so each point of the sweep sets that module constant (read at every load) and the
variable. Timed: ``tp_loader.load(root, device="cuda")`` until ``torch.cuda.synchronize()`` returns (CUDA context
and the caching allocator warmed by one untimed load first). Reference, per repetition: ``os.preadv`` of the same
byte ranges into pageable host tensors (raw s), then ``.to("cuda")`` of those tensors and a synchronize (H2D s).
No overlap would take raw + H2D; full overlap max(raw, H2D). The untimed load's tensors must equal the raw read's,
byte for byte, or the run fails.

The raw pinned copy, per repetition: pinned host tensors for the rank's bytes (``pin_memory=True``), allocated once
before any clock; ``os.preadv`` of the same byte ranges into them (pinned raw s), then ``.to("cuda",
non_blocking=True)`` of each and a synchronize (pinned H2D s). Its throughput (bytes / pinned H2D s) is what a copy
from page-locked memory reaches on this card; each ring setting's end-to-end throughput (bytes / load s: reading the
file, staging and copying) is given as a fraction of it. Its device tensors must equal tp_loader's, byte for byte.

``--device cpu`` runs the same steps without a ring (``zero_copy=False``), and the "pinned" reference without
``pin_memory`` (which needs CUDA) and with ``.to("cpu", copy=True)``: a check of this script on a machine without a
GPU, not a measurement of the ring. ``--require-gpu`` makes a missing GPU an error (exit 1) instead of a skip.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from benchmarks.checkpoint import BASE, ensure_checkpoint
from benchmarks.measure import add_data_argument, machine, versions, warm

if TYPE_CHECKING:
    from benchmarks.systems import RawRead


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


def _pinned_buffers(raw: RawRead, pin: bool) -> dict[str, torch.Tensor]:
    """Host tensors for the rank's slices, page-locked when ``pin``; allocated before any clock starts."""
    return {item.key: torch.empty(item.local_shape, dtype=item.info.dtype, pin_memory=pin) for item in raw.items}


def _pinned_and_h2d(
    root: Path, raw: RawRead, host: dict[str, torch.Tensor], device: str
) -> tuple[float, float, dict[str, torch.Tensor]]:
    """The raw read of the rank's bytes into ``host`` (pinned on CUDA), then an asynchronous copy of each tensor to
    ``device`` and a synchronize. On the CPU, ``copy=True``: ``.to("cpu")`` of a CPU tensor would return it."""
    from benchmarks.systems import preadv_slices

    start = time.perf_counter()
    preadv_slices(root, raw.items, {}, lambda item: host[item.key])
    read = time.perf_counter() - start
    _synchronize(device)
    start = time.perf_counter()
    moved = {key: tensor.to(device, non_blocking=True, copy=True) for key, tensor in host.items()}
    _synchronize(device)
    return read, time.perf_counter() - start, moved


def sweep(root: Path, device: str, buffer_mib: list[int], threads: list[int], reps: int, log) -> dict:
    import tp_loader.read
    from benchmarks.report import timing
    from benchmarks.systems import RawRead, rank_plan  # here: --require-gpu answers before torch.distributed loads

    raw = RawRead()
    raw.items = list(rank_plan(root, world_size=1, rank=0).tensors)  # what RawRead.prepare plans, for TP 1
    warm(root)
    state, _ = _load(root, device)  # untimed: CUDA context, allocator, pinned memory; and the check
    _, _, reference = _raw_and_h2d(root, raw, device)
    pin = device.startswith("cuda")
    host = _pinned_buffers(raw, pin)
    _, _, pinned = _pinned_and_h2d(root, raw, host, device)  # untimed: the first asynchronous copies; checked
    for name, other in (("raw read", reference), ("raw pinned copy", pinned)):
        differ = [key for key, tensor in other.items() if not torch.equal(state[key], tensor)]
        if differ or set(state) != set(other):
            raise AssertionError(f"tp_loader's tensors on {device} differ from the {name}: {differ[:5]}")
    del state, reference, pinned
    num_bytes = sum(t.numel() * t.element_size() for t in host.values())
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
            pinned_read, pinned_h2d, moved = _pinned_and_h2d(root, raw, host, device)
            del moved
            references.append({"raw_s": read, "h2d_s": h2d, "pinned_raw_s": pinned_read, "pinned_h2d_s": pinned_h2d})
            log(f"rep {rep + 1}/{reps} raw read {read:.3f} s, .to({device}) {h2d:.3f} s")
            log(
                f"rep {rep + 1}/{reps} raw read into {'pinned' if pin else 'pageable'} tensors {pinned_read:.3f} s, "
                f".to({device}, {'non_blocking' if pin else 'copy'}=True) {pinned_h2d:.3f} s "
                f"= {num_bytes / pinned_h2d / 1e9:.2f} GB/s"
            )
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
    pinned_h2d_s = statistics.median(r["pinned_h2d_s"] for r in references)
    pinned_gbps = num_bytes / pinned_h2d_s / 1e9
    for row in rows.values():
        row |= timing(row["runs"])
        row["gbps"] = num_bytes / row["median_s"] / 1e9
        row["fraction_of_pinned_h2d"] = row["gbps"] / pinned_gbps
    pinned_reference = {
        "pin_memory": pin,
        "label": "pinned host tensors, .to(device, non_blocking=True)"
        if pin
        else "pageable host tensors (pin_memory needs CUDA), .to(cpu, copy=True): a harness check, not an H2D copy",
        "raw_s": statistics.median(r["pinned_raw_s"] for r in references),
        "h2d_s": pinned_h2d_s,
        "h2d_gbps": pinned_gbps,
    }
    return {
        "device": device,
        "bytes": num_bytes,
        "raw_s": raw_s,
        "h2d_s": h2d_s,
        "pinned": pinned_reference,
        "references": references,
        "rows": list(rows.values()),
    }


def markdown(result: dict) -> str:
    raw, h2d, pinned = result["raw_s"], result["h2d_s"], result["pinned"]
    host, copy = (
        ("pinned", f'`.to("{result["device"]}", non_blocking=True)`')
        if pinned["pin_memory"]
        else ("pageable (no `pin_memory` without CUDA: a harness check)", f'`.to("{result["device"]}", copy=True)`')
    )
    lines = [
        f"Device {result['device_name']}; {result['checkpoint_gb']:.2f} GB bf16, TP 1, warm page cache, "
        f"{result['reps']} repetitions; run {result['started']}.",
        "",
        f'Raw read {raw:.3f} s, then `.to("{result["device"]}")` {h2d:.3f} s (medians): no overlap '
        f"{raw + h2d:.3f} s, full overlap {max(raw, h2d):.3f} s.",
        "",
        f"Raw pinned copy: read into {host} host tensors {pinned['raw_s']:.3f} s, then {copy} {pinned['h2d_s']:.3f} s: "
        f"**{pinned['h2d_gbps']:.2f} GB/s** for {result['bytes'] / 1e9:.2f} GB (medians).",
        "",
        "| reader threads | ring buffers × MiB | load s, median (min–max) | × (raw + H2D) | × max(raw, H2D) "
        "| load GB/s | × pinned H2D GB/s |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['num_threads']} | {r['num_buffers']} × {r['buffer_mib']} "
            f"| {r['median_s']:.3f} ({r['min_s']:.3f}–{r['max_s']:.3f}) "
            f"| {r['median_s'] / (raw + h2d):.2f} | {r['median_s'] / max(raw, h2d):.2f} "
            f"| {r['gbps']:.2f} | {r['fraction_of_pinned_h2d']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def summary(result: dict) -> str:
    """One line: the sweep's fastest ring setting end to end, as a fraction of the raw pinned copy."""
    best = max(result["rows"], key=lambda r: r["gbps"])
    pinned = result["pinned"]
    host = "raw pinned" if pinned["pin_memory"] else "raw pageable (harness check, no pin_memory)"
    return (
        f"H2D: tp_loader {best['gbps']:.2f} GB/s = {best['fraction_of_pinned_h2d']:.2f} of {host} "
        f"{pinned['h2d_gbps']:.2f} GB/s (ring {best['num_buffers']} × {best['buffer_mib']} MiB, "
        f"{best['num_threads']} reader thread{'s' if best['num_threads'] != 1 else ''}; {result['device_name']})"
    )


def cuda_missing() -> str | None:
    """Why this process has no GPU to load to, naming each thing checked; None when CUDA is usable."""
    if torch.cuda.is_available():
        return None
    return (
        f"benchmarks.cuda: error: --require-gpu, but no GPU: torch.cuda.is_available() is False, "
        f"torch.version.cuda is {torch.version.cuda!r}, torch.cuda.device_count() is {torch.cuda.device_count()} "
        f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). "
        "Run it on a machine with an NVIDIA GPU and a CUDA build of torch"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    add_data_argument(parser)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--buffer-mib", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4], help="TP_LOADER_NUM_THREADS values")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: checks this script only")
    parser.add_argument(
        "--require-gpu", action="store_true", help="exit 1 when CUDA is unavailable, instead of skipping (exit 0)"
    )
    args = parser.parse_args(argv)
    if args.require_gpu and args.device != "cuda":
        parser.error("--require-gpu measures the GPU: it does not go with --device cpu")
    if args.device == "cuda" and (missing := cuda_missing()) is not None:
        if args.require_gpu:
            print(missing, file=sys.stderr, flush=True)
            return 1
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
    print(summary(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
