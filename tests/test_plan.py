"""The plan stage is pure: plan files, the style table and per-rank slices, with no process group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import llama_config

from tp_loader.errors import CheckpointError, PlanError, ShardingError, StrictLoadError
from tp_loader.index import Checkpoint, TensorInfo
from tp_loader.plan import TieDecision, make_plan, plan_rank
from tp_loader.spec import builtin_plan_paths, evaluate, glob_to_regex, load_spec, select_spec
from tp_loader.styles import Heads, chunk_range, colwise, head_world_sizes, rowwise, vocab


@pytest.mark.parametrize("size", [0, 1, 5, 10, 32001, 101])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_chunk_range_matches_torch_chunk_including_empty_trailing_pieces(size: int, world_size: int) -> None:
    pieces = torch.chunk(torch.arange(size), world_size) if size else ()
    for rank in range(world_size):
        start, stop = chunk_range(size, world_size, rank)
        want = pieces[rank].tolist() if rank < len(pieces) else []
        assert list(range(start, stop)) == want


def test_vocab_32001_over_3_ranks_splits_as_dtensor_shard_does() -> None:
    assert [vocab((32001, 8), None, 3, r).local_shape((32001, 8)) for r in range(3)] == [
        (10667, 8),
        (10667, 8),
        (10667, 8),
    ]
    assert [vocab((10, 8), None, 4, r).local_shape((10, 8)) for r in range(4)] == [(3, 8), (3, 8), (3, 8), (1, 8)]


def test_kv_heads_fewer_than_ranks_give_rank_r_head_r_times_kv_over_world() -> None:
    kv = Heads("kv", num_heads=2, head_dim=4, replicate_when_fewer=True)
    slices = [colwise((8, 16), kv, 4, r) for r in range(4)]
    assert [(s.start, s.stop) for s in slices] == [(0, 4), (0, 4), (4, 8), (4, 8)]
    assert {s.global_shape for s in slices} == {(16, 16)}
    assert slices[0].note == "2 kv heads replicated 2x over 4 ranks"


def test_rowwise_shards_dim_1_and_replicates_a_bias() -> None:
    q = Heads("q", num_heads=4, head_dim=2)
    assert (rowwise((6, 8), q, 2, 1).dim, rowwise((6, 8), q, 2, 1).start, rowwise((6, 8), q, 2, 1).stop) == (1, 4, 8)
    assert rowwise((6,), None, 2, 1).dim is None


def test_query_heads_fewer_than_ranks_are_never_replicated() -> None:
    with pytest.raises(ShardingError, match="2 q heads cannot be split over 4 ranks"):
        colwise((8, 16), Heads("q", 2, 4), 4, 0)


def test_world_sizes_that_work_respect_every_head_group() -> None:
    groups = [Heads("q", 32, 128), Heads("kv", 8, 128, replicate_when_fewer=True)]
    assert head_world_sizes(groups) == [1, 2, 4, 8, 16, 32]


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("model.layers.*.mlp.up_proj.*", "model.layers.11.mlp.up_proj.weight", True),
        ("model.layers.*.mlp.up_proj.*", "model.layers.11.mlp.up_proj", False),
        ("model.layers.*.mlp.*", "model.layers.1.mlp.experts.0.w1.weight", False),
        ("**norm.weight", "model.layers.0.self_attn.q_norm.weight", True),
        ("lm_head.weight", "lm_headXweight", False),
    ],
)
def test_glob_star_is_within_one_segment_and_double_star_spans_segments(pattern: str, key: str, matches: bool) -> None:
    import re

    assert bool(re.fullmatch(glob_to_regex(pattern), key)) is matches


def test_first_matching_rule_wins_in_the_compiled_alternation(tmp_path: Path) -> None:
    plan = tmp_path / "p.toml"
    plan.write_text('[[rules]]\npattern = "a.*"\nstyle = "colwise"\n[[rules]]\npattern = "*.b"\nstyle = "rowwise"\n')
    spec = load_spec(plan)
    assert spec.match("a.b").style == "colwise"
    assert spec.match("c.b").style == "rowwise"
    assert spec.match("c.d") is None


def test_every_builtin_plan_loads_and_auto_selects_by_model_type_then_architecture() -> None:
    assert set(builtin_plan_paths()) >= {"llama", "qwen2", "qwen3"}
    assert select_spec("auto", {"model_type": "mistral"}, model="m").name == "llama"
    assert select_spec("auto", {"model_type": "qwen3"}, model="m").name == "qwen3"
    assert (
        select_spec("auto", {"model_type": "custom", "architectures": ["Qwen2ForCausalLM"]}, model="m").name == "qwen2"
    )
    with pytest.raises(PlanError, match="no built-in plan for model_type='gpt_neox'"):
        select_spec("auto", {"model_type": "gpt_neox"}, model="m")


def test_no_two_builtin_plans_claim_the_same_model_type_or_architecture() -> None:
    """``auto`` picks the plan named after the model type without reading the others: exact only while no
    other plan claims that model type (or, for the architecture search, the same architecture)."""
    from tp_loader.spec import _plan_header

    claims: dict[tuple[str, str], list[str]] = {}
    for name, path in builtin_plan_paths().items():
        model_types, architectures = _plan_header(path)
        for claim in [("model_type", t) for t in model_types] + [("architecture", a) for a in architectures]:
            claims.setdefault(claim, []).append(name)
    assert {claim: names for claim, names in claims.items() if len(names) > 1} == {}
    for name, path in builtin_plan_paths().items():  # each plan named after a model type is that type's plan
        if name in _plan_header(path)[0]:
            assert select_spec("auto", {"model_type": name}, model="m").name == load_spec(path).name


def test_extending_plan_overrides_tensor_entries_and_puts_its_rules_first(tmp_path: Path) -> None:
    plan = tmp_path / "mine.toml"
    plan.write_text(
        'extends = "llama"\nname = "mine"\n[[rules]]\npattern = "model.norm.weight"\nstyle = "colwise"\n'
        '[[tensors]]\nkey = "model.norm.weight"\nshape = ["hidden_size * 2"]\n'
    )
    spec = load_spec(plan)
    assert spec.name == "mine"
    assert spec.match("model.norm.weight").style == "colwise"
    assert [t.shape for t in spec.tensors if t.key == "model.norm.weight"] == [("hidden_size * 2",)]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[[rules]]\npattern = 3\n", "malformed plan file: KeyError: 'style'"),
        ("[[rules\n", "cannot parse plan file"),
        (
            '[[rules]]\npattern = "x"\nstyle = "colwise"\nheads = "q"\n',
            r"rule 'x' names head group 'q', which \[heads\] does not define",
        ),
        ('[[tensors]]\nkey = "x"\nshape = [1]\n', "expected tensor 'x' is matched by no rule"),
    ],
)
def test_malformed_plan_files_raise_plan_error_naming_the_file(tmp_path: Path, text: str, error: str) -> None:
    plan = tmp_path / "bad.toml"
    plan.write_text(text)
    with pytest.raises(PlanError, match=error) as info:
        load_spec(plan)
    assert info.value.file == str(plan)


def test_plan_expressions_allow_arithmetic_and_logic_but_not_calls() -> None:
    assert evaluate("a * b // 2 + 1", {"a": 6, "b": 4}, where="t") == 13
    assert evaluate("not x and y == 3", {"x": False, "y": 3}, where="t") is True
    with pytest.raises(PlanError, match="unsupported construct"):
        evaluate("__import__('os')", {}, where="t")
    with pytest.raises(CheckpointError, match="config.json has no 'vocab_size'"):
        evaluate("vocab_size", {}, where="t")


def _checkpoint(config: dict, drop: tuple[str, ...] = (), extra: dict | None = None) -> Checkpoint:
    from tp_loader.demo import llama_tensors

    tensors = {k: v for k, v in llama_tensors(config).items() if k not in drop}
    tensors.update(extra or {})
    infos = {k: TensorInfo(k, "model.safetensors", v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    return Checkpoint(Path("/nowhere"), "safetensors", config, infos)


def test_plan_reports_missing_unexpected_and_mismatched_keys_without_any_io() -> None:
    config = llama_config()
    ckpt = _checkpoint(
        config,
        drop=("model.norm.weight",),
        extra={"model.rotary.inv_freq": torch.zeros(2), "model.layers.0.mlp.up_proj.bias": torch.zeros(3)},
    )
    ckpt.tensors["model.layers.1.mlp.up_proj.weight"] = TensorInfo(
        "model.layers.1.mlp.up_proj.weight", "model.safetensors", torch.float32, (99, 48)
    )
    plan = make_plan(ckpt, load_spec(builtin_plan_paths()["llama"]), 2, 0, model="m")
    assert plan.missing == ("model.norm.weight",)
    assert plan.unexpected == ("model.layers.0.mlp.up_proj.bias", "model.rotary.inv_freq")
    assert plan.unmatched == ("model.rotary.inv_freq",)
    assert [m.describe() for m in plan.mismatched] == [
        "model.layers.1.mlp.up_proj.weight (config implies [100, 48], stored [99, 48])"
    ]
    assert "model.layers.1.mlp.up_proj.weight" not in {t.key for t in plan.tensors}
    assert {t.key: t.style for t in plan.tensors}["model.rotary.inv_freq"] == "replicate"


TILING_CONFIGS = [
    pytest.param(llama_config(), id="llama-12q-4kv-vocab101-mlp100"),
    pytest.param(
        llama_config(
            model_type="qwen2", architectures=["Qwen2ForCausalLM"], num_attention_heads=24, num_key_value_heads=2
        ),
        id="qwen2-biases-24q-2kv",
    ),
    pytest.param(
        llama_config(num_attention_heads=9, num_key_value_heads=3, hidden_size=36, intermediate_size=37, vocab_size=10),
        id="llama-9q-3kv-vocab10-mlp37",
    ),
    pytest.param(
        llama_config(
            model_type="mistral",
            num_attention_heads=7,
            num_key_value_heads=1,
            hidden_size=28,
            intermediate_size=9,
            vocab_size=5,
        ),
        id="mistral-7q-1kv-vocab5-mlp9",
    ),
    pytest.param(
        llama_config(num_attention_heads=5, num_key_value_heads=5, hidden_size=20, intermediate_size=13, vocab_size=12),
        id="llama-5q-5kv-vocab12-mlp13",
    ),
]


def _sharded_dim(key: str) -> int | None:
    """The llama plan's sharded dim of ``key``, from its name (None: replicated)."""
    if key.endswith(("embed_tokens.weight", "lm_head.weight")) or any(
        p in key for p in ("q_proj.", "k_proj.", "v_proj.", "gate_proj.", "up_proj.")
    ):
        return 0
    if key.endswith(("o_proj.weight", "down_proj.weight")):
        return 1
    return None


