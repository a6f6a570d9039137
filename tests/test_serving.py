"""Serving from the shards: a transformers model built on ``meta`` is made tensor-parallel by
``tp_loader.parallelize``, filled by ``tp_loader.load_into`` from a ``save_pretrained`` checkpoint, and
then generates exactly what the single-process model generates; reloads rewrite it in place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import tp_loader
from tp_loader.testing import run_ranks, values

transformers = pytest.importorskip("transformers", reason="the models under test are transformers'")

LLAMA = {
    "hidden_size": 64,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "vocab_size": 96,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
}
QWEN2 = {**LLAMA, "tie_word_embeddings": True}
PROMPT = torch.tensor([[5, 17, 33, 2, 71, 9]])
NEW_TOKENS = 16


def _save(root: Path, config_class: type, model_class: type, config: dict, seed: int) -> Path:
    torch.manual_seed(seed)
    model_class(config_class(**config)).eval().save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("serving")
    return {
        "llama": _save(base / "llama", transformers.LlamaConfig, transformers.LlamaForCausalLM, LLAMA, 0),
        "llama_b": _save(base / "llama_b", transformers.LlamaConfig, transformers.LlamaForCausalLM, LLAMA, 1),
        "qwen2": _save(base / "qwen2", transformers.Qwen2Config, transformers.Qwen2ForCausalLM, QWEN2, 2),
    }


def _reference(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32).eval()
    return _run(model)


def _run(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(PROMPT).logits
        tokens = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return logits, tokens


def _tp_model(root: Path, world_size: int) -> torch.nn.Module:
    """The model built on meta, parallelized, loaded into; the rotary buffers (not in the checkpoint,
    computed from the config) are made again on the CPU."""
    config = transformers.AutoConfig.from_pretrained(root)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    mesh = init_device_mesh("cpu", (world_size,))
    tp_loader.parallelize(model, mesh=mesh)
    report = tp_loader.load_into(model, root, mesh=mesh)
    assert report.missing_keys == () and report.unexpected_keys == ()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model


def _generate_tp(rank: int, world_size: int, root: Path, want_logits: torch.Tensor, want_tokens: torch.Tensor) -> int:
    model = _tp_model(root, world_size)
    logits, tokens = _run(model)
    assert torch.equal(tokens, want_tokens), (tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-4)
    return sum(isinstance(p, DTensor) and p.placements[0].is_shard() for p in model.parameters())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_a_meta_model_parallelized_and_loaded_into_generates_what_transformers_generates(
    checkpoints: dict[str, Path], family: str, world_size: int
) -> None:
    """llama: 2 KV heads, so at world size 4 each KV head is shared by two ranks; qwen2: tied embeddings."""
    root = checkpoints[family]
    want_logits, want_tokens = _reference(root)
    sharded = values(run_ranks(world_size, _generate_tp, root, want_logits, want_tokens, timeout=240))
    # per layer q, k, v, o, gate, up, down (+ q, k, v biases in qwen2), then the embeddings and lm_head
    # (one parameter when tied)
    layers = LLAMA["num_hidden_layers"]
    assert sharded == [{"llama": 7 * layers + 2, "qwen2": 10 * layers + 1}[family]] * world_size
