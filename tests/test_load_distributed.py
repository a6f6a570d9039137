"""Loading on 1–4 gloo ranks: exact shards, exact full tensors, exact byte counts, forward parity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import llama_config
from reference import expected_shard, llama_forward, tp_llama_forward
from safetensors.torch import load_file

import tp_loader
from tp_loader.testing import run_ranks, values


def _stored(root: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(root.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def _check_shards(rank: int, world_size: int, root: Path, config: dict, dtype: torch.dtype | None) -> dict:
    result = tp_loader.load(root, dtype=dtype)
    stored = _stored(root)
    kv = config["num_key_value_heads"]
    expected_bytes = 0
    for key in sorted(stored):
        tensor = stored[key]
        shard = expected_shard(key, tensor, config, world_size, rank)
        expected_bytes += shard.numel() * tensor.element_size()
        loaded = result.state_dict[key]
        local = loaded.to_local()
        want = shard.to(dtype) if dtype is not None else shard
        assert local.dtype == want.dtype, key
        assert local.is_contiguous(), key
        assert torch.equal(local, want), f"rank {rank}: local shard of {key} differs"
        full = loaded.full_tensor()
        replicated_kv = kv < world_size and ("k_proj" in key or "v_proj" in key)
        want_full = tensor
        if replicated_kv:
            head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
            heads = tensor.view(kv, head_dim, *tensor.shape[1:])
            want_full = heads.repeat_interleave(world_size // kv, 0).reshape(world_size * head_dim, *tensor.shape[1:])
        if dtype is not None:
            want_full = want_full.to(dtype)
        assert torch.equal(full, want_full), f"rank {rank}: full_tensor of {key} differs"
    assert result.report.ranks[rank].bytes_read == expected_bytes
    return {"report": result.report, "bytes": expected_bytes}


F32, BF16 = torch.float32, torch.bfloat16
SHARD_CASES = [
    pytest.param(1, llama_config(), 1, F32, None, id="world1-single-file-fp32"),
    pytest.param(2, llama_config(), 3, F32, None, id="world2-sharded-fp32"),
    pytest.param(3, llama_config(num_key_value_heads=6), 1, F32, None, id="world3-uneven-vocab-and-mlp"),
    pytest.param(4, llama_config(num_key_value_heads=2), 2, F32, None, id="world4-kv-heads-replicated"),
    pytest.param(2, llama_config(), 2, BF16, None, id="world2-bf16-checkpoint"),
    pytest.param(2, llama_config(), 1, BF16, F32, id="world2-bf16-loaded-as-fp32"),
    pytest.param(
        4,
        llama_config(
            model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], head_dim=8, tie_word_embeddings=True
        ),
        2,
        F32,
        None,
        id="world4-gemma3",
    ),
]


@pytest.mark.parametrize(("world_size", "config", "num_shards", "stored_dtype", "load_dtype"), SHARD_CASES)
def test_every_local_shard_equals_its_tensor_parallel_slice_bitwise(
    make_checkpoint, world_size, config, num_shards, stored_dtype, load_dtype
) -> None:
    root = make_checkpoint(config, num_shards=num_shards, dtype=stored_dtype)
    outcomes = values(run_ranks(world_size, _check_shards, root, config, load_dtype))
    reports = [o["report"] for o in outcomes]
    assert all(r == reports[0] for r in reports), "ranks returned different reports"
    assert [r.bytes_read for r in reports[0].ranks] == [o["bytes"] for o in outcomes]
    assert reports[0].clean


def _forward_error(rank: int, world_size: int, root: Path, config: dict) -> float:
    result = tp_loader.load(root)
    local = {k: v.to_local() for k, v in result.state_dict.items()}
    input_ids = torch.tensor([0, 5, config["vocab_size"] - 1, 17, 42, 3, 99, 64]) % config["vocab_size"]
    tp_logits = tp_llama_forward(local, config, input_ids, world_size, rank)
    reference = llama_forward(_stored(root), config, input_ids)
    return float((tp_logits - reference).abs().max())


GEMMA2 = llama_config(
    model_type="gemma2",
    architectures=["Gemma2ForCausalLM"],
    head_dim=8,
    tie_word_embeddings=True,
    query_pre_attn_scalar=8,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
)
GEMMA3 = llama_config(
    model_type="gemma3_text",
    architectures=["Gemma3ForCausalLM"],
    head_dim=8,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    query_pre_attn_scalar=8,
)

FORWARD_CASES = [
    pytest.param(2, llama_config(), id="gqa-12q-4kv-world2"),
    pytest.param(4, llama_config(num_key_value_heads=2), id="kv-heads-fewer-than-ranks-world4"),
    pytest.param(
        3, llama_config(num_key_value_heads=3, tie_word_embeddings=True), id="tied-embeddings-uneven-vocab-world3"
    ),
    pytest.param(4, llama_config(vocab_size=10), id="vocab-10-over-4-ranks"),
    pytest.param(2, llama_config(model_type="qwen2", architectures=["Qwen2ForCausalLM"]), id="qwen2-qkv-biases-world2"),
    pytest.param(
        4,
        llama_config(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=8, tie_word_embeddings=True),
        id="qwen3-qk-norm-explicit-head-dim-world4",
    ),
    pytest.param(
        2,
        llama_config(model_type="mistral", architectures=["MistralForCausalLM"], num_key_value_heads=1),
        id="mistral-mqa-world2",
    ),
    pytest.param(2, GEMMA2, id="gemma2-explicit-head-dim-softcaps-tied-world2"),
    pytest.param(4, GEMMA3, id="gemma3-qk-norm-kv-replicated-tied-world4"),
]


@pytest.mark.parametrize(("world_size", "config"), FORWARD_CASES)
def test_tensor_parallel_forward_matches_unsharded_forward(make_checkpoint, world_size, config) -> None:
    root = make_checkpoint(config)
    errors = values(run_ranks(world_size, _forward_error, root, config))
    assert max(errors) <= 1e-5, errors


def _tied_identity(rank: int, world_size: int, root: Path) -> tuple:
    result = tp_loader.load(root)
    sd = result.state_dict
    return sd["lm_head.weight"] is sd["model.embed_tokens.weight"], result.report.ties


def test_tied_target_is_the_same_tensor_object_as_its_source_on_every_rank(make_checkpoint) -> None:
    root = make_checkpoint(llama_config(tie_word_embeddings=True))
    outcomes = values(run_ranks(2, _tied_identity, root))
    assert [same for same, _ in outcomes] == [True, True]
    (tie,) = outcomes[0][1]
    assert (tie.source, tie.target, tie.stored, tie.identical) == (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "source",
        None,
    )


def test_tied_pair_stored_twice_with_different_values_is_reported_on_every_rank(make_checkpoint) -> None:
    config = llama_config(tie_word_embeddings=True)
    different = torch.ones(config["vocab_size"], config["hidden_size"])
    root = make_checkpoint(config, extra={"lm_head.weight": different})
    outcomes = values(run_ranks(2, _tied_identity, root))
    for same, ties in outcomes:
        assert same
        assert [(t.stored, t.identical) for t in ties] == [("both", False)]


def _tie_with_rank1_deciding_differently(rank: int, world_size: int, root: Path) -> tuple:
    import dataclasses

    import tp_loader.loader
    from tp_loader.plan import TieDecision

    if rank == 1:
        real = tp_loader.loader.plan_rank

        def disagreeing(*args, **kwargs):
            plan = real(*args, **kwargs)
            return dataclasses.replace(plan, ties=tuple(TieDecision(t.source, t.target, "neither") for t in plan.ties))

        tp_loader.loader.plan_rank = disagreeing
    result = tp_loader.load(root)
    return result.report.ties, result.state_dict["lm_head.weight"] is result.state_dict["model.embed_tokens.weight"]


def test_every_rank_applies_rank_0s_tie_decisions(make_checkpoint) -> None:
    root = make_checkpoint(llama_config(tie_word_embeddings=True))
    outcomes = values(run_ranks(2, _tie_with_rank1_deciding_differently, root))
    assert outcomes[0] == outcomes[1]
    assert [t.stored for t in outcomes[1][0]] == ["source"] and outcomes[1][1]


def _placed_like_from_local(rank: int, world_size: int, root: Path) -> int:
    from torch.distributed.tensor import DTensor

    result = tp_loader.load(root)
    for key, tensor in result.state_dict.items():
        local = tensor.to_local()
        reference = DTensor.from_local(
            local, result.mesh, tensor.placements, run_check=False, shape=tensor.shape, stride=tensor.stride()
        )
        assert (tensor.placements, tensor.shape, tensor.stride(), tensor.dtype) == (
            reference.placements,
            reference.shape,
            reference.stride(),
            reference.dtype,
        ), key
        assert tensor.shape == torch.Size(tensor.full_tensor().shape), key
        assert not tensor.requires_grad
    return len(result.state_dict)


def test_placed_dtensors_carry_the_metadata_from_local_would_give_them(make_checkpoint) -> None:
    root = make_checkpoint(llama_config(num_key_value_heads=2, vocab_size=101))
    assert values(run_ranks(4, _placed_like_from_local, root)) == [3 + 2 * 9] * 4  # embed, norm, lm_head; 9 per layer
