"""A ready model as ``benchmarks.ready`` builds it: a transformers model made on ``meta`` without random init,
``tp_loader.parallelize``, ``tp_loader.load_into``, the rotary buffer computed again. Its logits are the unsharded
model's, no rank holds more than its shards, and the hooks ``parallelize`` registers itself are torch's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TRANSFORMERS_LLAMA
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate

import tp_loader
from tp_loader.testing import run_ranks, values

transformers = pytest.importorskip("transformers", reason="the model under test is transformers'")
from transformers.initialization import no_init_weights  # noqa: E402

PROMPT = torch.tensor([[5, 17, 33, 2, 71, 9, 40]])
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ready") / "llama"
    torch.manual_seed(3)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TRANSFORMERS_LLAMA)).eval().save_pretrained(root)
    return root


def _meta_model(root: Path) -> nn.Module:
    """``benchmarks.ready``'s construction: meta device, no random init."""
    config = transformers.AutoConfig.from_pretrained(root)
    with torch.device("meta"), no_init_weights():
        return transformers.AutoModelForCausalLM.from_config(config)


def _ready(rank: int, world_size: int, root: Path, zero_copy: bool) -> dict:
    mesh = init_device_mesh("cpu", (world_size,))
    model = _meta_model(root)
    tp_loader.parallelize(model, mesh=mesh)
    meta_after_parallelize = all(p.is_meta for p in model.parameters())
    tp_loader.load_into(model, root, mesh=mesh, zero_copy=zero_copy, progress=False)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    layer = model.model.layers[0]
    linears = [getattr(layer.self_attn, n) for n in LINEARS[:4]] + [getattr(layer.mlp, n) for n in LINEARS[4:]]
    locals_ = {name: p.to_local() if isinstance(p, DTensor) else p for name, p in model.named_parameters()}
    with torch.no_grad():
        logits = model.eval()(PROMPT).logits
    return {
        "logits": logits.tolist(),  # a tensor would reach the parent as shared memory of an exited rank
        "meta_after_parallelize": meta_after_parallelize,
        "hooks": [(len(m._forward_pre_hooks), len(m._forward_hooks), m._distribute_module_applied) for m in linears],
        "storage_bytes": {name: t.untyped_storage().nbytes() for name, t in locals_.items()},
        "local_bytes": {name: t.nbytes for name, t in locals_.items()},
        "global_numel": {name: p.numel() for name, p in model.named_parameters()},
        "local_numel": {name: t.numel() for name, t in locals_.items()},
    }


@pytest.mark.parametrize("world_size", [1, 2])
def test_the_benchmarks_ready_model_gives_the_unsharded_models_logits(checkpoint: Path, world_size: int) -> None:
    want = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        want_logits = want(PROMPT).logits
    for got in values(run_ranks(world_size, _ready, checkpoint, True, timeout=240)):
        torch.testing.assert_close(torch.tensor(got["logits"]), want_logits, rtol=0, atol=1e-5)
        assert got["hooks"] == [(1, 1, True)] * len(LINEARS)  # one input and one output hook each, as torch's


def test_no_rank_holds_a_full_size_parameter(checkpoint: Path) -> None:
    """Built on meta, nothing is allocated before the load; after a copying load each parameter's storage is
    exactly its shard, and every sharded parameter holds half its elements on each of the 2 ranks."""
    ranks = values(run_ranks(2, _ready, checkpoint, False, timeout=240))
    for got in ranks:
        assert got["meta_after_parallelize"]
        assert got["storage_bytes"] == got["local_bytes"]
        sharded = {name for name, n in got["local_numel"].items() if n != got["global_numel"][name]}
        assert len(sharded) == len(LINEARS) * TRANSFORMERS_LLAMA["num_hidden_layers"] + 2  # + embeddings, LM head
        assert all(2 * got["local_numel"][name] == got["global_numel"][name] for name in sharded)
    assert sum(ranks[0]["local_bytes"].values()) == sum(ranks[1]["local_bytes"].values())


def _with_a_buffer(rank: int, world_size: int, root: Path) -> tuple:
    mesh = init_device_mesh("cpu", (world_size,))
    model = _meta_model(root)
    q_proj = model.model.layers[0].self_attn.q_proj
    q_proj.register_buffer("scale", torch.ones(3), persistent=False)  # not in the checkpoint, not in the plan
    tp_loader.parallelize(model, mesh=mesh)
    k_proj = model.model.layers[0].self_attn.k_proj
    return (
        type(q_proj.scale).__name__,
        tuple(q_proj.scale.placements),
        q_proj.scale.to_local().tolist(),
        (len(q_proj._forward_pre_hooks), len(q_proj._forward_hooks)),
        isinstance(q_proj.weight, DTensor) and q_proj.weight.placements[0].is_shard(),
        (len(k_proj._forward_pre_hooks), len(k_proj._forward_hooks)),
    )


def test_a_layer_holding_a_buffer_the_plan_does_not_place_gets_it_replicated_as_torch_does(checkpoint: Path) -> None:
    """Such a layer goes through torch's ``distribute_module``, which replicates what the styles leave."""
    for got in values(run_ranks(2, _with_a_buffer, checkpoint, timeout=240)):
        assert got == ("DTensor", (Replicate(),), [1.0, 1.0, 1.0], (1, 1), True, (1, 1))
