"""Two torchrun agents on this machine as two nodes of two ranks each (c10d rendezvous on localhost; node
identity from ``TP_LOADER_NODE``, the documented hook): the first rank of each node fetches from its node's
Hub cache, ``share="job"`` makes each node read about half the checkpoint, the shards are bitwise those of
``share="none"``, and a rank killed during the exchange ends the job with errors, not a hang."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import llama_config
from test_hub import _hub_cache

from tp_loader.demo import llama_tensors, write_checkpoint

WORKER = Path(__file__).with_name("two_nodes_job.py")
REPO = "org/two-nodes"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_agents(tmp_path: Path, extra: list[str], timeout: float = 150) -> tuple[list[int], float]:
    """Starts both agents, waits for both; returns their exit codes and the wall time."""
    port, out = _free_port(), tmp_path / "out"
    out.mkdir(exist_ok=True)
    agents = []
    start = time.monotonic()
    for node in range(2):
        env = {
            **os.environ,
            "TP_LOADER_NODE": f"node{node}",
            "HF_HUB_CACHE": str(tmp_path / f"hub-node{node}"),  # each node's own cache
            "HF_HUB_OFFLINE": "1",
            "TP_LOADER_TIMEOUT_S": "30",
            "OMP_NUM_THREADS": "1",
        }
        command = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "2", "--nproc-per-node", "2",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
            "--max-restarts", "0",
            str(WORKER), str(out), REPO, *extra,
        ]  # fmt: skip
        agents.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    codes = []
    for agent in agents:
        try:
            agent.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for a in agents:
                a.kill()
            pytest.fail(f"the two agents did not finish within {timeout} s")
        codes.append(agent.returncode)
    return codes, time.monotonic() - start


@pytest.fixture
def hub_caches(tmp_path: Path) -> Path:
    config = llama_config(num_key_value_heads=1)
    source = write_checkpoint(tmp_path / "source", config, llama_tensors(config, seed=3), num_shards=2)
    for node in range(2):
        (tmp_path / f"hub-node{node}").mkdir()
        _hub_cache(tmp_path / f"hub-node{node}", REPO, source)
    return tmp_path


def _records(tmp_path: Path) -> dict[int, dict]:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in (tmp_path / "out").glob("rank*.json")}


def test_two_nodes_share_job_read_half_each_and_hold_bitwise_the_shards_of_share_none(hub_caches: Path) -> None:
    codes, _ = _two_agents(hub_caches, [])
    records = _records(hub_caches)
    assert codes == [0, 0] and sorted(records) == [0, 1, 2, 3], records
    by_node: dict[str, list[dict]] = {}
    for rank in sorted(records):
        by_node.setdefault(records[rank]["node"], []).append(records[rank])
    assert sorted(by_node) == ["node0", "node1"] and all(len(v) == 2 for v in by_node.values())
    # the first rank of each node fetched (from that node's cache); the other rank used what it found
    for node, ranks in by_node.items():
        assert [r["fetched"] for r in ranks] == [True, False], node
    for record in records.values():
        assert record["same_keys"] and record["bitwise_equal"], record["rank"]
    report = records[0]["report"]
    ranks = report["ranks"]
    one_replica = sum(records[0]["none_bytes"]) / 2  # share="none": every replica reads everything
    per_node = report["bytes_read_per_node"]
    assert sum(per_node.values()) == one_replica
    assert min(per_node.values()) > 0.4 * one_replica, per_node
    assert sum(r["bytes_received"] for r in ranks) == one_replica


def test_a_rank_killed_during_the_exchange_ends_both_nodes_with_errors_not_a_hang(hub_caches: Path) -> None:
    codes, seconds = _two_agents(hub_caches, ["3"], timeout=150)
    records = _records(hub_caches)
    assert codes[0] != 0 or codes[1] != 0
    assert 3 not in records  # the killed rank wrote nothing
    assert all("error" in r for r in records.values()), records  # no survivor reports a load
    assert seconds < 120
