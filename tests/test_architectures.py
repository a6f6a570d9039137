"""The plans for olmo2, starcoder2, granite, granitemoe and llama4 (text), on checkpoints transformers'
``save_pretrained`` writes (tiny configs, parameters drawn at random, norms and biases included):

- every rank's shard of every stored tensor is the slice computed here from the stored tensor, bitwise,
  at world sizes 1, 2 and 4 (2 KV heads: shared by two ranks at 4), with a clean key report and exactly
  those slices' bytes read; fused experts stored ``[experts, 2 x intermediate, hidden]`` (granitemoe) and
  ``[experts, hidden, 2 x intermediate]`` (llama4) are sharded part by part inside every expert, or
  divided whole among the ranks with ``mode="ep"``;
- the model built on meta, ``parallelize``d and ``load_into``'d generates the tokens transformers
  generates, with logits within 1e-4, at world sizes 2 and 4 (OLMo 2's q_norm / k_norm normalize over
  all heads: each rank gathers the others' features for the statistic);
- a checkpoint of an architecture no plan covers is refused naming the closest plans.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TRANSFORMERS_LLAMA
from reference import chunk_piece, expected_shard
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import tp_loader
from tp_loader.errors import PlanError
from tp_loader.spec import builtin_plan_paths, load_spec
from tp_loader.testing import run_ranks, values

transformers = pytest.importorskip("transformers", reason="the checkpoints and models under test are transformers'")
accelerate = pytest.importorskip("accelerate", reason="init_empty_weights builds the models without memory")

GRANITE = {
    **TRANSFORMERS_LLAMA,
    "embedding_multiplier": 4.0,
    "attention_multiplier": 0.2,
    "residual_multiplier": 0.6,
    "logits_scaling": 2.0,
}
#: name → (config class, model class, config): 8 query heads and 2 KV heads of 8 dims, hidden 64
ARCHITECTURES = {
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", TRANSFORMERS_LLAMA),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", TRANSFORMERS_LLAMA),  # biases, tied embeddings
    "granite": ("GraniteConfig", "GraniteForCausalLM", GRANITE),
    "granitemoe": (
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        {**GRANITE, "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 48},
    ),
    "llama4": (
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        {
            **TRANSFORMERS_LLAMA,
            "head_dim": 8,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "intermediate_size": 48,  # each routed expert and the shared expert
            "intermediate_size_mlp": 96,  # the dense layers
            "interleave_moe_layer_step": 2,  # layer 0 dense, layer 1 MoE
            "attention_chunk_size": 8,
        },
    ),
}
#: (architecture, mode): tensor-parallel everywhere, and whole experts per rank for the MoE plans
CASES = [(name, None) for name in ARCHITECTURES] + [("granitemoe", "ep"), ("llama4", "ep")]


def _randomize(model: torch.nn.Module) -> None:
    """Every parameter drawn at random: matrices large enough for logits of order one, and norm weights
    and biases away from their ones and zeros, so that a misplaced slice of any of them shows."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(torch.randn_like(param) * 0.3 + (1.0 if name.endswith("norm.weight") else 0.0))
            else:
                param.normal_(0.0, 0.15)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("architectures")
    roots = {}
    for seed, (name, (config_class, model_class, config)) in enumerate(ARCHITECTURES.items()):
        torch.manual_seed(seed)
        model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config)).eval()
        _randomize(model)
        model.save_pretrained(base / name)
        roots[name] = base / name
    return roots


def test_each_checkpoint_gets_its_own_plan_by_model_type(checkpoints: dict[str, Path]) -> None:
    plans = {name: tp_loader.plan_load(root, world_size=2).plan for name, root in checkpoints.items()}
    assert plans == {name: name for name in ARCHITECTURES}


