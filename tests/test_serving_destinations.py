"""What ``load_into`` writes into: never two checkpoint keys into one destination (key_map collisions), never a
floating-point value into an integer or bool destination (or the reverse), never two destinations that share
memory unless the plan ties exactly those two keys. Each is refused before any byte is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import llama_config
from safetensors.torch import load_file, save_file

import tp_loader
from tp_loader.testing import run_ranks, same_error, values

UP, GATE = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_proj.weight"


def _stored(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / "model.safetensors")


def _nan_like(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: torch.full_like(t, float("nan") if t.is_floating_point() else -1) for key, t in tensors.items()}


@pytest.mark.parametrize("strict", [True, False])
def test_a_key_map_that_sends_two_checkpoint_keys_to_one_destination_is_refused(make_checkpoint, strict) -> None:
    root = make_checkpoint()
    target = _nan_like({k: t for k, t in _stored(root).items() if "mlp.up_proj" not in k})
    with pytest.raises(tp_loader.ArgumentError) as caught:
        tp_loader.load_into(target, root, key_map={r"mlp\.up_proj": "mlp.gate_proj"}, strict=strict)
    assert str(caught.value) == (
        f"key_map sends two checkpoint keys to one destination: {GATE!r} and {UP!r} both become {GATE!r} "
        "[rank=0, key=model.layers.0.mlp.gate_proj.weight]. Make the key_map patterns give each checkpoint key a "
        "name of its own (the first pattern that matches a key renames it)"
    )
    assert torch.isnan(target[GATE]).all(), "the refused load wrote the destination"


def test_a_floating_point_tensor_is_never_written_into_an_integer_or_bool_destination(make_checkpoint) -> None:
    root = make_checkpoint()
    for dtype in (torch.int32, torch.bool):
        target = _nan_like(_stored(root))
        target["model.norm.weight"] = torch.zeros(48, dtype=dtype)
        with pytest.raises(tp_loader.ShardingError) as caught:
            tp_loader.load_into(target, root)
        assert str(caught.value).startswith(
            f"destination 'model.norm.weight' is {dtype}, but the checkpoint stores it as torch.float32: load_into "
            "converts floating point to floating point only [rank=0, key=model.norm.weight]"
        ), str(caught.value)
        assert not target["model.norm.weight"].any(), "the refused load wrote the destination"


def test_an_integer_tensor_is_written_only_into_a_destination_of_its_own_dtype(make_checkpoint) -> None:
    ids = torch.arange(7, dtype=torch.int64) * (2**40)  # values an int32 destination would truncate
    root = make_checkpoint(extra={"model.position_ids": ids})
    for dtype in (torch.float32, torch.int32):
        target = _nan_like(_stored(root))
        target["model.position_ids"] = torch.zeros(7, dtype=dtype)
        with pytest.raises(tp_loader.ShardingError) as caught:
            tp_loader.load_into(target, root)
        assert str(caught.value).startswith(
            f"destination 'model.position_ids' is {dtype}, but the checkpoint stores it as torch.int64: load_into "
            "converts floating point to floating point only"
        ), str(caught.value)
    target = _nan_like(_stored(root))
    target["model.position_ids"] = torch.zeros(7, dtype=torch.int64)
    tp_loader.load_into(target, root)
    assert torch.equal(target["model.position_ids"], ids)


def test_a_float_destination_of_another_width_gets_the_converted_values(make_checkpoint) -> None:
    root = make_checkpoint()
    stored = _stored(root)
    target = {key: torch.empty_like(t, dtype=torch.bfloat16) for key, t in stored.items()}
    tp_loader.load_into(target, root)
    assert all(torch.equal(target[key], t.to(torch.bfloat16)) for key, t in stored.items())


def test_one_tensor_under_two_names_is_refused_as_overlapping_destinations(make_checkpoint) -> None:
    root = make_checkpoint()
    target = _nan_like(_stored(root))
    shared = target["model.norm.weight"]
    target["model.layers.0.input_layernorm.weight"] = shared
    with pytest.raises(tp_loader.ShardingError) as caught:
        tp_loader.load_into(target, root)
    assert str(caught.value).startswith(
        "destinations 'model.layers.0.input_layernorm.weight' and 'model.norm.weight' share memory: one would hold "
        "the other's values [rank=0, key=model.layers.0.input_layernorm.weight]"
    ), str(caught.value)
    assert torch.isnan(shared).all()


def test_overlapping_views_of_one_buffer_are_refused_and_interleaved_ones_load(make_checkpoint) -> None:
    config = llama_config()
    root = make_checkpoint(config)
    stored = _stored(root)
    hidden = config["hidden_size"]
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    rows_q, rows_k = stored[q].shape[0], stored[k].shape[0]
    buffer = torch.full((rows_q + rows_k - 1, hidden), float("nan"))  # one row short: the two views overlap
    target = _nan_like(stored)
    target[q], target[k] = buffer[:rows_q], buffer[rows_q - 1 :]
    with pytest.raises(tp_loader.ShardingError) as caught:
        tp_loader.load_into(target, root)
    assert str(caught.value).startswith(f"destinations {k!r} and {q!r} share memory"), str(caught.value)
    assert torch.isnan(buffer).all()
    # two column halves of one buffer interleave in memory without sharing an element: they load
    up, down = stored[UP], stored["model.layers.0.mlp.down_proj.weight"]  # [100, 48] and [48, 100]
    both = torch.full((100, 96), float("nan"))
    target = _nan_like(stored)
    target[UP], target["model.layers.0.mlp.down_proj.weight"] = both[:, :48], both[:, 48:].T
    tp_loader.load_into(target, root)
    assert torch.equal(both[:, :48], up) and torch.equal(both[:, 48:].T, down)


def _tied_both_stored(rank: int, world_size: int, root: Path) -> bool:
    shards = tp_loader.load(root).state_dict
    embed = shards["model.embed_tokens.weight"].to_local().clone()
    target = {key: torch.full_like(t.to_local(), float("nan")) for key, t in shards.items()}
    target["lm_head.weight"] = target["model.embed_tokens.weight"]  # the model ties them: one tensor
    tp_loader.load_into(target, root)
    return (
        torch.equal(target["lm_head.weight"], embed) and target["lm_head.weight"] is target["model.embed_tokens.weight"]
    )


def test_one_tensor_under_two_tied_names_loads_when_the_checkpoint_stores_both(make_checkpoint) -> None:
    config = llama_config(tie_word_embeddings=True)
    root = make_checkpoint(config)
    stored = _stored(root)
    assert "lm_head.weight" not in stored
    save_file({**stored, "lm_head.weight": stored["model.embed_tokens.weight"].clone()}, root / "model.safetensors")
    assert values(run_ranks(2, _tied_both_stored, root)) == [True, True]


def _overlap_on_ranks(rank: int, world_size: int, root: Path) -> None:
    shards = tp_loader.load(root).state_dict
    target = {key: torch.empty_like(t.to_local()) for key, t in shards.items()}
    target["model.norm.weight"] = target["model.layers.1.post_attention_layernorm.weight"]
    tp_loader.load_into(target, root)


def test_overlapping_destinations_are_one_agreed_error_on_every_rank(make_checkpoint) -> None:
    error = same_error(run_ranks(2, _overlap_on_ranks, make_checkpoint()))
    assert error.type == "ShardingError" and "share memory" in error.message, error
