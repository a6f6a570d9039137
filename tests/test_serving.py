"""Serving from the shards: a transformers model built on ``meta`` is made tensor-parallel by
``tp_loader.parallelize``, filled by ``tp_loader.load_into`` from a ``save_pretrained`` checkpoint, and
then generates exactly what the single-process model generates; reloads rewrite it in place."""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path

import pytest
import torch
from conftest import TRANSFORMERS_LLAMA, proc_status_bytes
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import tp_loader
from tp_loader.testing import run_ranks, same_error, values

transformers = pytest.importorskip("transformers", reason="the models under test are transformers'")
accelerate = pytest.importorskip("accelerate", reason="init_empty_weights builds the models without memory")

LLAMA = TRANSFORMERS_LLAMA
QWEN2 = {**LLAMA, "tie_word_embeddings": True}
PHI3 = {**LLAMA, "num_key_value_heads": 4}  # fused qkv_proj and gate_up_proj
GEMMA2 = {**LLAMA, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4}
MIXTRAL = {**LLAMA, "num_local_experts": 4, "num_experts_per_tok": 2}
QWEN3_MOE = {**LLAMA, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 8}
QWEN2_MOE = {**QWEN3_MOE, "shared_expert_intermediate_size": 48}
GPT2 = {
    "n_embd": 64,
    "n_head": 8,
    "n_layer": 2,
    "vocab_size": 96,
    "n_positions": 64,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
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
        "phi3": _save(base / "phi3", transformers.Phi3Config, transformers.Phi3ForCausalLM, PHI3, 4),
        "gemma2": _save(base / "gemma2", transformers.Gemma2Config, transformers.Gemma2ForCausalLM, GEMMA2, 5),
        "gpt2": _save(base / "gpt2", transformers.GPT2Config, transformers.GPT2LMHeadModel, GPT2, 6),
        "mixtral": _save(base / "mixtral", transformers.MixtralConfig, transformers.MixtralForCausalLM, MIXTRAL, 7),
        "qwen3_moe": _save(
            base / "qwen3_moe", transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, QWEN3_MOE, 8
        ),
        "qwen2_moe": _save(
            base / "qwen2_moe", transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, QWEN2_MOE, 9
        ),
    }


def _reference(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32).eval()
    return _run(model)


