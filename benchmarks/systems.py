"""The systems compared, each run on every rank of a gloo job: ``prepare`` (untimed, given the rank's 1-D mesh)
then ``load`` (timed: from the call to a complete state dict). ``state`` gives the rank's local tensors by
checkpoint key, for the page walk inside the timed region and the shard check outside it. ``modules`` names what a
fresh process imports for the system before its clock starts (``benchmarks.fresh``); ``available`` says why a
system cannot run here, or None."""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from tp_loader.byteranges import slice_ranges
from tp_loader.index import index_checkpoint
from tp_loader.place import place
from tp_loader.plan import LoadPlan, TensorPlan, make_plan
from tp_loader.resolve import find_weights
from tp_loader.spec import select_spec

PAGE = 4096


def rank_plan(root: Path, world_size: int | None = None, rank: int | None = None) -> LoadPlan:
    """A rank's tp_loader plan (this process group's rank unless given): the slices every system must end up with."""
    checkpoint = index_checkpoint(find_weights(root))
    spec = select_spec("auto", checkpoint.config, model=str(root))
    world_size = dist.get_world_size() if world_size is None else world_size
    return make_plan(checkpoint, spec, world_size, dist.get_rank() if rank is None else rank, model=str(root))


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def touch(tensors: dict[str, torch.Tensor]) -> float:
    """Reads one element in every 4 KiB page of every tensor (and each run's last element), without
    copying: a view of a file mapping is then faulted in, as a first use of the weights would."""
    total = 0.0
    for tensor in tensors.values():
        t = local(tensor)
        if t.numel() == 0:
            continue
        if t.is_contiguous():
            flat = t.reshape(-1)
            step = max(1, PAGE // t.element_size())
            total += float(flat[::step].sum(dtype=torch.float32)) + float(flat[-1])
        else:  # a strided column shard: every run is one row of the last dim
            step = max(1, PAGE // t.element_size())
            total += float(t[..., ::step].sum(dtype=torch.float32)) + float(t[..., -1].sum(dtype=torch.float32))
    return total


class System:
    """What every system has: nothing extra to import, available everywhere."""

    name = ""
    modules: tuple[str, ...] = ()

    @staticmethod
    def available() -> str | None:
        return None

    def prepare(self, root: Path, mesh: DeviceMesh) -> None:
        pass


class TPLoader(System):
    """``tp_loader.load`` with its CPU default, ``zero_copy=True``: shards stay views of a private file mapping
    (row shards and replicated tensors contiguous, column shards strided); the page walk faults them in."""

    name = "tp_loader zero-copy"
    modules = ("tp_loader.loader",)  # ``tp_loader.load`` imports its pipeline on first use
    zero_copy = True

    def prepare(self, root: Path, mesh: DeviceMesh) -> None:
        self.mesh = mesh

    def load(self, root: Path) -> None:
        import tp_loader

        self.result = tp_loader.load(root, mesh=self.mesh, progress=False, zero_copy=self.zero_copy)

    def state(self) -> dict[str, torch.Tensor]:
        return self.result.state_dict


class TPLoaderCopying(TPLoader):
    """``tp_loader.load(..., zero_copy=False)``: every shard copied into memory of its own."""

    name = "tp_loader copying"
    zero_copy = False


def _writable(out: torch.Tensor) -> memoryview:
    nbytes = out.numel() * out.element_size()
    if not nbytes:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(out.data_ptr())).cast("B")


def preadv_slices(
    root: Path,
    items: list[TensorPlan],
    out: dict[str, torch.Tensor],
    destination: Callable[[TensorPlan], torch.Tensor],
) -> None:
    """``os.preadv`` of each item's byte ranges, on this thread, into ``destination(item)`` (a contiguous CPU tensor
    of its local shape: a fresh one, or one allocated before the clock), kept in ``out`` under its key."""
    fds: dict[str, int] = {}
    try:
        for item in items:
            fd = fds.get(item.info.file) or fds.setdefault(item.info.file, os.open(root / item.info.file, os.O_RDONLY))
            tensor = destination(item)
            view, position = _writable(tensor), 0
            for r in slice_ranges(item):
                position += os.preadv(fd, [view[position : position + r.length]], r.offset)
            out[item.key] = tensor
    finally:
        for fd in fds.values():
            os.close(fd)


class RawRead(System):
    """A raw-read strategy: exactly this rank's byte ranges into fresh tensors, planning done before the
    clock starts. This one: ``os.preadv`` on one thread."""

    name = "raw preadv"
    num_threads = 1

    def prepare(self, root: Path, mesh: DeviceMesh) -> None:
        self.items: list[TensorPlan] = list(rank_plan(root).tensors)

    def _read(self, root: Path, items: list[TensorPlan], out: dict[str, torch.Tensor]) -> None:
        preadv_slices(root, items, out, lambda item: torch.empty(item.local_shape, dtype=item.info.dtype))

    def load(self, root: Path) -> None:
        self.out: dict[str, torch.Tensor] = {}  # kept, like every system's state dict
        if self.num_threads == 1:
            self._read(root, self.items, self.out)
            return
        shares: list[list[TensorPlan]] = [[] for _ in range(self.num_threads)]
        sizes = [0] * self.num_threads
        for item in sorted(self.items, key=lambda i: -i.read_bytes):  # balance bytes between threads
            least = sizes.index(min(sizes))
            shares[least].append(item)
            sizes[least] += item.read_bytes
        threads = [
            threading.Thread(
                target=self._read, args=(root, sorted(s, key=lambda i: (i.info.file, i.info.begin)), self.out)
            )
            for s in shares
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def state(self) -> dict[str, torch.Tensor]:
        return self.out


class RawReadThreads(RawRead):
    """``os.preadv`` on two threads, the rank's tensors split between them by bytes."""

    name = "raw preadv ×2"
    num_threads = 2


class RawMmapCopy(RawRead):
    """Each file mapped (private, read-only use), each slice copied into a fresh tensor by ``Tensor.copy_``
    (one strided copy per range, on torch's intra-op threads)."""

    name = "raw mmap+copy"

    def load(self, root: Path) -> None:
        self.out = {}
        maps: dict[str, tuple[Any, torch.Tensor]] = {}
        for item in self.items:
            info, piece = item.info, item.slice
            if info.file not in maps:
                with open(root / info.file, "rb") as handle:
                    mapped = mmap.mmap(handle.fileno(), 0, flags=mmap.MAP_PRIVATE)
                maps[info.file] = (mapped, torch.frombuffer(mapped, dtype=torch.uint8))
            source = maps[info.file][1][info.begin : info.end].view(info.dtype).view(info.shape)
            out = torch.empty(item.local_shape, dtype=info.dtype)
            if piece.dim is None:
                out.copy_(source)
            else:
                at = 0
                for a, b in piece.ranges:
                    out.narrow(piece.dim, at, b - a).copy_(source.narrow(piece.dim, a, b - a))
                    at += b - a
            self.out[item.key] = out
        del maps  # unmapped once the last view is gone; the copies own their memory


class Naive(System):
    """Every rank ``safetensors.torch.load_file`` of every file, then clones the slices it needs."""

    name = "naive"
    modules = ("safetensors.torch",)

    def prepare(self, root: Path, mesh: DeviceMesh) -> None:
        self.plan = rank_plan(root)
        self.files = sorted({t.info.file for t in self.plan.tensors})

    def load(self, root: Path) -> None:
        from safetensors.torch import load_file

        by_file: dict[str, list[TensorPlan]] = {}
        for item in self.plan.tensors:
            by_file.setdefault(item.info.file, []).append(item)
        out = {}
        for name in self.files:
            full = load_file(str(root / name))
            for item in by_file[name]:
                piece, tensor = item.slice, full[item.key]
                if piece.dim is None:
                    out[item.key] = tensor.clone()
                else:
                    out[item.key] = torch.cat([tensor.narrow(piece.dim, a, b - a) for a, b in piece.ranges], piece.dim)
            del full
        self.out = out

    def state(self) -> dict[str, torch.Tensor]:
        return self.out


class DCPReader(System):
    """``torch.distributed.checkpoint.load`` with ``HuggingFaceStorageReader`` into DTensors of the same
    placements (the empty DTensors are built inside the timed region)."""

    name = "DCP"
    modules = ("torch.distributed.checkpoint",)

    def prepare(self, root: Path, mesh: DeviceMesh) -> None:
        self.plan = rank_plan(root)
        self.mesh = mesh

    def load(self, root: Path) -> None:
        import torch.distributed.checkpoint as dcp

        empty = {item.key: torch.empty(item.local_shape, dtype=item.info.dtype) for item in self.plan.tensors}
        state: dict[str, Any] = place(empty, self.plan.tensors, self.mesh)
        dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(root)))
        self.out = state

    def state(self) -> dict[str, torch.Tensor]:
        return self.out


