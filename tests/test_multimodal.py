"""Vision-language checkpoints as transformers' ``save_pretrained`` writes them: Gemma 3
(``Gemma3ForConditionalGeneration``: Gemma 3 decoder, SigLIP vision tower, projector) and Qwen2.5-VL
(``Qwen2_5_VLForConditionalGeneration``: Qwen2 decoder, vision blocks with a fused qkv, patch merger).

- Every rank holds exactly its slice (world sizes 1, 2 and 4): the decoder as a Llama, the vision
  attention on its heads (Qwen2.5-VL's fused qkv as each rank's q, k and v rows), the vision MLPs and
  Qwen's merger colwise then rowwise, embeddings, norms and Gemma's projector whole; the keys are clean
  and each rank reads only its slices' bytes. Gemma 3 as the Hub stores it (``vision_tower.vision_model.``)
  loads under the same keys.
- The models built on meta, parallelized and loaded into give transformers' logits for a prompt with an
  image, and its greedy tokens, at world sizes 2 and 4 (the decoders' 2 KV heads shared by two ranks at 4).
- The Hub's config.json files (gemma-3-4b-it leaves sizes to transformers' defaults; Qwen2.5-VL keeps the
  decoder's sizes at the top level) imply exactly the tensors of the model transformers builds from them;
  a vision size the config lacks is named with its section before any I/O.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from reference import chunk_piece, expected_shard
from safetensors.torch import load_file, save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import tp_loader
from tp_loader.parallel import plan_module
from tp_loader.testing import run_ranks, values

transformers = pytest.importorskip("transformers", reason="checkpoints are written by transformers' save_pretrained")
accelerate = pytest.importorskip("accelerate", reason="init_empty_weights builds the models without memory")

TEXT = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "vocab_size": 300,
    "max_position_embeddings": 64,
}
GEMMA3 = {
    "text_config": {**TEXT, "sliding_window": 4},
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,  # not the decoder's 2: the tower's {layer} ranges over its own
        "num_attention_heads": 4,
        "image_size": 28,
        "patch_size": 7,
        "vision_use_head": False,  # as in Gemma 3's checkpoints
    },
    "mm_tokens_per_image": 4,
    "boi_token_index": 297,
    "eoi_token_index": 298,
    "image_token_index": 299,
}
QWEN2_5_VL = {
    "text_config": {
        **TEXT,
        "head_dim": None,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "bos_token_id": 0,
        "eos_token_id": 1,
    },
    "vision_config": {
        "depth": 3,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_heads": 4,
        "out_hidden_size": 64,
        "patch_size": 4,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "window_size": 16,
        "fullatt_block_indexes": [2],
    },
    "vision_start_token_id": 297,
    "vision_end_token_id": 296,
    "video_token_id": 298,
    "image_token_id": 299,
}
MODELS = {
    "gemma3": ("Gemma3Config", "Gemma3ForConditionalGeneration", GEMMA3),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", QWEN2_5_VL),
}
_pixels = torch.Generator().manual_seed(0)
#: A prompt with one image each: Gemma's 4 image tokens between begin/end-of-image; Qwen's 16 patches
#: of 2 x 4 x 4 pixels (a 1 x 4 x 4 grid) merged 2 x 2 into 4 image tokens.
INPUTS = {
    "gemma3": {
        "input_ids": torch.tensor([[2, 5, 17, 297, 299, 299, 299, 299, 298, 33, 7]]),
        "token_type_ids": torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0]]),
        "pixel_values": torch.randn(1, 3, 28, 28, generator=_pixels),
    },
    "qwen2_5_vl": {
        "input_ids": torch.tensor([[5, 17, 297, 299, 299, 299, 299, 296, 33, 7]]),
        "pixel_values": torch.randn(16, 3 * 2 * 4 * 4, generator=_pixels),
        "image_grid_thw": torch.tensor([[1, 4, 4]]),
    },
}
NEW_TOKENS = 8


def _save(root: Path, family: str, seed: int) -> Path:
    """Every parameter random (transformers initializes biases to zero and norms to one)."""
    config_class, model_class, config = MODELS[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2 if param.dim() > 1 else 0.5)
    model.save_pretrained(root)
    return root


def _hub_layout(saved: Path, root: Path) -> Path:
    """The Gemma 3 checkpoint with its tower under ``vision_tower.vision_model.``, as the Hub holds it."""
    root.mkdir()
    shutil.copy(saved / "config.json", root / "config.json")
    tensors = load_file(str(saved / "model.safetensors"))
    renamed = {re.sub(r"^vision_tower\.", "vision_tower.vision_model.", k): t for k, t in tensors.items()}
    save_file(renamed, str(root / "model.safetensors"), metadata={"format": "pt"})
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("multimodal")
    saved = {family: _save(base / family, family, seed) for seed, family in enumerate(MODELS)}
    keys = set(load_file(str(saved["gemma3"] / "model.safetensors")))
    assert {k.split(".")[0] for k in keys} == {"language_model", "vision_tower", "multi_modal_projector"}, "changed"
    assert "language_model.model.norm.weight" in keys and "lm_head.weight" not in keys, "transformers changed"
    return {**saved, "gemma3_hub": _hub_layout(saved["gemma3"], base / "gemma3_hub")}


def _gemma3_slice(key: str, tensor: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    if key.startswith("vision_tower."):  # vLLM's SigLIP: heads and MLP sharded, the rest whole
        if re.search(r"self_attn\.[qkv]_proj\.|mlp\.fc1\.", key):
            return chunk_piece(tensor, world_size, rank, 0)
        if key.endswith(("self_attn.out_proj.weight", "mlp.fc2.weight")):
            return chunk_piece(tensor, world_size, rank, 1)
        return tensor
    if key.startswith("multi_modal_projector."):
        return tensor
    return expected_shard(key, tensor, GEMMA3["text_config"], world_size, rank)


def _qwen2_5_vl_slice(key: str, tensor: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    if key.startswith("visual."):
        if ".attn.qkv." in key:  # this rank's q rows, then its k rows, then its v rows
            return torch.cat([chunk_piece(part, world_size, rank, 0) for part in tensor.chunk(3)])
        if re.search(r"mlp\.(gate_proj|up_proj)\.|merger\.mlp\.0\.", key):
            return chunk_piece(tensor, world_size, rank, 0)
        if key.endswith(("attn.proj.weight", "mlp.down_proj.weight", "merger.mlp.2.weight")):
            return chunk_piece(tensor, world_size, rank, 1)
        return tensor
    return expected_shard(key, tensor, QWEN2_5_VL["text_config"], world_size, rank)


#: checkpoint → (the save_pretrained checkpoint whose keys and tensors it loads as, plan, prefix, tied keys
#: the checkpoint lacks, slicer)
LOADS = {
    "gemma3": ("gemma3", "gemma3_vl", "language_model.model.", {"lm_head.weight": True}, _gemma3_slice),
    "gemma3_hub": ("gemma3", "gemma3_vl", "language_model.model.", {"lm_head.weight": True}, _gemma3_slice),
    "qwen2_5_vl": ("qwen2_5_vl", "qwen2_5_vl", "model.", {}, _qwen2_5_vl_slice),
}


def _shards_on_ranks(rank: int, world_size: int, checkpoints: dict[str, Path]) -> dict[str, tuple]:
    out = {}
    for name, (loads_as, *_, slicer) in LOADS.items():
        result = tp_loader.load(checkpoints[name])
        local = {key: t.to_local() if isinstance(t, DTensor) else t for key, t in result.state_dict.items()}
        stored = load_file(str(checkpoints[loads_as] / "model.safetensors"))
        differ = [k for k, t in stored.items() if not torch.equal(local[k], slicer(k, t, world_size, rank))]
        slice_bytes = sum(slicer(k, t, world_size, rank).nbytes for k, t in stored.items())
        # tied keys the checkpoint does not store (Gemma's LM head): the same tensor as their source
        tied = {t.target: result.state_dict[t.target] is result.state_dict[t.source] for t in result.report.ties}
        out[name] = (result.report, set(local) - set(stored), set(stored) - set(local), tied, differ, slice_bytes)
    return out


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_save_pretrained_vision_language_checkpoints_give_each_rank_exactly_its_slices(
    checkpoints: dict[str, Path], world_size: int
) -> None:
    """The Hub layout of Gemma 3 is compared with the save_pretrained keys it is renamed to."""
    for rank, outcome in enumerate(values(run_ranks(world_size, _shards_on_ranks, checkpoints, timeout=240))):
        for name, (report, extra, absent, tied, differ, slice_bytes) in outcome.items():
            _, plan, prefix, ties, _ = LOADS[name]
            assert report.clean, report.format_table(full=True)
            assert (report.plan, report.prefix, report.groups) == (plan, prefix, ("causal_lm",)), name
            assert (extra, absent) == (set(ties), set()), name
            assert tied == ties, name
            assert differ == [], f"{name} rank {rank}: shards differ from their tensor-parallel slices"
            assert report.ranks[rank].bytes_planned == slice_bytes, name


def _run(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return logits, tokens


@pytest.fixture(scope="module")
def references(checkpoints: dict[str, Path]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """transformers' logits and greedy tokens for each model's prompt with an image."""
    out = {}
    for family, (_, model_class, _) in MODELS.items():
        model = getattr(transformers, model_class).from_pretrained(checkpoints[family], dtype=torch.float32).eval()
        out[family] = _run(model, INPUTS[family])
    return out


def _generate_tp(rank: int, world_size: int, checkpoints: dict[str, Path], references: dict) -> dict[str, tuple]:
    mesh = init_device_mesh("cpu", (world_size,))
    sharded = {}
    for family, (_, model_class, _) in MODELS.items():
        root = checkpoints[family]
        config = transformers.AutoConfig.from_pretrained(root)
        with accelerate.init_empty_weights():
            model = getattr(transformers, model_class)._from_config(config, dtype=torch.float32).eval()
        tp_loader.parallelize(model, mesh=mesh)
        report = tp_loader.load_into(model, root, mesh=mesh)
        assert report.missing_keys == () and report.unexpected_keys == (), family
        assert not any(t.is_meta for t in (*model.parameters(), *model.buffers())), family
        logits, tokens = _run(model, INPUTS[family])
        want_logits, want_tokens = references[family]
        assert torch.equal(tokens, want_tokens), (family, tokens, want_tokens)
        torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-4)
        towers = {"vision": 0, "text": 0}
        for name, param in model.named_parameters():
            if isinstance(param, DTensor) and param.placements[0].is_shard():
                towers["vision" if name.startswith(("model.vision_tower.", "model.visual.")) else "text"] += 1
        sharded[family] = towers
    return sharded


@pytest.mark.parametrize("world_size", [2, 4])
def test_vision_language_models_parallelized_and_loaded_into_generate_what_transformers_generates_from_an_image(
    checkpoints: dict[str, Path], references: dict, world_size: int
) -> None:
    """Sharded parameters. Gemma 3's tower: per layer q, k, v (weights and biases), out_proj, fc1 (weight
    and bias), fc2; its decoder: per layer q, k, v, o, gate, up, down, and the embeddings (tied to the LM
    head). Qwen2.5-VL's encoder: per block qkv (weight and bias), proj, gate and up (weights and biases),
    down, then the merger's first layer (weight and bias) and second; its decoder: per layer q, k, v
    (weights and biases), o, gate, up, down, the embeddings and the LM head."""
    sharded = values(run_ranks(world_size, _generate_tp, checkpoints, references, timeout=240))
    layers = TEXT["num_hidden_layers"]
    gemma3 = {"vision": 10 * GEMMA3["vision_config"]["num_hidden_layers"], "text": 7 * layers + 1}
    qwen2_5_vl = {"vision": 8 * QWEN2_5_VL["vision_config"]["depth"] + 3, "text": 10 * layers + 2}
    assert sharded == [{"gemma3": gemma3, "qwen2_5_vl": qwen2_5_vl}] * world_size


def test_a_vision_size_the_config_lacks_is_named_with_its_section_before_any_io(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    shutil.copy(checkpoints["qwen2_5_vl"] / "model.safetensors", tmp_path / "model.safetensors")
    config = json.loads((checkpoints["qwen2_5_vl"] / "config.json").read_text())
    del config["vision_config"]["num_heads"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(tp_loader.CheckpointError) as raised:
        tp_loader.plan_load(tmp_path, world_size=2)
    assert str(raised.value) == (
        "config.json has no 'vision_config.num_heads', which the plan needs for number of vision heads "
        f"[file={tmp_path / 'config.json'}, key=vision_config.num_heads]. "
        "Add num_heads to vision_config in config.json"
    )


#: google/gemma-3-4b-it's config.json as the Hub holds it: the sizes equal to transformers' defaults
#: (heads, KV heads, head size, vocabulary; the tower's channels) are left out.
GEMMA3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "boi_token_index": 255999,
    "eoi_token_index": 256000,
    "eos_token_id": [1, 106],
    "image_token_index": 262144,
    "initializer_range": 0.02,
    "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "torch_dtype": "bfloat16",
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 896,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
        "vision_use_head": False,
    },
}
#: Qwen/Qwen2.5-VL-7B-Instruct's config.json as the Hub holds it: the decoder's sizes at the top level,
#: the tower's channels as in_chans.
QWEN2_5_VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}


@pytest.mark.parametrize(
    ("config", "config_class", "model_class", "plan"),
    [
        (GEMMA3_4B, "Gemma3Config", "Gemma3ForConditionalGeneration", "gemma3_vl"),
        (QWEN2_5_VL_7B, "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl"),
    ],
    ids=["gemma-3-4b-it", "Qwen2.5-VL-7B-Instruct"],
)
def test_the_hubs_config_json_implies_every_tensor_of_the_model_transformers_builds_from_it(
    config: dict, config_class: str, model_class: str, plan: str
) -> None:
    """The plan reads config.json as stored (sizes left to transformers' defaults, the decoder's sizes at
    the top level) and expects exactly the model's tensors, with its shapes, at world size 4."""
    with accelerate.init_empty_weights():
        model = getattr(transformers, model_class)(getattr(transformers, config_class).from_dict(config))
    load_plan = plan_module(model, config, world_size=4, rank=0)
    assert load_plan.plan_name == plan
    assert (load_plan.missing, load_plan.unexpected, load_plan.mismatched) == ((), (), ())
    assert len(load_plan.tensors) == len(model.state_dict())
