"""Random checkpoints in the real key names and layouts of the architectures beyond the Llama family."""

from __future__ import annotations

import torch

from tp_loader.demo import llama_tensors


def sparse_layer(config: dict, layer: int) -> bool:
    """Whether a layer has a MoE block (Mixtral: all; Qwen-MoE: off mlp_only_layers, on the sparse step)."""
    if config["model_type"] == "mixtral":
        return True
    return layer not in config.get("mlp_only_layers", []) and (layer + 1) % config.get("decoder_sparse_step", 1) == 0


def moe_tensors(config: dict, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint: the Llama-family attention (with each model's
    biases and norms), and per sparse layer a router, per-expert weights and (Qwen2-MoE) a shared
    expert with its gate; dense layers keep the Llama MLP."""
    tensors = llama_tensors(config, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    hidden = config["hidden_size"]

    def rand(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    for layer in range(config["num_hidden_layers"]):
        if not sparse_layer(config, layer):
            continue
        p = f"model.layers.{layer}."
        for name in ("gate_proj", "up_proj", "down_proj"):
            del tensors[p + f"mlp.{name}.weight"]
        if config["model_type"] == "mixtral":
            prefix, names, num_experts, inter = p + "block_sparse_moe.", ("w1", "w3", "w2"), config["num_local_experts"], config["intermediate_size"]
        else:
            prefix, names, num_experts, inter = p + "mlp.", ("gate_proj", "up_proj", "down_proj"), config["num_experts"], config["moe_intermediate_size"]
        tensors[prefix + "gate.weight"] = rand(num_experts, hidden, scale=1.0)
        for e in range(num_experts):
            tensors[prefix + f"experts.{e}.{names[0]}.weight"] = rand(inter, hidden, scale=0.5 / hidden**0.5)
            tensors[prefix + f"experts.{e}.{names[1]}.weight"] = rand(inter, hidden, scale=0.5 / hidden**0.5)
            tensors[prefix + f"experts.{e}.{names[2]}.weight"] = rand(hidden, inter, scale=0.5 / inter**0.5)
        if config["model_type"] == "qwen2_moe":
            shared = config["shared_expert_intermediate_size"]
            tensors[prefix + "shared_expert.gate_proj.weight"] = rand(shared, hidden, scale=0.5 / hidden**0.5)
            tensors[prefix + "shared_expert.up_proj.weight"] = rand(shared, hidden, scale=0.5 / hidden**0.5)
            tensors[prefix + "shared_expert.down_proj.weight"] = rand(hidden, shared, scale=0.5 / shared**0.5)
            tensors[prefix + "shared_expert_gate.weight"] = rand(1, hidden, scale=0.5 / hidden**0.5)
    return tensors


def gpt2_tensors(config: dict, *, seed: int = 0, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """A GPT-2 checkpoint: Conv1D weights ``[in, out]``, fused ``c_attn``, LayerNorms with biases, no
    stored ``lm_head`` (tied to ``wte``). ``prefix=""`` writes the original unprefixed key names."""
    generator = torch.Generator().manual_seed(seed)
    hidden, inner = config["n_embd"], config.get("n_inner") or 4 * config["n_embd"]

    def rand(*shape: int, scale: float = 0.5 / hidden**0.5) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    tensors = {prefix + "wte.weight": rand(config["vocab_size"], hidden, scale=0.1), prefix + "wpe.weight": rand(config["n_positions"], hidden, scale=0.1)}
    for layer in range(config["n_layer"]):
        p = f"{prefix}h.{layer}."
        for norm in ("ln_1", "ln_2"):
            tensors[p + f"{norm}.weight"] = 1 + rand(hidden, scale=0.1)
            tensors[p + f"{norm}.bias"] = rand(hidden, scale=0.1)
        tensors[p + "attn.c_attn.weight"] = rand(hidden, 3 * hidden)
        tensors[p + "attn.c_attn.bias"] = rand(3 * hidden, scale=0.1)
        tensors[p + "attn.c_proj.weight"] = rand(hidden, hidden)
        tensors[p + "attn.c_proj.bias"] = rand(hidden, scale=0.1)
        tensors[p + "mlp.c_fc.weight"] = rand(hidden, inner)
        tensors[p + "mlp.c_fc.bias"] = rand(inner, scale=0.1)
        tensors[p + "mlp.c_proj.weight"] = rand(inner, hidden, scale=0.5 / inner**0.5)
        tensors[p + "mlp.c_proj.bias"] = rand(hidden, scale=0.1)
    tensors[prefix + "ln_f.weight"] = 1 + rand(hidden, scale=0.1)
    tensors[prefix + "ln_f.bias"] = rand(hidden, scale=0.1)
    return tensors
