"""The serving mesh: ``load_into`` loads onto the mesh the destinations' DTensors carry (a user's own mesh, a
``tp`` submesh of a 2-D mesh), adopts a ``mesh=`` of the same ranks, and refuses before any byte is read a mesh
over other ranks or destinations on several meshes; ``parallelize`` refuses a module it already parallelized."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TRANSFORMERS_LLAMA
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import tp_loader
from tp_loader.parallel import planned_dtensor
from tp_loader.testing import run_ranks, same_error, values

transformers = pytest.importorskip("transformers", reason="the models under test are transformers'")
accelerate = pytest.importorskip("accelerate", reason="init_empty_weights builds the models without memory")

PROMPT = torch.tensor([[5, 17, 33, 2, 71, 9]])


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.Tensor]:
    """Two checkpoints of one shape (seeds 0 and 1) and the first one's unsharded logits."""
    base = tmp_path_factory.mktemp("serving_mesh")
    roots = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TRANSFORMERS_LLAMA)).eval()
        model.save_pretrained(base / f"llama{seed}")
        roots.append(base / f"llama{seed}")
    reference = transformers.AutoModelForCausalLM.from_pretrained(roots[0], dtype=torch.float32).eval()
    with torch.no_grad():
        logits = reference(PROMPT).logits
    return roots[0], roots[1], logits


def _meta_model(root: Path) -> torch.nn.Module:
    config = transformers.AutoConfig.from_pretrained(root)
    with accelerate.init_empty_weights():
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits


def _meshes_of(model: torch.nn.Module) -> set[int]:
    return {id(p.device_mesh) for p in model.parameters() if isinstance(p, DTensor)}


def _on_own_mesh(rank: int, world_size: int, root: Path, want: torch.Tensor, adopt: bool) -> int:
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    model = tp_loader.parallelize(_meta_model(root), mesh=mesh)
    # adopt: a second mesh object over the same ranks, as a server that builds its mesh twice passes it
    given = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",)) if adopt else None
    tp_loader.load_into(model, root, mesh=given)
    assert _meshes_of(model) == {id(mesh)}
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=1e-5)
    return sum(isinstance(p, DTensor) and p.placements[0].is_shard() for p in model.parameters())


@pytest.mark.parametrize("adopt", [False, True], ids=["no-mesh-argument", "same-ranks-other-mesh-object"])
def test_load_into_loads_onto_the_mesh_the_parallelized_model_carries(llama, adopt: bool) -> None:
    root, _, want = llama
    assert values(run_ranks(2, _on_own_mesh, root, want, adopt)) == [16, 16]


def _on_tp_submesh(rank: int, world_size: int, root: Path, want: torch.Tensor) -> tuple[int, list[int]]:
    mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = tp_loader.parallelize(_meta_model(root), mesh=mesh2["tp"])
    report = tp_loader.load_into(model, root)
    assert not any(p.is_meta for p in model.parameters())
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=1e-5)
    q = model.model.layers[0].self_attn.q_proj.weight
    return report.world_size, q.device_mesh.mesh.tolist()


def test_load_into_a_model_on_the_tp_submesh_of_a_2d_mesh_loads_onto_that_submesh(llama) -> None:
    root, _, want = llama
    got = values(run_ranks(4, _on_tp_submesh, root, want, timeout=240))
    assert got == [(2, [0, 1]), (2, [0, 1]), (2, [2, 3]), (2, [2, 3])]


def _other_axis(rank: int, world_size: int, root: Path, second: Path) -> str:
    mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = tp_loader.parallelize(_meta_model(root), mesh=mesh2["tp"])
    try:
        tp_loader.load_into(model, root, mesh=mesh2["dp"])
    except tp_loader.ShardingError as exc:
        first = str(exc)
    else:
        raise AssertionError("load_into onto the dp submesh loaded")
    assert all(p.is_meta for p in model.parameters()), "the refused load materialized parameters"
    tp_loader.load_into(model, root)  # the right mesh: loads, then a reload onto the wrong one is refused too
    before = _logits(model)
    try:
        tp_loader.load_into(model, second, mesh=mesh2["dp"])
    except tp_loader.ShardingError as exc:
        assert str(exc) == first
    else:
        raise AssertionError("a reload onto the dp submesh loaded")
    assert torch.equal(_logits(model), before), "the refused reload changed the model"
    return first


def test_a_mesh_over_other_ranks_than_the_destinations_is_refused_before_any_read(llama) -> None:
    root, second, _ = llama
    messages = values(run_ranks(4, _other_axis, root, second, timeout=240))
    hint = (
        " [rank=0, key=lm_head.weight]. Pass the mesh the model was parallelized on (or no mesh=: load_into takes "
        "the destinations' own), and parallelize every module on that one mesh"
    )
    # each dp column agrees on one error: its first rank's, naming both meshes
    column = "the destinations are DTensors on mesh cpu (2,) ranks [0, 1] dims ('tp',), but mesh= is mesh cpu (2,) "
    assert messages == [column + f"ranks {ranks} dims ('dp',)" + hint for ranks in ([0, 2], [1, 3], [0, 2], [1, 3])]


def _several_meshes(rank: int, world_size: int, root: Path) -> None:
    mesh_a = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    mesh_b = init_device_mesh("cpu", (world_size,), mesh_dim_names=("other",))
    summary = tp_loader.plan_load(root, world_size=world_size)
    target = {}
    for placement in summary.placements:
        mesh = mesh_b if placement.key == "model.norm.weight" else mesh_a
        dim = int(placement.placement[6:-1]) if placement.placement.startswith("Shard") else None
        target[placement.key] = planned_dtensor(torch.empty(placement.local_shapes[rank]), mesh, dim, placement.shape)
    tp_loader.load_into(target, root)


def test_destinations_on_several_meshes_are_refused_naming_two_of_them(llama) -> None:
    root, _, _ = llama
    error = same_error(run_ranks(2, _several_meshes, root))
    assert error.type == "ShardingError"
    assert error.message.startswith(
        "the destinations are DTensors on more than one mesh: 'lm_head.weight' on mesh cpu (2,) ranks [0, 1] "
        "dims ('tp',), 'model.norm.weight' on mesh cpu (2,) ranks [0, 1] dims ('other',)"
    ), error.message


def _twice(rank: int, world_size: int, root: Path) -> str:
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    model = tp_loader.parallelize(_meta_model(root), mesh=mesh)
    try:
        tp_loader.parallelize(model, mesh=mesh)
    except tp_loader.ArgumentError as exc:
        return str(exc)
    raise AssertionError("a second parallelize passed")


def test_parallelizing_a_module_twice_is_refused_naming_its_mesh(llama) -> None:
    root, _, _ = llama
    message = values(run_ranks(2, _twice, root))[0]
    assert message.startswith(
        "the module is already parallelized: 'lm_head.weight' is a DTensor on mesh cpu (2,) ranks [0, 1] dims ('tp',)"
    ), message
    assert "parallelize each module once" in message, message
