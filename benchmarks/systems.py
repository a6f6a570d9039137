"""The systems compared, each run on every rank of a gloo job: ``prepare`` (untimed) then ``load``
(timed: from the call to a complete state dict). ``state`` gives the rank's local tensors by checkpoint
key, for the page walk inside the timed region and the shard check outside it."""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from tp_loader.byteranges import slice_ranges
from tp_loader.index import index_checkpoint
from tp_loader.place import place
from tp_loader.plan import LoadPlan, TensorPlan, make_plan
from tp_loader.resolve import find_weights
from tp_loader.spec import select_spec

PAGE = 4096


def rank_plan(root: Path) -> LoadPlan:
    """This rank's tp_loader plan: the slices every system must end up with."""
    checkpoint = index_checkpoint(find_weights(root))
    spec = select_spec("auto", checkpoint.config, model=str(root))
    return make_plan(checkpoint, spec, dist.get_world_size(), dist.get_rank(), model=str(root))


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


class TPLoader:
    name = "tp_loader"
    zero_copy = False

    def prepare(self, root: Path) -> None:
        self.mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    def load(self, root: Path) -> None:
        import tp_loader

        self.result = tp_loader.load(root, mesh=self.mesh, progress=False, zero_copy=self.zero_copy)

    def state(self) -> dict[str, torch.Tensor]:
        return self.result.state_dict


class TPLoaderZeroCopy(TPLoader):
    """tp_loader with ``zero_copy=True``: shards stay views of the file mapping (row shards as
    transformers keeps them, column shards as strided views where transformers copies)."""

    name = "tp_loader zero-copy"
    zero_copy = True


def _writable(out: torch.Tensor) -> memoryview:
    nbytes = out.numel() * out.element_size()
    if not nbytes:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(out.data_ptr())).cast("B")


class RawRead:
    """A raw-read strategy: exactly this rank's byte ranges into fresh tensors, planning done before the
    clock starts. This one: ``os.preadv`` on one thread."""

    name = "raw preadv"
    num_threads = 1

    def prepare(self, root: Path) -> None:
        self.items: list[TensorPlan] = list(rank_plan(root).tensors)

    def _read(self, root: Path, items: list[TensorPlan], out: dict[str, torch.Tensor]) -> None:
        fds: dict[str, int] = {}
        try:
            for item in items:
                fd = fds.get(item.info.file) or fds.setdefault(
                    item.info.file, os.open(root / item.info.file, os.O_RDONLY)
                )
                tensor = torch.empty(item.local_shape, dtype=item.info.dtype)
                view, position = _writable(tensor), 0
                for r in slice_ranges(item):
                    position += os.preadv(fd, [view[position : position + r.length]], r.offset)
                out[item.key] = tensor
        finally:
            for fd in fds.values():
                os.close(fd)

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


class Naive:
    """Every rank ``safetensors.torch.load_file`` of every file, then clones the slices it needs."""

    name = "naive"

    def prepare(self, root: Path) -> None:
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


class DCPReader:
    """``torch.distributed.checkpoint.load`` with ``HuggingFaceStorageReader`` into DTensors of the same
    placements (the empty DTensors are built inside the timed region)."""

    name = "DCP"

    def prepare(self, root: Path) -> None:
        self.plan = rank_plan(root)
        self.mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    def load(self, root: Path) -> None:
        import torch.distributed.checkpoint as dcp

        empty = {item.key: torch.empty(item.local_shape, dtype=item.info.dtype) for item in self.plan.tensors}
        state: dict[str, Any] = place(empty, self.plan.tensors, self.mesh)
        dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(root)))
        self.out = state

    def state(self) -> dict[str, torch.Tensor]:
        return self.out


class Transformers:
    """``AutoModelForCausalLM.from_pretrained(tp_plan="auto")``: builds a whole model (modules, buffers,
    the TP hooks) besides loading its weights (transformers and accelerate needed)."""

    name = "transformers"

    @staticmethod
    def available() -> str | None:
        try:
            import accelerate  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as exc:
            return f"skipped: {exc.name} is not installed (pip install -e '.[bench]')"
        return None

    def prepare(self, root: Path) -> None:
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


SYSTEMS = {
    cls.name: cls
    for cls in (TPLoader, TPLoaderZeroCopy, RawRead, RawReadThreads, RawMmapCopy, Naive, DCPReader, Transformers)
}
RAW = (RawRead.name, RawReadThreads.name, RawMmapCopy.name)
