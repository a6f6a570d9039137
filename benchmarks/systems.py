"""The systems compared, each run on every rank of a gloo job: ``prepare`` (untimed) then ``load``
(timed: from the call to a complete state dict). ``load`` returns the bytes it read, or ``None``
where the system does not say."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from tp_loader.byteranges import slice_ranges
from tp_loader.index import index_checkpoint
from tp_loader.place import place
from tp_loader.plan import LoadPlan, make_plan
from tp_loader.resolve import find_weights
from tp_loader.spec import select_spec


def rank_plan(root: Path) -> LoadPlan:
    """This rank's tp_loader plan: the slices every system must end up with."""
    checkpoint = index_checkpoint(find_weights(root))
    spec = select_spec("auto", checkpoint.config, model=str(root))
    return make_plan(checkpoint, spec, dist.get_world_size(), dist.get_rank(), model=str(root))


class TPLoader:
    name = "tp_loader"

    def prepare(self, root: Path) -> None:
        self.mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    def load(self, root: Path) -> int | None:
        import tp_loader

        self.result = tp_loader.load(root, mesh=self.mesh, progress=False)  # kept: a complete state dict
        return self.result.report.ranks[dist.get_rank()].bytes_read


class TPLoaderZeroCopy(TPLoader):
    """tp_loader with ``zero_copy=True``: shards stay views of the file mapping (row shards as
    transformers keeps them, column shards as strided views where transformers copies)."""

    name = "tp_loader zero-copy"

    def load(self, root: Path) -> int | None:
        import tp_loader

        self.result = tp_loader.load(root, mesh=self.mesh, progress=False, zero_copy=True)
        return self.result.report.ranks[dist.get_rank()].bytes_read


class RawRead:
    """The raw-read limit: ``os.preadv`` of exactly this rank's byte ranges into fresh tensors."""

    name = "raw read"

    def prepare(self, root: Path) -> None:
        plan = rank_plan(root)
        self.jobs = [
            (root / t.info.file, t.local_shape, t.info.dtype, [(r.offset, r.length) for r in slice_ranges(t)])
            for t in plan.tensors
        ]

    def load(self, root: Path) -> int | None:
        fds: dict[Path, int] = {}
        total = 0
        self.state = []  # kept, like every system's state dict: no allocator reuse between tensors
        for path, shape, dtype, ranges in self.jobs:
            fd = fds.get(path) or fds.setdefault(path, os.open(path, os.O_RDONLY))
            out = torch.empty(shape, dtype=dtype)
            self.state.append(out)
            nbytes = out.numel() * out.element_size()
            view = (
                memoryview((ctypes.c_char * nbytes).from_address(out.data_ptr())).cast("B")
                if nbytes
                else memoryview(b"")
            )
            position = 0
            for offset, length in ranges:
                position += os.preadv(fd, [view[position : position + length]], offset)
            total += position
        for fd in fds.values():
            os.close(fd)
        return total


class Naive:
    """Every rank ``safetensors.torch.load_file`` of every file, then slices what it needs."""

    name = "naive"

    def prepare(self, root: Path) -> None:
        self.plan = rank_plan(root)
        self.files = sorted({t.info.file for t in self.plan.tensors})

    def load(self, root: Path) -> int | None:
        from safetensors.torch import load_file

        by_file: dict[str, list] = {}
        for item in self.plan.tensors:
            by_file.setdefault(item.info.file, []).append(item)
        out, total = {}, 0
        for name in self.files:
            full = load_file(str(root / name))
            total += sum(t.numel() * t.element_size() for t in full.values())
            for item in by_file[name]:
                piece = item.slice
                tensor = full[item.key]
                out[item.key] = (
                    tensor if piece.dim is None else tensor.narrow(piece.dim, piece.start, piece.stop - piece.start)
                ).clone()
            del full
        self.state = out
        return total


class DCPReader:
    """``torch.distributed.checkpoint.load`` with ``HuggingFaceStorageReader`` into DTensors of the same placements."""

    name = "DCP"

    def prepare(self, root: Path) -> None:
        self.plan = rank_plan(root)
        self.mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    def load(self, root: Path) -> int | None:
        import torch.distributed.checkpoint as dcp

        empty = {item.key: torch.empty(item.local_shape, dtype=item.info.dtype) for item in self.plan.tensors}
        state: dict[str, Any] = place(empty, self.plan.tensors, self.mesh)
        dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(root)))
        self.state = state
        return None


class Transformers:
    """``AutoModelForCausalLM.from_pretrained(tp_plan="auto")`` (transformers and accelerate needed)."""

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

    def load(self, root: Path) -> int | None:
        self.model = self.auto.from_pretrained(str(root), tp_plan="auto", dtype=torch.bfloat16)
        return None


SYSTEMS = {cls.name: cls for cls in (TPLoader, TPLoaderZeroCopy, RawRead, Naive, DCPReader, Transformers)}
