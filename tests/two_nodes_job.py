"""Run by tests/test_two_nodes.py under two torchrun agents, each a "node" (``TP_LOADER_NODE``): loads MODEL on
a (dp, tp) mesh with share="none" and then share="job", and writes what it saw to OUT/rank<N>.json.

    torchrun --nnodes 2 ... tests/two_nodes_job.py OUT MODEL [DIE_RANK]

DIE_RANK: that rank exits without a word after its third broadcast of the share="job" load.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import tp_loader
import tp_loader.loader
import tp_loader.share

out, model = sys.argv[1], sys.argv[2]
die_rank = int(sys.argv[3]) if len(sys.argv) > 3 else -1
fetch_flags: list[bool] = []
real_resolve = tp_loader.loader.resolve_source


def recording_resolve(source, **kwargs):
    fetch_flags.append(kwargs.get("fetch", True))
    return real_resolve(source, **kwargs)


tp_loader.loader.resolve_source = recording_resolve
dist.init_process_group("gloo")
rank, world_size = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world_size // 2, 2), mesh_dim_names=("dp", "tp"))
record: dict = {"rank": rank, "node": os.environ["TP_LOADER_NODE"]}
try:
    none = tp_loader.load(model, mesh=mesh, share="none", progress=False)
    record["fetched"] = fetch_flags[0]
    if rank == die_rank:
        real_post, posted = tp_loader.share._post, iter(range(10**6))

        def dying(*args, **kwargs):
            if next(posted) == 3:
                os._exit(7)
            return real_post(*args, **kwargs)

        tp_loader.share._post = dying
    job = tp_loader.load(model, mesh=mesh, share="job", progress=False)
    record["same_keys"] = sorted(none.state_dict) == sorted(job.state_dict)
    record["bitwise_equal"] = all(
        torch.equal(none.state_dict[k].to_local(), job.state_dict[k].to_local())
        and none.state_dict[k].placements == job.state_dict[k].placements
        for k in none.state_dict
    )
    record["report"] = job.report.to_dict()
    record["none_bytes"] = [r.bytes_planned for r in none.report.ranks]
    code = 0
except tp_loader.TPLoaderError as exc:
    record["error"] = type(exc).__name__
    code = 1
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(record, f)
if code == 0:
    dist.barrier()
    dist.destroy_process_group()
sys.stdout.flush()
os._exit(code)
