"""Per-tensor cost of one rank, in one process: index a full-size sparse checkpoint's headers, plan one rank,
make its zero-copy views, and place them as DTensors, each step timed (no process group: the mesh is a fake one of
``world_size`` ranks, so DTensor construction runs as it does on a real rank).

    python -m benchmarks.per_tensor deepseek_v3 --tp 8            # the sparse checkpoint written to a temp dir
    python -m benchmarks.per_tensor deepseek_v3 --tp 8 --dir DIR  # an existing one (benchmarks.fullsize)

What ``benchmarks.scale`` measures across 8 processes on 2 cores, taken apart on one core without contention.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def measure(root: Path, world_size: int, rank: int) -> dict[str, float]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from tp_loader.index import index_checkpoint
    from tp_loader.place import place
    from tp_loader.plan import plan_rank
    from tp_loader.read import MappedSource
    from tp_loader.resolve import find_weights

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    checkpoint = index_checkpoint(find_weights(root))
    seconds["index headers"] = time.perf_counter() - start
    start = time.perf_counter()
    plan = plan_rank(checkpoint, world_size, rank, model=str(root))
    seconds["plan one rank"] = time.perf_counter() - start
    source = MappedSource(checkpoint.root, checkpoint.file_sizes)
    start = time.perf_counter()
    views = {item.key: source.view(item) for item in plan.tensors if source.can_view(item)}
    seconds["zero-copy views"] = time.perf_counter() - start
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        mesh = DeviceMesh("cpu", list(range(world_size)))
        start = time.perf_counter()
        items = tuple(item for item in plan.tensors if item.key in views)
        place(views, items, mesh)
        seconds["DTensors"] = time.perf_counter() - start
    finally:
        dist.destroy_process_group()
    seconds["tensors"] = len(plan.tensors)
    seconds["views"] = len(views)
    return seconds


def main(argv: list[str] | None = None) -> int:
    from benchmarks import fullsize

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=list(fullsize.MODELS))
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--dir", type=Path, help="an existing sparse checkpoint of the model")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.dir or Path(scratch) / args.model
        if args.dir is None:
            fullsize.write(root, args.model)
        result = measure(root, args.tp, args.rank)
    tensors, views = int(result.pop("tensors")), int(result.pop("views"))
    print(f"{args.model}, rank {args.rank} of {args.tp}: {tensors:,} tensors ({views:,} zero-copy views)")
    for step, spent in result.items():
        print(f"  {step:<16} {spent:7.3f} s  {spent / tensors * 1e6:6.1f} us a tensor")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