def _expected(
    key: str, tensor: torch.Tensor, config: dict, world_size: int, rank: int, mode: str | None
) -> torch.Tensor:
    """The slice of ``key`` that ``rank`` must hold, from the stored tensor: the new layouts here, the
    Llama-family ones from ``reference.expected_shard``."""
    experts = key.endswith(("_linear.weight", "experts.gate_up_proj", "experts.down_proj"))
    if experts and mode == "ep":  # whole experts per rank
        return chunk_piece(tensor, world_size, rank, 0)
    if key.endswith(("input_linear.weight", "experts.gate_up_proj")):  # each expert's gate, then up: rows or columns
        dim = 1 if key.endswith("input_linear.weight") else 2
        gate, up = tensor.chunk(2, dim)
        return torch.cat([chunk_piece(gate, world_size, rank, dim), chunk_piece(up, world_size, rank, dim)], dim)
    if key.endswith("output_linear.weight"):  # [experts, hidden, intermediate]
        return chunk_piece(tensor, world_size, rank, 2)
    if key.endswith("experts.down_proj"):  # [experts, intermediate, hidden]
        return chunk_piece(tensor, world_size, rank, 1)
    if key.endswith(("mlp.c_fc.weight", "mlp.c_fc.bias")):
        return chunk_piece(tensor, world_size, rank, 0)
    if key.endswith("mlp.c_proj.weight"):
        return chunk_piece(tensor, world_size, rank, 1)
    if key.endswith(("q_norm.weight", "k_norm.weight")):  # with the heads of q_proj / k_proj
        return expected_shard(key.replace("_norm", "_proj"), tensor, config, world_size, rank)
    if key.endswith(("router.weight", "router.layer.weight", "o_proj.bias", "c_proj.bias")):
        return tensor
    return expected_shard(key, tensor, config, world_size, rank)


def _check_shards(rank: int, world_size: int, roots: dict[str, Path]) -> dict[str, int]:
    checked = {}
    for name, mode in CASES:
        root = roots[name]
        stored = load_file(root / "model.safetensors")
        config = ARCHITECTURES[name][2]
        result = tp_loader.load(root, mode=mode)
        assert result.report.clean, result.report.format_table(full=True)
        assert set(result.state_dict) == set(stored) | ({"lm_head.weight"} if name == "starcoder2" else set())
        if name == "starcoder2":  # tied: the embedding itself
            assert result.state_dict["lm_head.weight"] is result.state_dict["model.embed_tokens.weight"]
        expected_bytes = 0
        for key, tensor in stored.items():
            want = _expected(key, tensor, config, world_size, rank, mode)
            assert torch.equal(result.state_dict[key].to_local(), want), (name, mode, key)
            expected_bytes += want.numel() * want.element_size()
        assert result.report.ranks[rank].bytes_planned == expected_bytes, (name, mode)
        checked[f"{name}-{mode}"] = len(stored)
    return checked


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_ranks_shards_are_the_slices_of_the_saved_tensors(checkpoints: dict[str, Path], world_size: int) -> None:
    """One launch checks every architecture and mode; starcoder2's tied lm_head is its embedding."""
    checked = values(run_ranks(world_size, _check_shards, checkpoints, timeout=240))
    stored = {name: len(load_file(root / "model.safetensors")) for name, root in checkpoints.items()}
    assert checked == [{f"{name}-{mode}": stored[name] for name, mode in CASES}] * world_size


PROMPT = torch.tensor([[5, 17, 33, 2, 71, 9]])
NEW_TOKENS = 12


def _run(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(PROMPT).logits
        tokens = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return logits, tokens


@pytest.fixture(scope="module")
def references(checkpoints: dict[str, Path]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """transformers' logits and greedy tokens for each checkpoint, in one process."""
    out = {}
    for name, root in checkpoints.items():
        out[name] = _run(transformers.AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32).eval())
        assert out[name][0].std() > 0.5, "logits too flat for the comparison to mean anything"
    return out


def _generate_tp(
    rank: int, world_size: int, roots: dict[str, Path], references: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, int]:
    sharded = {}
    mesh = init_device_mesh("cpu", (world_size,))
    for name, mode in CASES:
        config = transformers.AutoConfig.from_pretrained(roots[name])
        with accelerate.init_empty_weights():
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        tp_loader.parallelize(model, mesh=mesh, mode=mode)
        report = tp_loader.load_into(model, roots[name], mesh=mesh, mode=mode)
        assert report.missing_keys == () and report.unexpected_keys == (), (name, mode)
        logits, tokens = _run(model)
        want_logits, want_tokens = references[name]
        assert torch.equal(tokens, want_tokens), (name, mode, tokens, want_tokens)
        torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-4, msg=f"{name} {mode}")
        params = model.parameters()
        sharded[f"{name}-{mode}"] = sum(isinstance(p, DTensor) and p.placements[0].is_shard() for p in params)
    return sharded


