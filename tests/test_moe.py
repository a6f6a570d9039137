"""Mixtral, Qwen2-MoE and Qwen3-MoE: tensor-parallel experts (every expert's gate/up colwise, down
rowwise) and expert parallelism (mode "ep": experts stacked and divided whole among the ranks, a rank
reading only its own experts' bytes); the forward from local shards equals the unsharded forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import llama_config
from models import moe_tensors
from reference import expected_shard, llama_forward, tp_llama_forward

import tp_loader
from tp_loader.demo import write_checkpoint
from tp_loader.testing import run_ranks, values


def mixtral_config(**overrides: object) -> dict:
    base = dict(
        model_type="mixtral",
        architectures=["MixtralForCausalLM"],
        intermediate_size=40,
        num_local_experts=5,
        num_experts_per_tok=2,
    )
    return llama_config(**{**base, **overrides})


def qwen2_moe_config(**overrides: object) -> dict:
    base = dict(
        model_type="qwen2_moe",
        architectures=["Qwen2MoeForCausalLM"],
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=32,
        num_hidden_layers=3,
        mlp_only_layers=[1],
    )
    return llama_config(**{**base, **overrides})


def qwen3_moe_config(**overrides: object) -> dict:
    base = dict(
        model_type="qwen3_moe",
        architectures=["Qwen3MoeForCausalLM"],
        head_dim=8,
        num_experts=5,
        num_experts_per_tok=3,
        moe_intermediate_size=20,
        norm_topk_prob=True,
        decoder_sparse_step=2,
        num_hidden_layers=2,
    )
    return llama_config(**{**base, **overrides})


def _stacked(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The experts of a checkpoint stacked per layer and weight name, as mode "ep" loads them."""
    out: dict[str, list[tuple[int, torch.Tensor]]] = {}
    rest = {}
    for key, tensor in stored.items():
        head, sep, tail = key.partition(".experts.")
        if sep:
            expert, name = tail.split(".", 1)
            out.setdefault(f"{head}.experts.{name}", []).append((int(expert), tensor))
        else:
            rest[key] = tensor
    return {
        **rest,
        **{key: torch.stack([t for _, t in sorted(pieces, key=lambda p: p[0])]) for key, pieces in out.items()},
    }


def _check_moe(rank: int, world_size: int, root: Path, config: dict, mode: str | None) -> tuple[float, int, int]:
    result = tp_loader.load(root, mode=mode)
    stored = moe_tensors(config)
    full = _stacked(stored) if mode == "ep" else stored
    assert set(result.state_dict) == set(full)
    assert result.report.clean, result.report
    expected_bytes = 0
    local = {}
    for key, tensor in full.items():
        want = expected_shard(key, tensor, config, world_size, rank)
        local[key] = result.state_dict[key].to_local()
        assert torch.equal(local[key], want), key
        expected_bytes += want.numel() * want.element_size()
    input_ids = torch.tensor([0, 5, 17, 42, 3, 99, 64, 7]) % config["vocab_size"]
    error = float(
        (tp_llama_forward(local, config, input_ids, world_size, rank) - llama_forward(stored, config, input_ids))
        .abs()
        .max()
    )
    return error, result.report.ranks[rank].bytes_planned, expected_bytes


CASES = [
    pytest.param(1, mixtral_config(), id="mixtral-world1"),
    pytest.param(2, mixtral_config(), id="mixtral-world2"),
    pytest.param(3, mixtral_config(num_key_value_heads=3, intermediate_size=41), id="mixtral-world3-uneven"),
    pytest.param(4, mixtral_config(num_key_value_heads=2, num_local_experts=4), id="mixtral-world4-kv-replicated"),
    pytest.param(1, qwen2_moe_config(), id="qwen2_moe-world1"),
    pytest.param(2, qwen2_moe_config(), id="qwen2_moe-world2-shared-expert-and-a-dense-layer"),
    pytest.param(4, qwen2_moe_config(), id="qwen2_moe-world4"),
    pytest.param(2, qwen3_moe_config(), id="qwen3_moe-world2-sparse-step-2"),
    pytest.param(
        3,
        qwen3_moe_config(num_attention_heads=6, num_key_value_heads=3, moe_intermediate_size=21),
        id="qwen3_moe-world3-uneven",
    ),
    pytest.param(4, qwen3_moe_config(num_key_value_heads=2), id="qwen3_moe-world4-kv-replicated"),
]


@pytest.mark.parametrize("mode", [None, "ep"], ids=["tp-experts", "expert-parallel"])
@pytest.mark.parametrize(("world_size", "config"), CASES)
def test_moe_shards_are_exact_and_forward_matches_the_unsharded_forward(
    tmp_path: Path, world_size: int, config: dict, mode: str | None
) -> None:
    root = write_checkpoint(tmp_path / "moe", config, moe_tensors(config), num_shards=2)
    for error, bytes_read, expected_bytes in values(run_ranks(world_size, _check_moe, root, config, mode)):
        assert error <= 1e-5
        assert bytes_read == expected_bytes


def test_expert_parallel_ranks_read_disjoint_experts_that_cover_every_expert_once(tmp_path: Path) -> None:
    from tp_loader.byteranges import slice_ranges
    from tp_loader.index import index_checkpoint
    from tp_loader.plan import make_plan
    from tp_loader.resolve import find_weights
    from tp_loader.spec import select_spec

    config = mixtral_config(num_key_value_heads=3)
    root = write_checkpoint(tmp_path / "moe", config, moe_tensors(config), num_shards=2)
    checkpoint = index_checkpoint(find_weights(root))
    spec = select_spec("auto", checkpoint.config, model="m", mode="ep")
    expert_bytes = {
        (info.file, b)
        for info in checkpoint.tensors.values()
        if ".experts." in info.key
        for b in range(info.begin, info.end, 4)
    }
    seen: list[set] = []
    for rank in range(3):
        plan = make_plan(checkpoint, spec, 3, rank, model="m")
        ranges = [r for item in plan.tensors if ".experts." in item.key for r in slice_ranges(item)]
        seen.append({(r.file, b) for r in ranges for b in range(r.offset, r.end, 4)})
    assert all(not (seen[a] & seen[b]) for a in range(3) for b in range(a + 1, 3))
    assert set().union(*seen) == expert_bytes
    assert [len(s) * 4 for s in seen] == [2 * 2 * 3 * 40 * 48 * 4, 2 * 2 * 3 * 40 * 48 * 4, 2 * 1 * 3 * 40 * 48 * 4]


def test_unknown_mode_names_the_plans_modes(tmp_path: Path) -> None:
    config = mixtral_config(num_hidden_layers=1)
    root = write_checkpoint(tmp_path / "moe", config, moe_tensors(config))
    with pytest.raises(tp_loader.PlanError, match=r"plan 'mixtral' has no mode 'pp'; its modes: ep"):
        tp_loader.load(root, mode="pp")
