"""The process group, the device mesh, and the one collective the loader's control flow rests on:
:func:`agree`, which makes any rank's error every rank's error."""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .env import LaunchEnv, Settings, node_override
from .errors import DistributedError, LostContactError, TPLoaderError, as_loader_error, from_wire

logger = logging.getLogger("tp_loader")

T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """Where this process stands in the load.

    Attributes:
        rank: this process's coordinate on the tensor-parallel dimension (0 when not distributed).
        world_size: the tensor-parallel degree.
        mesh: the device mesh (1-D, or 2-D with replicas), or ``None`` for a plain single process
            (plain tensors result).
        device: where shards are placed.
        group: the group of the loader's own collectives (``None`` in a single process), set by
            :func:`open_control_group`.
        timeout_s: the loader's collective timeout.
        initialized_gloo: this load initialized the job's process group itself, on gloo and with the
            loader's timeout, so the loader's collectives can use it.
        tp_axis: the mesh dimension the plan shards over.
        replica: this process's coordinate on the other dimension of a 2-D mesh (0 for a 1-D one).
        num_replicas: that dimension's size: tensor-parallel groups holding the same shards.
        control_rank: this process's rank in the loader's collectives (their payloads come in this order).
    """

    rank: int
    world_size: int
    mesh: DeviceMesh | None
    device: torch.device
    group: Any = None
    timeout_s: float = 0.0
    initialized_gloo: bool = False
    tp_axis: int = 0
    replica: int = 0
    num_replicas: int = 1
    control_rank: int = 0

    @property
    def control_size(self) -> int:
        """Ranks in the loader's collectives: every rank of every replica."""
        return self.world_size * self.num_replicas

    @property
    def leader(self) -> bool:
        """Whether this rank speaks for the load (the report, warnings, the progress bar)."""
        return self.control_rank == 0

    def replica_of(self) -> dict[int, int]:
        """Each rank's replica, by global rank."""
        return {rank: i for column in self.columns() for i, rank in enumerate(column)}

    def columns(self) -> list[tuple[int, ...]]:
        """The global ranks of each replica group (one tensor-parallel coordinate in every replica), in
        tensor-parallel order; a 1-D mesh has one rank per column."""
        if self.mesh is None:
            return [(0,)]
        grid = self.mesh.mesh
        if grid.dim() == 1:
            return [(int(r),) for r in grid.tolist()]
        grid = grid if self.tp_axis == 1 else grid.transpose(0, 1)  # rows: replicas; columns: tp ranks
        return [tuple(int(r) for r in grid[:, t].tolist()) for t in range(grid.shape[1])]


