"""End to end: ``torchrun -m tp_loader`` and a caller-provided device mesh."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import llama_config
from torch.distributed.device_mesh import init_device_mesh

import tp_loader
from tp_loader.testing import run_ranks, values


def _torchrun(args: list[str], nproc: int, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "tp_loader",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})


def test_torchrun_loads_a_checkpoint_and_writes_one_agreed_report(make_checkpoint, tmp_path: Path) -> None:
    root = make_checkpoint(llama_config(num_key_value_heads=2), num_shards=2)
    report_path = tmp_path / "report.json"
    done = _torchrun(
        [str(root), "--dtype", "bfloat16", "--report", str(report_path)], nproc=4, env={"TP_LOADER_PROGRESS": "0"}
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(report_path.read_text())
    assert (report["world_size"], report["dtype"], report["plan"], report["clean"]) == (4, "bfloat16", "llama", True)
    assert len(report["ranks"]) == 4
    assert report["notes"]["model.layers.0.self_attn.k_proj.weight"] == "2 kv heads replicated 2x over 4 ranks"
    assert done.stdout.count("tp_loader: ") == 1, "the table must be printed once, by rank 0"


def test_local_launch_script_without_a_model_loads_the_generated_demo_checkpoint(tmp_path: Path) -> None:
    script = Path(__file__).parents[1] / "launch" / "local.sh"
    env = {**os.environ, "TP_LOADER_DEMO_DIR": str(tmp_path / "demo")}
    done = subprocess.run(
        ["bash", str(script), "-n", "2", "-q", "--report", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "r.json").read_text())["num_tensors"] == 21
    assert done.stdout == ""


def test_cli_exits_nonzero_with_the_error_message(make_checkpoint) -> None:
    root = make_checkpoint(llama_config(num_attention_heads=12, num_key_value_heads=4))
    done = _torchrun([str(root)], nproc=3, env={})
    assert done.returncode != 0
    assert f"tp_loader: error: model {root} (4 kv heads, 12 q heads) cannot be sharded over 3 ranks" in done.stderr


def _load_on_callers_mesh(rank: int, world_size: int, root: Path) -> tuple:
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    result = tp_loader.load(root, mesh=mesh)
    weight = result.state_dict["model.layers.0.mlp.down_proj.weight"]
    return result.mesh is mesh, weight.device_mesh is mesh, tuple(weight.to_local().shape)


def test_load_uses_the_callers_mesh(make_checkpoint) -> None:
    root = make_checkpoint()
    outcomes = values(run_ranks(2, _load_on_callers_mesh, root))
    assert outcomes == [(True, True, (48, 50)), (True, True, (48, 50))]


def test_python_dash_m_in_one_process_prints_the_table(make_checkpoint) -> None:
    root = make_checkpoint()
    done = subprocess.run([sys.executable, "-m", "tp_loader", str(root)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"tp_loader: {root}"
    assert (
        lines[1] == "  plan llama (keys prefixed 'model.', heads: causal_lm), world size 1, dtype as stored, device cpu"
    )
    headline = (
        r"  21 tensors, 199\.31 KiB planned: 199\.31 KiB mapped \(read when first touched\) in \d+\.\d\d s; "
        r"\d+\.\d\d s in all \(slowest rank\)"
    )
    assert re.fullmatch(headline, lines[2])


def test_version_is_the_packages(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "tp_loader", "--version"], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, f"tp-loader {tp_loader.__version__}\n")
    assert tp_loader.__version__ == importlib.metadata.version("tp_loader")


def test_dry_run_prints_every_ranks_pieces_in_aligned_columns(make_checkpoint) -> None:
    root = make_checkpoint(llama_config(num_key_value_heads=2))
    done = subprocess.run(
        [sys.executable, "-m", "tp_loader", str(root), "--dry-run", "4"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1] == (
        "  plan llama (keys prefixed 'model.', heads: causal_lm), world size 4, dtype as stored; "
        "no process group, no tensor data read"
    )
    rows = {line.split()[0]: line for line in lines if line.startswith("  model.") or line.startswith("  lm_head")}
    assert rows["model.layers.0.self_attn.k_proj.weight"].split() == [
        "model.layers.0.self_attn.k_proj.weight",
        "colwise",
        "16x48",
        "Shard(0)",
        "4x48",
        "4x48",
        "4x48",
        "4x48",
    ]
    assert rows["model.embed_tokens.weight"].split()[1:] == [
        "vocab",
        "101x48",
        "Shard(0)",
        "26x48",
        "26x48",
        "26x48",
        "23x48",
    ]
    assert rows["model.norm.weight"].split()[1:] == ["replicate", "48", "Replicate()", "whole", "on", "every", "rank"]
    columns = {line.index("Shard(0)") for line in rows.values() if "Shard(0)" in line}
    assert len(columns) == 1, "the placement column is aligned"
    assert "    model.layers.0.self_attn.k_proj.weight: 2 kv heads replicated 2x over 4 ranks" in lines
    failed = subprocess.run(
        [sys.executable, "-m", "tp_loader", str(root), "--dry-run", "3"], capture_output=True, text=True, timeout=120
    )
    assert failed.returncode == 1
    assert (
        "(2 kv heads, 12 q heads) cannot be sharded over 3 ranks. World sizes that work: 1, 2, 4, 6, 12"
        in failed.stderr
    )


def test_torchrun_with_tp_smaller_than_the_job_loads_replicas_that_read_each_byte_once(
    make_checkpoint, tmp_path: Path
) -> None:
    """--tp 2 on 4 ranks: two replicas of a 2-way group; --share job: between them they read one replica's
    bytes (here one node, so the column's two members split the reading), and each receives the rest."""
    root = make_checkpoint(llama_config(num_key_value_heads=2))
    report_path = tmp_path / "report.json"
    args = [str(root), "--tp", "2", "--share", "job", "--report", str(report_path), "-q"]
    done = _torchrun(args, nproc=4, env={"TP_LOADER_PROGRESS": "0"})
    assert done.returncode == 0, done.stderr
    report = json.loads(report_path.read_text())
    assert report["world_size"] == 2 and [r["replica"] for r in report["ranks"]] == [0, 0, 1, 1]
    read, received = [r["bytes_read"] for r in report["ranks"]], [r["bytes_received"] for r in report["ranks"]]
    assert read[0] + received[0] == read[2] + received[2] and read[1] + received[1] == read[3] + received[3]
    assert sum(read) == read[0] + received[0] + read[1] + received[1]  # one replica's bytes, read once
    assert min(read) > 0


def test_a_tp_degree_that_does_not_divide_the_job_is_refused_on_every_rank(make_checkpoint) -> None:
    done = _torchrun([str(make_checkpoint()), "--tp", "3"], nproc=2, env={})
    assert done.returncode != 0
    assert done.stderr.count("a tensor-parallel degree of 3 does not divide the job's 2 ranks into replicas") == 2
