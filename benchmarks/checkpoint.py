"""Llama-shaped bf16 benchmark checkpoints, generated once and reused."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tp_loader.demo import write_checkpoint

#: The headline checkpoint: 0.98 GB bf16, 4 files, hidden 2048, 8 layers, GQA 16/4, vocab 32000.
BASE = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}

#: A few-MB checkpoint for the fixed cost (a fresh process's first load against its second).
TINY = {**BASE, "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 2, "vocab_size": 4000}

LAYER_BYTES = 2 * (2 * 2048 * 2048 + 2 * 512 * 2048 + 3 * 5632 * 2048 + 2 * 2048)
EMBED_BYTES_PER_TOKEN = 2 * 2 * 2048  # embed_tokens + lm_head rows, bf16


def sweep_config(target_gb: float) -> dict:
    """A config of about ``target_gb`` GB: vocabulary and depth scaled together."""
    vocab = 32000 if target_gb >= 1 else max(4000, int(32000 * target_gb))
    layers = max(1, round((target_gb * 1e9 - vocab * EMBED_BYTES_PER_TOKEN) / LAYER_BYTES))
    return {**BASE, "vocab_size": vocab, "num_hidden_layers": layers}


def _tensors(config: dict) -> dict[str, torch.Tensor]:
    """Shapes of a Llama checkpoint, filled fast with a cheap deterministic pattern (values do not
    matter for load speed; randn of a GB costs more than the loads measured)."""
    from tp_loader.demo import llama_tensors

    small = {
        **config,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": 8,
    }
    out = {}
    hidden, inter, heads, kv = (
        config["hidden_size"],
        config["intermediate_size"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
    )
    head_dim = hidden // heads
    shapes = {
        "embed_tokens": (config["vocab_size"], hidden),
        "lm_head": (config["vocab_size"], hidden),
        "q_proj": (heads * head_dim, hidden),
        "k_proj": (kv * head_dim, hidden),
        "v_proj": (kv * head_dim, hidden),
        "o_proj": (hidden, heads * head_dim),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }
    for i, key in enumerate(llama_tensors(small)):
        name = key.split(".")[-2]
        shape = shapes.get(name, (hidden,))
        numel = 1
        for d in shape:
            numel *= d
        out[key] = (
            ((torch.arange(numel, dtype=torch.int32) * 7 + i) % 1021 - 510).to(torch.bfloat16).div_(1021).view(shape)
        )
    return out


def ensure_checkpoint(root: Path, config: dict, num_files: int = 4) -> Path:
    """Writes the checkpoint at ``root`` unless one with the same config is there."""
    if (root / "config.json").is_file() and json.loads((root / "config.json").read_text()) == config:
        return root
    return write_checkpoint(root, config, _tensors(config), num_shards=num_files)


def checkpoint_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.glob("*.safetensors"))