def default_device(env: LaunchEnv) -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def make_context(
    mesh: DeviceMesh | None,
    device: str | torch.device | None,
    env: LaunchEnv,
    settings: Settings,
    tp_dim: str = "tp",
    tp_size: int | None = None,
) -> Context:
    """Builds the context, initializing the process group when launched under torchrun without one.

    Args:
        mesh: the caller's device mesh: 1-D (tensor-parallel), or 2-D over the whole job with a dimension
            named ``tp_dim`` (each slice along the other dimension a replica); or ``None``.
        device: where to place shards; default: the mesh's device type, else :func:`default_device`.
        env: the launcher's variables.
        settings: tunables (the collective timeout).
        tp_dim: the name of a 2-D mesh's tensor-parallel dimension.
        tp_size: without a mesh, under a launcher: the tensor-parallel degree, when smaller than the job (the
            job then holds ``world_size / tp_size`` replicas on a ``("dp", "tp")`` mesh).

    Raises:
        DistributedError: a mesh of more than two dimensions, a 2-D mesh without ``tp_dim`` or over part of
            the job, or a process group that cannot be set up.
    """
    if mesh is not None:
        target = torch.device(device) if device is not None else _mesh_device(mesh)
        if mesh.get_coordinate() is None:
            raise DistributedError(
                f"this process (global rank {dist.get_rank()}) is not in the mesh it passed "
                f"(ranks {mesh.mesh.flatten().tolist()})",
                hint="Call load with mesh= only on the mesh's own ranks, each passing the mesh it belongs to",
            )
        if mesh.ndim == 1:
            rank = mesh.get_local_rank()
            return Context(rank, mesh.size(), mesh, target, timeout_s=settings.timeout_s, control_rank=rank)
        return _replicated_context(mesh, target, settings, tp_dim)
    target = torch.device(device) if device is not None else default_device(env)
    if not dist.is_initialized() and not env.launched:
        return Context(0, 1, None, target)
    initialized_gloo = False
    if not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        initialized_gloo = backend == "gloo"
        if target.type == "cuda":
            torch.cuda.set_device(target)
        try:
            _init_process_group(backend, settings.timeout_s)
        except Exception as exc:  # noqa: BLE001 - the launcher's variables are what is wrong
            raise DistributedError(
                f"cannot initialize the {backend} process group: {exc}",
                rank=env.rank,
                hint="Check MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE (torchrun sets them)",
            ) from None
    world_size = dist.get_world_size()
    if tp_size is not None and tp_size != world_size:
        if tp_size < 1 or world_size % tp_size:
            raise DistributedError(
                f"a tensor-parallel degree of {tp_size} does not divide the job's {world_size} ranks into replicas",
                rank=dist.get_rank(),
                hint=f"Pass a divisor of {world_size} as tp_size (--tp)",
            )
        mesh = init_device_mesh(target.type, (world_size // tp_size, tp_size), mesh_dim_names=("dp", "tp"))
        ctx = _replicated_context(mesh, target, settings, "tp")
        return dataclasses.replace(ctx, initialized_gloo=initialized_gloo)
    mesh = init_device_mesh(target.type, (world_size,), mesh_dim_names=("tp",))
    return Context(
        dist.get_rank(),
        world_size,
        mesh,
        target,
        timeout_s=settings.timeout_s,
        initialized_gloo=initialized_gloo,
        control_rank=dist.get_rank(),
    )


def _replicated_context(mesh: DeviceMesh, target: torch.device, settings: Settings, tp_dim: str) -> Context:
    """A 2-D mesh: the plan shards over ``tp_dim``; the other dimension holds replicas of those shards."""
    names = mesh.mesh_dim_names or ()
    if mesh.ndim != 2 or tp_dim not in names:
        raise DistributedError(
            f"tp_loader takes a 1-D mesh or a 2-D mesh with a dimension named {tp_dim!r}; got a {mesh.ndim}-D mesh "
            f"{tuple(mesh.shape)} with dimensions {list(names)}",
            hint="Name the mesh's dimensions (init_device_mesh(..., mesh_dim_names=('dp', 'tp'))) and pass "
            "tp_dim=, or pass mesh['tp'] alone",
        )
    if mesh.size() != dist.get_world_size():
        raise DistributedError(
            f"a 2-D mesh must span the whole job: it has {mesh.size()} ranks, the job {dist.get_world_size()}",
            hint="Pass the job's whole (dp, tp) mesh, or each replica's mesh['tp'] alone (each replica then "
            "reads for itself)",
        )
    axis = names.index(tp_dim)
    return Context(
        mesh.get_local_rank(axis),
        mesh.size(axis),
        mesh,
        target,
        timeout_s=settings.timeout_s,
        tp_axis=axis,
        replica=mesh.get_local_rank(1 - axis),
        num_replicas=mesh.size(1 - axis),
        control_rank=dist.get_rank(),
    )


#: How many times this process has initialized the job's process group (see :func:`_init_process_group`).
_INCARNATIONS = itertools.count()


def _init_process_group(backend: str, timeout_s: float) -> None:
    """Initializes the job's process group from the launcher's variables, in a store namespace of its
    own for each time this process does it.

    torchrun's store outlives a job that is torn down (``destroy_process_group()``) and initialized
    again, and torch numbers the new job's groups from the start: without a namespace of its own, a
    rank of the new job can meet the old job's addresses in the store and wait on a dead peer (seen
    here in 4 of 5 runs). Every rank initializes the same number of times, so the namespaces agree.
    """
    incarnation = next(_INCARNATIONS)
    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    store = dist.PrefixStore(f"tp_loader/job{incarnation}/", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


#: The loader's control groups, one per timeout, kept for later loads: tearing a gloo group down costs
#: about 20 ms here (measured; creating one about 1 ms), a third of a small load's fixed cost. A group
#: the caller has destroyed since (``destroy_process_group()``, a re-initialized job) is replaced.
_CONTROL_GROUPS: dict[float, Any] = {}


def open_control_group(ctx: Context) -> Context:
    """Gives the load a gloo group for the loader's collectives, with the loader's timeout, so a lost
    or stuck peer ends every waiting rank within ``timeout_s`` whatever the caller's process group
    timeout is.

    When the mesh spans the whole job, every rank creates the group on its first load with that
    timeout (a collective call, made identically on every rank) and reuses it after. A mesh over part
    of a larger job cannot create one without the other ranks, so its own group is used and the
    caller's timeout applies.

    Raises:
        DistributedError: the group cannot be formed within the timeout.
    """
    if ctx.mesh is None or ctx.control_size == 1:
        return ctx
    if ctx.initialized_gloo:
        # the group this load created is gloo with the loader's timeout already: a group of its own
        # would be created after a re-initialized job under torchrun with the numbering of the first
        # job, in torchrun's store that outlives it, and meet that job's stale addresses
        return dataclasses.replace(ctx, group=dist.group.WORLD)
    if ctx.control_size != dist.get_world_size():
        logger.debug(
            "mesh of %d ranks in a job of %d: the loader's collectives use the mesh's group and its timeout",
            ctx.world_size,
            dist.get_world_size(),
        )
        return dataclasses.replace(ctx, group=ctx.mesh.get_group())
    group = _CONTROL_GROUPS.get(ctx.timeout_s)
    if group is None or not group_alive(group):
        try:
            group = dist.new_group(timeout=datetime.timedelta(seconds=ctx.timeout_s), backend="gloo")
        except Exception as exc:  # noqa: BLE001 - a missing peer surfaces here
            raise DistributedError(
                f"cannot form the loader's process group: {exc}",
                rank=ctx.control_rank,
                hint="Check that every rank calls tp_loader.load",
            ) from None
        _CONTROL_GROUPS[ctx.timeout_s] = group
    return dataclasses.replace(ctx, group=group)


def group_alive(group: Any) -> bool:
    """Whether ``group`` is still registered (not destroyed with its job)."""
    try:
        dist.get_process_group_ranks(group)
    except (KeyError, ValueError, RuntimeError):
        return False
    return True


def _mesh_device(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def agree(ctx: Context, error: TPLoaderError | None, payload: Any = None, *, stage: str = "") -> list[Any]:
    """Gathers ``(error, payload)`` from every rank. If any rank failed, every rank raises the error of
    the lowest failing rank; otherwise every rank gets every rank's payload, in rank order.

    Raises:
        TPLoaderError: the agreed error.
    """
    if ctx.control_size == 1 or ctx.group is None:
        if error is not None:
            raise error
        return [payload]
    sent = (error.to_wire() if error is not None else None, payload)
    gathered: list[Any] = [None] * ctx.control_size
    try:
        dist.all_gather_object(gathered, sent, group=ctx.group)
    except Exception as exc:  # noqa: BLE001 - a lost peer or a timeout surfaces here
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LostContactError(
            f"lost contact with the other ranks after stage '{stage}' (waited at most {ctx.timeout_s:g} s): {cause}",
            rank=ctx.control_rank,
            hint="Another rank died, hung or failed outside tp_loader; see its log. TP_LOADER_TIMEOUT_S sets the wait",
        ) from None
    for wire, _ in gathered:
        if wire is not None:
            raise from_wire(wire)
    return [item for _, item in gathered]


def run_agreed(
    ctx: Context, stage: str, fn: Callable[[], T], payload: Callable[[T], Any] = lambda _: None
) -> tuple[T, list[Any]]:
    """Runs ``fn`` on every rank, then :func:`agree` on its outcome.

    Returns:
        ``fn``'s result on this rank and every rank's ``payload(result)``.
    """
    result: Any = None
    error: TPLoaderError | None = None
    try:
        result = fn()
        sent = payload(result)
    except Exception as exc:  # noqa: BLE001 - every failure must reach every rank
        logger.debug("stage %s failed on rank %d", stage, ctx.control_rank, exc_info=True)
        error = as_loader_error(exc, ctx.control_rank)
        sent = None
    if isinstance(error, LostContactError):  # the rank it lost would not join this round either
        raise error
    return result, agree(ctx, error, sent, stage=stage)


def host_name() -> str:
    """This node's name, to tell which ranks share a filesystem cache: ``TP_LOADER_NODE`` when set (nodes
    whose host names are not unique, and the tests that run several "nodes" on one machine), else the host
    name."""
    return node_override() or socket.gethostname()
