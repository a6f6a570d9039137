"""GPT-2: Conv1D weights are stored transposed ([in, out]), so colwise shards dim 1 and rowwise dim 0;
the fused c_attn is packed along dim 1 (a rank's columns are its q, k and v heads); lm_head is wte."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from models import gpt2_tensors
from reference import all_reduce, chunk_piece, gather_vocab, vocab_parallel_embed

import tp_loader
from tp_loader.demo import write_checkpoint
from tp_loader.testing import run_ranks, values

CONFIG = {
    "model_type": "gpt2",
    "architectures": ["GPT2LMHeadModel"],
    "n_embd": 48,
    "n_head": 12,
    "n_layer": 2,
    "n_positions": 16,
    "vocab_size": 101,
    "layer_norm_epsilon": 1e-5,
}


def expected_gpt2_shard(key: str, tensor: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    """The slice a rank must hold, from torch.chunk: c_attn per q/k/v part along the output dim."""
    if key.endswith("c_attn.weight") or key.endswith("c_attn.bias"):
        dim = tensor.dim() - 1
        return torch.cat([chunk_piece(part, world_size, rank, dim) for part in tensor.chunk(3, dim)], dim)
    if key.endswith("mlp.c_fc.weight"):
        return chunk_piece(tensor, world_size, rank, 1)
    if key.endswith(("mlp.c_fc.bias", "wte.weight", "lm_head.weight")):
        return chunk_piece(tensor, world_size, rank, 0)
    if key.endswith("c_proj.weight"):
        return chunk_piece(tensor, world_size, rank, 0)
    return tensor


def _layer_norm(x: torch.Tensor, w: dict, name: str) -> torch.Tensor:
    return torch.nn.functional.layer_norm(
        x, x.shape[-1:], w[name + ".weight"], w[name + ".bias"], CONFIG["layer_norm_epsilon"]
    )


def gpt2_hidden(x: torch.Tensor, w: dict, reduce) -> torch.Tensor:
    """The transformer blocks and final norm on embeddings ``x``; shards give local q/k/v heads and
    partial row-parallel products that ``reduce`` sums (biases added after the reduction)."""
    seq = x.shape[0]
    head_dim = CONFIG["n_embd"] // CONFIG["n_head"]
    mask = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    for layer in range(CONFIG["n_layer"]):
        p = f"transformer.h.{layer}."
        h = _layer_norm(x, w, p + "ln_1")
        q, k, v = (
            t.reshape(seq, -1, head_dim).transpose(0, 1)
            for t in (h @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]).chunk(3, -1)
        )
        scores = (q @ k.transpose(-1, -2) / math.sqrt(head_dim)).masked_fill(mask, float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(0, 1).reshape(seq, -1)
        x = x + reduce(attn @ w[p + "attn.c_proj.weight"]) + w[p + "attn.c_proj.bias"]
        h = _layer_norm(x, w, p + "ln_2")
        inner = torch.nn.functional.gelu(h @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"], approximate="tanh")
        x = x + reduce(inner @ w[p + "mlp.c_proj.weight"]) + w[p + "mlp.c_proj.bias"]
    return _layer_norm(x, w, "transformer.ln_f")


def gpt2_forward(w: dict, input_ids: torch.Tensor) -> torch.Tensor:
    x = w["transformer.wte.weight"][input_ids] + w["transformer.wpe.weight"][: len(input_ids)]
    return gpt2_hidden(x, w, lambda t: t) @ w["transformer.wte.weight"].T


def _check_gpt2(rank: int, world_size: int, root: Path, prefix: str) -> tuple[float, int, int, bool]:
    result = tp_loader.load(root)
    assert result.report.prefix == prefix
    assert set(result.state_dict) == {prefix + k.removeprefix("transformer.") for k in gpt2_tensors(CONFIG)} | {
        "lm_head.weight"
    }, "keys come back as the checkpoint stores them"
    assert result.state_dict["lm_head.weight"] is result.state_dict[prefix + "wte.weight"]
    stored = {k.removeprefix("transformer."): v for k, v in gpt2_tensors(CONFIG).items()}
    full = {"transformer." + k: v for k, v in stored.items()}
    local = {
        (k if k == "lm_head.weight" else "transformer." + k.removeprefix(prefix)): v.to_local()
        for k, v in result.state_dict.items()
    }
    expected_bytes = 0
    for key, tensor in full.items():
        want = expected_gpt2_shard(key, tensor, world_size, rank)
        assert torch.equal(local[key], want), key
        expected_bytes += want.numel() * want.element_size()
    input_ids = torch.tensor([0, 5, 17, 42, 3, 99, 64, 7])
    x = (
        vocab_parallel_embed(local["transformer.wte.weight"], input_ids, CONFIG["vocab_size"], world_size, rank)
        + local["transformer.wpe.weight"][: len(input_ids)]
    )
    logits = gather_vocab(
        gpt2_hidden(x, local, all_reduce) @ local["lm_head.weight"].T, CONFIG["vocab_size"], world_size
    )
    error = float((logits - gpt2_forward(full, input_ids)).abs().max())
    return error, result.report.ranks[rank].bytes_planned, expected_bytes, result.report.clean


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("prefix", ["transformer.", ""], ids=["prefixed", "original-unprefixed-keys"])
def test_gpt2_transposed_shards_are_exact_and_forward_matches_the_unsharded_forward(
    tmp_path: Path, world_size: int, prefix: str
) -> None:
    root = write_checkpoint(tmp_path / "gpt2", CONFIG, gpt2_tensors(CONFIG, prefix=prefix))
    for error, bytes_read, expected_bytes, clean in values(run_ranks(world_size, _check_gpt2, root, prefix)):
        assert error <= 1e-5
        assert bytes_read == expected_bytes
        assert clean
