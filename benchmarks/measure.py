"""What every benchmark measures with: the page cache (warm, evict), anonymous memory, ``/proc`` counters, the
shard checksums that compare systems, and the machine and versions a result records.

Only the standard library is imported here (torch inside ``checksums``): ``benchmarks.fresh`` times each rank's
imports, and this module is imported before that clock starts.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import platform
import resource
import threading
import time
from pathlib import Path
from typing import Any


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    """``--data``: where benchmark checkpoints are generated (``TP_LOADER_BENCH_DIR``, else /tmp/tp_loader_bench)."""
    default = Path(os.environ.get("TP_LOADER_BENCH_DIR", "/tmp/tp_loader_bench"))
    parser.add_argument("--data", type=Path, default=default, help="where checkpoints are generated")


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` figure given in kB (``RssAnon``, ``VmHWM``), in bytes; 0 when absent."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class AnonPeak:
    """Samples RssAnon (anonymous memory, not file-backed pages) every millisecond; keeps the peak."""

    def __init__(self) -> None:
        self.peak = status_bytes("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, status_bytes("RssAnon"))
            time.sleep(0.001)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_bytes("RssAnon"))


def io_counters() -> dict[str, int]:
    """``/proc/self/io``: ``rchar`` (bytes asked of read system calls), ``read_bytes`` (bytes read from storage)."""
    with open("/proc/self/io") as io:
        return {line.split(":")[0]: int(line.split()[1]) for line in io}


def faults() -> tuple[int, int]:
    """This process's minor and major page faults so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_majflt


def evict(root: Path) -> None:
    """Drops ``root``'s safetensors files from the page cache (their pages only, nothing else's)."""
    evict_files(sorted(root.glob("*.safetensors")))


def evict_files(paths: list[Path]) -> None:
    """Drops these files' pages from the page cache (written back first: dirty pages cannot be dropped)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(root: Path) -> None:
    """Reads every safetensors file of ``root`` once so the page cache is warm."""
    warm_files(sorted(root.glob("*.safetensors")))


def warm_files(paths: list[Path]) -> None:
    """Reads these files once so the page cache is warm."""
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(64 << 20):
                pass


def checksums(state: dict[str, Any]) -> dict[str, tuple[list[int], str]]:
    """Key → (local shape, BLAKE2b of the local bytes) of a rank's tensors (DTensors by their local shard)."""
    import torch

    from benchmarks.systems import local

    out = {}
    for key, tensor in state.items():
        t = local(tensor).detach().contiguous().cpu()
        digest = hashlib.blake2b(t.reshape(-1).view(torch.uint8).numpy(), digest_size=8)
        out[key] = (list(t.shape), digest.hexdigest())
    return out


def compare(ours: list[dict], theirs: list[dict]) -> list[str]:
    """Differences between two systems' per-rank checksums (``ours``' keys; shape and checksum per key)."""
    problems = []
    for rank, (mine, other) in enumerate(zip(ours, theirs)):
        for key, (shape, digest) in mine.items():
            if key not in other:
                problems.append(f"rank {rank} {key}: missing")
            elif list(other[key][0]) != list(shape):
                problems.append(f"rank {rank} {key}: shape {other[key][0]} not {shape}")
            elif other[key][1] != digest:
                problems.append(f"rank {rank} {key}: different bytes")
        extra = sorted(set(other) - set(mine))
        if extra:
            problems.append(f"rank {rank}: {len(extra)} extra keys ({extra[0]}, ...)")
    return problems


def machine() -> dict:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    with open("/proc/meminfo") as meminfo:
        mem = int(meminfo.readline().split()[1]) * 1024
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in (
        "tp_loader",
        "torch",
        "transformers",
        "accelerate",
        "safetensors",
        "huggingface_hub",
        "fastsafetensors",
    ):
        try:
            out[name] = (
                version(name.replace("_", "-")) if name != "tp_loader" else importlib.import_module(name).__version__
            )
        except (PackageNotFoundError, ImportError):
            out[name] = "not installed"
    return out
