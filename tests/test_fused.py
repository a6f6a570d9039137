"""Fused projections (phi3 qkv_proj and gate_up_proj): each part is sharded on its own, and a rank
reads exactly its piece of every part — never the first part's placement applied to the whole."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import llama_config
from reference import expected_shard, llama_forward, tp_llama_forward
from safetensors.torch import load_file

import tp_loader
from tp_loader.convert import Conversion
from tp_loader.demo import llama_tensors, write_checkpoint
from tp_loader.errors import ShardingError
from tp_loader.styles import Heads, Part, packed
from tp_loader.testing import run_ranks, values


def phi3_config(**overrides: object) -> dict:
    return llama_config(model_type="phi3", architectures=["Phi3ForCausalLM"], **overrides)


def _fuse(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The llama-layout weights in phi3's fused layout."""
    out = {}
    for key, tensor in tensors.items():
        if key.endswith(("k_proj.weight", "v_proj.weight", "up_proj.weight")):
            continue
        if key.endswith("q_proj.weight"):
            prefix = key[: -len("q_proj.weight")]
            out[prefix + "qkv_proj.weight"] = torch.cat(
                [tensor, tensors[prefix + "k_proj.weight"], tensors[prefix + "v_proj.weight"]]
            )
        elif key.endswith("gate_proj.weight"):
            prefix = key[: -len("gate_proj.weight")]
            out[prefix + "gate_up_proj.weight"] = torch.cat([tensor, tensors[prefix + "up_proj.weight"]])
        else:
            out[key] = tensor
    return out


def _split(fused: dict[str, torch.Tensor], q_rows: int, kv_rows: int) -> dict[str, torch.Tensor]:
    """phi3-layout weights (whole, or one rank's shard with its local sizes) back in llama names."""
    out = {}
    for key, tensor in fused.items():
        if key.endswith("qkv_proj.weight"):
            prefix = key[: -len("qkv_proj.weight")]
            q, k, v = torch.split(tensor, [q_rows, kv_rows, kv_rows])
            out.update({prefix + "q_proj.weight": q, prefix + "k_proj.weight": k, prefix + "v_proj.weight": v})
        elif key.endswith("gate_up_proj.weight"):
            prefix = key[: -len("gate_up_proj.weight")]
            gate, up = tensor.chunk(2)
            out.update({prefix + "gate_proj.weight": gate, prefix + "up_proj.weight": up})
        else:
            out[key] = tensor
    return out


def _sizes(config: dict, world_size: int) -> tuple[int, int, int, int]:
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // heads
    local_kv = kv // world_size if kv >= world_size else 1
    return heads * head_dim, kv * head_dim, heads // world_size * head_dim, local_kv * head_dim


def test_packed_style_reads_each_parts_piece_with_kv_heads_replicated() -> None:
    q, kv = Heads("q", 8, 4), Heads("kv", 2, 4, replicate_when_fewer=True)
    parts = (Part(32, q), Part(8, kv), Part(8, kv))
    ranges = [packed((48, 16), None, 4, r, parts).ranges for r in range(4)]
    assert ranges == [
        ((0, 8), (32, 36), (40, 44)),
        ((8, 16), (32, 36), (40, 44)),
        ((16, 24), (36, 40), (44, 48)),
        ((24, 32), (36, 40), (44, 48)),
    ]
    assert packed((48, 16), None, 4, 0, parts).global_shape == (64, 16)


def test_packed_part_that_cannot_split_evenly_is_refused() -> None:
    with pytest.raises(ShardingError, match="a fused part of 10 rows cannot be split evenly over 4 ranks"):
        packed((20, 4), None, 4, 0, (Part(10), Part(10)))


def _check_fused_shards(rank: int, world_size: int, root: Path, config: dict) -> tuple[int, int]:
    result = tp_loader.load(root)
    stored = load_file(str(root / "model.safetensors"))
    q_rows, kv_rows, _, _ = _sizes(config, world_size)
    unfused = _split(stored, q_rows, kv_rows)
    expected_bytes = 0
    for key, tensor in stored.items():
        if key.endswith(("qkv_proj.weight", "gate_up_proj.weight")):
            prefix = key.rsplit(".", 2)[0] + "."
            names = ("q_proj", "k_proj", "v_proj") if "qkv" in key else ("gate_proj", "up_proj")
            want = torch.cat(
                [
                    expected_shard(prefix + n + ".weight", unfused[prefix + n + ".weight"], config, world_size, rank)
                    for n in names
                ]
            )
        else:
            want = expected_shard(key, tensor, config, world_size, rank)
        assert torch.equal(result.state_dict[key].to_local(), want), key
        expected_bytes += want.numel() * want.element_size()
    return result.report.ranks[rank].bytes_planned, expected_bytes


