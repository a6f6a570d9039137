"""benchmarks/gpu.sh and ``python -m benchmarks.cuda --require-gpu`` fail loudly without a GPU: a non-zero exit and
a message on stderr naming what was checked. nvidia-smi is a stand-in on PATH where a case needs one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/, for benchmarks.cuda's parser
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available: the script would run")


def _run_script(tmp_path: Path, nvidia_smi: str | None) -> subprocess.CompletedProcess[str]:
    """``bash benchmarks/gpu.sh`` from another directory, with a stand-in nvidia-smi first on PATH when given,
    and this interpreter's directory next (the script's ``python`` when the repository has no .venv)."""
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    if nvidia_smi is not None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{nvidia_smi}\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
        path = f"{bin_dir}:{path}"
    env = {**os.environ, "PATH": path, "TP_LOADER_BENCH_DIR": str(tmp_path / "data")}
    return subprocess.run(
        ["bash", str(SCRIPT), "--out", str(tmp_path / "out")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_gpu_script_is_executable_bash_with_strict_mode() -> None:
    assert os.access(SCRIPT, os.X_OK)
    assert SCRIPT.read_text().startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in SCRIPT.read_text()


@NO_CUDA
@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_gpu_script_without_nvidia_smi_exits_1_saying_so(tmp_path: Path) -> None:
    done = _run_script(tmp_path, nvidia_smi=None)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        "benchmarks/gpu.sh: error: nvidia-smi not found on PATH: no NVIDIA driver on this machine. "
        "This script needs an NVIDIA GPU\n"
    )
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()


def test_gpu_script_when_nvidia_smi_finds_no_device_exits_1_with_its_output(tmp_path: Path) -> None:
    done = _run_script(tmp_path, nvidia_smi='echo "No devices were found"; exit 6')
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "benchmarks/gpu.sh: error: nvidia-smi lists no GPU (exit 6): No devices were found\n"


@NO_CUDA
def test_gpu_script_with_a_gpu_but_torch_without_cuda_exits_1_naming_what_it_checked(tmp_path: Path) -> None:
    done = _run_script(tmp_path, nvidia_smi='echo "0, NVIDIA H100 80GB HBM3, 81559 MiB"')
    assert done.returncode == 1
    assert done.stdout == "GPUs (nvidia-smi: index, name, memory):\n0, NVIDIA H100 80GB HBM3, 81559 MiB\n"
    line = done.stderr.splitlines()[-1]
    assert line.startswith("benchmarks/gpu.sh: error: torch.cuda is unavailable to ")
    assert line.endswith(
        "torch.cuda.is_available() False, torch.cuda.device_count() 0 (a CPU build of torch, or a driver torch "
        "cannot use)"
    )
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()


@NO_CUDA
def test_benchmarks_cuda_require_gpu_without_cuda_exits_1_naming_what_it_checked(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "CUDA_VISIBLE_DEVICES"}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.cuda", "--require-gpu", "--data", str(tmp_path), "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        "benchmarks.cuda: error: --require-gpu, but no GPU: torch.cuda.is_available() is False, "
        f"torch.version.cuda is {torch.version.cuda!r}, torch.cuda.device_count() is 0 "
        f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES=None). "
        "Run it on a machine with an NVIDIA GPU and a CUDA build of torch\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_benchmarks_cuda_refuses_require_gpu_with_device_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.cuda import main

    with pytest.raises(SystemExit) as info:
        main(["--require-gpu", "--device", "cpu"])
    assert info.value.code == 2
    assert capsys.readouterr().err.endswith("error: --require-gpu measures the GPU: it does not go with --device cpu\n")
