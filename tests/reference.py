"""Reference computations the tests compare against, written independently of tp_loader.

- :func:`expected_shard`: the slice tensor parallelism needs of each Llama-family key, from
  ``torch.chunk`` and the head layout (vLLM's KV-head replication when KV heads < ranks).
- :func:`llama_forward`: the unsharded forward of a Llama / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 model,
  of the Mixtral / Qwen2-MoE / Qwen3-MoE / DeepSeek-V3 sparse variants (:func:`moe`) and of
  DeepSeek's latent attention (:func:`mla_attention`).
- :func:`tp_llama_forward`: the same forward from one rank's local shards, with explicit collectives.
"""

from __future__ import annotations

import math
import re

import torch
import torch.distributed as dist


def chunk_piece(tensor: torch.Tensor, world_size: int, rank: int, dim: int) -> torch.Tensor:
    """``torch.chunk(tensor, world_size, dim)[rank]``, empty when chunk returns fewer pieces."""
    chunks = torch.chunk(tensor, world_size, dim=dim)
    return chunks[rank] if rank < len(chunks) else tensor.narrow(dim, tensor.shape[dim], 0)


def _heads(config: dict) -> tuple[int, int, int]:
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    return heads, kv, config.get("head_dim") or config["hidden_size"] // heads


def expected_shard(key: str, tensor: torch.Tensor, config: dict, world_size: int, rank: int) -> torch.Tensor:
    """The local shard rank ``rank`` must hold for ``key``."""
    _, kv, head_dim = _heads(config)
    if re.search(r"\.experts\.[a-z0-9_]+\.weight$", key):  # stacked experts: whole experts per rank
        return chunk_piece(tensor, world_size, rank, 0)
    if key.endswith((".w1.weight", ".w3.weight")):
        return chunk_piece(tensor, world_size, rank, 0)
    if key.endswith(".w2.weight"):
        return chunk_piece(tensor, world_size, rank, 1)
    if key.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")) and kv < world_size:
        head = rank * kv // world_size
        return tensor[head * head_dim : (head + 1) * head_dim]
    if any(p in key for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head")):
        return chunk_piece(tensor, world_size, rank, 0)
    if any(p in key for p in ("o_proj.weight", "down_proj.weight")):
        return chunk_piece(tensor, world_size, rank, 1)
    return tensor


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding, half-split layout (as transformers' Llama); ``x`` is [heads, seq, head_dim]."""
    seq, dim = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq)
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(x.dtype)
    half = dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def _linear(x: torch.Tensor, w: dict, name: str) -> torch.Tensor:
    out = x @ w[name + ".weight"].T
    bias = w.get(name + ".bias")
    return out if bias is None else out + bias


def _gemma(config: dict) -> bool:
    return str(config.get("model_type", "")).startswith("gemma")


def _norm(x: torch.Tensor, weight: torch.Tensor, config: dict) -> torch.Tensor:
    """RMSNorm; Gemma scales by (1 + weight)."""
    return rms_norm(x, 1 + weight if _gemma(config) else weight, config.get("rms_norm_eps", 1e-6))


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """Causal attention; q [hq, s, d], k/v [hkv, s, d] with hq a multiple of hkv. Gemma: scaled by
    ``query_pre_attn_scalar`` and soft-capped by ``attn_logit_softcapping`` when set."""
    config = config or {}
    group = q.shape[0] // k.shape[0]
    k = k.repeat_interleave(group, 0)
    v = v.repeat_interleave(group, 0)
    scores = q @ k.transpose(-1, -2) / math.sqrt(config.get("query_pre_attn_scalar") or q.shape[-1])
    if config.get("attn_logit_softcapping"):
        cap = config["attn_logit_softcapping"]
        scores = torch.tanh(scores / cap) * cap
    mask = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1) @ v


