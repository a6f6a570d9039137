"""GPT-OSS as transformers' ``save_pretrained`` writes it (bf16 layout, here in float32): attention with
biases and one sink logit per query head, a replicated router, and fused biased experts
``gate_up_proj [experts, hidden, 2 x intermediate]`` (gate and up interleaved along the last dim),
``down_proj [experts, intermediate, hidden]``.

- Every rank holds exactly its slice (world sizes 1, 2 and 4): the sinks with its query heads, every
  expert's gate/up columns as whole pairs (its gate and up of the same features), the matching
  down_proj rows, the down bias and the router whole; the keys are clean and each rank reads only
  its slices' bytes.
- The model built on meta, parallelized and loaded into gives transformers' logits and greedy tokens
  at world sizes 2 and 4 (2 KV heads, so shared by two ranks at 4); the down bias counts once.
- An intermediate size that the world size does not divide (a pair would be cut) is refused before
  any I/O.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from reference import chunk_piece, expected_shard
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import tp_loader
from tp_loader.testing import run_ranks, values

transformers = pytest.importorskip("transformers", reason="checkpoints are written by transformers' save_pretrained")
accelerate = pytest.importorskip("accelerate", reason="init_empty_weights builds the model without memory")

GPT_OSS = {
    "hidden_size": 64,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "vocab_size": 96,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "sliding_window": 4,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
}
PROMPT = torch.tensor([[5, 17, 33, 2, 71, 9]])
NEW_TOKENS = 12


def _save(root: Path, config: dict, seed: int) -> Path:
    """A checkpoint whose every parameter is random: transformers initializes the biases to zero and the
    norms to one, which would let a bias added once per rank go unseen."""
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**config)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3 if param.dim() > 1 else 0.5)
    model.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = _save(tmp_path_factory.mktemp("gpt_oss"), GPT_OSS, 0)
    stored = load_file(str(root / "model.safetensors"))
    assert tuple(stored["model.layers.0.mlp.experts.gate_up_proj"].shape) == (4, 64, 96), "transformers changed"
    return root


def _expected(key: str, tensor: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    """The slice rank ``rank`` must hold, from torch.chunk and the head layout (vLLM's GPT-OSS layout)."""
    if key.endswith("self_attn.sinks"):
        return chunk_piece(tensor, world_size, rank, 0)
    if key.endswith("mlp.experts.gate_up_proj"):
        return chunk_piece(tensor, world_size, rank, 2)
    if key.endswith(("mlp.experts.gate_up_proj_bias", "mlp.experts.down_proj")):
        return chunk_piece(tensor, world_size, rank, 1)
    if re.search(r"mlp\.(router|experts)\.", key):
        return tensor  # the router, and down_proj_bias (added once, after the reduction)
    return expected_shard(key, tensor, GPT_OSS, world_size, rank)


def _shards_on_ranks(rank: int, world_size: int, root: Path) -> tuple:
    result = tp_loader.load(root)
    local = {key: t.to_local() if isinstance(t, DTensor) else t for key, t in result.state_dict.items()}
    stored = load_file(str(root / "model.safetensors"))
    differ = [k for k, t in stored.items() if not torch.equal(local[k], _expected(k, t, world_size, rank))]
    slice_bytes = sum(_expected(k, t, world_size, rank).nbytes for k, t in stored.items())
    # the pairs stay whole: this rank's gate and up columns are the gate and up of the same features
    per_rank = GPT_OSS["intermediate_size"] // world_size
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    fused, shard = stored["model.layers.1.mlp.experts.gate_up_proj"], local["model.layers.1.mlp.experts.gate_up_proj"]
    pairs = torch.equal(shard[..., 0::2], fused[..., 0::2][..., mine]) and torch.equal(
        shard[..., 1::2], fused[..., 1::2][..., mine]
    )
    return result.report, set(local) == set(stored), differ, slice_bytes, pairs


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_gpt_oss_shards_are_its_query_heads_sinks_and_whole_gate_up_pairs_of_every_expert(
    gpt_oss: Path, world_size: int
) -> None:
    for rank, (report, same_keys, differ, slice_bytes, pairs) in enumerate(
        values(run_ranks(world_size, _shards_on_ranks, gpt_oss))
    ):
        assert report.clean, report.format_table(full=True)
        assert (report.plan, report.prefix, report.groups) == ("gpt_oss", "model.", ("causal_lm",))
        assert same_keys
        assert differ == [], f"rank {rank}: shards differ from their tensor-parallel slices"
        assert report.ranks[rank].bytes_planned == slice_bytes
        assert pairs, f"rank {rank}: a gate/up pair was split"


def _run(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(PROMPT).logits
        tokens = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return logits, tokens


def _generate_tp(rank: int, world_size: int, root: Path, want_logits: torch.Tensor, want_tokens: torch.Tensor) -> int:
    config = transformers.AutoConfig.from_pretrained(root)
    with accelerate.init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    mesh = init_device_mesh("cpu", (world_size,))
    tp_loader.parallelize(model, mesh=mesh)
    report = tp_loader.load_into(model, root, mesh=mesh)
    assert report.missing_keys == () and report.unexpected_keys == ()
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    logits, tokens = _run(model)
    assert torch.equal(tokens, want_tokens), (tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-4)
    return sum(isinstance(p, DTensor) and p.placements[0].is_shard() for p in model.parameters())


@pytest.mark.parametrize("world_size", [2, 4])
def test_gpt_oss_parallelized_and_loaded_into_generates_what_transformers_generates(
    gpt_oss: Path, world_size: int
) -> None:
    """Sharded per layer: q, k, v (weights and biases), o, the sinks, the experts' gate_up_proj, its
    bias and down_proj; then the embeddings and the LM head."""
    reference = transformers.AutoModelForCausalLM.from_pretrained(gpt_oss, dtype=torch.float32).eval()
    want_logits, want_tokens = _run(reference)
    sharded = values(run_ranks(world_size, _generate_tp, gpt_oss, want_logits, want_tokens, timeout=240))
    assert sharded == [11 * GPT_OSS["num_hidden_layers"] + 2] * world_size


def test_an_intermediate_size_the_world_size_does_not_divide_is_refused_before_any_io(tmp_path: Path) -> None:
    """28 features over 8 ranks would cut a gate/up pair (3.5 pairs per rank)."""
    root = _save(tmp_path, {**GPT_OSS, "intermediate_size": 28}, 1)
    with pytest.raises(tp_loader.ShardingError) as raised:
        tp_loader.plan_load(root, world_size=8)
    assert str(raised.value) == (
        f"model {root} (28 gate_up heads, 2 kv heads, 8 q heads, 8 sinks heads) cannot be sharded over 8 ranks. "
        "World sizes that work: 1, 2, 4"
    )
