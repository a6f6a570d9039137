"""fp8 weights stored beside their scales (``weight_scale_inv`` blocks, ``weight_scale``) in a checkpoint whose
config.json has no ``quantization_config`` contradict each other: loaded as they are, every weight would be off by
its scale. The load and the dry run refuse, naming the keys and what to add, in strict and non-strict mode."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import llama_config
from models import quantize_block_fp8, quantize_checkpoint

import tp_loader
from tp_loader.demo import llama_tensors, write_checkpoint

BLOCK = (16, 16)
CONFIG = llama_config(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=4)


def _block_fp8(tmp_path, with_config: bool):
    config = {**CONFIG}
    if with_config:
        config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(BLOCK), "fmt": "e4m3"}
    return write_checkpoint(tmp_path / "fp8", config, quantize_checkpoint(llama_tensors(CONFIG), BLOCK))


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_block_fp8_weights_with_scales_but_no_quantization_config_are_refused(tmp_path, strict, dtype) -> None:
    root = _block_fp8(tmp_path, with_config=False)
    with pytest.raises(tp_loader.CheckpointError) as caught:
        tp_loader.load(root, strict=strict, dtype=dtype)
    message = str(caught.value)
    assert message.startswith(
        "14 fp8 tensors are stored with scales ('model.layers.0.mlp.down_proj.weight' beside "
        "'model.layers.0.mlp.down_proj.weight_scale_inv', ...), but config.json has no quantization_config: "
        "loaded as stored, each weight would be off by its scale "
        f"[rank=0, file={root / 'config.json'}, key=model.layers.0.mlp.down_proj.weight_scale_inv]. "
        "Add the quantization_config the checkpoint was saved with to config.json"
    ), message
    assert '{"quant_method": "fp8", "weight_block_size": [16, 16]}' in message, message
    with pytest.raises(tp_loader.CheckpointError) as dry:
        tp_loader.plan_load(root, world_size=2, strict=strict)
    assert (dry.value.message, dry.value.key, dry.value.hint) == (
        caught.value.message,
        caught.value.key,
        caught.value.hint,
    )


def test_the_same_checkpoint_with_its_quantization_config_loads_dequantized(tmp_path) -> None:
    root = _block_fp8(tmp_path, with_config=True)
    tensors = tp_loader.load(root, dtype=torch.float32).state_dict
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.float32
    assert not any(key.endswith("_scale_inv") for key in tensors)


def test_a_per_channel_weight_scale_beside_an_fp8_weight_without_config_is_refused(tmp_path) -> None:
    tensors = llama_tensors(CONFIG)
    weight, _ = quantize_block_fp8(tensors["model.layers.1.self_attn.o_proj.weight"], BLOCK)
    tensors["model.layers.1.self_attn.o_proj.weight"] = weight
    tensors["model.layers.1.self_attn.o_proj.weight_scale"] = torch.ones(64, 1)
    root = write_checkpoint(tmp_path / "fp8c", CONFIG, tensors)
    with pytest.raises(tp_loader.CheckpointError) as caught:
        tp_loader.load(root)
    assert str(caught.value).startswith(
        "1 fp8 tensors are stored with scales ('model.layers.1.self_attn.o_proj.weight' beside "
        "'model.layers.1.self_attn.o_proj.weight_scale'), but config.json has no quantization_config"
    ), str(caught.value)
    assert json.loads((root / "config.json").read_text()).get("quantization_config") is None