@pytest.mark.parametrize(
    ("world_size", "config"),
    [
        pytest.param(1, phi3_config(), id="world1"),
        pytest.param(2, phi3_config(), id="world2-gqa"),
        pytest.param(3, phi3_config(num_key_value_heads=3, intermediate_size=102), id="world3"),
        pytest.param(4, phi3_config(num_key_value_heads=2), id="world4-kv-heads-replicated"),
    ],
)
def test_fused_shard_is_the_concatenation_of_each_parts_tensor_parallel_slice(
    tmp_path: Path, world_size: int, config: dict
) -> None:
    root = write_checkpoint(tmp_path / "phi3", config, _fuse(llama_tensors(config), config))
    for bytes_read, expected in values(run_ranks(world_size, _check_fused_shards, root, config)):
        assert bytes_read == expected


def _fused_forward_error(rank: int, world_size: int, root: Path, config: dict) -> float:
    result = tp_loader.load(root)
    q_rows, kv_rows, local_q, local_kv = _sizes(config, world_size)
    local = _split({k: v.to_local() for k, v in result.state_dict.items()}, local_q, local_kv)
    input_ids = torch.tensor([0, 5, 17, 42, 3, 99, 64, 7]) % config["vocab_size"]
    reference = llama_forward(_split(load_file(str(root / "model.safetensors")), q_rows, kv_rows), config, input_ids)
    return float((tp_llama_forward(local, config, input_ids, world_size, rank) - reference).abs().max())


@pytest.mark.parametrize(
    ("world_size", "config"),
    [(2, phi3_config()), (4, phi3_config(num_key_value_heads=2, tie_word_embeddings=True))],
    ids=["world2", "world4-kv-replicated-tied"],
)
def test_fused_checkpoint_tensor_parallel_forward_matches_the_unsharded_forward(
    tmp_path: Path, world_size: int, config: dict
) -> None:
    root = write_checkpoint(tmp_path / "phi3", config, _fuse(llama_tensors(config), config))
    assert max(values(run_ranks(world_size, _fused_forward_error, root, config))) <= 1e-5


SPLIT_TARGET_PLAN = """
extends = "llama"
name = "llama-from-fused"
model_types = ["phi3"]

[[converters]]
op = "chunk"
source = "model.layers.{layer}.self_attn.qkv_proj.weight"
targets = [
    "model.layers.{layer}.self_attn.q_proj.weight",
    "model.layers.{layer}.self_attn.k_proj.weight",
    "model.layers.{layer}.self_attn.v_proj.weight",
]
sizes = ["num_attention_heads * head_dim", "num_key_value_heads * head_dim", "num_key_value_heads * head_dim"]

[[converters]]
op = "chunk"
source = "model.layers.{layer}.mlp.gate_up_proj.weight"
targets = ["model.layers.{layer}.mlp.gate_proj.weight", "model.layers.{layer}.mlp.up_proj.weight"]
sizes = ["intermediate_size", "intermediate_size"]
"""


def _load_split_from_fused(
    rank: int, world_size: int, root: Path, plan: Path, config: dict
) -> tuple[float, int, int, tuple]:
    result = tp_loader.load(root, plan=str(plan))
    q_rows, kv_rows, _, _ = _sizes(config, world_size)
    unfused = _split(load_file(str(root / "model.safetensors")), q_rows, kv_rows)
    assert set(result.state_dict) == set(unfused)
    expected_bytes = 0
    for key, tensor in unfused.items():
        want = expected_shard(key, tensor, config, world_size, rank)
        assert torch.equal(result.state_dict[key].to_local(), want), key
        expected_bytes += want.numel() * want.element_size()
    input_ids = torch.tensor([0, 5, 17, 42, 3, 99, 64, 7]) % config["vocab_size"]
    local = {k: v.to_local() for k, v in result.state_dict.items()}
    error = float(
        (tp_llama_forward(local, config, input_ids, world_size, rank) - llama_forward(unfused, config, input_ids))
        .abs()
        .max()
    )
    return error, result.report.ranks[rank].bytes_planned, expected_bytes, result.report.conversions


