"""``--check-forward``: the model transformers builds on meta, parallelized and loaded into by tp_loader, gives
the logits of ``from_pretrained`` on rank 0; a load that puts a wrong weight in fails the check with exit 1."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TRANSFORMERS_LLAMA
from torch import nn

from tp_loader import ArgumentError, PlanError
from tp_loader.check import check_forward, rebuild_meta_buffers
from tp_loader.cli import main

transformers = pytest.importorskip("transformers", reason="the check builds transformers' models")

LLAMA = TRANSFORMERS_LLAMA
LINE = (
    r"tp_loader forward check (PASS|FAIL): max abs logit difference (\S+) (<=|>) 1\.0e-04 "
    r"\(float32, 8 tokens, (2 ranks|one unsharded process) vs from_pretrained on rank 0\)"
)

#: A plan that reads every q_proj in the other rotary layout: the right shapes, the wrong weights.
WRONG_ROPE_PLAN = """
extends = "llama"
name = "llama_wrong_rope"

[[converters]]
op = "permute_for_rope"
source = "model.layers.{layer}.self_attn.q_proj.weight"
heads = "q"
direction = "to_half"
"""


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("check") / "llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).save_pretrained(root)
    return root


def _torchrun(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TP_LOADER_PROGRESS": "0"}
    return subprocess.run(
        [*command, "-m", "tp_loader", *args], capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path
    )


def test_torchrun_check_forward_on_two_ranks_passes_and_prints_one_line(llama: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    done = _torchrun([str(llama), "--check-forward", "--report", str(report)], tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [line for line in done.stdout.splitlines() if "forward check" in line]
    assert len(lines) == 1, "rank 0 prints the verdict once"
    verdict = re.fullmatch(LINE, lines[0])
    assert verdict is not None, lines[0]
    assert verdict.group(1, 3, 4) == ("PASS", "<=", "2 ranks")
    assert float(verdict.group(2)) < 1e-5
    assert done.stdout.startswith(f"tp_loader: {llama}\n"), "the load's table comes first"
    loaded = json.loads(report.read_text())
    assert (loaded["world_size"], loaded["plan"], loaded["num_tensors"]) == (2, "llama", 21)


def test_a_load_with_a_wrong_weight_of_the_right_shape_fails_the_check_with_exit_1(llama: Path, tmp_path: Path) -> None:
    """Every q_proj is read permuted (a plan for the other rotary layout): nothing fails to load or run, only
    the logits are wrong. (Weights swapped inside the checkpoint's file would pass: from_pretrained reads
    the same swapped bytes, and the check compares the two loads.)"""
    plan = tmp_path / "wrong_rope.toml"
    plan.write_text(WRONG_ROPE_PLAN)
    done = _torchrun([str(llama), "--check-forward", "--plan", str(plan), "-q"], tmp_path)
    assert done.returncode == 1
    assert done.stdout == "", "-q: the FAIL line alone, on stderr"
    (line,) = [line for line in done.stderr.splitlines() if "forward check" in line]
    verdict = re.fullmatch(LINE, line)
    assert verdict is not None, line
    assert verdict.group(1, 3, 4) == ("FAIL", ">", "2 ranks")
    assert float(verdict.group(2)) > 1e-3


def test_in_one_process_the_check_loads_unsharded_and_passes(llama: Path) -> None:
    outcome = check_forward(llama, progress=False)
    assert (outcome.passed, outcome.world_size, outcome.dtype, outcome.num_tokens) == (True, 1, "float32", 8)
    assert outcome.max_abs_diff < 1e-5 and outcome.tolerance == 1e-4
    assert re.fullmatch(LINE, outcome.format_line()).group(1, 4) == ("PASS", "one unsharded process")


def test_without_transformers_the_check_says_to_install_it(
    llama: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with pytest.raises(ArgumentError) as raised:
        check_forward(llama)
    assert str(raised.value) == (
        "the forward check builds the model with transformers, which is not installed [key=check_forward]. "
        "Install it (pip install transformers) or leave out --check-forward"
    )
    assert main([str(llama), "--check-forward"]) == 1
    assert capsys.readouterr().err == f"tp_loader: error: {raised.value}\n"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--dtype", "float8_e4m3fn"],
            "the forward check runs in float32, bfloat16 or float16, not float8_e4m3fn [key=dtype]",
        ),
        (["--mode", "ep"], "--check-forward does not take --mode [key=mode]"),
        (["--zero-copy"], "--check-forward does not take --zero-copy [key=zero_copy]"),
    ],
)
def test_the_check_refuses_flags_it_cannot_honour(
    llama: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert main([str(llama), "--check-forward", *flags]) == 1
    assert capsys.readouterr().err.startswith(f"tp_loader: error: {message}. ")


def test_check_forward_and_dry_run_are_exclusive(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--check-forward", "--dry-run", "2"])
    assert exited.value.code == 1
    assert "argument --dry-run: not allowed with argument --check-forward" in capsys.readouterr().err


class Config:
    """A stand-in for a transformers config."""

    base = 16.0


class Rotary(nn.Module):
    """A module whose only state is a buffer computed from the config, as transformers' rotary embeddings."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / config.base ** torch.arange(0, 1, 0.25), persistent=False)


class NeedsMore(Rotary):
    def __init__(self, config: Config, dim: int) -> None:
        super().__init__(config)


class Holder(nn.Module):
    """A module with a meta buffer that also holds a (loaded) parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))
        self.register_buffer("cache", torch.zeros(2), persistent=False)


def _meta_model(child: nn.Module) -> nn.Module:
    model = nn.Module()
    model.proj = nn.Linear(2, 2)
    with torch.device("meta"):
        model.inner = nn.Module()
        model.inner.rotary = child
    model.shared = model.inner.rotary  # one module under two paths
    return model


def test_meta_buffers_are_rebuilt_from_the_config_under_every_path() -> None:
    with torch.device("meta"):
        rotary = Rotary(Config())
    model = _meta_model(rotary)
    weight = model.proj.weight
    assert rebuild_meta_buffers(model, Config(), torch.device("cpu")) == ["inner.rotary", "shared"]
    assert model.inner.rotary is model.shared and model.shared is not rotary
    assert model.shared.inv_freq.tolist() == [1.0, 0.5, 0.25, 0.125]
    assert model.proj.weight is weight


def test_a_meta_buffer_whose_module_needs_more_than_the_config_is_an_error_naming_the_module() -> None:
    with torch.device("meta"):
        child = NeedsMore(Config(), dim=4)
    with pytest.raises(PlanError) as raised:
        rebuild_meta_buffers(_meta_model(child), Config(), torch.device("cpu"))
    assert str(raised.value) == (
        "module 'inner.rotary' (NeedsMore) has buffers on meta that no checkpoint holds (inv_freq), and "
        "NeedsMore(config=config) cannot rebuild it: TypeError: NeedsMore.__init__() missing 1 required "
        "positional argument: 'dim'. Re-create this module's buffers yourself after load_into (see docs/serving.md)"
    )


def test_a_meta_buffer_beside_loaded_tensors_is_an_error_not_a_rebuild() -> None:
    with torch.device("meta"):
        child = Holder()
    with pytest.raises(PlanError) as raised:
        rebuild_meta_buffers(_meta_model(child), Config(), torch.device("cpu"))
    assert str(raised.value).startswith(
        "module 'inner.rotary' (Holder) has buffers on meta that no checkpoint holds (cache), and cannot be "
        "rebuilt from the config: it also holds loaded tensors (weight)."
    )
