"""DeepSeek-V3: MLA (q_a / kv_a_with_mqa replicated, q_b / kv_b colwise on head boundaries, o rowwise),
dense first layers, MoE with shared experts; block-fp8 weights whose weight_scale_inv blocks are
sharded in step with them, a shard that cuts a block refused unless a wider dtype is asked for, in
which case every slice is dequantized on load. Block-fp8 on a small llama too: non-square 4x8 and 8x4
blocks with partial blocks at the edges, in step, dequantized and refused."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import llama_config
from models import deepseek_tensors, dequantize_block_fp8, quantize_checkpoint
from reference import chunk_piece, llama_forward, tp_llama_forward

import tp_loader
from tp_loader.demo import llama_tensors, write_checkpoint
from tp_loader.index import index_checkpoint
from tp_loader.plan import make_plan
from tp_loader.resolve import find_weights
from tp_loader.spec import select_spec
from tp_loader.testing import run_ranks, values

BLOCK = (8, 8)
CONFIG = {
    "model_type": "deepseek_v3",
    "architectures": ["DeepseekV3ForCausalLM"],
    "vocab_size": 101,
    "hidden_size": 64,
    "intermediate_size": 64,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_shared_experts": 1,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "q_lora_rank": 36,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "norm_topk_prob": True,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
FP8_CONFIG = {
    **CONFIG,
    "quantization_config": {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(BLOCK),
    },
}
INPUT_IDS = torch.tensor([0, 5, 17, 42, 3, 99, 64, 7])


def shard_dim(key: str) -> int | None:
    """The sharded dim of a DeepSeek-V3 key (None: replicated)."""
    if key.endswith(
        (
            "q_b_proj.weight",
            "kv_b_proj.weight",
            "q_proj.weight",
            "gate_proj.weight",
            "up_proj.weight",
            "embed_tokens.weight",
            "lm_head.weight",
        )
    ):
        return 0
    if key.endswith(("o_proj.weight", "down_proj.weight")):
        return 1
    return None


def expected_slice(key: str, tensor: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    dim = shard_dim(key)
    return tensor if dim is None else chunk_piece(tensor, world_size, rank, dim)


def dequantized(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint with every fp8 weight multiplied out by its scale blocks (the reference weights)."""
    out = {}
    for key, tensor in stored.items():
        if key.endswith("_scale_inv"):
            continue
        out[key] = (
            dequantize_block_fp8(tensor, stored[key + "_scale_inv"], BLOCK)
            if tensor.dtype == torch.float8_e4m3fn
            else tensor
        )
    return out


def _check_float(rank: int, world_size: int, root: Path, config: dict) -> tuple[float, bool]:
    result = tp_loader.load(root)
    stored = deepseek_tensors(config)
    local = {k: v.to_local() for k, v in result.state_dict.items()}
    assert set(local) == set(stored)
    for key, tensor in stored.items():
        assert torch.equal(local[key], expected_slice(key, tensor, world_size, rank)), key
    error = float(
        (tp_llama_forward(local, config, INPUT_IDS, world_size, rank) - llama_forward(stored, config, INPUT_IDS))
        .abs()
        .max()
    )
    return error, result.report.clean


@pytest.mark.parametrize(
    ("world_size", "config"),
    [
        (1, CONFIG),
        (2, CONFIG),
        (4, CONFIG),
        (2, {**CONFIG, "q_lora_rank": None}),
        (3, {**CONFIG, "num_attention_heads": 6, "num_key_value_heads": 6}),
    ],
    ids=["world1", "world2", "world4", "world2-no-q-lora", "world3-uneven-mlp"],
)
def test_deepseek_mla_and_moe_shards_are_exact_and_forward_matches(
    tmp_path: Path, world_size: int, config: dict
) -> None:
    root = write_checkpoint(tmp_path / "ds", config, deepseek_tensors(config), num_shards=2)
    for error, clean in values(run_ranks(world_size, _check_float, root, config)):
        assert error <= 1e-5
        assert clean