class Transformers(System):
    """``AutoModelForCausalLM.from_pretrained(tp_plan="auto")``: builds a whole model (modules, buffers,
    the TP hooks) besides loading its weights (transformers and accelerate needed)."""

    name = "transformers"
    modules = ("transformers", "transformers.models.llama.modeling_llama", "transformers.integrations.tensor_parallel")

    @staticmethod
    def available() -> str | None:
        try:
            import accelerate  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as exc:
            return f"skipped: {exc.name} is not installed (pip install -e '.[bench]')"
        return None

    def prepare(self, root: Path, mesh: DeviceMesh) -> None:
        rank, world = dist.get_rank(), dist.get_world_size()
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
        import transformers.models.llama.modeling_llama  # noqa: F401 - import cost is not load cost
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.auto = AutoModelForCausalLM

    def load(self, root: Path) -> None:
        self.model = self.auto.from_pretrained(str(root), tp_plan="auto", dtype=torch.bfloat16)

    def state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()


class FastSafeTensors(System):
    """fastsafetensors' own tensor-parallel path on CPU (``nogds=True``): the files are dealt out to the ranks
    round-robin, each rank reads its whole files (``pread`` into one buffer per file), then every tensor is
    ``get_sharded`` along its tp_loader shard dim (a gloo ``scatter`` from the rank holding the file) or
    ``get_tensor`` when replicated (a ``broadcast``). Buffered reads (``FASTSAFETENSORS_ODIRECT=0``): on a local
    filesystem its default is ``O_DIRECT``, which skips the page cache, so a warm run would still read storage."""

    name = "fastsafetensors"
    modules = ("fastsafetensors",)

    @staticmethod
    def available() -> str | None:
        try:
            import fastsafetensors  # noqa: F401
        except ImportError:
            return "skipped: fastsafetensors is not installed (pip install -e '.[bench]')"
        return None

    def prepare(self, root: Path, mesh: DeviceMesh) -> None:
        os.environ["FASTSAFETENSORS_ODIRECT"] = "0"
        self.dims = {item.key: item.slice.dim for item in rank_plan(root).tensors}
        files = sorted(str(path) for path in root.glob("*.safetensors"))
        world = dist.get_world_size()
        self.files = {rank: files[rank::world] for rank in range(world)}

    def load(self, root: Path) -> None:
        from fastsafetensors import SafeTensorsFileLoader

        loader = SafeTensorsFileLoader(dist.group.WORLD, "cpu", nogds=True)
        try:
            loader.add_filenames(self.files)
            buffers = loader.copy_files_to_device()
            self.out = {
                key: buffers.get_tensor(key) if dim is None else buffers.get_sharded(key, dim)
                for key, dim in sorted(self.dims.items())  # the same order on every rank: they are collectives
            }
            buffers.close()
        finally:
            loader.close()

    def state(self) -> dict[str, torch.Tensor]:
        return self.out


SYSTEMS = {
    cls.name: cls
    for cls in (
        TPLoader,
        TPLoaderCopying,
        RawRead,
        RawReadThreads,
        RawMmapCopy,
        Naive,
        DCPReader,
        Transformers,
        FastSafeTensors,
    )
}
RAW = (RawRead.name, RawReadThreads.name, RawMmapCopy.name)
#: Every system's shards are checked against this one's.
REFERENCE = TPLoader.name


def runnable(names: list[str]) -> tuple[list[str], list[str]]:
    """The systems of ``names`` that can run here, and a note for each one that cannot."""
    reasons = {name: SYSTEMS[name].available() for name in names}
    return [n for n in names if not reasons[n]], [f"{n} {reason}" for n, reason in reasons.items() if reason]
