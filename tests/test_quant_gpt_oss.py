"""MXFP4 on gpt-oss through its plan (plans/gpt_oss.toml): a transformers-saved GPT-OSS checkpoint whose
fused experts are replaced by MXFP4 ``*_blocks`` / ``*_scales`` as gpt-oss ships them (random e2m1 codes
and e8m0 exponents), with ``quant_method = "mxfp4"``.

- Stored form: each rank's blocks and scales are its experts' gate/up rows (whole pairs) and its
  down_proj input blocks, bitwise, at world sizes 1, 2 and 4.
- Dequantized into a parallelized transformers model (``load_into(..., dtype=float32)``): logits and
  greedy tokens equal transformers' on the float checkpoint holding transformers' own dequantization
  (``convert_moe_packed_tensors``).
- gpt-oss-20b's intermediate size (2880 = 90 blocks of 32) at world 4 (720 rows a rank) cuts blocks:
  refused as stored, naming the world sizes that work; dequantizing plans.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_gpt_oss
import torch
from reference import chunk_piece
from safetensors.torch import load_file, save_file
from torch.distributed.device_mesh import init_device_mesh

import tp_loader
from tp_loader.testing import run_ranks, values

transformers = pytest.importorskip("transformers", reason="checkpoints are written by transformers' save_pretrained")
accelerate = pytest.importorskip("accelerate", reason="init_empty_weights builds the model without memory")
from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # noqa: E402

#: test_gpt_oss's model with 128 features: 32 per rank at world size 4, one whole MXFP4 block
GPT_OSS = {**test_gpt_oss.GPT_OSS, "intermediate_size": 128}
PROMPT = torch.tensor([[5, 17, 33, 2, 71, 9]])
EXPERTS = ("gate_up_proj", "down_proj")


def write_mxfp4(root: Path, config: dict, seed: int = 0) -> tuple[Path, Path]:
    """(MXFP4 checkpoint, float checkpoint with the experts dequantized by transformers)."""
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**config)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3 if param.dim() > 1 else 0.5)
    model.save_pretrained(root / "float")
    tensors = load_file(str(root / "float" / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed + 1)
    quantized = dict(tensors)
    for key in [k for k in tensors if k.endswith(EXPERTS)]:
        experts, cols, rows = tensors[key].shape  # [experts, in, out] once dequantized
        codes = torch.randint(0, 16, (experts, rows, cols // 32, 32), generator=generator, dtype=torch.uint8)
        blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()
        scales = torch.randint(116, 123, (experts, rows, cols // 32), generator=generator, dtype=torch.uint8)
        tensors[key] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
        del quantized[key]
        quantized |= {key + "_blocks": blocks, key + "_scales": scales}
    save_file(tensors, str(root / "float" / "model.safetensors"), metadata={"format": "pt"})
    (root / "mxfp4").mkdir()
    config_json = json.loads((root / "float" / "config.json").read_text())
    config_json["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn"],
    }
    (root / "mxfp4" / "config.json").write_text(json.dumps(config_json))
    save_file(quantized, str(root / "mxfp4" / "model.safetensors"), metadata={"format": "pt"})
    return root / "mxfp4", root / "float"


def expected_blocks(key: str, tensor: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    """gate_up's blocks and scales: its output rows (dim 1) chunked (pairs whole: 2 x 128 rows split
    evenly); down's: its input features (128) chunked, 32 to a block (dim 2)."""
    if ".gate_up_proj_" in key:
        return chunk_piece(tensor, world_size, rank, 1)
    step = GPT_OSS["intermediate_size"] // world_size
    return tensor.narrow(2, rank * step // 32, step // 32)


def _shards_and_generation(rank: int, world_size: int, root: Path, want: tuple[torch.Tensor, torch.Tensor]) -> bool:
    stored = load_file(str(root / "model.safetensors"))
    loaded = tp_loader.load(root).state_dict
    for key in [k for k in stored if k.endswith(("_blocks", "_scales"))]:
        assert torch.equal(loaded[key].to_local(), expected_blocks(key, stored[key], world_size, rank)), key
    config = transformers.AutoConfig.from_pretrained(root)
    config.quantization_config = None
    with accelerate.init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    mesh = init_device_mesh("cpu", (world_size,))
    tp_loader.parallelize(model, mesh=mesh)
    report = tp_loader.load_into(model, root, mesh=mesh, dtype=torch.float32)
    assert report.missing_keys == () and report.unexpected_keys == (), report.format_table(full=True)
    with torch.no_grad():
        logits = model(PROMPT).logits
        tokens = model.generate(PROMPT, max_new_tokens=8, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(logits, want[0], rtol=0, atol=1e-4)
    assert torch.equal(tokens, want[1]), (tokens, want[1])
    return True


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_mxfp4_experts_shard_as_stored_and_dequantize_into_a_model_that_generates_as_transformers(
    tmp_path: Path, world_size: int
) -> None:
    mxfp4, reference_root = write_mxfp4(tmp_path, GPT_OSS)
    reference = transformers.AutoModelForCausalLM.from_pretrained(reference_root, dtype=torch.float32).eval()
    with torch.no_grad():
        want = reference(PROMPT).logits, reference.generate(PROMPT, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert values(run_ranks(world_size, _shards_and_generation, mxfp4, want, timeout=240)) == [True] * world_size


def test_gpt_oss_20b_intermediate_size_at_world_4_cuts_mxfp4_blocks_unless_dequantized(tmp_path: Path) -> None:
    """2880 features over 4 ranks is 720 each, 22.5 blocks of 32. The head groups allow 1, 2, 4 and 8
    ranks (8 query heads); of those the blocks allow 1 and 2 (1440 = 45 blocks; 360 cuts too)."""
    config = {
        **GPT_OSS,
        "intermediate_size": 2880,
        "num_hidden_layers": 1,
        "num_local_experts": 1,
        "num_experts_per_tok": 1,
    }
    mxfp4, _ = write_mxfp4(tmp_path, config)
    with pytest.raises(tp_loader.ShardingError) as info:
        tp_loader.plan_load(mxfp4, world_size=4)
    assert info.value.message == (
        "weight model.layers.0.mlp.experts.down_proj (mxfp4 (e2m1 values, e8m0 scales per 32)) cannot be sharded "
        "over 4 ranks as stored: rank 0's shard [0, 720) of dim 1 (size 2880) cuts "
        "model.layers.0.mlp.experts.down_proj_blocks (blocks of 32)"
    )
    assert info.value.hint.startswith("World sizes that work: 1, 2; or load with a wider dtype")
    summary = tp_loader.plan_load(mxfp4, world_size=4, dtype="bfloat16")
    assert dict(summary.notes)["model.layers.0.mlp.experts.down_proj"] == (
        "dequantized on load from mxfp4 (e2m1 values, e8m0 scales per 32) "
        "(model.layers.0.mlp.experts.down_proj_blocks, model.layers.0.mlp.experts.down_proj_scales)"
    )
