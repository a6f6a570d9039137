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
            prefix, names, num_experts, inter = (
                p + "block_sparse_moe.",
                ("w1", "w3", "w2"),
                config["num_local_experts"],
                config["intermediate_size"],
            )
        else:
            prefix, names, num_experts, inter = (
                p + "mlp.",
                ("gate_proj", "up_proj", "down_proj"),
                config["num_experts"],
                config["moe_intermediate_size"],
            )
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

    tensors = {
        prefix + "wte.weight": rand(config["vocab_size"], hidden, scale=0.1),
        prefix + "wpe.weight": rand(config["n_positions"], hidden, scale=0.1),
    }
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


def deepseek_tensors(config: dict, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A DeepSeek-V3 checkpoint in float32: MLA attention (q LoRA when ``q_lora_rank``), dense MLPs in
    the first ``first_k_dense_replace`` layers, then a router with its score-correction bias, routed
    experts and shared experts."""
    generator = torch.Generator().manual_seed(seed)
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    nope, rope, v_dim = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    q_lora, kv_lora = config.get("q_lora_rank"), config["kv_lora_rank"]

    def rand(*shape: int, scale: float | None = None) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * (scale if scale is not None else 0.5 / shape[-1] ** 0.5)

    def norm(size: int) -> torch.Tensor:
        return 1 + rand(size, scale=0.1)

    tensors = {"model.embed_tokens.weight": rand(config["vocab_size"], hidden, scale=0.1)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        tensors[p + "input_layernorm.weight"] = norm(hidden)
        if q_lora:
            tensors[p + "self_attn.q_a_proj.weight"] = rand(q_lora, hidden)
            tensors[p + "self_attn.q_a_layernorm.weight"] = norm(q_lora)
            tensors[p + "self_attn.q_b_proj.weight"] = rand(heads * (nope + rope), q_lora)
        else:
            tensors[p + "self_attn.q_proj.weight"] = rand(heads * (nope + rope), hidden)
        tensors[p + "self_attn.kv_a_proj_with_mqa.weight"] = rand(kv_lora + rope, hidden)
        tensors[p + "self_attn.kv_a_layernorm.weight"] = norm(kv_lora)
        tensors[p + "self_attn.kv_b_proj.weight"] = rand(heads * (nope + v_dim), kv_lora)
        tensors[p + "self_attn.o_proj.weight"] = rand(hidden, heads * v_dim)
        tensors[p + "post_attention_layernorm.weight"] = norm(hidden)
        if layer < config.get("first_k_dense_replace", 0):
            inter = config["intermediate_size"]
            tensors.update(
                {
                    p + "mlp.gate_proj.weight": rand(inter, hidden),
                    p + "mlp.up_proj.weight": rand(inter, hidden),
                    p + "mlp.down_proj.weight": rand(hidden, inter),
                }
            )
            continue
        inter, shared = (
            config["moe_intermediate_size"],
            config["moe_intermediate_size"] * config.get("n_shared_experts", 0),
        )
        tensors[p + "mlp.gate.weight"] = rand(config["n_routed_experts"], hidden, scale=1.0)
        tensors[p + "mlp.gate.e_score_correction_bias"] = rand(config["n_routed_experts"], scale=0.01)
        for e in range(config["n_routed_experts"]):
            q = f"{p}mlp.experts.{e}."
            tensors.update(
                {
                    q + "gate_proj.weight": rand(inter, hidden),
                    q + "up_proj.weight": rand(inter, hidden),
                    q + "down_proj.weight": rand(hidden, inter),
                }
            )
        if shared:
            q = p + "mlp.shared_experts."
            tensors.update(
                {
                    q + "gate_proj.weight": rand(shared, hidden),
                    q + "up_proj.weight": rand(shared, hidden),
                    q + "down_proj.weight": rand(hidden, shared),
                }
            )
    tensors["model.norm.weight"] = norm(hidden)
    tensors["lm_head.weight"] = rand(config["vocab_size"], hidden)
    return tensors


def quantize_block_fp8(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's block fp8: per block, scale = amax / 448 and the weight / scale as float8_e4m3fn;
    returns (fp8 weight, float32 ``weight_scale_inv`` [ceil(rows/b0), ceil(cols/b1)])."""
    blocks, rows, cols = _blocks(weight.float(), block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    quantized = (blocks / scale[:, None, :, None]).reshape(blocks.shape[0] * block[0], -1)[:rows, :cols]
    return quantized.to(torch.float8_e4m3fn), scale


def dequantize_block_fp8(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp8 weight times its per-block scale, float32 (padded into whole blocks, then cut back)."""
    blocks, rows, cols = _blocks(weight.float(), block)
    return (blocks * scale[:, None, :, None]).reshape(blocks.shape[0] * block[0], -1)[:rows, :cols]


def _blocks(tensor: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
    rows, cols = tensor.shape
    padded = torch.zeros(-(-rows // block[0]) * block[0], -(-cols // block[1]) * block[1])
    padded[:rows, :cols] = tensor
    return padded.view(padded.shape[0] // block[0], block[0], padded.shape[1] // block[1], block[1]), rows, cols


def quantize_checkpoint(tensors: dict[str, torch.Tensor], block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Every ``*_proj.weight`` as block fp8 with its ``weight_scale_inv`` (routers, norms, embeddings and
    the LM head stay as they are, as in DeepSeek-V3's checkpoint)."""
    out = {}
    for key, tensor in tensors.items():
        if key.endswith("_proj.weight") or key.endswith("kv_a_proj_with_mqa.weight"):
            out[key], out[key + "_scale_inv"] = quantize_block_fp8(tensor, block)
        else:
            out[key] = tensor
    return out
