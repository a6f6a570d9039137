"""Loading on 1–4 gloo ranks: exact shards, exact full tensors, exact byte counts, forward parity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import llama_config
from reference import expected_shard, llama_forward, tp_llama_forward
from safetensors.torch import load_file
from torch.distributed.tensor import Shard

import tp_loader
import tp_loader.loader
from tp_loader.demo import llama_tensors, write_checkpoint
from tp_loader.testing import run_ranks, same_error, values


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
        # zero-copy by default on CPU: a column shard is a strided view of the mapping, the rest contiguous
        assert local.is_contiguous() or (dtype is None and loaded.placements[0] == Shard(1)), key
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
    mine = result.report.ranks[rank]
    assert mine.bytes_planned == expected_bytes
    # zero-copy (the default on CPU) maps every slice unless a dtype conversion copies it
    assert (mine.bytes_read, mine.bytes_mapped) == ((0, expected_bytes) if dtype is None else (expected_bytes, 0))
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
    assert [r.bytes_planned for r in reports[0].ranks] == [o["bytes"] for o in outcomes]
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
        assert not same  # each keeps its own values (tests/test_ties_stored_twice.py)
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


def _expected_placement(key: str, shape: tuple[int, ...], config: dict, world_size: int) -> tuple:
    """The placement and global shape the llama plan implies for ``key``, from its name: vocab and
    colwise projections ``Shard(0)``, rowwise ``Shard(1)``, norms ``Replicate()``; KV projections with
    fewer heads than ranks hold each head ``world // kv`` times."""
    from torch.distributed.tensor import Replicate, Shard

    kv = config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if key.endswith(("k_proj.weight", "v_proj.weight")) and kv < world_size:
        return Shard(0), (world_size * head_dim, *shape[1:])
    colwise = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")
    if key.endswith(("embed_tokens.weight", "lm_head.weight", *colwise)):
        return Shard(0), shape
    if key.endswith(("o_proj.weight", "down_proj.weight")):
        return Shard(1), shape
    assert key.endswith("norm.weight"), key
    return Replicate(), shape


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(torch.empty(shape).stride())


def _placed_like_from_local(rank: int, world_size: int, root: Path, config: dict) -> int:
    from torch.distributed.tensor import DTensor

    result = tp_loader.load(root)
    stored = _stored(root)
    for key, tensor in result.state_dict.items():
        placement, shape = _expected_placement(key, tuple(stored[key].shape), config, world_size)
        local = tensor.to_local()
        reference = DTensor.from_local(
            local, result.mesh, [placement], run_check=False, shape=torch.Size(shape), stride=_contiguous_stride(shape)
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


def test_placed_dtensors_carry_the_placement_shape_and_stride_the_plan_implies(make_checkpoint) -> None:
    """Every DTensor equals ``DTensor.from_local`` of its shard with the placement and global shape
    the test derives from the key (KV heads replicated 2x at world 4) and a contiguous global stride."""
    config = llama_config(num_key_value_heads=2, vocab_size=101)
    root = make_checkpoint(config)
    assert values(run_ranks(4, _placed_like_from_local, root, config)) == [3 + 2 * 9] * 4  # embed, norm, lm_head


def _tie_from_target(rank: int, world_size: int, root: Path) -> tuple:
    from torch.distributed.tensor import Shard

    result = tp_loader.load(root)
    embed, head = result.state_dict["model.embed_tokens.weight"], result.state_dict["lm_head.weight"]
    stored_head = _stored(root)["lm_head.weight"]
    holds_head_shard = torch.equal(embed.to_local(), torch.chunk(stored_head, world_size, 0)[rank])
    return embed is head, holds_head_shard, embed.placements == (Shard(0),), result.report


def test_tie_whose_target_alone_is_stored_maps_the_source_to_the_targets_shard_on_every_rank(tmp_path: Path) -> None:
    """A tied llama checkpoint that stores lm_head.weight but not model.embed_tokens.weight: both keys
    are one object holding lm_head's shard, the tie is reported stored "target", nothing is missing."""
    config = llama_config(tie_word_embeddings=True)
    tensors = llama_tensors(config)
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    root = write_checkpoint(tmp_path / "tied", config, tensors)
    for same, holds_head_shard, sharded_rows, report in values(run_ranks(2, _tie_from_target, root)):
        assert (same, holds_head_shard, sharded_rows) == (True, True, True)
        assert [(t.source, t.target, t.stored, t.identical) for t in report.ties] == [
            ("model.embed_tokens.weight", "lm_head.weight", "target", None)
        ]
        assert report.missing_keys == ()
        assert report.clean


def _strict_load_that_must_not_read(rank: int, world_size: int, root: Path) -> object:
    import tp_loader.loader

    def no_reads(*args, **kwargs):
        raise AssertionError("strict load read tensor data before refusing")

    tp_loader.loader.read_tensors = no_reads
    return tp_loader.load(root, strict=True).report


def test_strict_load_with_only_an_unexpected_key_is_refused_on_every_rank_before_reading(make_checkpoint) -> None:
    root = make_checkpoint(extra={"extra.weight": torch.zeros(3)})
    error = same_error(run_ranks(2, _strict_load_that_must_not_read, root))
    assert error.type == "StrictLoadError"
    assert error.wire["message"] == f"strict load of {root} refused: 1 unexpected: extra.weight"
    assert error.wire["hint"] == "Fix the checkpoint or the plan, or load with strict=False to see the full report"


def _count_rounds(rank: int, world_size: int, model: object) -> list[str]:
    import tp_loader.dist

    stages: list[str] = []
    real = tp_loader.dist.agree

    def counting(ctx, error, payload=None, *, stage=""):
        stages.append(stage)
        return real(ctx, error, payload, stage=stage)

    tp_loader.dist.agree = counting
    tp_loader.load(model)
    return stages


def test_a_local_directory_loads_in_three_rounds_and_a_fetched_model_adds_two(make_checkpoint, tmp_path) -> None:
    """Every collective round costs a gather on every rank: a directory all ranks see needs no fetch round, the
    destinations are checked in the plan round and the read's outcome is agreed with the report's figures."""
    root = make_checkpoint()
    assert values(run_ranks(2, _count_rounds, root)) == [["arguments", "plan", "read"]] * 2
    demo = values(run_ranks(2, _count_rounds, None, env={"TP_LOADER_DEMO_DIR": str(tmp_path / "demo")}))
    assert demo == [["arguments", "fetch", "resolve", "plan", "read"]] * 2
