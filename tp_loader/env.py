"""Configuration read from the environment, in one place, at call time (never at import)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .errors import ArgumentError

DEFAULT_TIMEOUT_S = 300.0
DEFAULT_MAX_INFLIGHT_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher (torchrun, Slurm, a host program) told this process.

    Attributes:
        rank: global rank (``RANK``), 0 when not launched distributed.
        world_size: ``WORLD_SIZE``, 1 when not launched distributed.
        local_rank: ``LOCAL_RANK``.
        local_world_size: ``LOCAL_WORLD_SIZE``, the number of ranks on this node.
        launched: whether ``WORLD_SIZE`` and ``RANK`` are set (torchrun or an equivalent).
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launched: bool


@dataclass(frozen=True)
class Settings:
    """Tunables, each from a ``TP_LOADER_*`` variable.

    Attributes:
        num_threads: reader threads per rank (``TP_LOADER_NUM_THREADS``); default: this node's CPUs
            divided among its ranks, at most 8.
        max_inflight_bytes: bytes read but not yet placed on the target device
            (``TP_LOADER_MAX_INFLIGHT_BYTES``).
        timeout_s: timeout of tp_loader's own collectives (``TP_LOADER_TIMEOUT_S``).
        progress: whether rank 0 may show a progress bar (``TP_LOADER_PROGRESS``, default on).
        demo_dir: where the demo checkpoint is generated (``TP_LOADER_DEMO_DIR``).
        reader: how safetensors files are read (``TP_LOADER_READER``: ``mmap``, ``safetensors``, ``pread``).
        fadvise: whether to send ``POSIX_FADV_WILLNEED`` hints first (``TP_LOADER_FADVISE``, default off:
            a win on cold caches and network filesystems, about 0.1 s per GB of overhead on a warm cache).
        zero_copy: on CPU without a dtype change, keep single-range shards as views of the file mapping
            (``TP_LOADER_ZERO_COPY``, default on; ``0`` copies them).
    """

    num_threads: int
    max_inflight_bytes: int
    timeout_s: float
    progress: bool
    demo_dir: str
    reader: str = "mmap"
    fadvise: bool = False
    zero_copy: bool = True


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ArgumentError(
            f"environment variable {name}={raw!r} is not an integer", hint=f"Set {name} to a whole number or unset it"
        ) from None


def launch_env() -> LaunchEnv:
    """Reads the launcher's variables now."""
    launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    world_size = _int("WORLD_SIZE", 1)
    local_world_size = _int("LOCAL_WORLD_SIZE", world_size if launched else 1)
    return LaunchEnv(
        rank=_int("RANK", 0),
        world_size=world_size,
        local_rank=_int("LOCAL_RANK", 0),
        local_world_size=max(1, local_world_size),
        launched=launched,
    )


def node_override() -> str | None:
    """``TP_LOADER_NODE``: this process's node name, when host names cannot tell nodes apart."""
    return os.environ.get("TP_LOADER_NODE") or None


def _default_threads(local_world_size: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // max(1, local_world_size)))


def _demo_dir() -> str:
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("TP_LOADER_DEMO_DIR") or os.path.join(cache_home, "tp_loader", "demo")


def default_settings(local_world_size: int) -> Settings:
    """The tunables' defaults, ignoring ``TP_LOADER_*``: what a load uses to reach the other ranks and
    tell them about a bad setting."""
    threads = _default_threads(local_world_size)
    return Settings(threads, DEFAULT_MAX_INFLIGHT_BYTES, DEFAULT_TIMEOUT_S, progress=False, demo_dir=_demo_dir())


def settings(local_world_size: int) -> Settings:
    """Reads the ``TP_LOADER_*`` tunables now.

    Args:
        local_world_size: ranks sharing this node, among which the CPUs are divided.

    Raises:
        ArgumentError: a variable that is set to something other than what it takes, naming it.
    """
    default_threads = _default_threads(local_world_size)
    timeout_raw = os.environ.get("TP_LOADER_TIMEOUT_S", "")
    try:
        timeout_s = float(timeout_raw) if timeout_raw else DEFAULT_TIMEOUT_S
        if not math.isfinite(timeout_s) or timeout_s <= 0:
            raise ValueError(timeout_raw)
    except ValueError:
        raise ArgumentError(
            f"environment variable TP_LOADER_TIMEOUT_S={timeout_raw!r} is not a positive number of seconds",
            hint="Set it to seconds, e.g. 300",
        ) from None
    return Settings(
        num_threads=max(1, _int("TP_LOADER_NUM_THREADS", default_threads)),
        max_inflight_bytes=max(1, _int("TP_LOADER_MAX_INFLIGHT_BYTES", DEFAULT_MAX_INFLIGHT_BYTES)),
        timeout_s=timeout_s,
        progress=_flag("TP_LOADER_PROGRESS", True),
        demo_dir=_demo_dir(),
        reader=_choice("TP_LOADER_READER", ("mmap", "safetensors", "pread")),
        fadvise=_flag("TP_LOADER_FADVISE", False),
        zero_copy=_flag("TP_LOADER_ZERO_COPY", True),
    )


def _flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    return default if raw == "" else raw not in ("0", "false", "no", "off")


def _choice(name: str, allowed: tuple[str, ...]) -> str:
    raw = os.environ.get(name, "").strip() or allowed[0]
    if raw not in allowed:
        raise ArgumentError(
            f"environment variable {name}={raw!r} is not one of {', '.join(allowed)}",
            hint=f"Set {name} to one of them or unset it",
        )
    return raw
