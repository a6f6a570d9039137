"""The launch recipes' commands parse: each recipe runs with stand-ins for torchrun, srun and scontrol that
print their arguments, and both torchrun's own parser and tp_loader's accept what they were given."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from tp_loader.cli import build_parser

LAUNCH = Path(__file__).parents[1] / "launch"


def _stand_ins(tmp_path: Path) -> dict[str, str]:
    """A PATH whose torchrun, srun and scontrol print their arguments, one per line, after a marker."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("torchrun", "srun"):
        (bin_dir / name).write_text(f'#!/usr/bin/env bash\necho "{name}"; printf "%s\\n" "$@"\n')
    # as for a large job: a recipe that stops reading after the first line (head -n 1) under pipefail dies of SIGPIPE
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho node-a\nfor i in $(seq 5000); do echo node-$i; done\n")
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def _torchrun_and_tp_loader(argv: list[str]) -> tuple[object, object]:
    """torchrun's and tp_loader's parse of a ``torchrun ... -m tp_loader ...`` argument list."""
    assert argv[0] == "torchrun", argv
    split = argv.index("-m")
    assert argv[split + 1] == "tp_loader", argv
    torchrun = get_args_parser().parse_args([*argv[1:split], "--module", "tp_loader", *argv[split + 2 :]])
    return torchrun, build_parser().parse_args(argv[split + 2 :])


def test_the_multinode_recipe_passes_tp_and_share_to_tp_loader(tmp_path: Path) -> None:
    env = {**_stand_ins(tmp_path), "MASTER_ADDR": "10.0.0.1", "NODE_RANK": "1", "TP": "8", "SHARE": "job"}
    done = subprocess.run(
        ["bash", str(LAUNCH / "multinode-torchrun.sh"), "/models/m", "--dtype", "bfloat16"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    torchrun, ours = _torchrun_and_tp_loader(done.stdout.splitlines())
    assert (torchrun.nnodes, torchrun.node_rank, torchrun.rdzv_endpoint) == ("2", 1, "10.0.0.1:29500")
    assert (ours.model, ours.tp, ours.share, ours.dtype) == ("/models/m", 8, "job", "bfloat16")


def test_the_multinode_recipe_without_tp_loads_one_group_over_every_rank(tmp_path: Path) -> None:
    env = {**_stand_ins(tmp_path), "MASTER_ADDR": "10.0.0.1", "NODE_RANK": "0"}
    env.pop("TP", None), env.pop("SHARE", None)
    script = str(LAUNCH / "multinode-torchrun.sh")
    done = subprocess.run(["bash", script, "/models/m"], capture_output=True, text=True, env=env, check=True)
    _, ours = _torchrun_and_tp_loader(done.stdout.splitlines())
    assert (ours.tp, ours.share) == (None, "none")


def test_the_slurm_recipe_runs_torchrun_under_srun_with_the_head_node_as_endpoint(tmp_path: Path) -> None:
    env = {**_stand_ins(tmp_path), "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_NUM_NODES": "2"}
    env |= {"SLURM_JOB_ID": "42", "SLURM_GPUS_ON_NODE": "8"}
    done = subprocess.run(
        ["bash", str(LAUNCH / "slurm.sbatch"), "/models/m", "--tp", "8", "--share", "job"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    lines = done.stdout.splitlines()
    assert lines[0] == "srun"
    torchrun, ours = _torchrun_and_tp_loader(lines[1:])
    assert (torchrun.nnodes, torchrun.nproc_per_node, torchrun.rdzv_endpoint) == ("2", "8", "node-a:29500")
    assert (ours.tp, ours.share) == (8, "job")


def _yaml_commands() -> list[list[str]]:
    yaml = pytest.importorskip("yaml")
    job = yaml.safe_load((LAUNCH / "kubernetes.yaml").read_text())
    specs = job["spec"]["pytorchReplicaSpecs"]
    return [c["command"] for role in ("Master", "Worker") for c in specs[role]["template"]["spec"]["containers"]]


@pytest.mark.parametrize("role", [0, 1], ids=["master", "worker"])
def test_the_kubernetes_recipe_commands_parse(role: int) -> None:
    command = _yaml_commands()[role]
    torchrun, ours = _torchrun_and_tp_loader(command)
    assert (ours.model, ours.tp, ours.share) == ("/models/my-model", 8, "job"), shlex.join(command)
    assert torchrun.module
