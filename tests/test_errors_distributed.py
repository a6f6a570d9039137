"""Failures reach every rank as the same tp_loader error, naming file, key and rank, and never hang."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import llama_config
from safetensors.torch import load_file, save_file

import tp_loader
import tp_loader.loader
import tp_loader.read
from tp_loader.testing import run_ranks, same_error

TIMEOUT_S = 60.0  # a hang guard, not a speed claim: a hang would otherwise stall CI for the pg timeout


def _load(rank: int, world_size: int, root: Path, plan: str = "auto") -> object:
    return tp_loader.load(root, plan=plan).report


def _same_error_everywhere(results: list) -> tuple[str, dict]:
    error = same_error(results)
    return error.type, error.wire


def test_indivisible_heads_fail_on_every_rank_naming_the_world_sizes_that_work(make_checkpoint) -> None:
    root = make_checkpoint(llama_config(num_attention_heads=12, num_key_value_heads=4))
    kind, wire = _same_error_everywhere(run_ranks(3, _load, root, timeout=TIMEOUT_S))
    assert kind == "ShardingError"
    assert str(tp_loader.errors.from_wire(wire)) == (
        f"model {root} (4 kv heads, 12 q heads) cannot be sharded over 3 ranks [rank=0]. "
        "World sizes that work: 1, 2, 4, 12"
    )


def test_missing_shard_file_fails_on_every_rank_naming_the_file(make_checkpoint) -> None:
    root = make_checkpoint(num_shards=2)
    (root / "model-00002-of-00002.safetensors").unlink()
    kind, wire = _same_error_everywhere(run_ranks(2, _load, root, timeout=TIMEOUT_S))
    assert kind == "CheckpointError"
    assert wire["file"] == str(root / "model-00002-of-00002.safetensors")
    assert wire["message"] == "weight file does not exist"
    assert wire["rank"] == 0


def test_index_naming_a_key_absent_from_its_file_fails_on_every_rank_naming_the_key(make_checkpoint) -> None:
    root = make_checkpoint(num_shards=2)
    index_path = root / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    kind, wire = _same_error_everywhere(run_ranks(2, _load, root, timeout=TIMEOUT_S))
    assert kind == "CheckpointError"
    assert (wire["key"], wire["file"]) == ("model.layers.0.mlp.extra.weight", str(index_path))
    assert (
        wire["message"]
        == "index maps the key to model-00001-of-00002.safetensors, but that file's header has no such tensor"
    )


def test_unknown_plan_style_fails_on_every_rank_listing_the_known_styles(make_checkpoint, tmp_path: Path) -> None:
    root = make_checkpoint()
    plan = tmp_path / "diagonal.toml"
    plan.write_text('extends = "llama"\n[[rules]]\npattern = "model.norm.weight"\nstyle = "diagonal"\n')
    kind, wire = _same_error_everywhere(run_ranks(2, _load, root, str(plan), timeout=TIMEOUT_S))
    assert kind == "PlanError"
    assert wire["file"] == str(plan)
    assert wire["message"] == (
        "line 4: rule 'model.norm.weight' names unknown style 'diagonal'; "
        "known styles: colwise, experts, packed, replicate, rowwise, vocab"
    )


def _load_with_rank1_read_failure(rank: int, world_size: int, root: Path) -> object:
    if rank == 1:
        real_read = tp_loader.read.MappedSource.read_into

        def failing_read(self, item, out):
            if item.key == "model.layers.1.mlp.up_proj.weight":
                raise OSError(5, "Input/output error")
            return real_read(self, item, out)

        tp_loader.read.MappedSource.read_into = failing_read
    return tp_loader.load(root).report


def test_read_failure_on_one_rank_reaches_every_rank_as_the_same_error(make_checkpoint) -> None:
    root = make_checkpoint()
    kind, wire = _same_error_everywhere(
        run_ranks(2, _load_with_rank1_read_failure, root, timeout=TIMEOUT_S, env={"TP_LOADER_ZERO_COPY": "0"})
    )
    assert kind == "ReadError"
    assert (wire["rank"], wire["key"], wire["file"]) == (
        1,
        "model.layers.1.mlp.up_proj.weight",
        str(root / "model.safetensors"),
    )


def _strict_load(rank: int, world_size: int, root: Path) -> object:
    return tp_loader.load(root, strict=True).report


def test_strict_load_with_a_missing_key_fails_on_every_rank_before_reading(make_checkpoint, tmp_path: Path) -> None:
    root = make_checkpoint()
    tensors = load_file(str(root / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(root / "model.safetensors"))
    kind, wire = _same_error_everywhere(run_ranks(2, _strict_load, root, timeout=TIMEOUT_S))
    assert kind == "StrictLoadError"
    assert wire["message"] == f"strict load of {root} refused: 1 missing: model.layers.1.mlp.up_proj.weight"


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_that_see_different_checkpoints_refuse_to_load(make_checkpoint, world_size: int) -> None:
    first = make_checkpoint(seed=0)
    second = make_checkpoint(llama_config(intermediate_size=96), seed=0)

    def load_own(rank: int, world_size: int) -> object:
        return tp_loader.load(first if rank == 0 else second).report

    kind, wire = _same_error_everywhere(run_ranks(world_size, load_own, timeout=TIMEOUT_S))
    assert kind == "DistributedError"
    assert (
        wire["message"]
        == f"ranks {list(range(1, world_size))} see a different checkpoint (config or headers) than rank 0"
    )


def _load_with_recording_fetch(rank: int, world_size: int, source: Path, target: Path) -> tuple:
    import shutil
    import time

    import tp_loader.loader

    calls = []

    def fake_resolve(model, *, revision, cache_dir, fetch, deadline_s=None):
        if fetch:
            time.sleep(0.5)  # a slow download: the node's other ranks must wait for it
            shutil.copytree(source, target)
        calls.append((fetch, target.is_dir()))
        return target

    tp_loader.loader.resolve_source = fake_resolve
    tp_loader.load("org/model")
    return calls


def test_only_the_first_rank_of_a_node_fetches_and_the_others_wait_for_it(make_checkpoint, tmp_path: Path) -> None:
    from tp_loader.testing import values

    calls = values(
        run_ranks(
            3,
            _load_with_recording_fetch,
            make_checkpoint(llama_config(num_key_value_heads=3)),
            tmp_path / "snapshot",
            timeout=TIMEOUT_S,
        )
    )
    assert calls == [[(True, True)], [(False, True)], [(False, True)]]
