"""LLaVA-style vision-language checkpoints as transformers' ``save_pretrained`` writes them: LLaVA
(``LlavaForConditionalGeneration``: Llama decoder, CLIP tower, two-layer projector), LLaVA-NeXT (the same
plus ``image_newline``) and Mistral 3 (``Mistral3ForConditionalGeneration``: Mistral decoder, Pixtral
tower, projector with a norm and a patch merger).

- Every rank holds exactly its slice (world sizes 1, 2 and 4): the decoder as a Llama, the vision
  attention on its heads, the vision MLPs and the projector colwise then rowwise, embeddings, norms, the
  patch merger and ``image_newline`` whole; each rank reads only its slices' bytes. The same tensors
  load under the same names from the Hub's layout (``vision_tower.vision_model.``) and from the model's
  own module names (``model.language_model.``, ``model.vision_tower.``, ``lm_head.``).
- Mistral 3's LM head follows ``text_config.tie_word_embeddings``: tied for a Ministral-like checkpoint
  that stores none, and the stored head of a Mistral-Small-like one whose top-level
  ``tie_word_embeddings`` is true (as transformers 5 writes it) is loaded, not replaced by the embedding.
- The models built on meta, parallelized and loaded into give transformers' logits for a prompt with an
  image at world size 2.
- The Hub's config.json files (llava-1.5 leaves the decoder's sizes to LlamaConfig's defaults) imply
  exactly the tensors of the model transformers builds from them.
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
CLIP = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,  # not the decoder's 2: the tower's {layer} ranges over its own
    "num_attention_heads": 4,
    "image_size": 28,
    "patch_size": 7,
}
PIXTRAL = {
    "model_type": "pixtral",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "head_dim": 8,
    "image_size": 56,
    "patch_size": 7,
}
LLAVA = {"text_config": {**TEXT, "model_type": "llama"}, "vision_config": CLIP, "image_token_index": 299}
LLAVA_NEXT = {**LLAVA, "image_grid_pinpoints": [[28, 28], [28, 56], [56, 28]]}
#: Mistral-Small-like: an LM head of its own (saved untied; config.json then says true, as below).
MISTRAL3 = {
    "text_config": {**TEXT, "model_type": "mistral"},
    "vision_config": PIXTRAL,
    "image_token_index": 299,
    "tie_word_embeddings": False,
}
#: Ministral-like: the text config ties the LM head, and the checkpoint stores none.
MINISTRAL3 = {**MISTRAL3, "text_config": {**MISTRAL3["text_config"], "tie_word_embeddings": True}}
del MINISTRAL3["tie_word_embeddings"]  # Mistral3Config's default, true
MODELS = {
    "llava": ("LlavaConfig", "LlavaForConditionalGeneration", LLAVA),
    "llava_next": ("LlavaNextConfig", "LlavaNextForConditionalGeneration", LLAVA_NEXT),
    "mistral3": ("Mistral3Config", "Mistral3ForConditionalGeneration", MISTRAL3),
    "ministral3": ("Mistral3Config", "Mistral3ForConditionalGeneration", MINISTRAL3),
}
_pixels = torch.Generator().manual_seed(0)
#: A prompt with one image each. LLaVA: CLIP's 16 patches of a 28 x 28 image (the class token dropped).
#: LLaVA-NeXT: a 28 x 56 image as its 28 x 28 overview and two 28 x 28 tiles, 16 + 4 x (8 + 1) tokens (each
#: row of the tiles' features ends with image_newline). Mistral 3: Pixtral's 4 x 8 patches of a 28 x 56
#: image merged 2 x 2 into 8 tokens.
INPUTS = {
    "llava": {
        "input_ids": torch.tensor([[1, 5, 17, *[299] * 16, 33, 7]]),
        "pixel_values": torch.randn(1, 3, 28, 28, generator=_pixels),
    },
    "llava_next": {
        "input_ids": torch.tensor([[1, 5, *[299] * 52, 33, 7]]),
        "pixel_values": torch.randn(1, 3, 3, 28, 28, generator=_pixels),
        "image_sizes": torch.tensor([[28, 56]]),
    },
    "mistral3": {
        "input_ids": torch.tensor([[1, 5, 17, *[299] * 8, 33, 7]]),
        "pixel_values": torch.randn(1, 3, 28, 56, generator=_pixels),
        "image_sizes": torch.tensor([[28, 56]]),
    },
}
INPUTS["ministral3"] = INPUTS["mistral3"]


def _save(root: Path, family: str, seed: int) -> Path:
    """Every parameter random (transformers initializes biases to zero and norms to one)."""
    config_class, model_class, config = MODELS[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2 if param.dim() > 1 else 0.5)
    model.save_pretrained(root)
    if family == "mistral3":  # transformers 5 writes Mistral3Config's default back (Mistral-Small re-saved)
        config_json = json.loads((root / "config.json").read_text())
        (root / "config.json").write_text(json.dumps({**config_json, "tie_word_embeddings": True}))
    return root


def _renamed(saved: Path, root: Path, rename: list[tuple[str, str]]) -> Path:
    """The checkpoint with its keys renamed (``re.sub`` in turn), the same tensors and config."""
    root.mkdir()
    shutil.copy(saved / "config.json", root / "config.json")
    tensors = {}
    for key, tensor in load_file(str(saved / "model.safetensors")).items():
        for pattern, replacement in rename:
            key = re.sub(pattern, replacement, key)
        tensors[key] = tensor
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    return root


#: The Hub's llava-hf layout: the CLIP tower under vision_tower.vision_model.
HUB = [(r"^vision_tower\.", "vision_tower.vision_model.")]
#: The model's own module names, as a state_dict saved as is holds them.
MODULES = [
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^(vision_tower|multi_modal_projector|image_newline)", r"model.\1"),
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("llava")
    saved = {family: _save(base / family, family, seed) for seed, family in enumerate(MODELS)}
    keys = {family: set(load_file(str(root / "model.safetensors"))) for family, root in saved.items()}
    assert {k.split(".")[0] for k in keys["llava_next"]} == {
        "language_model",
        "vision_tower",
        "multi_modal_projector",
        "image_newline",
    }, "transformers changed"
    assert "language_model.lm_head.weight" in keys["mistral3"], "transformers changed"
    assert "language_model.lm_head.weight" not in keys["ministral3"], "transformers changed"
    return {
        **saved,
        "llava_hub": _renamed(saved["llava"], base / "llava_hub", HUB),
        "llava_modules": _renamed(saved["llava"], base / "llava_modules", MODULES),
        "llava_next_modules": _renamed(saved["llava_next"], base / "llava_next_modules", MODULES),
        "mistral3_modules": _renamed(saved["mistral3"], base / "mistral3_modules", MODULES),
    }


def _text_slice(key: str, tensor: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    return expected_shard(key, tensor, TEXT, world_size, rank)


def _clip_slice(key: str, tensor: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    if key.startswith("vision_tower."):  # vLLM's CLIP: heads and MLP sharded, the rest whole
        if re.search(r"self_attn\.[qkv]_proj\.|mlp\.fc1\.", key):
            return chunk_piece(tensor, world_size, rank, 0)
        if key.endswith(("self_attn.out_proj.weight", "mlp.fc2.weight")):
            return chunk_piece(tensor, world_size, rank, 1)
        return tensor
    if key.startswith("multi_modal_projector.linear_1."):
        return chunk_piece(tensor, world_size, rank, 0)
    if key == "multi_modal_projector.linear_2.weight":
        return chunk_piece(tensor, world_size, rank, 1)
    if key.startswith("multi_modal_projector.") or key == "image_newline":
        return tensor
    return _text_slice(key, tensor, world_size, rank)


def _pixtral_slice(key: str, tensor: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    if key.startswith("vision_tower."):  # vLLM's Pixtral: heads and MLP sharded, the rest whole
        if re.search(r"attention\.[qkv]_proj\.|feed_forward\.(gate|up)_proj\.", key):
            return chunk_piece(tensor, world_size, rank, 0)
        if key.endswith(("attention.o_proj.weight", "feed_forward.down_proj.weight")):
            return chunk_piece(tensor, world_size, rank, 1)
        return tensor
    if key == "multi_modal_projector.linear_1.weight":
        return chunk_piece(tensor, world_size, rank, 0)
    if key == "multi_modal_projector.linear_2.weight":
        return chunk_piece(tensor, world_size, rank, 1)
    if key.startswith("multi_modal_projector."):  # the norm and the patch merger
        return tensor
    return _text_slice(key, tensor, world_size, rank)


#: checkpoint → (the save_pretrained checkpoint whose tensors it holds, plan, prefix, tied keys the
#: checkpoint lacks, slicer)
LOADS = {
    "llava": ("llava", "llava", "language_model.model.", {}, _clip_slice),
    "llava_hub": ("llava", "llava", "language_model.model.", {}, _clip_slice),
    "llava_modules": ("llava", "llava", "model.language_model.", {}, _clip_slice),
    "llava_next": ("llava_next", "llava_next", "language_model.model.", {}, _clip_slice),
    "llava_next_modules": ("llava_next", "llava_next", "model.language_model.", {}, _clip_slice),
    "mistral3": ("mistral3", "mistral3", "language_model.model.", {}, _pixtral_slice),
    "mistral3_modules": ("mistral3", "mistral3", "model.language_model.", {}, _pixtral_slice),
    "ministral3": ("ministral3", "mistral3", "language_model.model.", {"lm_head.weight": True}, _pixtral_slice),
}


def _loaded_name(saved_key: str, prefix: str) -> str:
    """The name a save_pretrained key loads under: the decoder under the prefix it was stored with, the
    LM head as lm_head.*, the tower, projector and image_newline as save_pretrained names them."""
    key = re.sub(r"^language_model\.lm_head\.", "lm_head.", saved_key)
    return re.sub(r"^language_model\.model\.", prefix, key)


def _shards_on_ranks(rank: int, world_size: int, checkpoints: dict[str, Path]) -> dict[str, tuple]:
    out = {}
    for name, (loads_as, _, prefix, _, slicer) in LOADS.items():
        result = tp_loader.load(checkpoints[name])
        local = {key: t.to_local() if isinstance(t, DTensor) else t for key, t in result.state_dict.items()}
        saved = load_file(str(checkpoints[loads_as] / "model.safetensors"))
        # the slicers name keys as save_pretrained does, with the LM head as lm_head.*
        want = {
            _loaded_name(k, prefix): slicer(_loaded_name(k, "language_model.model."), t, world_size, rank)
            for k, t in saved.items()
        }
        differ = [k for k, t in want.items() if k not in local or not torch.equal(local[k], t)]
        slice_bytes = sum(t.nbytes for t in want.values())
        # tied keys the checkpoint does not store (Ministral's LM head): the same tensor as their source
        tied = {t.target: result.state_dict[t.target] is result.state_dict[t.source] for t in result.report.ties}
        out[name] = (result.report, set(local) - set(want), set(want) - set(local), tied, differ, slice_bytes)
    return out


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_llava_llava_next_and_mistral3_checkpoints_give_each_rank_exactly_its_slices(
    checkpoints: dict[str, Path], world_size: int
) -> None:
    """Each layout is compared with the save_pretrained tensors it holds; at 4 the decoders' 2 KV heads are
    shared by two ranks each."""
    for rank, outcome in enumerate(values(run_ranks(world_size, _shards_on_ranks, checkpoints, timeout=240))):
        for name, (report, extra, absent, tied, differ, slice_bytes) in outcome.items():
            _, plan, prefix, ties, _ = LOADS[name]
            assert report.clean, report.format_table(full=True)
            assert (report.plan, report.prefix, report.groups) == (plan, prefix, ("causal_lm",)), name
            assert (extra, absent) == (set(ties), set()), name
            assert tied == ties, name
            assert differ == [], f"{name} rank {rank}: shards differ from their tensor-parallel slices"
            assert report.ranks[rank].bytes_planned == slice_bytes, name


#: The checkpoints run through a TP forward, with the model they are built as.
FORWARD = {
    "llava": "llava",
    "llava_modules": "llava",
    "llava_next": "llava_next",
    "mistral3": "mistral3",
    "ministral3": "ministral3",
}


@pytest.fixture(scope="module")
def references(checkpoints: dict[str, Path]) -> dict[str, torch.Tensor]:
    """transformers' logits for each model's prompt with an image, from the unsharded model."""
    out = {}
    for name, family in FORWARD.items():
        model_class = getattr(transformers, MODELS[family][1])
        model = model_class.from_pretrained(checkpoints[name], dtype=torch.float32).eval()
        with torch.no_grad():
            out[name] = model(**INPUTS[family]).logits
    return out


def _forward_tp(rank: int, world_size: int, checkpoints: dict[str, Path], references: dict) -> dict[str, tuple]:
    mesh = init_device_mesh("cpu", (world_size,))
    out = {}
    for name, family in FORWARD.items():
        root = checkpoints[name]
        config = transformers.AutoConfig.from_pretrained(root)
        with accelerate.init_empty_weights():
            model = getattr(transformers, MODELS[family][1])._from_config(config, dtype=torch.float32).eval()
        tp_loader.parallelize(model, mesh=mesh)
        report = tp_loader.load_into(model, root, mesh=mesh)
        assert report.missing_keys == () and report.unexpected_keys == (), name
        assert not any(t.is_meta for t in (*model.parameters(), *model.buffers())), name
        with torch.no_grad():
            logits = model(**INPUTS[family]).logits
        towers = {"vision": 0, "projector": 0, "text": 0}
        for key, param in model.named_parameters():
            if isinstance(param, DTensor) and param.placements[0].is_shard():
                tower = key.split(".")[1] if key.startswith("model.") else "lm_head"
                towers[{"vision_tower": "vision", "multi_modal_projector": "projector"}.get(tower, "text")] += 1
        out[name] = ((logits - references[name]).abs().max().item(), towers)
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_llava_llava_next_and_mistral3_parallelized_and_loaded_into_give_transformers_logits_for_an_image(
    checkpoints: dict[str, Path], references: dict, world_size: int
) -> None:
    """Logits within 1e-5 of transformers' (fp32); at 4 the decoders' 2 KV heads are shared by two ranks each.
    Sharded parameters: CLIP's q, k, v (weights and biases), out_proj, fc1 (weight and bias) and fc2 per
    layer; Pixtral's q, k, v, o, gate, up and down per layer; LLaVA's projector linear_1 (weight and bias) and
    linear_2, Mistral 3's linear_1 and linear_2; the decoder's q, k, v, o, gate, up and down per layer, the
    embeddings and (stored or tied to them) the LM head."""
    outcome = values(run_ranks(world_size, _forward_tp, checkpoints, references, timeout=240))
    layers, vision_layers = TEXT["num_hidden_layers"], CLIP["num_hidden_layers"]
    text = 7 * layers + 2
    clip = {"vision": 10 * vision_layers, "projector": 3, "text": text}
    pixtral = {"vision": 7 * PIXTRAL["num_hidden_layers"], "projector": 2, "text": text}
    want = {"llava": clip, "llava_modules": clip, "llava_next": clip, "mistral3": pixtral}
    want["ministral3"] = {**pixtral, "text": text - 1}  # the LM head is the embeddings' parameter
    for rank, by_name in enumerate(outcome):
        assert {name: towers for name, (_, towers) in by_name.items()} == want, rank
        worst = {name: diff for name, (diff, _) in by_name.items() if not diff <= 1e-5}
        assert worst == {}, f"rank {rank}: max abs logit difference above 1e-5"


#: llava-hf/llava-1.5-7b-hf's config.json as the Hub holds it: the decoder's sizes equal to LlamaConfig's
#: defaults (hidden size, heads, layers, MLP) are left out, and a deprecated top-level vocab_size is kept.
LLAVA_1_5_7B = {
    "architectures": ["LlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_token_index": 32000,
    "model_type": "llava",
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.36.0.dev0",
    "vision_config": {
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
        "vocab_size": 32000,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}
#: llava-hf/llava-v1.6-mistral-7b-hf's config.json: a Mistral decoder that names the sizes where
#: MistralConfig's defaults differ from LlamaConfig's (MLP, KV heads).
LLAVA_NEXT_MISTRAL_7B = {
    "architectures": ["LlavaNextForConditionalGeneration"],
    "ignore_index": -100,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "image_token_index": 32000,
    "model_type": "llava_next",
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2",
        "architectures": ["MistralForCausalLM"],
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "model_type": "mistral",
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "torch_dtype": "bfloat16",
        "vocab_size": 32064,
    },
    "torch_dtype": "float16",
    "transformers_version": "4.39.0.dev0",
    "use_image_newline_parameter": True,
    "vision_config": {
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
        "vocab_size": 32000,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}
#: A Mistral-Small-3.x 24B config.json as transformers 4.57 writes it: neither config names
#: tie_word_embeddings, and the checkpoint stores its own LM head.
MISTRAL_SMALL_24B = {
    "architectures": ["Mistral3ForConditionalGeneration"],
    "dtype": "bfloat16",
    "image_token_index": 10,
    "model_type": "mistral3",
    "multimodal_projector_bias": False,
    "projector_hidden_act": "gelu",
    "spatial_merge_size": 2,
    "text_config": {
        "attention_dropout": 0.0,
        "dtype": "bfloat16",
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 5120,
        "initializer_range": 0.02,
        "intermediate_size": 32768,
        "max_position_embeddings": 131072,
        "model_type": "mistral",
        "num_attention_heads": 32,
        "num_hidden_layers": 40,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000000.0,
        "sliding_window": None,
        "use_cache": True,
        "vocab_size": 131072,
    },
    "transformers_version": "4.57.1",
    "vision_config": {
        "attention_dropout": 0.0,
        "dtype": "bfloat16",
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 1024,
        "image_size": 1540,
        "initializer_range": 0.02,
        "intermediate_size": 4096,
        "model_type": "pixtral",
        "num_attention_heads": 16,
        "num_channels": 3,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "rope_theta": 10000.0,
    },
    "vision_feature_layer": -1,
}


@pytest.mark.parametrize(
    ("config", "config_class", "model_class", "plan"),
    [
        (LLAVA_1_5_7B, "LlavaConfig", "LlavaForConditionalGeneration", "llava"),
        (LLAVA_NEXT_MISTRAL_7B, "LlavaNextConfig", "LlavaNextForConditionalGeneration", "llava_next"),
        (MISTRAL_SMALL_24B, "Mistral3Config", "Mistral3ForConditionalGeneration", "mistral3"),
    ],
    ids=["llava-1.5-7b-hf", "llava-v1.6-mistral-7b-hf", "Mistral-Small-24B"],
)
def test_the_hubs_llava_and_mistral3_config_json_implies_every_tensor_of_the_model_transformers_builds(
    config: dict, config_class: str, model_class: str, plan: str
) -> None:
    """The plan reads config.json as stored (the decoder's sizes left to transformers' defaults) and expects
    exactly the model's tensors, with its shapes, at world size 4; Mistral-Small's LM head is its own."""
    with accelerate.init_empty_weights():
        model = getattr(transformers, model_class)(getattr(transformers, config_class).from_dict(config))
    load_plan = plan_module(model, config, world_size=4, rank=0)
    assert load_plan.plan_name == plan
    assert (load_plan.missing, load_plan.unexpected, load_plan.mismatched) == ((), (), ())
    assert len(load_plan.tensors) == len(model.state_dict())
    assert load_plan.ties == ()