#: Sharded parameters (the others replicated). Per layer: olmo2 q, k, v, o, q_norm, k_norm, gate, up, down;
#: starcoder2 q, k, v, o, the q, k, v biases, c_fc and its bias, c_proj; granite q, k, v, o, gate, up,
#: down; granitemoe q, k, v, o and the experts' gate_up_proj and down_proj; llama4 layer 0 (dense) q, k,
#: v, o, gate, up, down and layer 1 q, k, v, o, the experts' two tensors and the shared expert's three.
#: Then the embeddings and the LM head (one parameter when tied, starcoder2).
SHARDED = {
    "olmo2-None": 9 * 2 + 2,
    "starcoder2-None": 10 * 2 + 1,
    "granite-None": 7 * 2 + 2,
    "granitemoe-None": 6 * 2 + 2,
    "llama4-None": 7 + 9 + 2,
    "granitemoe-ep": 6 * 2 + 2,
    "llama4-ep": 7 + 9 + 2,
}


@pytest.mark.parametrize("world_size", [2, 4])
def test_a_meta_model_parallelized_and_loaded_into_generates_what_transformers_generates(
    checkpoints: dict[str, Path], references: dict[str, tuple[torch.Tensor, torch.Tensor]], world_size: int
) -> None:
    """At 4 ranks each KV head (and each k_norm slice) is shared by two ranks, and each rank holds one
    whole expert in mode ep."""
    sharded = values(run_ranks(world_size, _generate_tp, checkpoints, references, timeout=300))
    assert sharded == [SHARDED] * world_size


def _parallelize_loaded(
    rank: int, world_size: int, roots: dict[str, Path], references: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> int:
    """Models that already hold their weights (``from_pretrained``): parallelize keeps each rank's slice
    of the gathered norms and of the stored fused experts."""
    mesh = init_device_mesh("cpu", (world_size,))
    cases = [case for case in CASES if case[0] in ("olmo2", "granitemoe", "llama4")]
    for name, mode in cases:
        model = transformers.AutoModelForCausalLM.from_pretrained(roots[name], dtype=torch.float32).eval()
        tp_loader.parallelize(model, mesh=mesh, mode=mode)
        logits, tokens = _run(model)
        assert torch.equal(tokens, references[name][1]), (name, mode)
        torch.testing.assert_close(logits, references[name][0], rtol=0, atol=1e-4, msg=f"{name} {mode}")
    return len(cases)


def test_parallelizing_models_that_hold_their_weights_keeps_each_ranks_slice(
    checkpoints: dict[str, Path], references: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> None:
    assert values(run_ranks(2, _parallelize_loaded, checkpoints, references, timeout=240)) == [5, 5]


def test_an_architecture_no_plan_covers_is_refused_naming_the_closest_plans(tmp_path: Path) -> None:
    """OLMo (1) is named like olmo2 and stores the Llama tensors, without norm weights."""
    torch.manual_seed(0)
    transformers.OlmoForCausalLM(transformers.OlmoConfig(**TRANSFORMERS_LLAMA)).save_pretrained(tmp_path)
    with pytest.raises(PlanError) as caught:
        tp_loader.plan_load(tmp_path, world_size=2)
    assert str(caught.value) == (
        "no built-in plan for model_type='olmo', architectures=['OlmoForCausalLM']; closest plans by name: "
        "olmo2 ('olmo2'); by tensor names: granite (shares 9 of 12 key names), llama (shares 9 of 12 key names), "
        f"gemma2 (shares 9 of 14 key names) [file={tmp_path}]. If one of them has this checkpoint's layout, pass "
        "plan=NAME (--plan NAME); otherwise write a plan for it (docs/plan-format.md, 'Write a plan in 15 "
        f"minutes') and pass its path. Built-in plans: {', '.join(sorted(builtin_plan_paths()))}"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[rules]]\npattern = "model.layers.*.self_attn.q_norm.weight"\nstyle = "replicate"\n'
            "gathered_norm = true\n",
            "rule 'model.layers.*.self_attn.q_norm.weight': gathered_norm needs style 'colwise' (the norm's weight "
            "sharded with the features it normalizes), not 'replicate'",
        ),
        (
            '[[expert_modules]]\nmodule = "model.layers.*.mlp.experts"\nrouting = "sorted"\n',
            "expert module 'model.layers.*.mlp.experts' has routing 'sorted'; known: 'index' (routed ids and "
            "weights), 'stacked' (each expert's tokens stacked)",
        ),
    ],
    ids=["gathered-norm-not-colwise", "unknown-routing"],
)
def test_a_plan_with_a_malformed_serving_field_is_refused_naming_it(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "plan.toml"
    path.write_text('extends = "llama"\n\n' + text)
    with pytest.raises(PlanError) as caught:
        load_spec(path)
    assert caught.value.message == message
    assert caught.value.file == str(path)
