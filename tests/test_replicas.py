"""Replicas: a 2-D ``(dp, tp)`` mesh gives every replica the plan's shards, replicated on ``dp``; with
``share="job"`` the nodes split the reading of those shards and exchange them, and every rank still holds
bitwise the shards of ``share="none"``. Four ranks in one machine play two nodes of two ranks each, told apart
by ``TP_LOADER_NODE`` (the documented hook), as ``tests/test_two_nodes.py`` does with two torchrun agents."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import llama_config
from reference import expected_shard
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard

import tp_loader
from tp_loader.testing import run_ranks, same_error, values

#: KV heads fewer than the TP degree, so that a replicated KV head is among what the replicas exchange.
CONFIG = llama_config(num_key_value_heads=1)


def _stored(root: Path) -> dict[str, torch.Tensor]:
    return {k: v for path in sorted(root.glob("*.safetensors")) for k, v in load_file(str(path)).items()}


def _mesh(rank: int, world_size: int, dims: tuple[str, str] = ("dp", "tp")):
    os.environ["TP_LOADER_NODE"] = f"node{rank // 2}"  # ranks 0, 1 on node0; 2, 3 on node1
    return init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=dims)


def _replicated_shards(rank: int, world_size: int, root: Path, share: str, dims: tuple[str, str]) -> dict:
    mesh = _mesh(rank, world_size, dims)
    result = tp_loader.load(root, mesh=mesh, share=share)
    tp_axis = dims.index("tp")
    tp_rank, tp_size = mesh.get_local_rank(tp_axis), mesh.size(tp_axis)
    stored = _stored(root)
    assert sorted(result.state_dict) == sorted(stored)
    for key, tensor in stored.items():
        loaded = result.state_dict[key]
        want = expected_shard(key, tensor, CONFIG, tp_size, tp_rank)
        assert loaded.device_mesh is mesh, key
        assert loaded.placements[1 - tp_axis] == Replicate(), key
        assert loaded.placements[tp_axis] in (Replicate(), Shard(0), Shard(1)), key
        assert torch.equal(loaded.to_local(), want), f"rank {rank}: {key} differs from its slice"
        if loaded.placements[tp_axis] != Replicate() and not ("k_proj" in key or "v_proj" in key):
            assert torch.equal(loaded.full_tensor(), tensor), f"rank {rank}: full {key} differs"
    report = result.report
    return {
        "bytes_planned": [r.bytes_planned for r in report.ranks],
        "bytes_read": [r.bytes_read for r in report.ranks],
        "bytes_mapped": [r.bytes_mapped for r in report.ranks],
        "received": [r.bytes_received for r in report.ranks],
        "nodes": [r.node for r in report.ranks],
        "replicas": [r.replica for r in report.ranks],
        "per_node": report.bytes_read_per_node,
        "shard_bytes": sum(expected_shard(k, t, CONFIG, tp_size, tp_rank).nbytes for k, t in stored.items()),
        "sizes": sorted(t.nbytes for t in stored.values()),
    }


@pytest.mark.parametrize("dims", [("dp", "tp"), ("tp", "dp")], ids=["dp-major", "tp-major"])
def test_a_2d_mesh_gives_every_replica_the_plans_shards_replicated_on_the_other_dimension(
    make_checkpoint, dims
) -> None:
    root = make_checkpoint(CONFIG)
    outcomes = values(run_ranks(4, _replicated_shards, root, "none", dims))
    first = outcomes[0]
    assert all(o["bytes_planned"] == first["bytes_planned"] for o in outcomes)
    # share="none": every rank maps its whole shard (zero-copy) from storage, and nothing moves between ranks
    assert first["bytes_planned"] == first["bytes_mapped"] == [o["shard_bytes"] for o in outcomes]
    assert first["bytes_read"] == [0, 0, 0, 0]
    assert first["received"] == [0, 0, 0, 0]
    assert first["nodes"] == ["node0", "node0", "node1", "node1"]
    assert first["replicas"] == ([0, 0, 1, 1] if dims == ("dp", "tp") else [0, 1, 0, 1])


def test_share_job_splits_the_reading_between_nodes_and_gives_bitwise_the_shards_of_share_none(
    make_checkpoint,
) -> None:
    root = make_checkpoint(CONFIG)
    outcomes = values(run_ranks(4, _replicated_shards, root, "job", ("dp", "tp")))
    report = outcomes[0]
    shard_bytes = [o["shard_bytes"] for o in outcomes]  # what each rank holds (replicas hold the same)
    assert shard_bytes[0:2] == shard_bytes[2:4]
    # every shard is read once per job: the two nodes together read one replica's bytes, and each rank
    # receives exactly what it holds but did not read
    assert sum(report["bytes_read"]) == sum(shard_bytes[0:2])
    assert [s - r for s, r in zip(shard_bytes, report["bytes_read"])] == report["received"]
    # the exchange copies what it reads; each rank's slices are its plan's, however they arrived
    assert report["bytes_planned"] == shard_bytes and report["bytes_mapped"] == [0, 0, 0, 0]
    per_node = report["per_node"]
    assert sorted(per_node) == ["node0", "node1"]
    # about half each: the greedy split is off by at most the largest tensor's shard
    assert abs(per_node["node0"] - per_node["node1"]) <= max(report["sizes"])
    assert min(per_node.values()) > 0.4 * sum(shard_bytes[0:2])


def _fetchers(rank: int, world_size: int, demo: str) -> bool:
    import tp_loader.loader

    os.environ["TP_LOADER_NODE"] = f"node{rank // 2}"
    os.environ["TP_LOADER_DEMO_DIR"] = f"{demo}/node{rank // 2}"  # each node's own cache
    fetched = []
    real = tp_loader.loader.ensure_demo
    tp_loader.loader.ensure_demo = lambda path: fetched.append(path) or real(path)
    tp_loader.load(None, mesh=init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp")))
    return bool(fetched)


def test_the_first_rank_of_each_node_fetches_and_the_others_use_its_files(tmp_path) -> None:
    assert values(run_ranks(4, _fetchers, str(tmp_path))) == [True, False, True, False]


def _source_read_fails(rank: int, world_size: int, root: Path) -> None:
    import tp_loader.read
    from tp_loader.errors import ReadError

    mesh = _mesh(rank, world_size)
    if rank == 3:
        real = tp_loader.read.read_tensors

        def failing(root_, fmt, items, *args, **kwargs):
            if any(item.key.endswith("down_proj.weight") for item in items):
                raise ReadError("disk gone", file="model.safetensors", key="down_proj")
            return real(root_, fmt, items, *args, **kwargs)

        tp_loader.loader.read_tensors = failing
    tp_loader.load(root, mesh=mesh, share="job")


def test_a_source_whose_read_fails_ends_every_rank_with_its_error_not_a_hang(make_checkpoint) -> None:
    import tp_loader.loader  # noqa: F401 - patched in the workers

    error = same_error(run_ranks(4, _source_read_fails, make_checkpoint(CONFIG), timeout=60))
    assert error.type == "ReadError"
    assert error.wire["message"].startswith("disk gone")
    assert error.wire["rank"] == 3


def _dies_mid_exchange(rank: int, world_size: int, root: Path) -> tuple[str, float]:
    import time

    import tp_loader.share

    mesh = _mesh(rank, world_size)
    if rank == 2:
        real = tp_loader.share._post
        posted = iter(range(10**6))

        def dying(*args, **kwargs):
            if next(posted) == 3:
                os._exit(5)  # gone without a word, in the middle of the exchange
            return real(*args, **kwargs)

        tp_loader.share._post = dying
    start = time.monotonic()
    try:
        tp_loader.load(root, mesh=mesh, share="job")
    except tp_loader.DistributedError as exc:
        return type(exc).__name__, time.monotonic() - start
    return "loaded", time.monotonic() - start


def test_a_rank_killed_during_the_exchange_ends_every_peer_with_an_error_within_the_timeout(make_checkpoint) -> None:
    outcomes = run_ranks(
        4,
        _dies_mid_exchange,
        make_checkpoint(CONFIG),
        timeout=90,
        env={"TP_LOADER_TIMEOUT_S": "20"},
        allow_lost=True,
    )
    assert outcomes[2] == ("lost", None)
    for rank in (0, 1, 3):
        kind, (name, seconds) = outcomes[rank]
        assert (kind, name) == ("ok", "LostContactError"), outcomes[rank]
        assert seconds < 20, f"rank {rank} ended after {seconds:.1f} s"


def _refused(rank: int, world_size: int, root: Path, case: str) -> None:
    if case == "3-D":
        mesh = init_device_mesh("cpu", (1, 2, 2), mesh_dim_names=("pp", "dp", "tp"))
    elif case == "no tp dim":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "model"))
    else:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    tp_loader.load(root, mesh=mesh, share="job" if case != "bad share" else "node")


@pytest.mark.parametrize(
    "case, kind, message",
    [
        (
            "3-D",
            "DistributedError",
            "tp_loader takes a 1-D mesh or a 2-D mesh with a dimension named 'tp'; got a 3-D mesh (1, 2, 2) with "
            "dimensions ['pp', 'dp', 'tp']",
        ),
        (
            "no tp dim",
            "DistributedError",
            "tp_loader takes a 1-D mesh or a 2-D mesh with a dimension named 'tp'; got a 2-D mesh (2, 2) with "
            "dimensions ['dp', 'model']",
        ),
        ("bad share", "ArgumentError", "share='node' is not one of ['none', 'job']"),
    ],
)
def test_meshes_and_share_modes_it_cannot_take_are_refused_with_what_it_takes(
    make_checkpoint, case, kind, message
) -> None:
    outcomes = run_ranks(4, _refused, make_checkpoint(CONFIG), case)
    for outcome in outcomes:
        assert outcome[0] == "error" and outcome[1].type == kind, outcome
        assert outcome[1].message.startswith(message), outcome[1].message


def _load_into_with_replicas(rank: int, world_size: int, root: Path) -> None:
    tp_loader.load_into({}, root, mesh=init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp")), strict=False)


def test_load_into_a_model_with_a_mesh_of_replicas_is_refused_naming_the_mesh_to_pass(make_checkpoint) -> None:
    error = same_error(run_ranks(4, _load_into_with_replicas, make_checkpoint(CONFIG)))
    assert error.type == "ArgumentError"
    assert error.message.startswith(
        "load_into fills one tensor-parallel group's model: it takes a 1-D mesh, not a mesh with replicas"
    )


def test_share_job_for_cuda_shards_is_refused_saying_what_to_do_instead() -> None:
    from tp_loader.arguments import normalise_share
    from tp_loader.errors import ArgumentError

    with pytest.raises(ArgumentError) as info:
        normalise_share("job", torch.device("cuda", 0))
    assert str(info.value) == (
        "share='job' exchanges CPU tensors over gloo; shards on cuda are not supported yet. "
        "Load with share='none' on GPUs, or with device='cpu' and move the shards"
    )
    assert normalise_share("job", torch.device("cpu")) == "job" and normalise_share("none", None) == "none"


def _stalls_in_the_broadcast(rank: int, world_size: int, root: Path, flags: Path, timeout_s: float) -> float:
    import time

    import tp_loader.share

    mesh = _mesh(rank, world_size)
    if rank == 0:

        def stalled(*args, **kwargs):  # hung (a stuck NIC, a stopped process) until every peer has given up
            waited = time.monotonic()
            while len(list(flags.glob("done*"))) < world_size - 1 and time.monotonic() - waited < 4 * timeout_s:
                time.sleep(0.1)
            os._exit(3)

        tp_loader.share._post = stalled
    start = time.monotonic()
    try:
        tp_loader.load(root, mesh=mesh, share="job")
    except tp_loader.DistributedError:
        return time.monotonic() - start
    finally:
        (flags / f"done{rank}").touch()
    raise AssertionError("loaded with a stalled peer")


def test_a_rank_stalled_in_the_exchange_ends_every_peer_within_the_timeout_and_ten_seconds(
    make_checkpoint, tmp_path: Path
) -> None:
    """A member of the stalled rank's replica group waits out the broadcast's timeout, and must then not wait a
    second timeout for the stalled rank in the agreement round that follows."""
    timeout_s = 12.0
    outcomes = run_ranks(
        4,
        _stalls_in_the_broadcast,
        make_checkpoint(CONFIG),
        tmp_path,
        timeout_s,
        timeout=6 * timeout_s,
        env={"TP_LOADER_TIMEOUT_S": str(timeout_s)},
        allow_lost=True,
    )
    assert outcomes[0] == ("lost", None)
    for rank in (1, 2, 3):
        kind, seconds = outcomes[rank]
        assert kind == "ok", outcomes[rank]
        assert seconds < timeout_s + 10, f"rank {rank} ended after {seconds:.1f} s"
