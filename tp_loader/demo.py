"""A small Llama-family checkpoint in Hugging Face layout, generated deterministically.

``python -m tp_loader`` with no model loads the demo checkpoint, generated on first use; tests and
benchmarks use :func:`write_checkpoint` for checkpoints of their own shapes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import ArgumentError

DEMO_CONFIG: dict = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 1001,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def llama_tensors(config: dict, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights with the real key names and shapes of a llama / mistral / qwen2 / qwen3 /
    gemma2 / gemma3_text model (and the attention and dense MLPs of qwen2_moe / qwen3_moe).

    Biases on q/k/v follow qwen2 (always) or ``attention_bias``; q/k norms follow qwen3 and gemma3;
    gemma models get their feed-forward norms (stored as offsets from 1); ``lm_head`` is left out when
    ``tie_word_embeddings`` is set.
    """
    generator = torch.Generator().manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    model_type = config.get("model_type", "llama")
    qkv_bias = model_type in ("qwen2", "qwen2_moe") or bool(config.get("attention_bias"))
    std = 0.5 / hidden**0.5

    def rand(*shape: int, scale: float = std) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)

    gemma = model_type.startswith("gemma")

    def norm(size: int) -> torch.Tensor:
        return ((0.0 if gemma else 1.0) + 0.1 * torch.randn(size, generator=generator)).to(dtype)

    tensors = {"model.embed_tokens.weight": rand(config["vocab_size"], hidden, scale=0.1)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        tensors[p + "input_layernorm.weight"] = norm(hidden)
        tensors[p + "self_attn.q_proj.weight"] = rand(heads * head_dim, hidden)
        tensors[p + "self_attn.k_proj.weight"] = rand(kv_heads * head_dim, hidden)
        tensors[p + "self_attn.v_proj.weight"] = rand(kv_heads * head_dim, hidden)
        if qkv_bias:
            tensors[p + "self_attn.q_proj.bias"] = rand(heads * head_dim, scale=0.1)
            tensors[p + "self_attn.k_proj.bias"] = rand(kv_heads * head_dim, scale=0.1)
            tensors[p + "self_attn.v_proj.bias"] = rand(kv_heads * head_dim, scale=0.1)
        if model_type in ("qwen3", "qwen3_moe", "gemma3_text"):
            tensors[p + "self_attn.q_norm.weight"] = norm(head_dim)
            tensors[p + "self_attn.k_norm.weight"] = norm(head_dim)
        tensors[p + "self_attn.o_proj.weight"] = rand(hidden, heads * head_dim)
        tensors[p + "post_attention_layernorm.weight"] = norm(hidden)
        if gemma:
            tensors[p + "pre_feedforward_layernorm.weight"] = norm(hidden)
            tensors[p + "post_feedforward_layernorm.weight"] = norm(hidden)
        tensors[p + "mlp.gate_proj.weight"] = rand(inter, hidden)
        tensors[p + "mlp.up_proj.weight"] = rand(inter, hidden)
        tensors[p + "mlp.down_proj.weight"] = rand(hidden, inter, scale=0.5 / inter**0.5)
    tensors["model.norm.weight"] = norm(hidden)
    if not config.get("tie_word_embeddings"):
        tensors["lm_head.weight"] = rand(config["vocab_size"], hidden)
    return tensors


def write_checkpoint(
    path: str | os.PathLike[str], config: dict, tensors: dict[str, torch.Tensor], *, num_shards: int = 1
) -> Path:
    """Writes ``config.json`` and the tensors as ``model.safetensors``, or as ``num_shards`` files
    ``model-0000i-of-0000n.safetensors`` with a ``model.safetensors.index.json``, as transformers does.

    Returns:
        The checkpoint directory.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config, indent=2))
    if num_shards == 1:
        save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
        return root
    keys = list(tensors)
    per_shard = -(-len(keys) // num_shards)
    weight_map = {}
    for i in range(num_shards):
        name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i * per_shard : (i + 1) * per_shard]}
        save_file(part, str(root / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return root


def ensure_demo(path: str | os.PathLike[str]) -> Path:
    """Generates the demo checkpoint at ``path`` unless it is already there (atomically: a reader never
    sees a half-written checkpoint).

    Returns:
        The demo checkpoint directory.
    """
    root = Path(path)
    if (root / "config.json").is_file():
        return root
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=root.parent))
    except OSError as exc:
        raise _demo_error(root, exc) from None
    try:
        write_checkpoint(staging, DEMO_CONFIG, llama_tensors(DEMO_CONFIG, seed=0), num_shards=2)
        try:
            staging.rename(root)
        except OSError as exc:
            if not (root / "config.json").is_file():
                raise _demo_error(root, exc) from None
    except OSError as exc:
        raise _demo_error(root, exc) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _demo_error(root: Path, exc: OSError) -> ArgumentError:
    return ArgumentError(
        f"cannot generate the demo checkpoint in {root}: {exc.strerror or exc}",
        file=str(root),
        key="TP_LOADER_DEMO_DIR",
        hint="Set TP_LOADER_DEMO_DIR to a writable directory that does not exist yet (or holds the demo)",
    )