def _run(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(PROMPT).logits
        tokens = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return logits, tokens


def _tp_model(root: Path, world_size: int, mode: str | None = None) -> torch.nn.Module:
    """The model built with its parameters on meta (``init_empty_weights`` keeps buffers such as rotary
    frequencies real: checkpoints do not hold them), parallelized, then loaded into."""
    config = transformers.AutoConfig.from_pretrained(root)
    with accelerate.init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert all(p.is_meta for p in model.parameters())
    mesh = init_device_mesh("cpu", (world_size,))
    tp_loader.parallelize(model, mesh=mesh, mode=mode)
    report = tp_loader.load_into(model, root, mesh=mesh, mode=mode)
    assert report.missing_keys == () and report.unexpected_keys == ()
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    return model


def _generate_tp(
    rank: int,
    world_size: int,
    root: Path,
    want_logits: torch.Tensor,
    want_tokens: torch.Tensor,
    mode: str | None = None,
) -> int:
    model = _tp_model(root, world_size, mode)
    logits, tokens = _run(model)
    assert torch.equal(tokens, want_tokens), (tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-4)
    return sum(isinstance(p, DTensor) and p.placements[0].is_shard() for p in model.parameters())


#: Sharded parameters: per layer q, k, v, o, gate, up, down (qwen2: + q, k, v biases; phi3: qkv, o,
#: gate_up, down; gpt2: c_attn weight and bias, c_proj weight, c_fc weight and bias, c_proj weight),
#: then the embeddings and the LM head (one parameter when tied).
#: mixtral: q, k, v, o, the fused experts' gate_up_proj and down_proj.
SHARDED = {
    "llama": 7 * 2 + 2,
    "qwen2": 10 * 2 + 1,
    "phi3": 4 * 2 + 2,
    "gemma2": 7 * 2 + 1,
    "gpt2": 6 * 2 + 1,
    "mixtral": 6 * 2 + 2,
    "qwen3_moe": 6 * 2 + 2,
    "qwen2_moe": 12 * 2 + 2,  # + q, k, v biases and the shared expert's gate, up and down
}


@pytest.mark.parametrize("family", list(SHARDED))
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_a_meta_model_parallelized_and_loaded_into_generates_what_transformers_generates(
    checkpoints: dict[str, Path], family: str, world_size: int
) -> None:
    """llama: 2 KV heads, so at world size 4 each KV head is shared by two ranks; qwen2: tied embeddings
    and biases; phi3: fused projections, each part sharded on its own; gemma2: tied, soft-capped,
    sliding window; gpt2: Conv1D weights stored [in, out], tied; mixtral: per-expert checkpoint tensors
    read into transformers 5's fused expert tensors, each expert tensor-parallel."""
    root = checkpoints[family]
    want_logits, want_tokens = _reference(root)
    sharded = values(run_ranks(world_size, _generate_tp, root, want_logits, want_tokens, timeout=240))
    assert sharded == [SHARDED[family]] * world_size


def test_uneven_shards_of_the_mlp_and_the_vocabulary_generate_what_transformers_generates(tmp_path: Path) -> None:
    """42 intermediate features and 98 tokens over 4 ranks: 11, 11, 10, 10 and 25, 25, 24, 24. A rowwise
    layer's input then has no even global size for torch to infer (it took 4 x 11 = 44 and refused the
    matmul with the 42-column weight)."""
    config = {**LLAMA, "intermediate_size": 42, "vocab_size": 98}
    root = _save(tmp_path / "uneven", transformers.LlamaConfig, transformers.LlamaForCausalLM, config, 10)
    want_logits, want_tokens = _reference(root)
    assert values(run_ranks(4, _generate_tp, root, want_logits, want_tokens, timeout=240)) == [SHARDED["llama"]] * 4


def _data_ptrs(model: torch.nn.Module) -> dict[str, int]:
    return {n: (t.to_local() if isinstance(t, DTensor) else t).data_ptr() for n, t in model.state_dict().items()}


def _reload_in_place(rank: int, world_size: int, first: Path, second: Path, want_logits: torch.Tensor) -> int:
    model = _tp_model(first, world_size)
    pointers = _data_ptrs(model)
    report = tp_loader.load_into(model, second, mesh=model.lm_head.weight.device_mesh)
    assert _data_ptrs(model) == pointers
    with torch.no_grad():
        torch.testing.assert_close(model(PROMPT).logits, want_logits, rtol=0, atol=1e-4)
    return report.ranks[rank].bytes_read


def test_reloading_a_new_checkpoint_rewrites_every_parameter_in_place(checkpoints: dict[str, Path]) -> None:
    """Load A, reload B into the same model: every data_ptr is kept and the outputs are B's."""
    want_logits, _ = _reference(checkpoints["llama_b"])
    bytes_read = values(run_ranks(2, _reload_in_place, checkpoints["llama"], checkpoints["llama_b"], want_logits))
    assert bytes_read[0] > 0


#: Twelve layers whose widest row (down_proj's, 1024 fp32) is 4 KiB: a rank's shards (31 MB at TP 2) are three
#: times the bound below, which one staging block (a column shard's whole rows: 256 rows of 4 KiB) sets.
WIDE_LLAMA = {**LLAMA, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 12, "vocab_size": 8192}
STAGING_BLOCK = 256 * 1024 * 4
SLACK = 8 * 1024 * 1024  # Python objects (plan, report, headers), a reader thread's malloc arena


def _reload_peak(rank: int, world_size: int, first: Path, second: Path) -> tuple[int, int]:
    """Loads ``first`` into memory of its own, then reloads ``second`` in place with one reader thread: the peak
    resident memory the reload adds (``VmHWM`` reset just before), and this rank's bytes of parameters."""
    os.environ["TP_LOADER_NUM_THREADS"] = "1"
    config = transformers.AutoConfig.from_pretrained(first)
    with accelerate.init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    mesh = init_device_mesh("cpu", (world_size,))
    tp_loader.parallelize(model, mesh=mesh)
    tp_loader.load_into(model, first, mesh=mesh, zero_copy=False)
    pointers = _data_ptrs(model)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    before = proc_status_bytes("VmRSS")
    tp_loader.load_into(model, second, mesh=mesh, progress=False)
    added = proc_status_bytes("VmHWM") - before
    assert _data_ptrs(model) == pointers
    return added, sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())


