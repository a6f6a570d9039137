"""Launching gloo ranks by fork, for tests and benchmarks: much lighter than torchrun.

torchrun costs seconds per launch on two cores; forking costs about one. The parent must not have
started threads that hold locks across the fork (OpenMP's pool: call ``torch.set_num_threads(1)``
before any large torch op in the parent). Each rank runs
``fn(rank, world_size, *args)`` and sends back ``("ok", value)`` or ``("error", info)``.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class RankError:
    """An exception raised on one rank: its type, message, (for tp_loader errors) its fields, and the
    rank's peak resident memory."""

    type: str
    message: str
    traceback: str
    wire: dict | None
    peak_rss_mib: int = 0


def _worker(
    rank: int, world_size: int, init_file: str, fn: Callable, args: tuple, conn: Any, env: dict[str, str]
) -> None:
    os.environ.update(env)
    code = 0
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=60),
        )
        # every rank's connections are up before any rank may finish: a rank that returns at once (one
        # outside the mesh it passes) would otherwise close its sockets under a peer still connecting
        dist.barrier()
        out: tuple = ("ok", fn(rank, world_size, *args))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the test
        to_wire = getattr(exc, "to_wire", None)
        peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        wire = to_wire() if to_wire else None
        out = ("error", RankError(type(exc).__name__, str(exc), traceback.format_exc(), wire, peak_rss_mib))
        code = 1
    try:
        conn.send(out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_ranks(
    world_size: int,
    fn: Callable,
    *args: Any,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    allow_lost: bool = False,
) -> list[tuple[str, Any]]:
    """Runs ``fn`` on ``world_size`` forked gloo ranks; returns each rank's outcome in rank order.

    With ``allow_lost``, a rank that exits or hangs without reporting yields ``("lost", None)``.

    Raises:
        TimeoutError: some rank did not report within ``timeout`` seconds (all ranks are then killed),
            unless ``allow_lost``.
    """
    ctx = mp.get_context("fork")
    init_file = os.path.join(tempfile.mkdtemp(prefix="tp_loader_pg_"), "rendezvous")
    procs, conns = [], []
    for rank in range(world_size):
        receiver, sender = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker, args=(rank, world_size, init_file, fn, args, sender, env or {}), daemon=True)
        proc.start()
        sender.close()
        procs.append(proc)
        conns.append(receiver)
    deadline = time.monotonic() + timeout
    results: list[tuple[str, Any]] = []
    try:
        for rank, conn in enumerate(conns):
            try:
                ready = conn.poll(max(0.0, deadline - time.monotonic()))
                outcome = conn.recv() if ready else None
            except EOFError:  # the rank exited without reporting
                outcome = None
            if outcome is None and not allow_lost:
                raise TimeoutError(f"rank {rank} of {world_size} did not report within {timeout} s")
            results.append(outcome or ("lost", None))
    finally:
        for proc in procs:
            proc.join(timeout=max(0.1, deadline - time.monotonic()) if not allow_lost else 0.1)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return results


def values(results: list[tuple[str, Any]]) -> list[Any]:
    """Every rank's value; fails with the first rank's traceback if any rank raised."""
    for rank, (status, value) in enumerate(results):
        if status != "ok":
            raise AssertionError(f"rank {rank} raised {value.type}: {value.message}\n{value.traceback}")
    return [value for _, value in results]


def errors(results: list[tuple[str, Any]]) -> list[RankError]:
    """Every rank's error; fails if any rank succeeded."""
    for rank, (status, value) in enumerate(results):
        if status != "error":
            raise AssertionError(f"rank {rank} succeeded with {value!r}, expected an error")
    return [value for _, value in results]


def same_error(results: list[tuple[str, Any]]) -> RankError:
    """The error every rank raised; fails unless all ranks raised the same type and message."""
    found = errors(results)
    kinds = {(e.type, e.message) for e in found}
    assert len(kinds) == 1, f"ranks raised different errors: {kinds}"
    return found[0]
