"""The place stage builds DTensors without ``DTensor.__init__`` (whose first call imports torch._dynamo):
each must equal what the public ``DTensor.from_local`` builds, and a load must not import dynamo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import tp_loader
from tp_loader.testing import run_ranks, values


def _same_as_from_local(rank: int, world_size: int, root: Path) -> int:
    mesh = init_device_mesh("cpu", (world_size,))
    result = tp_loader.load(root, mesh=mesh, zero_copy=False)
    for key, built in result.state_dict.items():
        local = built.to_local()
        public = DTensor.from_local(
            local, mesh, built.placements, run_check=False, shape=built.shape, stride=built.stride()
        )
        assert type(built) is DTensor and built.device_mesh is mesh, key
        assert (built.placements, built.shape, built.stride(), built.dtype) == (
            public.placements,
            public.shape,
            public.stride(),
            public.dtype,
        ), key
        assert built.requires_grad is False and local.data_ptr() == built._local_tensor.data_ptr(), key
        assert torch.equal(built.full_tensor(), public.full_tensor()), key
        assert torch.equal((built * 2).to_local(), local * 2), key
    return len(result.state_dict)


def test_placed_dtensors_equal_what_from_local_builds(make_checkpoint) -> None:
    assert values(run_ranks(2, _same_as_from_local, make_checkpoint())) == [21, 21]


LOAD_IN_A_FRESH_PROCESS = """
import sys
from tp_loader.testing import run_ranks, values

def load(rank, world_size, root):
    import tp_loader
    tp_loader.load(root)
    return "torch._dynamo" in sys.modules

print(values(run_ranks(2, load, sys.argv[1])))
"""


def test_a_load_in_a_fresh_process_does_not_import_torch_dynamo(make_checkpoint) -> None:
    """Importing dynamo cost 0.5 s of a 0.55 s fresh-process load at TP 2 (measured on a 1 GB checkpoint)."""
    out = subprocess.run(
        [sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, str(make_checkpoint())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[False, False]"


def _planned_like_from_local(rank: int, world_size: int) -> int:
    from torch.distributed.tensor import Replicate, Shard

    from tp_loader.parallel import planned_dtensor

    mesh = init_device_mesh("cpu", (world_size,))
    checked = 0
    for dim, shape, local in [
        (0, (5, 3), torch.arange(9.0).reshape(3, 3) + rank),  # uneven: rank 0 holds 3 rows, rank 1 two
        (1, (4, 6), torch.arange(12.0).reshape(4, 3) * (rank + 1)),
        (None, (2, 2), torch.ones(2, 2)),
        (0, (8, 2), torch.empty(4, 2, device="meta")),
    ]:
        placement = Replicate() if dim is None else Shard(dim)
        built = planned_dtensor(local, mesh, dim, shape)
        public = DTensor.from_local(
            local, mesh, (placement,), run_check=False, shape=torch.Size(shape), stride=built.stride()
        )
        assert (built.placements, built.shape, built.stride(), built.dtype, built.device) == (
            public.placements,
            public.shape,
            public.stride(),
            public.dtype,
            public.device,
        )
        assert built.requires_grad is False and built._local_tensor is local
        checked += 1
    grad_input = torch.ones(2, 3, requires_grad=True)  # an activation in training keeps its autograd graph
    (planned_dtensor(grad_input, mesh, 0, (4, 3)).to_local() * 3).sum().backward()
    assert torch.equal(grad_input.grad, torch.full((2, 3), 3.0))
    return checked


def test_planned_dtensors_of_parallelize_and_load_into_equal_what_from_local_builds() -> None:
    assert values(run_ranks(2, _planned_like_from_local)) == [4, 4]


def _parameters_like_nn_parameter(rank: int, world_size: int) -> int:
    from torch import nn

    from tp_loader.parallel import planned_dtensor
    from tp_loader.place import as_parameter

    mesh = init_device_mesh("cpu", (world_size,))
    checked = 0
    for requires_grad in (True, False):
        for local, dim, shape in [
            (torch.arange(6.0).reshape(3, 2), 0, (5, 2)),
            (torch.empty(2, 2, device="meta"), 1, (2, 4)),
        ]:
            ours = as_parameter(planned_dtensor(local, mesh, dim, shape), requires_grad)
            theirs = nn.Parameter(planned_dtensor(local, mesh, dim, shape), requires_grad=requires_grad)
            assert isinstance(ours, nn.Parameter) and isinstance(ours, DTensor) and type(ours) is type(theirs)
            assert (ours.requires_grad, ours.is_leaf, ours.grad_fn) == (theirs.requires_grad, True, None)
            assert (ours.placements, ours.shape, ours.stride(), ours.dtype) == (
                theirs.placements,
                theirs.shape,
                theirs.stride(),
                theirs.dtype,
            )
            assert ours._local_tensor is local and ours.to_local().requires_grad == theirs.to_local().requires_grad
            if not local.is_meta:
                assert torch.equal(ours.full_tensor(), theirs.full_tensor())
            module = nn.Linear(1, 1)
            module.register_parameter("weight", ours)  # accepted as a Parameter, and listed as one
            assert dict(module.named_parameters())["weight"] is ours
            checked += 1
    plain = as_parameter(torch.ones(2), True)
    assert type(plain) is nn.Parameter and plain.requires_grad
    return checked


def test_parameters_built_without_detach_equal_what_nn_parameter_makes_of_a_dtensor() -> None:
    assert values(run_ranks(2, _parameters_like_nn_parameter)) == [4, 4]