def test_a_reload_in_place_adds_at_most_one_staging_block_of_memory(tmp_path: Path) -> None:
    """The issue's bound: a reload writes into the model's storage, so it adds at most the reader's staging (one
    block per reader thread), not a second copy of the shards (which would add every byte the rank holds)."""
    first = _save(tmp_path / "a", transformers.LlamaConfig, transformers.LlamaForCausalLM, WIDE_LLAMA, 0)
    second = _save(tmp_path / "b", transformers.LlamaConfig, transformers.LlamaForCausalLM, WIDE_LLAMA, 1)
    for added, held in values(run_ranks(2, _reload_peak, first, second)):
        assert held > 3 * (STAGING_BLOCK + SLACK)
        assert added <= STAGING_BLOCK + SLACK, f"the reload added {added / 2**20:.1f} MiB for {held / 2**20:.1f} MiB"


def _refused_reload(rank: int, world_size: int, first: Path, other: Path) -> str:
    model = _tp_model(first, world_size)
    with torch.no_grad():
        before = model(PROMPT).logits
    try:
        tp_loader.load_into(model, other, mesh=model.lm_head.weight.device_mesh)
    except tp_loader.TPLoaderError as exc:
        with torch.no_grad():
            assert torch.equal(model(PROMPT).logits, before), "the refused reload changed the model"
        return f"{type(exc).__name__}: {exc}"
    raise AssertionError("a checkpoint of other shapes was loaded into the model")