@pytest.mark.parametrize(
    ("world_size", "config"),
    [(2, phi3_config()), (4, phi3_config(num_key_value_heads=2))],
    ids=["world2", "world4-kv-replicated"],
)
def test_fused_checkpoint_loads_into_a_split_target_layout_reading_each_targets_rows(
    tmp_path: Path, world_size: int, config: dict
) -> None:
    root = write_checkpoint(tmp_path / "phi3", config, _fuse(llama_tensors(config), config))
    plan = tmp_path / "split.toml"
    plan.write_text(SPLIT_TARGET_PLAN)
    outcomes = values(run_ranks(world_size, _load_split_from_fused, root, plan, config))
    for error, bytes_read, expected_bytes, conversions in outcomes:
        assert error <= 1e-5
        assert bytes_read == expected_bytes
        q_rows, kv_rows, _, _ = _sizes(config, world_size)
        by_target = {c.target: c for c in conversions}
        assert [by_target[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qkv"] == [
            Conversion(
                "model.layers.0.self_attn.q_proj.weight",
                ("model.layers.0.self_attn.qkv_proj.weight",),
                f"chunk rows 0:{q_rows}",
                "colwise Shard(0)",
            ),
            Conversion(
                "model.layers.0.self_attn.k_proj.weight",
                ("model.layers.0.self_attn.qkv_proj.weight",),
                f"chunk rows {q_rows}:{q_rows + kv_rows}",
                "colwise Shard(0)",
            ),
            Conversion(
                "model.layers.0.self_attn.v_proj.weight",
                ("model.layers.0.self_attn.qkv_proj.weight",),
                f"chunk rows {q_rows + kv_rows}:{q_rows + 2 * kv_rows}",
                "colwise Shard(0)",
            ),
        ]


@pytest.mark.parametrize("reader", ["safetensors", "pread", "mmap"])
def test_chunk_targets_read_identically_through_every_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    config = phi3_config()
    root = write_checkpoint(tmp_path / "phi3", config, _fuse(llama_tensors(config), config))
    (tmp_path / "split.toml").write_text(SPLIT_TARGET_PLAN)
    monkeypatch.setenv("TP_LOADER_READER", reader)
    result = tp_loader.load(root, plan=str(tmp_path / "split.toml"))
    q_rows, kv_rows, _, _ = _sizes(config, 1)
    unfused = _split(load_file(str(root / "model.safetensors")), q_rows, kv_rows)
    assert all(torch.equal(result.state_dict[k], v) for k, v in unfused.items())


def test_chunk_sizes_that_do_not_add_up_to_the_stored_rows_are_refused(tmp_path: Path) -> None:
    config = phi3_config()
    root = write_checkpoint(tmp_path / "phi3", config, _fuse(llama_tensors(config), config))
    (tmp_path / "split.toml").write_text(
        SPLIT_TARGET_PLAN.replace(
            'sizes = ["intermediate_size", "intermediate_size"]',
            'sizes = ["intermediate_size", "intermediate_size - 1"]',
        )
    )
    with pytest.raises(
        tp_loader.CheckpointError,
        match=r"chunk converter: the stored tensor has shape \[200, 48\], but its targets' sizes add up to 199 rows",
    ) as info:
        tp_loader.load(root, plan=str(tmp_path / "split.toml"))
    assert info.value.key == "model.layers.0.mlp.gate_up_proj.weight"


FUSED_TARGET_PLAN = """
extends = "phi3"
name = "phi3-from-split"
model_types = ["llama"]

[[converters]]
op = "concatenate"
sources = [
    "model.layers.{layer}.self_attn.q_proj.weight",
    "model.layers.{layer}.self_attn.k_proj.weight",
    "model.layers.{layer}.self_attn.v_proj.weight",
]
target = "model.layers.{layer}.self_attn.qkv_proj.weight"

[[converters]]
op = "concatenate"
sources = ["model.layers.{layer}.mlp.gate_proj.weight", "model.layers.{layer}.mlp.up_proj.weight"]
target = "model.layers.{layer}.mlp.gate_up_proj.weight"
"""


def _load_fused_from_split(rank: int, world_size: int, root: Path, plan: Path, config: dict) -> tuple[float, int, int]:
    result = tp_loader.load(root, plan=str(plan))
    stored = llama_tensors(config)
    fused = _fuse(stored, config)
    assert set(result.state_dict) == set(fused)
    _, _, local_q, local_kv = _sizes(config, world_size)
    expected_bytes = 0
    for key, tensor in stored.items():  # each rank's piece of each part, straight out of the split tensors
        expected_bytes += expected_shard(key, tensor, config, world_size, rank).numel() * tensor.element_size()
    local = _split({k: v.to_local() for k, v in result.state_dict.items()}, local_q, local_kv)
    for key, tensor in stored.items():
        assert torch.equal(local[key], expected_shard(key, tensor, config, world_size, rank)), key
    input_ids = torch.tensor([0, 5, 17, 42, 3, 99, 64, 7]) % config["vocab_size"]
    error = float(
        (tp_llama_forward(local, config, input_ids, world_size, rank) - llama_forward(stored, config, input_ids))
        .abs()
        .max()
    )
    return error, result.report.ranks[rank].bytes_planned, expected_bytes


@pytest.mark.parametrize(
    ("world_size", "config"),
    [(2, llama_config()), (4, llama_config(num_key_value_heads=2))],
    ids=["world2", "world4-kv-replicated"],
)
def test_split_checkpoint_loads_into_a_fused_target_layout_reading_each_parts_rows(
    tmp_path: Path, world_size: int, config: dict
) -> None:
    """The reverse of the chunk case: q/k/v (gate/up) stored apart, loaded as phi3's packed qkv_proj
    (gate_up_proj); rank r reads q[r], k[r], v[r] from the three stored tensors and nothing else."""
    root = write_checkpoint(tmp_path / "llama", config, llama_tensors(config), num_shards=2)
    plan = tmp_path / "fused.toml"
    plan.write_text(FUSED_TARGET_PLAN)
    for error, bytes_read, expected_bytes in values(run_ranks(world_size, _load_fused_from_split, root, plan, config)):
        assert error <= 1e-5
        assert bytes_read == expected_bytes