def _check_fp8(rank: int, world_size: int, root: Path) -> tuple[float, int, int]:
    result = tp_loader.load(root)
    stored = quantize_checkpoint(deepseek_tensors(FP8_CONFIG), BLOCK)
    local = {k: v.to_local() for k, v in result.state_dict.items()}
    assert set(local) == set(stored)
    expected_bytes = 0
    for key, tensor in stored.items():
        weight_key = key.removesuffix("_scale_inv")
        if key != weight_key and shard_dim(weight_key) is not None:  # the scale's blocks of the weight's slice
            dim = shard_dim(weight_key)
            start, stop = _chunk(stored[weight_key].shape[dim], world_size, rank)
            want = tensor.narrow(dim, start // BLOCK[dim], math.ceil(stop / BLOCK[dim]) - start // BLOCK[dim])
        else:
            want = expected_slice(key, tensor, world_size, rank)
        assert local[key].dtype == tensor.dtype
        assert torch.equal(local[key].view(torch.uint8), want.contiguous().view(torch.uint8)), (
            key
        )  # bitwise, fp8 included
        expected_bytes += want.numel() * want.element_size()
    weights = {
        k: dequantize_block_fp8(v, local[k + "_scale_inv"], BLOCK) if v.dtype == torch.float8_e4m3fn else v
        for k, v in local.items()
        if not k.endswith("_scale_inv")
    }
    error = float(
        (
            tp_llama_forward(weights, FP8_CONFIG, INPUT_IDS, world_size, rank)
            - llama_forward(dequantized(stored), FP8_CONFIG, INPUT_IDS)
        )
        .abs()
        .max()
    )
    return error, result.report.ranks[rank].bytes_planned, expected_bytes


def _chunk(size: int, world_size: int, rank: int) -> tuple[int, int]:
    step = math.ceil(size / world_size)
    return min(rank * step, size), min((rank + 1) * step, size)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_fp8_weights_and_their_scale_blocks_are_sharded_in_step(tmp_path: Path, world_size: int) -> None:
    root = write_checkpoint(
        tmp_path / "ds", FP8_CONFIG, quantize_checkpoint(deepseek_tensors(FP8_CONFIG), BLOCK), num_shards=3
    )
    for error, bytes_read, expected_bytes in values(run_ranks(world_size, _check_fp8, root)):
        assert error <= 1e-5
        assert bytes_read == expected_bytes


WORLD3 = {**FP8_CONFIG, "num_attention_heads": 6, "num_key_value_heads": 6}


def test_shard_that_cuts_an_fp8_block_is_refused_naming_the_key(tmp_path: Path) -> None:
    """At world 3 the dense MLP (64 rows: 22 per rank) cuts 8-row blocks; attention (6 heads) does not."""
    root = write_checkpoint(tmp_path / "ds", WORLD3, quantize_checkpoint(deepseek_tensors(WORLD3), BLOCK))
    checkpoint = index_checkpoint(find_weights(root))
    spec = select_spec("auto", checkpoint.config, model="ds")
    with pytest.raises(
        tp_loader.ShardingError, match=r"the shard \[0, 22\) of dim 1 cuts the weight's 8x8 fp8 scale blocks"
    ) as info:
        make_plan(checkpoint, spec, 3, 0, model="ds")
    assert info.value.key == "model.layers.0.mlp.down_proj.weight"  # the first cut key in file order
    assert "dtype=bfloat16" in info.value.hint


def _check_dequantized(rank: int, world_size: int, root: Path) -> tuple[float, int, int, dict]:
    result = tp_loader.load(root, dtype=torch.float32)
    stored = quantize_checkpoint(deepseek_tensors(WORLD3), BLOCK)
    full = dequantized(stored)
    local = {k: v.to_local() for k, v in result.state_dict.items()}
    assert set(local) == set(full)  # scales are consumed, not loaded
    expected_bytes = 0
    for key, tensor in full.items():
        want = expected_slice(key, tensor, world_size, rank)
        assert local[key].dtype == torch.float32 and torch.equal(local[key], want), key
        expected_bytes += want.numel() * stored[key].element_size()
        if key + "_scale_inv" in stored:  # the scale blocks covering the slice
            dim = shard_dim(key)
            scale = stored[key + "_scale_inv"]
            if dim is None:
                expected_bytes += scale.numel() * 4
            else:
                start, stop = _chunk(tensor.shape[dim], world_size, rank)
                blocks = math.ceil(stop / BLOCK[dim]) - start // BLOCK[dim] if stop > start else 0
                expected_bytes += blocks * scale.shape[1 - dim] * 4
    error = float(
        (tp_llama_forward(local, WORLD3, INPUT_IDS, world_size, rank) - llama_forward(full, WORLD3, INPUT_IDS))
        .abs()
        .max()
    )
    return error, result.report.ranks[rank].bytes_planned, expected_bytes, dict(result.report.notes)


def test_wider_dtype_dequantizes_every_slice_on_load_even_where_shards_cut_blocks(tmp_path: Path) -> None:
    root = write_checkpoint(tmp_path / "ds", WORLD3, quantize_checkpoint(deepseek_tensors(WORLD3), BLOCK), num_shards=2)
    for error, bytes_read, expected_bytes, notes in values(run_ranks(3, _check_dequantized, root)):
        assert error <= 1e-5
        assert bytes_read == expected_bytes
        assert (
            notes["model.layers.0.mlp.gate_proj.weight"]
            == "dequantized on load from float8_e4m3fn with model.layers.0.mlp.gate_proj.weight_scale_inv (8x8 blocks)"
        )


def test_fp8_scale_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    tensors = quantize_checkpoint(deepseek_tensors(FP8_CONFIG), BLOCK)
    key = "model.layers.1.self_attn.o_proj.weight_scale_inv"
    tensors[key] = tensors[key][:, :-1].contiguous()
    root = write_checkpoint(tmp_path / "ds", FP8_CONFIG, tensors)
    with pytest.raises(
        tp_loader.CheckpointError,
        match=r"scale has shape \[8, 7\], but the weight \[64, 64\] in 8x8 blocks needs \[8, 8\]",
    ) as info:
        tp_loader.load(root)
    assert info.value.key == key


def test_fp8_weight_without_its_scale_is_missing_and_cannot_be_dequantized(tmp_path: Path) -> None:
    tensors = quantize_checkpoint(deepseek_tensors(FP8_CONFIG), BLOCK)
    del tensors["model.layers.1.mlp.experts.2.up_proj.weight_scale_inv"]
    root = write_checkpoint(tmp_path / "ds", FP8_CONFIG, tensors)
    assert tp_loader.load(root).report.missing_keys == ("model.layers.1.mlp.experts.2.up_proj.weight_scale_inv",)
    with pytest.raises(tp_loader.CheckpointError, match="block-fp8 weight has no stored scale") as info:
        tp_loader.load(root, dtype="bfloat16")
    assert info.value.key == "model.layers.1.mlp.experts.2.up_proj.weight"


@pytest.mark.parametrize("reader", ["mmap", "safetensors", "pread"])
def test_dequantized_slices_are_identical_through_every_reader(tmp_path: Path, reader: str) -> None:
    from tp_loader.read import ReadOptions, read_tensors

    stored = quantize_checkpoint(deepseek_tensors(WORLD3), BLOCK)
    root = write_checkpoint(tmp_path / "ds", WORLD3, stored, num_shards=2)
    full = dequantized(stored)
    checkpoint = index_checkpoint(find_weights(root))
    spec = select_spec("auto", checkpoint.config, model="ds")
    options = ReadOptions(torch.float32, torch.device("cpu"), num_threads=2, max_inflight_bytes=1 << 30, reader=reader)
    for rank in range(3):
        plan = make_plan(checkpoint, spec, 3, rank, model="ds", dequantize=True)
        local, _ = read_tensors(root, "safetensors", plan.tensors, options)
        assert all(torch.equal(local[key], expected_slice(key, tensor, 3, rank)) for key, tensor in full.items())


def test_scale_of_a_mismatched_weight_is_reported_mismatched_too(tmp_path: Path) -> None:
    tensors = quantize_checkpoint(deepseek_tensors(FP8_CONFIG), BLOCK)
    key = "model.layers.0.self_attn.o_proj.weight"
    tensors[key], tensors[key + "_scale_inv"] = (
        tensors[key][:, :-8].contiguous(),
        tensors[key + "_scale_inv"][:, :-1].contiguous(),
    )
    report = tp_loader.load(write_checkpoint(tmp_path / "ds", FP8_CONFIG, tensors)).report
    assert [m.key for m in report.mismatched_keys] == [key, key + "_scale_inv"]
    assert report.mismatched_keys[1].describe() == f"{key}_scale_inv (config implies [8, 8], stored [8, 7])"


def test_zero_copy_never_counts_a_dequantized_weight_as_a_view(tmp_path: Path) -> None:
    stored = quantize_checkpoint(deepseek_tensors(FP8_CONFIG), BLOCK)
    root = write_checkpoint(tmp_path / "ds", FP8_CONFIG, stored)
    result = tp_loader.load(root, dtype=torch.float32, zero_copy=True)
    fp8_weights = sum(1 for t in stored.values() if t.dtype == torch.float8_e4m3fn)
    assert result.report.ranks[0].zero_copy_tensors == len(result.state_dict) - fp8_weights
    assert all(torch.equal(result.state_dict[k], v) for k, v in dequantized(stored).items())


# Block-fp8 with non-square blocks and partial blocks, on a small llama (fp8 applies to every plan):
# hidden 30 leaves a partial block at the edge of every weight's hidden dim for 4 and 8 alike, and the
# MLP's 15 or 31 rows leave one at the end of its sharded dim. Attention is sharded on heads of 8 rows
# (4 q heads, 2 kv heads, replicated 2x at world 4), so its shards always fall on block boundaries.
def fp8_llama_config(block: tuple[int, int], intermediate_size: int) -> dict:
    quantization = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": block}
    return llama_config(
        hidden_size=30,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=intermediate_size,
        vocab_size=37,
        num_hidden_layers=1,
        quantization_config=quantization,
    )


def fp8_llama_tensors(config: dict) -> dict[str, torch.Tensor]:
    return quantize_checkpoint(llama_tensors(config), tuple(config["quantization_config"]["weight_block_size"]))


ROW_SHARDED = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")


def held_range(key: str, shape: tuple[int, ...], config: dict, world_size: int, rank: int) -> tuple[int, int, int, int]:
    """``(dim, start, stop, global size of dim)`` of the llama weight ``key`` that ``rank`` holds (dim -1:
    all of it): ``torch.chunk`` along its dim, or KV head ``rank * kv // world`` when KV heads are fewer
    than ranks (each head then counted once per rank holding it)."""
    kv, head_dim = config["num_key_value_heads"], config["head_dim"]
    if key.endswith(("k_proj.weight", "v_proj.weight")) and kv < world_size:
        head = rank * kv // world_size
        return 0, head * head_dim, (head + 1) * head_dim, world_size * head_dim
    if key.endswith((*ROW_SHARDED, "embed_tokens.weight", "lm_head.weight")):
        dim = 0
    elif key.endswith(("o_proj.weight", "down_proj.weight")):
        dim = 1
    else:
        return -1, 0, 0, 0
    pieces = torch.chunk(torch.arange(shape[dim]), world_size)
    piece = pieces[rank] if rank < len(pieces) else torch.arange(0)
    start = int(piece[0]) if len(piece) else shape[dim]
    return dim, start, start + len(piece), shape[dim]


def expected_fp8_shard(
    key: str, stored: dict[str, torch.Tensor], config: dict, world_size: int, rank: int
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """What ``rank`` holds of ``key`` without dequantizing, and the DTensor's global shape: a weight's
    rows or columns; a scale's blocks of exactly those rows or columns (a partial last block included)."""
    tensor, weight_key = stored[key], key.removesuffix("_scale_inv")
    dim, start, stop, size = held_range(weight_key, tuple(stored[weight_key].shape), config, world_size, rank)
    if dim < 0:
        return tensor, tuple(tensor.shape)
    global_shape = list(tensor.shape)
    if key == weight_key:
        global_shape[dim] = size
        return tensor.narrow(dim, start, stop - start), tuple(global_shape)
    block = config["quantization_config"]["weight_block_size"][dim]
    first, last = start // block, -(-stop // block)
    global_shape[dim] = -(-size // block)
    return tensor.narrow(dim, first, last - first), tuple(global_shape)


def _check_fp8_llama(rank: int, world_size: int, root: Path, config: dict) -> bool:
    result = tp_loader.load(root)
    stored = fp8_llama_tensors(config)
    assert set(result.state_dict) == set(stored)
    for key, tensor in stored.items():
        want, global_shape = expected_fp8_shard(key, stored, config, world_size, rank)
        local = result.state_dict[key].to_local()
        assert local.dtype == tensor.dtype, key
        assert torch.equal(local.view(torch.uint8), want.contiguous().view(torch.uint8)), key  # fp8 bitwise
        assert tuple(result.state_dict[key].shape) == global_shape, key
    return result.report.clean


@pytest.mark.parametrize(
    ("block", "intermediate_size", "world_size"),
    [((4, 8), 15, 2), ((8, 4), 15, 2), ((4, 8), 31, 4), ((8, 4), 31, 4)],
    ids=["4x8-mlp15-world2", "8x4-mlp15-world2", "4x8-mlp31-world4-kv-replicated", "8x4-mlp31-world4-kv-replicated"],
)
def test_non_square_fp8_blocks_with_partial_edges_are_sharded_in_step_with_their_weights(
    tmp_path: Path, block: tuple[int, int], intermediate_size: int, world_size: int
) -> None:
    """Shards on block boundaries (15 rows: 8 + 7 at world 2; 31 rows: 8, 8, 8, 7 at world 4): each
    scale shard is the blocks of its weight's rows (blocks of b0) or columns (blocks of b1), the partial
    last block included, bitwise."""
    config = fp8_llama_config(block, intermediate_size)
    root = write_checkpoint(tmp_path / "fp8", config, fp8_llama_tensors(config), num_shards=2)
    assert values(run_ranks(world_size, _check_fp8_llama, root, config)) == [True] * world_size


def dequantize_reference(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Each fp8 weight element times the ``scale_inv`` of its block: element (i, j) is in block
    (i // b0, j // b1)."""
    rows = torch.arange(weight.shape[0]) // block[0]
    cols = torch.arange(weight.shape[1]) // block[1]
    return weight.float() * scale_inv[rows][:, cols]


def _check_fp8_llama_dequantized(rank: int, world_size: int, root: Path, config: dict) -> bool:
    result = tp_loader.load(root, dtype=torch.float32)
    stored = fp8_llama_tensors(config)
    block = config["quantization_config"]["weight_block_size"]
    assert set(result.state_dict) == {k for k in stored if not k.endswith("_scale_inv")}  # scales consumed
    for key, local in result.state_dict.items():
        scale = stored.get(key + "_scale_inv")
        full = stored[key] if scale is None else dequantize_reference(stored[key], scale, block)
        dim, start, stop, _ = held_range(key, tuple(full.shape), config, world_size, rank)
        want = full if dim < 0 else full.narrow(dim, start, stop - start)
        assert local.to_local().dtype == torch.float32 and torch.equal(local.to_local(), want), key
    return result.report.clean


@pytest.mark.parametrize("block", [(4, 8), (8, 4)], ids=["4x8", "8x4"])
def test_non_square_fp8_blocks_cut_by_shards_dequantize_to_slices_of_the_whole_dequantization(
    tmp_path: Path, block: tuple[int, int]
) -> None:
    """At world 4 the MLP's 15 rows split 4, 4, 4, 3: every shard cuts 8-wide blocks, and each rank's
    dequantized slice equals the same slice of the whole weight dequantized in the test."""
    config = fp8_llama_config(block, 15)
    root = write_checkpoint(tmp_path / "fp8", config, fp8_llama_tensors(config), num_shards=2)
    assert values(run_ranks(4, _check_fp8_llama_dequantized, root, config)) == [True] * 4


@pytest.mark.parametrize(
    ("block", "key", "dim"),
    [((4, 8), "model.layers.0.mlp.down_proj.weight", 1), ((8, 4), "model.layers.0.mlp.gate_proj.weight", 0)],
    ids=["4x8-columns-of-8", "8x4-rows-of-8"],
)
def test_shard_that_cuts_a_non_square_fp8_block_is_refused_on_every_rank(
    tmp_path: Path, block: tuple[int, int], key: str, dim: int
) -> None:
    """World 4 shards the MLP's 15 rows (and down_proj's 15 columns) as [0, 4), [4, 8), [8, 12), [12, 15):
    every rank cuts a block 8 wide, and none cuts a block 4 wide."""
    config = fp8_llama_config(block, 15)
    checkpoint = index_checkpoint(find_weights(write_checkpoint(tmp_path / "fp8", config, fp8_llama_tensors(config))))
    spec = select_spec("auto", checkpoint.config, model="m")
    for rank, (start, stop) in enumerate([(0, 4), (4, 8), (8, 12), (12, 15)]):
        with pytest.raises(tp_loader.ShardingError) as info:
            make_plan(checkpoint, spec, 4, rank, model="m")
        assert info.value.message == (
            f"the shard [{start}, {stop}) of dim {dim} cuts the weight's {block[0]}x{block[1]} fp8 scale blocks"
        )
        assert info.value.key == key
        assert "dtype=bfloat16" in info.value.hint


def test_scale_of_a_mismatched_weight_is_reported_with_the_shape_its_non_square_blocks_imply(tmp_path: Path) -> None:
    """o_proj [30, 32] in 4x8 blocks implies a [ceil(30 / 4), ceil(32 / 8)] = [8, 4] scale; stored with
    8 columns cut (and its scale with them), both are mismatched and neither is loaded."""
    config = fp8_llama_config((4, 8), 15)
    tensors = fp8_llama_tensors(config)
    key = "model.layers.0.self_attn.o_proj.weight"
    tensors[key] = tensors[key][:, :-8].contiguous()
    tensors[key + "_scale_inv"] = tensors[key + "_scale_inv"][:, :-1].contiguous()
    checkpoint = index_checkpoint(find_weights(write_checkpoint(tmp_path / "fp8", config, tensors)))
    plan = make_plan(checkpoint, select_spec("auto", checkpoint.config, model="m"), 2, 0, model="m")
    assert [m.describe() for m in plan.mismatched] == [
        f"{key} (config implies [30, 32], stored [30, 24])",
        f"{key}_scale_inv (config implies [8, 4], stored [8, 3])",
    ]
    assert {key, key + "_scale_inv"}.isdisjoint(t.key for t in plan.tensors)