def _layer(x: torch.Tensor, w: dict, p: str, config: dict, reduce, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """One decoder layer; ``reduce`` all-reduces a row-parallel product (identity when unsharded).
    Gemma: norms after attention and around the MLP, GELU-tanh gating."""
    gemma = _gemma(config)
    _, _, head_dim = _heads(config)
    h = _norm(x, w[p + "input_layernorm.weight"], config)
    theta = config.get("rope_theta", 10000.0)
    if p + "self_attn.kv_a_proj_with_mqa.weight" in w:
        attn = mla_attention(h, w, p, config)
    else:
        q = _linear(h, w, p + "self_attn.q_proj").view(x.shape[0], -1, head_dim).transpose(0, 1)
        k = _linear(h, w, p + "self_attn.k_proj").view(x.shape[0], -1, head_dim).transpose(0, 1)
        v = _linear(h, w, p + "self_attn.v_proj").view(x.shape[0], -1, head_dim).transpose(0, 1)
        if p + "self_attn.q_norm.weight" in w:
            q = _norm(q, w[p + "self_attn.q_norm.weight"], config)
            k = _norm(k, w[p + "self_attn.k_norm.weight"], config)
        attn = _attention(rope(q, theta), rope(k, theta), v, config).transpose(0, 1).reshape(x.shape[0], -1)
    out = reduce(attn @ w[p + "self_attn.o_proj.weight"].T)
    if p + "self_attn.o_proj.bias" in w:
        out = out + w[p + "self_attn.o_proj.bias"]
    if gemma:
        x = x + _norm(out, w[p + "post_attention_layernorm.weight"], config)
        h = _norm(x, w[p + "pre_feedforward_layernorm.weight"], config)
        gate = torch.nn.functional.gelu(h @ w[p + "mlp.gate_proj.weight"].T, approximate="tanh")
        mlp = reduce((gate * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T)
        return x + _norm(mlp, w[p + "post_feedforward_layernorm.weight"], config)
    x = x + out
    h = _norm(x, w[p + "post_attention_layernorm.weight"], config)
    sparse = _sparse_block(w, p)
    if sparse is not None:
        return x + reduce(moe(h, w, *sparse, config, shard))
    return x + reduce(
        _swiglu(h, w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"])
    )


def mla_attention(h: torch.Tensor, w: dict, p: str, config: dict) -> torch.Tensor:
    """DeepSeek multi-head latent attention up to o_proj: queries through the q LoRA (or q_proj),
    keys and values from a normed latent through kv_b, one rotary key shared by every head; each
    head's query and key are [nope | rope], its value v_head_dim. Local heads from local shards."""
    nope, rope_dim, v_dim = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    seq, theta = h.shape[0], config.get("rope_theta", 10000.0)
    if p + "self_attn.q_a_proj.weight" in w:
        q = (
            _norm(h @ w[p + "self_attn.q_a_proj.weight"].T, w[p + "self_attn.q_a_layernorm.weight"], config)
            @ w[p + "self_attn.q_b_proj.weight"].T
        )
    else:
        q = h @ w[p + "self_attn.q_proj.weight"].T
    q_nope, q_pe = q.view(seq, -1, nope + rope_dim).transpose(0, 1).split([nope, rope_dim], -1)
    latent, k_pe = (h @ w[p + "self_attn.kv_a_proj_with_mqa.weight"].T).split([config["kv_lora_rank"], rope_dim], -1)
    kv = _norm(latent, w[p + "self_attn.kv_a_layernorm.weight"], config) @ w[p + "self_attn.kv_b_proj.weight"].T
    k_nope, v = kv.view(seq, -1, nope + v_dim).transpose(0, 1).split([nope, v_dim], -1)
    k_pe = rope(k_pe.unsqueeze(0), theta).expand(k_nope.shape[0], -1, -1)
    attn = _attention(torch.cat([q_nope, rope(q_pe, theta)], -1), torch.cat([k_nope, k_pe], -1), v)
    return attn.transpose(0, 1).reshape(seq, -1)


def _swiglu(h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(h @ gate.T) * (h @ up.T)) @ down.T


def _sparse_block(w: dict, p: str) -> tuple[str, tuple[str, str, str]] | None:
    """A layer's MoE block: its prefix and its experts' gate/up/down names, or None for a dense MLP."""
    if p + "block_sparse_moe.gate.weight" in w:
        return p + "block_sparse_moe.", ("w1", "w3", "w2")
    if p + "mlp.gate.weight" in w:
        return p + "mlp.", ("gate_proj", "up_proj", "down_proj")
    return None


def moe(
    h: torch.Tensor, w: dict, prefix: str, names: tuple[str, str, str], config: dict, shard: tuple[int, int] = (0, 1)
) -> torch.Tensor:
    """A sparse MoE block's output before the tensor-parallel reduction: softmax routing over the
    (replicated) router, top-k (chosen with ``e_score_correction_bias`` when present), weights
    renormalized when ``norm_topk_prob`` (Mixtral always), plus shared experts (a Qwen2-MoE shared
    expert is scaled by the sigmoid of ``shared_expert_gate``). Experts are per-expert tensors
    (all experts, each possibly a TP shard) or stacked ``experts.<name>.weight`` tensors holding the
    rank's whole experts (expert parallelism, ``torch.chunk`` of the experts over ``shard``'s ranks)."""
    rank, world_size = shard
    probs = (h @ w[prefix + "gate.weight"].T).softmax(-1)
    num_experts = probs.shape[-1]
    bias = w.get(prefix + "gate.e_score_correction_bias")
    choice = (probs if bias is None else probs + bias).topk(config["num_experts_per_tok"], -1).indices
    weights = probs.gather(-1, choice)
    if config.get("norm_topk_prob", config.get("model_type") == "mixtral"):
        weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(h)
    if prefix + f"experts.{names[0]}.weight" in w:
        step = math.ceil(num_experts / world_size)
        stacked = [w[prefix + f"experts.{n}.weight"] for n in names]
        experts = [(min(rank * step, num_experts) + i, [t[i] for t in stacked]) for i in range(stacked[0].shape[0])]
    else:
        experts = [(e, [w[prefix + f"experts.{e}.{n}.weight"] for n in names]) for e in range(num_experts)]
    for e, (gate, up, down) in experts:
        coefficient = (weights * (choice == e)).sum(-1, keepdim=True)
        out = out + coefficient * _swiglu(h, gate, up, down)
    for shared in ("shared_expert.", "shared_experts."):
        if prefix + shared + "gate_proj.weight" in w:
            extra = _swiglu(h, *(w[prefix + shared + f"{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj")))
            if prefix + "shared_expert_gate.weight" in w:
                extra = torch.sigmoid(h @ w[prefix + "shared_expert_gate.weight"].T) * extra
            out = out + extra
    return out


def _finish(x: torch.Tensor, w: dict, lm_head: torch.Tensor, config: dict) -> torch.Tensor:
    """Final norm and (local) logits; Gemma 2 soft-caps them (elementwise, so per shard is exact)."""
    logits = _norm(x, w["model.norm.weight"], config) @ lm_head.T
    if config.get("final_logit_softcapping"):
        cap = config["final_logit_softcapping"]
        logits = torch.tanh(logits / cap) * cap
    return logits


def _embed_scale(config: dict) -> float:
    return math.sqrt(config["hidden_size"]) if _gemma(config) else 1.0


def llama_forward(weights: dict[str, torch.Tensor], config: dict, input_ids: torch.Tensor) -> torch.Tensor:
    """Unsharded logits [seq, vocab] for one sequence."""
    lm_head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    x = weights["model.embed_tokens.weight"][input_ids] * _embed_scale(config)
    for layer in range(config["num_hidden_layers"]):
        x = _layer(x, weights, f"model.layers.{layer}.", config, lambda t: t)
    return _finish(x, weights, lm_head, config)


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    dist.all_reduce(t)
    return t


def vocab_parallel_embed(
    embed: torch.Tensor, input_ids: torch.Tensor, vocab: int, world_size: int, rank: int
) -> torch.Tensor:
    """Embeddings from this rank's ``torch.chunk`` piece of the vocabulary: look up the ids it holds,
    zero the rest, all-reduce."""
    step = math.ceil(vocab / world_size)
    start = min(rank * step, vocab)
    assert embed.shape[0] == min(start + step, vocab) - start, "vocab shard does not follow torch.chunk"
    in_shard = (input_ids >= start) & (input_ids < start + embed.shape[0])
    x = (
        embed[(input_ids - start).clamp(0, max(embed.shape[0] - 1, 0))]
        if embed.shape[0]
        else torch.zeros(len(input_ids), embed.shape[1], dtype=embed.dtype)
    )
    return all_reduce(x * in_shard.unsqueeze(-1))


def gather_vocab(logits: torch.Tensor, vocab: int, world_size: int) -> torch.Tensor:
    """Every rank's vocabulary piece of the logits, all-gathered (padded to equal sizes) and joined."""
    step = math.ceil(vocab / world_size)
    padded = torch.zeros(logits.shape[0], step, dtype=logits.dtype)
    padded[:, : logits.shape[1]] = logits
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    sizes = [min((r + 1) * step, vocab) - min(r * step, vocab) for r in range(world_size)]
    return torch.cat([g[:, :n] for g, n in zip(gathered, sizes)], dim=1)


def tp_llama_forward(
    local: dict[str, torch.Tensor], config: dict, input_ids: torch.Tensor, world_size: int, rank: int
) -> torch.Tensor:
    """Logits [seq, vocab] from this rank's local shards: vocab-parallel embedding and LM head,
    column/row-parallel attention and MLP, all-reduce after each row-parallel product."""
    embed = local["model.embed_tokens.weight"]
    x = vocab_parallel_embed(embed, input_ids, config["vocab_size"], world_size, rank) * _embed_scale(config)
    for layer in range(config["num_hidden_layers"]):
        x = _layer(x, local, f"model.layers.{layer}.", config, all_reduce, (rank, world_size))
    logits = _finish(x, local, local.get("lm_head.weight", embed), config)
    return gather_vocab(logits, config["vocab_size"], world_size)
