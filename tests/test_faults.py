"""Lost, hung and killed ranks end every other rank promptly; repeated loads leak nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from conftest import llama_config

import tp_loader
import tp_loader.read
from tp_loader.testing import run_ranks, values


def _load_with_rank1_stuck(rank: int, world_size: int, root: Path, how: str) -> tuple[str, float]:
    if rank == 1:

        def stuck_view(self, item):
            if how == "hang":
                time.sleep(12)  # four times the loader's timeout below, then gone without a word
            os._exit(3)

        tp_loader.read.MappedSource.slice = stuck_view
    start = time.monotonic()
    try:
        tp_loader.load(root)
    except tp_loader.DistributedError as exc:
        return str(exc), time.monotonic() - start
    return "loaded", time.monotonic() - start


def test_hung_rank_ends_the_other_ranks_with_a_timeout_error_within_the_configured_time(make_checkpoint) -> None:
    root = make_checkpoint()
    results = run_ranks(
        2, _load_with_rank1_stuck, root, "hang", timeout=60, env={"TP_LOADER_TIMEOUT_S": "3"}, allow_lost=True
    )
    assert results[1] == ("lost", None)
    message, seconds = results[0][1]
    assert message.startswith("lost contact with the other ranks after stage 'read' (waited at most 3 s)"), message
    assert seconds < 30


def test_rank_that_dies_mid_read_ends_the_other_ranks_with_an_error_not_a_hang(make_checkpoint) -> None:
    root = make_checkpoint()
    results = run_ranks(
        2, _load_with_rank1_stuck, root, "exit", timeout=60, env={"TP_LOADER_TIMEOUT_S": "20"}, allow_lost=True
    )
    assert results[1] == ("lost", None)
    message, seconds = results[0][1]
    assert message.startswith("lost contact with the other ranks after stage 'read'"), message
    assert seconds < 30


def test_rank_killed_mid_load_under_torchrun_ends_the_job_naming_the_lost_rank(make_checkpoint) -> None:
    root = make_checkpoint(num_shards=2)
    script = Path(__file__).parent / "die_mid_load.py"
    start = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TP_LOADER_TIMEOUT_S": "30", "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert done.returncode != 0
    assert "rank      : 1 (local_rank: 1)" in done.stderr
    assert "Signal 9 (SIGKILL)" in done.stderr
    assert time.monotonic() - start < 60


def _resources() -> tuple[int, int, int]:
    fds = len(os.listdir("/proc/self/fd"))
    with open("/proc/self/status") as status:
        rss_kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return fds, threading.active_count(), rss_kb


def _repeat_loads(rank: int, world_size: int, root: Path, times: int) -> list[tuple[int, int, int]]:
    tp_loader.load(root)
    before = _resources()
    for _ in range(times):
        tp_loader.load(root)
    return [before, _resources()]


def test_twenty_loads_in_one_process_leak_no_file_handles_threads_or_memory(make_checkpoint) -> None:
    root = make_checkpoint(llama_config(hidden_size=96, intermediate_size=256), num_shards=2)
    for before, after in values(run_ranks(2, _repeat_loads, root, 20)):
        assert after[0] == before[0], f"open fds {before[0]} -> {after[0]}"
        assert after[1] == before[1], f"threads {before[1]} -> {after[1]}"
        assert after[2] - before[2] < 8 * 1024, f"RSS grew {after[2] - before[2]} KiB over 20 loads"


def _load_across_a_new_job(rank: int, world_size: int, root: Path, init_file: str) -> tuple[bool, bool, bool]:
    import datetime

    import torch.distributed as dist

    from tp_loader import dist as tp_dist

    first = tp_loader.load(root)
    (group,) = tp_dist._CONTROL_GROUPS.values()  # one timeout in use, so one group
    again = tp_loader.load(root)
    (reused,) = tp_dist._CONTROL_GROUPS.values()
    dist.destroy_process_group()  # the caller tears its job down and starts a new one
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    third = tp_loader.load(root)
    (replaced,) = tp_dist._CONTROL_GROUPS.values()
    same = all(
        torch.equal(first.state_dict[k].to_local(), t.to_local())
        and torch.equal(again.state_dict[k].to_local(), t.to_local())
        for k, t in third.state_dict.items()
    )
    return reused is group, replaced is not group, same


def test_load_after_the_job_is_torn_down_and_reinitialized_forms_a_new_control_group(
    make_checkpoint, tmp_path: Path
) -> None:
    root = make_checkpoint(llama_config())
    assert values(run_ranks(2, _load_across_a_new_job, root, str(tmp_path / "second_init"))) == [(True, True, True)] * 2
