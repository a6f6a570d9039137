"""Fitting a plan to the checkpoint as saved: the prefix its keys use, the task heads it has, and the
config names transformers stores under aliases. Pure functions, no I/O."""

from __future__ import annotations

import time

import pytest

from tp_loader.aliases import with_aliases
from tp_loader.errors import CheckpointError
from tp_loader.prefix import detect_prefix, present_groups, with_prefix
from tp_loader.spec import builtin_plan_paths, config_values, evaluate, load_spec


def plan(name: str):
    return load_spec(builtin_plan_paths()[name])


LLAMA_BASE = ["embed_tokens.weight", "norm.weight", "layers.0.mlp.up_proj.weight", "layers.0.self_attn.q_proj.weight"]


@pytest.mark.parametrize(
    ("keys", "prefix"),
    [
        (["model." + k for k in LLAMA_BASE] + ["lm_head.weight"], "model."),
        (LLAMA_BASE, ""),
        (["model.language_model." + k for k in LLAMA_BASE] + ["model.vision_tower.x.weight"], "model.language_model."),
        (["unrelated.weight"], "model."),
    ],
    ids=["task-model", "base-model-alone", "nested-deeper", "nothing-fits-keeps-the-plans-own"],
)
def test_the_prefix_is_the_one_under_which_most_stored_keys_are_the_plans_base_keys(
    keys: list[str], prefix: str
) -> None:
    assert detect_prefix(plan("llama"), keys) == prefix


def test_prefix_detection_stays_linear_when_every_key_has_a_prefix_of_its_own() -> None:
    keys = [f"p{i}.model.norm.weight" for i in range(100_000)]
    start = time.monotonic()
    found = detect_prefix(plan("llama"), keys)
    assert time.monotonic() - start < 5
    assert found.endswith(".model.")


def test_with_prefix_rewrites_rules_tensors_ties_and_converters_but_not_head_keys() -> None:
    spec = with_prefix(plan("llama"), "")
    assert spec.prefix == ""
    assert spec.match("layers.3.self_attn.q_proj.weight").style == "colwise"
    assert spec.match("norm.weight").style == "replicate"
    assert spec.match("model.layers.3.self_attn.q_proj.weight") is None
    assert {t.key for t in spec.tensors} >= {"embed_tokens.weight", "lm_head.weight", "score.weight"}
    assert [(t.source, t.target) for t in spec.ties] == [("embed_tokens.weight", "lm_head.weight")]
    moe = with_prefix(load_spec(builtin_plan_paths()["mixtral"], mode="ep"), "")
    assert moe.converters[0].sources == ("layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",)


@pytest.mark.parametrize(
    ("architectures", "keys", "groups"),
    [
        (["LlamaForCausalLM"], [], ("causal_lm",)),
        (["LlamaModel"], [], ()),
        (["LlamaForSequenceClassification"], ["score.weight"], ("sequence_classification",)),
        ([], ["score.weight"], ()),
        ([], ["score.bias"], ("token_classification",)),
        ([], ["lm_head.weight"], ("causal_lm",)),
        ("not a list", [], ()),
    ],
    ids=[
        "by-architecture",
        "base-model",
        "shared-key-by-architecture",
        "shared-key-alone",
        "own-key",
        "stored-head",
        "malformed-architectures",
    ],
)
def test_a_group_is_present_by_architecture_or_by_a_stored_key_only_it_has(
    architectures: object, keys: list[str], groups: tuple[str, ...]
) -> None:
    assert present_groups(plan("llama"), {"architectures": architectures}, keys) == groups


def test_bert_task_heads_by_architecture() -> None:
    bert = plan("bert")
    assert present_groups(bert, {"architectures": ["BertForPreTraining"]}, []) == (
        "masked_lm",
        "next_sentence",
        "pooler",
    )
    assert present_groups(bert, {"architectures": ["BertModel"]}, ["bert.embeddings.position_ids"]) == (
        "pooler",
        "position_ids",
    )


def test_a_name_the_config_lacks_takes_its_aliass_value() -> None:
    assert with_aliases({"num_local_experts": 8})["num_experts"] == 8
    assert with_aliases({"n_embd": 768, "n_head": 12})["hidden_size"] == 768
    both = with_aliases({"num_experts": 4, "num_local_experts": 8})
    assert (both["num_experts"], both["num_local_experts"], both["n_routed_experts"]) == (4, 8, 4)
    values = config_values(plan("qwen3_moe"), {"num_local_experts": 8, "hidden_size": 16, "num_attention_heads": 2})
    assert values["num_experts"] == 8


def test_defaults_count_labels_and_leave_out_what_needs_a_missing_name() -> None:
    bert = plan("bert")
    assert config_values(bert, {})["num_labels"] == 2  # transformers' default, not written to config.json
    assert config_values(bert, {"id2label": {"0": "a", "1": "b", "2": "c"}})["num_labels"] == 3
    assert "head_dim" not in config_values(plan("llama"), {"num_attention_heads": 4})
    with pytest.raises(CheckpointError, match="config.json has no 'hidden_size'"):
        evaluate("hidden_size // 2", config_values(plan("llama"), {}), where="t")


def test_arithmetic_takes_whole_numbers_only() -> None:
    with pytest.raises(CheckpointError, match="arithmetic needs whole numbers, got 'x'"):
        evaluate("n * d", {"n": 10**9, "d": "x"}, where="shape")
    assert evaluate("len(labels) + 1", {"labels": [1, 2]}, where="t") == 3
