"""Full-size checkpoints without the disk: real configs and tensor names, real safetensors headers, and the data
left as holes (each file's header is written, then the file is truncated to its full length).

DeepSeek-V3's 91,991 tensors (689 GB) take about 20 MB of disk this way, so planning, loading (zero-copy: the
data is mapped, never read) and their per-tensor costs can be measured at full scale on any machine. Reading a
hole gives zeros, so nothing here says anything about values.

    python -m benchmarks.fullsize deepseek_v3 /tmp/ds3      # writes the directory, prints its totals
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

#: (key, safetensors dtype, shape)
Entry = tuple[str, str, tuple[int, ...]]

ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1}

LLAMA3_70B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}

DEEPSEEK_V3 = {
    "model_type": "deepseek_v3",
    "architectures": ["DeepseekV3ForCausalLM"],
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "vocab_size": 129280,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
}

QWEN3_235B = {
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "num_hidden_layers": 94,
    "num_attention_heads": 64,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "vocab_size": 151936,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}

MIXTRAL_8X22B = {
    "model_type": "mixtral",
    "architectures": ["MixtralForCausalLM"],
    "hidden_size": 6144,
    "intermediate_size": 16384,
    "num_hidden_layers": 56,
    "num_attention_heads": 48,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def _attention_gqa(p: str, c: dict, norms: bool = False) -> Iterator[Entry]:
    hidden, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim") or hidden // heads
    yield p + "self_attn.q_proj.weight", "BF16", (heads * head_dim, hidden)
    yield p + "self_attn.k_proj.weight", "BF16", (kv * head_dim, hidden)
    yield p + "self_attn.v_proj.weight", "BF16", (kv * head_dim, hidden)
    yield p + "self_attn.o_proj.weight", "BF16", (hidden, heads * head_dim)
    if norms:
        yield p + "self_attn.q_norm.weight", "BF16", (head_dim,)
        yield p + "self_attn.k_norm.weight", "BF16", (head_dim,)


def _layer_norms(p: str, c: dict) -> Iterator[Entry]:
    yield p + "input_layernorm.weight", "BF16", (c["hidden_size"],)
    yield p + "post_attention_layernorm.weight", "BF16", (c["hidden_size"],)


def _ends(c: dict) -> tuple[list[Entry], list[Entry]]:
    vocab, hidden = c["vocab_size"], c["hidden_size"]
    head = [("model.embed_tokens.weight", "BF16", (vocab, hidden))]
    tail = [("model.norm.weight", "BF16", (hidden,)), ("lm_head.weight", "BF16", (vocab, hidden))]
    return head, tail


def llama_entries(c: dict) -> list[Entry]:
    head, tail = _ends(c)
    out = list(head)
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [*_layer_norms(p, c), *_attention_gqa(p, c)]
        out += [
            (p + "mlp.gate_proj.weight", "BF16", (inter, hidden)),
            (p + "mlp.up_proj.weight", "BF16", (inter, hidden)),
            (p + "mlp.down_proj.weight", "BF16", (hidden, inter)),
        ]
    return out + tail


def qwen3_moe_entries(c: dict) -> list[Entry]:
    head, tail = _ends(c)
    out = list(head)
    hidden, inter = c["hidden_size"], c["moe_intermediate_size"]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [*_layer_norms(p, c), *_attention_gqa(p, c, norms=True)]
        out.append((p + "mlp.gate.weight", "BF16", (c["num_experts"], hidden)))
        for e in range(c["num_experts"]):
            q = f"{p}mlp.experts.{e}."
            out += [
                (q + "gate_proj.weight", "BF16", (inter, hidden)),
                (q + "up_proj.weight", "BF16", (inter, hidden)),
                (q + "down_proj.weight", "BF16", (hidden, inter)),
            ]
    return out + tail


def mixtral_entries(c: dict) -> list[Entry]:
    head, tail = _ends(c)
    out = list(head)
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [*_layer_norms(p, c), *_attention_gqa(p, c)]
        out.append((p + "block_sparse_moe.gate.weight", "BF16", (c["num_local_experts"], hidden)))
        for e in range(c["num_local_experts"]):
            q = f"{p}block_sparse_moe.experts.{e}."
            out += [
                (q + "w1.weight", "BF16", (inter, hidden)),
                (q + "w2.weight", "BF16", (hidden, inter)),
                (q + "w3.weight", "BF16", (inter, hidden)),
            ]
    return out + tail


def _fp8(key: str, shape: tuple[int, int], block: tuple[int, int]) -> list[Entry]:
    scale = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    return [(key, "F8_E4M3", shape), (key + "_scale_inv", "F32", scale)]


def deepseek_v3_entries(c: dict) -> list[Entry]:
    """DeepSeek-V3's keys as its Hub repository stores them: block-fp8 projections with their scales, bf16 norms,
    routers and embeddings, and after the decoder layers the multi-token-prediction layer(s) (``model.layers.61``:
    a full MoE decoder layer plus ``embed_tokens``, ``enorm``, ``hnorm``, ``eh_proj`` and ``shared_head``)."""
    block = tuple(c["quantization_config"]["weight_block_size"])
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    nope, rope, v_dim = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    q_lora, kv_lora = c["q_lora_rank"], c["kv_lora_rank"]
    experts, moe, shared = c["n_routed_experts"], c["moe_intermediate_size"], c["n_shared_experts"]
    head, tail = _ends(c)
    out = list(head)
    num_mtp = c.get("num_nextn_predict_layers", 0)
    for layer in range(c["num_hidden_layers"] + num_mtp):
        p = f"model.layers.{layer}."
        out.append((p + "input_layernorm.weight", "BF16", (hidden,)))
        out += _fp8(p + "self_attn.q_a_proj.weight", (q_lora, hidden), block)
        out.append((p + "self_attn.q_a_layernorm.weight", "BF16", (q_lora,)))
        out += _fp8(p + "self_attn.q_b_proj.weight", (heads * (nope + rope), q_lora), block)
        out += _fp8(p + "self_attn.kv_a_proj_with_mqa.weight", (kv_lora + rope, hidden), block)
        out.append((p + "self_attn.kv_a_layernorm.weight", "BF16", (kv_lora,)))
        out += _fp8(p + "self_attn.kv_b_proj.weight", (heads * (nope + v_dim), kv_lora), block)
        out += _fp8(p + "self_attn.o_proj.weight", (hidden, heads * v_dim), block)
        out.append((p + "post_attention_layernorm.weight", "BF16", (hidden,)))
        if layer < c["first_k_dense_replace"]:
            inter = c["intermediate_size"]
            out += _fp8(p + "mlp.gate_proj.weight", (inter, hidden), block)
            out += _fp8(p + "mlp.up_proj.weight", (inter, hidden), block)
            out += _fp8(p + "mlp.down_proj.weight", (hidden, inter), block)
            continue
        out.append((p + "mlp.gate.weight", "BF16", (experts, hidden)))
        out.append((p + "mlp.gate.e_score_correction_bias", "F32", (experts,)))
        for e in range(experts):
            q = f"{p}mlp.experts.{e}."
            out += _fp8(q + "gate_proj.weight", (moe, hidden), block)
            out += _fp8(q + "up_proj.weight", (moe, hidden), block)
            out += _fp8(q + "down_proj.weight", (hidden, moe), block)
        q = p + "mlp.shared_experts."
        out += _fp8(q + "gate_proj.weight", (moe * shared, hidden), block)
        out += _fp8(q + "up_proj.weight", (moe * shared, hidden), block)
        out += _fp8(q + "down_proj.weight", (hidden, moe * shared), block)
        if layer >= c["num_hidden_layers"]:  # the MTP layer's own modules
            out += [
                (p + "embed_tokens.weight", "BF16", (c["vocab_size"], hidden)),
                (p + "enorm.weight", "BF16", (hidden,)),
                (p + "hnorm.weight", "BF16", (hidden,)),
                (p + "eh_proj.weight", "BF16", (hidden, 2 * hidden)),
                (p + "shared_head.norm.weight", "BF16", (hidden,)),
                (p + "shared_head.head.weight", "BF16", (c["vocab_size"], hidden)),
            ]
    return out + tail


#: name → (config, its entries, the number of files its Hub repository has)
MODELS = {
    "llama3_70b": (LLAMA3_70B, llama_entries, 30),
    "deepseek_v3": (DEEPSEEK_V3, deepseek_v3_entries, 163),
    "qwen3_235b": (QWEN3_235B, qwen3_moe_entries, 118),
    "mixtral_8x22b": (MIXTRAL_8X22B, mixtral_entries, 59),
}


def nbytes(entry: Entry) -> int:
    _, dtype, shape = entry
    return math.prod(shape) * ITEMSIZE[dtype]


def _split(entries: list[Entry], num_files: int) -> list[list[Entry]]:
    """Consecutive runs of about equal bytes, in key order of the model (as the Hub's shards are)."""
    total = sum(nbytes(e) for e in entries)
    target = total / num_files
    files: list[list[Entry]] = [[]]
    filled = 0
    for entry in entries:
        if filled >= target * len(files) and len(files) < num_files:
            files.append([])
        files[-1].append(entry)
        filled += nbytes(entry)
    return files


def _write_sparse_file(path: Path, entries: list[Entry]) -> int:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, dtype, shape in entries:
        size = math.prod(shape) * ITEMSIZE[dtype]
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset)  # the data: a hole, read as zeros
    return 8 + len(raw) + offset


def write(root: str | os.PathLike[str], name: str, *, num_files: int | None = None) -> dict:
    """Writes model ``name`` (a key of :data:`MODELS`) as a sparse checkpoint under ``root``: config.json, one
    safetensors file per Hub shard and the index. Returns ``{"tensors", "bytes", "files"}``."""
    config, entries_of, hub_files = MODELS[name]
    entries = entries_of(config)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config, indent=2))
    files = _split(entries, num_files or hub_files)
    weight_map: dict[str, str] = {}
    total = 0
    for i, chunk in enumerate(files):
        file = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        _write_sparse_file(root / file, chunk)
        weight_map.update({key: file for key, _, _ in chunk})
        total += sum(nbytes(e) for e in chunk)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"tensors": len(entries), "bytes": total, "files": len(files)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("out")
    args = parser.parse_args(argv)
    totals = write(args.out, args.model)
    print(f"{args.model}: {totals['tensors']} tensors, {totals['bytes'] / 1e9:.1f} GB in {totals['files']} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
