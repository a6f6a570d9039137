"""BERT: an encoder's hidden states from each rank's local shards (explicit collectives) equal the
unsharded encoder's, and every shard is exactly its tensor-parallel slice."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from reference import chunk_piece
from safetensors.torch import load_file

import tp_loader
from tp_loader.demo import write_checkpoint
from tp_loader.testing import run_ranks, values

BERT = {
    "model_type": "bert",
    "architectures": ["BertForMaskedLM"],
    "hidden_size": 48,
    "num_attention_heads": 12,
    "intermediate_size": 100,
    "num_hidden_layers": 2,
    "vocab_size": 101,
    "max_position_embeddings": 16,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
}


def bert_tensors(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]

    def rand(*shape: int, scale: float = 0.5 / math.sqrt(hidden)) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    out = {
        "bert.embeddings.word_embeddings.weight": rand(config["vocab_size"], hidden, scale=0.1),
        "bert.embeddings.position_embeddings.weight": rand(config["max_position_embeddings"], hidden, scale=0.1),
        "bert.embeddings.token_type_embeddings.weight": rand(config["type_vocab_size"], hidden, scale=0.1),
        "bert.embeddings.LayerNorm.weight": 1 + rand(hidden, scale=0.1),
        "bert.embeddings.LayerNorm.bias": rand(hidden, scale=0.1),
    }
    for layer in range(config["num_hidden_layers"]):
        p = f"bert.encoder.layer.{layer}."
        for name in ("query", "key", "value"):
            out[f"{p}attention.self.{name}.weight"] = rand(hidden, hidden)
            out[f"{p}attention.self.{name}.bias"] = rand(hidden, scale=0.1)
        out[p + "attention.output.dense.weight"] = rand(hidden, hidden)
        out[p + "attention.output.dense.bias"] = rand(hidden, scale=0.1)
        out[p + "intermediate.dense.weight"] = rand(inter, hidden)
        out[p + "intermediate.dense.bias"] = rand(inter, scale=0.1)
        out[p + "output.dense.weight"] = rand(hidden, inter, scale=0.5 / math.sqrt(inter))
        out[p + "output.dense.bias"] = rand(hidden, scale=0.1)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            out[f"{p}{norm}.weight"] = 1 + rand(hidden, scale=0.1)
            out[f"{p}{norm}.bias"] = rand(hidden, scale=0.1)
    return out


def encode(
    w: dict, config: dict, input_ids: torch.Tensor, token_types: torch.Tensor, reduce=lambda t: t, embed=None
) -> torch.Tensor:
    """BERT encoder hidden states [seq, hidden]; ``reduce`` all-reduces row-parallel products, ``embed``
    looks up (possibly vocab-parallel) word embeddings."""
    hidden, eps = config["hidden_size"], config["layer_norm_eps"]
    head_dim = hidden // config["num_attention_heads"]

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, (hidden,), w[name + ".weight"], w[name + ".bias"], eps)

    words = embed(input_ids) if embed else w["bert.embeddings.word_embeddings.weight"][input_ids]
    x = (
        words
        + w["bert.embeddings.position_embeddings.weight"][: len(input_ids)]
        + w["bert.embeddings.token_type_embeddings.weight"][token_types]
    )
    x = norm(x, "bert.embeddings.LayerNorm")
    for layer in range(config["num_hidden_layers"]):
        p = f"bert.encoder.layer.{layer}."
        q, k, v = (
            (x @ w[f"{p}attention.self.{n}.weight"].T + w[f"{p}attention.self.{n}.bias"])
            .view(len(input_ids), -1, head_dim)
            .transpose(0, 1)
            for n in ("query", "key", "value")
        )
        attn = (
            ((q @ k.transpose(-1, -2) / math.sqrt(head_dim)).softmax(-1) @ v)
            .transpose(0, 1)
            .reshape(len(input_ids), -1)
        )
        x = norm(
            x + reduce(attn @ w[p + "attention.output.dense.weight"].T) + w[p + "attention.output.dense.bias"],
            p + "attention.output.LayerNorm",
        )
        h = torch.nn.functional.gelu(x @ w[p + "intermediate.dense.weight"].T + w[p + "intermediate.dense.bias"])
        x = norm(x + reduce(h @ w[p + "output.dense.weight"].T) + w[p + "output.dense.bias"], p + "output.LayerNorm")
    return x


def _expected(key: str, tensor: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    if key.endswith("word_embeddings.weight") or ".attention.self." in key or ".intermediate.dense." in key:
        return chunk_piece(tensor, world_size, rank, 0)
    if key.endswith(("attention.output.dense.weight", ".output.dense.weight")):
        return chunk_piece(tensor, world_size, rank, 1)
    return tensor


def _encode_on_ranks(rank: int, world_size: int, root: Path) -> tuple[float, bool]:
    result = tp_loader.load(root)
    stored = load_file(str(root / "model.safetensors"))
    local = {k: v.to_local() for k, v in result.state_dict.items()}
    exact = all(torch.equal(local[k], _expected(k, t, world_size, rank)) for k, t in stored.items())

    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        dist.all_reduce(t)
        return t

    table = local["bert.embeddings.word_embeddings.weight"]
    start = min(rank * math.ceil(BERT["vocab_size"] / world_size), BERT["vocab_size"])

    def embed(ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= start) & (ids < start + table.shape[0])
        rows = (
            table[(ids - start).clamp(0, max(table.shape[0] - 1, 0))]
            if table.shape[0]
            else torch.zeros(len(ids), BERT["hidden_size"])
        )
        return reduce(rows * mine.unsqueeze(-1))

    ids = torch.tensor([1, 7, 100, 42, 0, 55, 13, 99])
    types = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    error = (encode(local, BERT, ids, types, reduce, embed) - encode(stored, BERT, ids, types)).abs().max()
    return float(error), exact


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_bert_encoder_hidden_states_from_shards_match_the_unsharded_encoder(tmp_path: Path, world_size: int) -> None:
    root = write_checkpoint(tmp_path / "bert", BERT, bert_tensors(BERT))
    for error, exact in values(run_ranks(world_size, _encode_on_ranks, root)):
        assert exact, "a shard differs from its tensor-parallel slice"
        assert error <= 1e-5
