"""Tiny checkpoints written by transformers' save_pretrained (random normal weights, several safetensors files)."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(
    hidden_size=128,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    max_position_embeddings=128,
    initializer_range=0.2,
)

#: architecture → (transformers config class name, config overrides)
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    # GQA with one KV head (replicated on both ranks at TP 2), a vocabulary vLLM pads (1000 → 1024)
    "llama": ("LlamaConfig", dict(vocab_size=1000)),
    # q/k/v biases, tied embeddings, two KV heads (one per rank)
    "qwen2": ("Qwen2Config", dict(vocab_size=1000, num_key_value_heads=2, tie_word_embeddings=True)),
    # q/k norms, explicit head_dim
    "qwen3": ("Qwen3Config", dict(vocab_size=1000, num_key_value_heads=2, head_dim=32)),
    "mistral": ("MistralConfig", dict(vocab_size=1000, num_key_value_heads=2, sliding_window=None)),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            vocab_size=1000,
            num_key_value_heads=2,
            head_dim=32,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
    ),
}


def write_checkpoint(arch: str, root: Path, *, seed: int = 0) -> Path:
    """Saves a random ``arch`` model (float32) under ``root / arch`` in several safetensors files."""
    import transformers

    name, overrides = ARCHITECTURES[arch]
    config = getattr(transformers, name)(**{**COMMON, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = root / f"{arch}-{seed}"
    model.save_pretrained(path, max_shard_size="100KB")
    return path