@pytest.mark.parametrize("config", TILING_CONFIGS)
def test_every_world_size_1_to_9_plans_slices_that_tile_each_tensor_exactly(config: dict) -> None:
    """Without a process group, for every world size the heads allow: a sharded tensor's ranks hold
    disjoint ranges along its dim, in rank order, covering [0, size) with torch.chunk's sizes (empty
    pieces at the end); a replicated tensor is whole on every rank; KV heads fewer than ranks give rank
    r head r * kv // world. Every other world size is refused before any I/O."""
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // heads
    spec = select_spec("auto", config, model="m")
    ckpt = _checkpoint(config)
    for world in range(1, 10):
        if heads % world or (kv % world and world % kv):
            with pytest.raises(ShardingError) as info:
                make_plan(ckpt, spec, world, 0, model="m")
            assert (
                info.value.message == f"model m ({kv} kv heads, {heads} q heads) cannot be sharded over {world} ranks"
            )
            continue
        by_rank = [{t.key: t.slice for t in make_plan(ckpt, spec, world, r, model="m").tensors} for r in range(world)]
        assert all(set(slices) == set(ckpt.tensors) for slices in by_rank)
        for key, stored in ckpt.tensors.items():
            shape, dim, slices = stored.shape, _sharded_dim(key), [by_rank[r][key] for r in range(world)]
            if dim is None:
                assert [(s.dim, s.local_shape(shape), s.global_shape) for s in slices] == [(None, shape, shape)] * world
            elif ("k_proj" in key or "v_proj" in key) and kv < world:
                assert [s.ranges for s in slices] == [
                    (((r * kv // world) * head_dim, (r * kv // world + 1) * head_dim),) for r in range(world)
                ], key
                assert {(s.dim, s.global_shape) for s in slices} == {(0, (world * head_dim, *shape[1:]))}, key
            else:
                assert {(s.dim, len(s.ranges), s.global_shape) for s in slices} == {(dim, 1, shape)}, key
                ranges = [s.ranges[0] for s in slices]
                pieces = [len(p) for p in torch.chunk(torch.arange(shape[dim]), world)]
                assert [b - a for a, b in ranges] == pieces + [0] * (world - len(pieces)), (key, world)
                assert [a for a, _ in ranges] == [0] + [b for _, b in ranges[:-1]], (key, world)
                assert ranges[-1][1] == shape[dim], (key, world)


def test_tie_whose_target_alone_is_stored_covers_the_source_and_shards_the_target() -> None:
    config = llama_config(tie_word_embeddings=True)
    ckpt = _checkpoint(config, drop=("model.embed_tokens.weight",), extra={"lm_head.weight": torch.zeros(101, 48)})
    plans = [make_plan(ckpt, load_spec(builtin_plan_paths()["llama"]), 2, r, model="m") for r in range(2)]
    for plan in plans:
        assert plan.ties == (TieDecision("model.embed_tokens.weight", "lm_head.weight", "target"),)
        assert (plan.missing, plan.unexpected) == ((), ())
    head = [{t.key: t.slice for t in p.tensors}["lm_head.weight"] for p in plans]
    assert [(s.dim, s.ranges) for s in head] == [(0, ((0, 51),)), (0, ((51, 101),))]


@pytest.mark.parametrize(
    ("drop", "extra", "reshape", "summary"),
    [
        (("model.norm.weight",), {}, None, "1 missing: model.norm.weight"),
        ((), {"extra.weight": torch.zeros(3)}, None, "1 unexpected: extra.weight"),
        (
            (),
            {},
            "model.layers.1.mlp.up_proj.weight",
            "1 mismatched: model.layers.1.mlp.up_proj.weight (config implies [100, 48], stored [99, 48])",
        ),
    ],
    ids=["missing-only", "unexpected-only", "mismatched-only"],
)
def test_strict_plan_refuses_each_kind_of_key_problem_on_its_own(drop, extra, reshape, summary: str) -> None:
    ckpt = _checkpoint(llama_config(), drop=drop, extra=extra)
    if reshape:
        ckpt.tensors[reshape] = TensorInfo(reshape, "model.safetensors", torch.float32, (99, 48))
    lenient = plan_rank(ckpt, 2, 0, model="m")  # planned, the one problem reported
    assert len(lenient.missing) + len(lenient.unexpected) + len(lenient.mismatched) == 1
    with pytest.raises(StrictLoadError) as info:
        plan_rank(ckpt, 2, 0, model="m", strict=True)
    assert info.value.message == f"strict load of m refused: {summary}"


def test_head_rule_on_a_tensor_not_made_of_those_heads_is_an_error_not_a_wrong_slice() -> None:
    with pytest.raises(ShardingError, match="dim 0 has size 101, not 4 kv heads x 4"):
        colwise((101, 48), Heads("kv", 4, 4, replicate_when_fewer=True), 1, 0)


def test_expected_tensor_that_no_rule_covers_in_a_later_layer_is_a_plan_error(tmp_path: Path) -> None:
    plan = tmp_path / "layer0.toml"
    plan.write_text(
        '[[rules]]\npattern = "model.layers.0.w"\nstyle = "colwise"\n'
        '[[tensors]]\nkey = "model.layers.{layer}.w"\nshape = ["4"]\n'
    )
    infos = {f"model.layers.{i}.w": TensorInfo(f"model.layers.{i}.w", "f", torch.float32, (4,)) for i in range(2)}
    with pytest.raises(PlanError, match="the plan expects this tensor but no rule gives it a style") as info:
        make_plan(
            Checkpoint(Path("/x"), "safetensors", {"num_hidden_layers": 2}, infos), load_spec(plan), 2, 0, model="m"
        )
    assert info.value.key == "model.layers.1.w"


def test_a_plan_file_edited_between_loads_is_parsed_again_and_an_unchanged_one_is_reused(tmp_path: Path) -> None:
    parent = tmp_path / "base.toml"
    parent.write_text('extends = "llama"\nname = "base"\n')
    child = tmp_path / "child.toml"
    child.write_text('extends = "base.toml"\nname = "child"\n')
    first = load_spec(child)
    assert load_spec(child) is first
    parent.write_text(
        'extends = "llama"\nname = "base"\n\n[[rules]]\npattern = "model.norm.weight"\nstyle = "colwise"\n'
    )
    edited = load_spec(child)
    assert edited is not first
    assert edited.match("model.norm.weight").style == "colwise"
    assert first.match("model.norm.weight").style == "replicate"