def test_a_reload_with_other_shapes_is_refused_before_any_byte_is_written(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    other = _save(
        tmp_path / "wider",
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        {**LLAMA, "intermediate_size": 192},
        3,
    )
    messages = values(run_ranks(2, _refused_reload, checkpoints["llama"], other))
    assert messages[0] == messages[1]
    assert messages[0].startswith(
        "ShardingError: destination 'model.layers.0.mlp.down_proj.weight' is DTensor [64, 128] (Shard(dim=1),) "
        "local [64, 64] torch.float32, but the plan gives it global [64, 192] (Shard(dim=1),) local [64, 96] "
        "(and 5 more destinations that do not fit) [rank=0, key=model.layers.0.mlp.down_proj.weight]"
    ), messages[0]


def _into_local_tensors(rank: int, world_size: int, root: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """A server with its own parallel layers: plain tensors of this rank's local shapes, named its own way."""
    mine = {name.replace("model.layers.", "blocks."): torch.full(shape, float("nan")) for name, shape in shapes.items()}
    pointers = {name: t.data_ptr() for name, t in mine.items()}
    report = tp_loader.load_into(mine, root, key_map={r"^model\.layers\.": "blocks."})
    assert report.missing_keys == () and report.unexpected_keys == ()
    shards = tp_loader.load(root).state_dict
    for key, shard in shards.items():
        name = key.replace("model.layers.", "blocks.")
        assert torch.equal(mine[name], shard.to_local()), name
        assert mine[name].data_ptr() == pointers[name]
    return len(mine)


def test_a_dict_of_local_tensors_named_by_key_map_gets_exactly_each_ranks_shards(
    checkpoints: dict[str, Path],
) -> None:
    summary = tp_loader.plan_load(checkpoints["llama"], world_size=2)
    for rank in range(2):
        shapes = {p.key: p.local_shapes[rank] for p in summary.placements}
        assert len(shapes) == 2 + 9 * LLAMA["num_hidden_layers"] + 1
    shapes0 = {p.key: p.local_shapes[0] for p in summary.placements}
    assert shapes0 == {p.key: p.local_shapes[1] for p in summary.placements}  # every split is even here
    assert values(run_ranks(2, _into_local_tensors, checkpoints["llama"], shapes0)) == [len(shapes0)] * 2


def _strict_mismatch(rank: int, world_size: int, root: Path) -> str:
    mine = {"model.embed_tokens.weight": torch.empty(48, 64), "extra.weight": torch.empty(3)}
    tp_loader.load_into(mine, root)
    return "loaded"


def test_a_strict_load_into_names_what_the_target_and_the_checkpoint_each_lack(checkpoints: dict[str, Path]) -> None:
    error = same_error(run_ranks(2, _strict_mismatch, checkpoints["llama"]))
    assert error.type == "StrictLoadError"
    assert error.message.startswith(
        "the module and the checkpoint differ: 1 module tensors have no checkpoint key (extra.weight), "
        "20 checkpoint keys have no module tensor (lm_head.weight, model.layers.0.input_layernorm.weight, "
    ), error.message


@pytest.mark.parametrize(("family", "world_size"), [("mixtral", 2), ("mixtral", 4), ("qwen3_moe", 2)])
def test_moe_in_expert_parallel_mode_generates_what_transformers_generates(
    checkpoints: dict[str, Path], family: str, world_size: int
) -> None:
    """Whole experts per rank (4 experts: two each at world size 2, one each at 4), the routed expert
    ids renumbered to each rank's own, the outputs summed over the ranks."""
    root = checkpoints[family]
    want_logits, want_tokens = _reference(root)
    sharded = values(run_ranks(world_size, _generate_tp, root, want_logits, want_tokens, "ep", timeout=240))
    assert sharded == [SHARDED[family]] * world_size


def test_a_module_the_plan_shards_but_cannot_run_sharded_is_an_error_naming_it(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    plan = tmp_path / "norm_colwise.toml"
    plan.write_text('extends = "llama"\n\n[[rules]]\npattern = "model.norm.weight"\nstyle = "colwise"\n')
    config = transformers.AutoConfig.from_pretrained(checkpoints["llama"])
    with accelerate.init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config)
    error = same_error(run_ranks(2, _parallelize_only, model, str(plan)))
    assert error.type == "PlanError"
    assert error.message.startswith(
        "cannot run module 'model.norm' (LlamaRMSNorm) tensor-parallel with style 'colwise' [key=model.norm.weight]"
    ), error.message


def _parallelize_only(rank: int, world_size: int, model: torch.nn.Module, plan: str) -> None:
    tp_loader.parallelize(model, mesh=init_device_mesh("cpu", (world_size,)), plan=plan)


def _parallelize_loaded(rank: int, world_size: int, root: Path, want_tokens: torch.Tensor, family: str) -> int:
    """A model already holding its weights (``from_pretrained``): parallelize keeps each rank's slice."""
    model = transformers.AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32).eval()
    full = {k: v.clone() for k, v in model.state_dict().items()}
    tp_loader.parallelize(model, mesh=init_device_mesh("cpu", (world_size,)), mode="ep" if family == "ep" else None)
    _, tokens = _run(model)
    assert torch.equal(tokens, want_tokens), (tokens, want_tokens)
    gathered = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
    # fused tensors gather rank by rank (each rank's q, k, v together), so only the others compare whole
    fused = ("qkv_proj", "gate_up_proj", ".experts.")
    assert all(torch.equal(gathered[k], full[k]) for k in full if not any(f in k for f in fused)), family
    return len(gathered)


@pytest.mark.parametrize("family", ["phi3", "mixtral", "ep"])
def test_parallelizing_a_model_that_holds_its_weights_keeps_each_ranks_slice(
    checkpoints: dict[str, Path], family: str
) -> None:
    """Fused parts (phi3), fused experts split per expert (mixtral) and whole experts per rank (ep)."""
    root = checkpoints["mixtral" if family == "ep" else family]
    _, want_tokens = _reference(root)
    assert len(set(values(run_ranks(2, _parallelize_loaded, root, want_tokens, family)))) == 1


def _into_bf16(rank: int, world_size: int, root: Path) -> None:
    config = transformers.AutoConfig.from_pretrained(root)
    with accelerate.init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    mesh = init_device_mesh("cpu", (world_size,))
    tp_loader.parallelize(model, mesh=mesh)
    tp_loader.load_into(model, root, mesh=mesh)
    want = tp_loader.load(root, dtype=torch.bfloat16).state_dict
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.bfloat16, name
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        assert torch.equal(local, want[name].to_local()), name


def test_load_into_converts_each_slice_to_its_destinations_dtype(checkpoints: dict[str, Path]) -> None:
    values(run_ranks(2, _into_bf16, checkpoints["llama"]))


def test_reloading_a_model_loaded_zero_copy_warns_once_that_its_pages_are_copied(
    checkpoints: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A reload into views of a file mapping works (the views' pages become the process's own) but is several
    times as slow as into memory of its own: the load says so, and what to do; into owned memory it says nothing."""
    mapped = dict(tp_loader.load(checkpoints["llama"]).state_dict)  # one process: plain views of the mapping
    owned = dict(tp_loader.load(checkpoints["llama"], zero_copy=False).state_dict)
    with caplog.at_level(logging.WARNING, logger="tp_loader"):
        tp_loader.load_into(owned, checkpoints["llama_b"], progress=False)
    assert not [r for r in caplog.records if "file mapping" in r.message]
    with caplog.at_level(logging.WARNING, logger="tp_loader"):
        tp_loader.load_into(mapped, checkpoints["llama_b"], progress=False)
    warned = [r.getMessage() for r in caplog.records if "file mapping" in r.getMessage()]
    assert len(warned) == 1 and "Load with zero_copy=False a model you will reload in place" in warned[0], warned
    b = tp_loader.load(checkpoints["llama_b"]).state_dict
    assert all(torch.equal(mapped[key], b[key]) for key in b)
