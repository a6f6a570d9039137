"""First contact: what a user meets before any weight is loaded, at world size 2.

Arguments and ``TP_LOADER_*`` settings are checked, and compared across ranks, before the checkpoint is
even looked at (the refusals here name a model directory that does not exist), and every rank raises the
same error. Under torchrun the command exits 1, rank 0 prints the whole message and every other failing
rank one line. A dry run plans every rank without a process group and without reading tensor data. A
checkpoint whose bytes the plan does not expect is refused unless ``allow_unmatched``.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors
import torch
from conftest import llama_config
from torch.distributed.tensor import Replicate

import tp_loader
import tp_loader.read
from tp_loader import cli
from tp_loader.demo import write_checkpoint
from tp_loader.errors import ArgumentError
from tp_loader.report import PlanSummary, RankPlan
from tp_loader.testing import errors, run_ranks, same_error, values

DTYPE_HINT = (
    "Use float32 (fp32, float), bfloat16 (bf16), float16 (fp16, half), or an fp8 dtype to keep fp8 weights; "
    "or no dtype to keep every tensor as stored"
)
NO_CUDA = "torch sees no CUDA device (a CPU-only build of torch)"
NO_CUDA_HINT = "Load with --device cpu, or run where a GPU is visible with a CUDA build of torch"
SAME_ARGUMENTS_HINT = (
    "Call tp_loader.load with the same dtype, plan, mode, strict, allow_unmatched, zero_copy, keep and device "
    "type on every rank"
)
UNMATCHED_HINT = (
    "Pass the plan that fits this checkpoint (plan=NAME or a .toml path), fix config.json's model_type, "
    "or pass allow_unmatched=True (--allow-unmatched) to load them replicated on every rank"
)
#: Far below the loader's default collective timeout (300 s): an error must end the job, not a timeout.
QUICK_S = 60.0


def _torchrun(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """``torchrun --nproc-per-node 2 -m tp_loader ARGS``; returns the finished process and its wall time."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "TP_LOADER_PROGRESS": "0", **(env or {})}
    start = time.monotonic()
    done = subprocess.run(
        [*command, "-m", "tp_loader", *args], capture_output=True, text=True, timeout=2 * QUICK_S, env=env
    )
    return done, time.monotonic() - start


def _error_lines(stderr: str) -> list[str]:
    """stderr's lines, a line also ending where another rank's error line starts: torchrun runs its workers
    unbuffered (``python -u``), and each rank writes its line and the newline apart, so two ranks' lines can
    run together (test_each_error_line_reaches_stderr_in_one_write)."""
    return re.split(r"\n|(?=tp_loader: error)", stderr)


def _other_rank_line(rank: int, error_type: str, message: str) -> str:
    """What a failing rank other than 0 prints: its error's first line, cut at 300 characters."""
    first = message.splitlines()[0]
    return f"tp_loader: error on rank {rank}: {error_type}: {first[:300] + '…' if len(first) > 300 else first}"


def _load(rank: int, world_size: int, model: Path, arguments: dict) -> str:
    return tp_loader.load(model, **arguments).report.dtype


def _load_with_rank_arguments(rank: int, world_size: int, model: Path, arguments: list[dict]) -> str:
    return tp_loader.load(model, **arguments[rank]).report.dtype


def _load_with_rank_env(rank: int, world_size: int, model: Path, env: list[dict[str, str]]) -> str:
    os.environ.update(env[rank])
    return tp_loader.load(model).report.dtype


# --- under torchrun: exit code and every rank's message ---------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--dtype", "int8"],
            {},
            f"dtype 'int8' is not one tp_loader loads weights as [rank=0, key=dtype]. {DTYPE_HINT}",
        ),
        (["--device", "cuda"], {}, f"device 'cuda' asked for, but {NO_CUDA} [rank=0, key=device]. {NO_CUDA_HINT}"),
        (
            ["--report", "{tmp}/file/report.json"],
            {},
            "cannot write the report to {tmp}/file/report.json: {tmp}/file is not a directory "
            "[rank=0, file={tmp}/file/report.json]. Pass a path in a writable directory",
        ),
        (
            [],
            {"TP_LOADER_TIMEOUT_S": "nan"},
            "environment variable TP_LOADER_TIMEOUT_S='nan' is not a positive number of seconds [rank=0]. "
            "Set it to seconds, e.g. 300",
        ),
    ],
    ids=["dtype int8", "device cuda without CUDA", "report under a regular file", "TP_LOADER_TIMEOUT_S=nan"],
)
def test_torchrun_refusal_exits_1_with_the_whole_message_on_rank_0_and_one_line_on_rank_1(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    (tmp_path / "file").write_text("a regular file, not a directory")
    never_read = tmp_path / "no-such-model"
    args = [arg.format(tmp=tmp_path) for arg in args]
    message = message.format(tmp=tmp_path)

    done, seconds = _torchrun([str(never_read), *args], env)

    assert done.returncode == 1, done.stderr
    lines = _error_lines(done.stderr)
    assert f"tp_loader: error: {message}" in lines, done.stderr
    assert _other_rank_line(1, "ArgumentError", message) in lines, done.stderr
    assert done.stdout == ""
    assert not (tmp_path / "file" / "report.json").exists()
    assert seconds < QUICK_S


def test_torchrun_dry_run_prints_once_and_writes_a_load_reports_json_with_local_shapes(
    make_checkpoint, tmp_path: Path
) -> None:
    root = make_checkpoint()
    report_path = tmp_path / "dry" / "report.json"

    done, _ = _torchrun([str(root), "--dry-run", "2", "--report", str(report_path)])

    assert done.returncode == 0, done.stderr
    summary = tp_loader.plan_load(root, world_size=2)
    assert done.stdout == summary.format_table() + "\n", "the table is printed once, by rank 0"
    assert "tp_loader: " not in done.stderr, "rank 1 of a dry run does nothing and prints nothing"
    dry = json.loads(report_path.read_text())
    assert dry == json.loads(summary.to_json())

    loaded = json.loads(values(run_ranks(2, _report_json, root))[0])
    load_only = {
        "device",
        "seconds",
        "read_seconds",
        "bytes_planned",
        "bytes_read",
        "bytes_mapped",
        "bytes_read_per_node",
    }
    assert set(dry) == set(loaded) - load_only
    for key in set(dry) - {"placements", "ranks"}:
        assert dry[key] == loaded[key], key
    assert [{**p, "local_shapes": []} for p in dry["placements"]] == loaded["placements"]
    shapes = {p["key"]: p["local_shapes"] for p in dry["placements"]}
    assert shapes["model.embed_tokens.weight"] == [[51, 48], [50, 48]]
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == [[48, 24], [48, 24]]
    assert shapes["model.norm.weight"] == [[48], [48]]
    assert dry["ranks"] == [
        {"rank": 0, "bytes_read": 102720, "num_tensors": 21, "shard_bytes": 102720, "peak_bytes": 205440},
        {"rank": 1, "bytes_read": 102336, "num_tensors": 21, "shard_bytes": 102336, "peak_bytes": 204672},
    ]
    assert [r["bytes_planned"] for r in loaded["ranks"]] == [102720, 102336], "a dry run plans what a load plans"


def _report_json(rank: int, world_size: int, root: Path) -> str:
    return tp_loader.load(root).report.to_json()


# --- in process, at world size 2: arguments agreed before any I/O ----------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "name"),
    [
        ("int8", "int8"),
        (torch.uint8, "uint8"),
        (torch.bool, "bool"),
        ("complex64", "complex64"),
        (torch.float64, "float64"),
        ("foo", "foo"),
    ],
)
def test_refused_dtype_is_the_same_argument_error_on_every_rank_before_the_model_is_looked_at(
    tmp_path: Path, dtype: torch.dtype | str, name: str
) -> None:
    error = same_error(run_ranks(2, _load, tmp_path / "no-such-model", {"dtype": dtype}))
    assert error.type == "ArgumentError"
    assert error.message == f"dtype {name!r} is not one tp_loader loads weights as [rank=0, key=dtype]. {DTYPE_HINT}"


def _load_every_alias(rank: int, world_size: int, root: Path, aliases: list) -> list[tuple[str, list[str]]]:
    loaded = []
    for alias in aliases:
        result = tp_loader.load(root, dtype=alias)
        loaded.append((result.report.dtype, sorted({str(t.dtype) for t in result.state_dict.values()})))
    return loaded


def test_every_accepted_dtype_name_loads_as_its_dtype(make_checkpoint) -> None:
    root = make_checkpoint()
    aliases = ["bf16", "fp16", "half", "fp32", "float", torch.bfloat16, " BFloat16 ", "torch.float16"]

    per_rank = values(run_ranks(2, _load_every_alias, root, aliases))

    expected = [
        ("bfloat16", ["torch.bfloat16"]),
        ("float16", ["torch.float16"]),
        ("float16", ["torch.float16"]),
        ("float32", ["torch.float32"]),
        ("float32", ["torch.float32"]),
        ("bfloat16", ["torch.bfloat16"]),
        ("bfloat16", ["torch.bfloat16"]),
        ("float16", ["torch.float16"]),
    ]
    assert per_rank == [expected, expected]


def test_fp8_dtype_for_a_checkpoint_storing_no_fp8_is_an_argument_error_on_every_rank(make_checkpoint) -> None:
    root = make_checkpoint()
    error = same_error(run_ranks(2, _load, root, {"dtype": "float8_e4m3fn"}))
    assert error.type == "ArgumentError"
    assert error.message == (
        f"dtype float8_e4m3fn keeps fp8 weights as stored, but {root} stores none in it [rank=0, key=dtype]. "
        "tp_loader does not quantize: pass float32, bfloat16 or float16, or no dtype"
    )


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("foo", "device 'foo' is not a device [rank=1, key=device]. Use cpu, cuda or cuda:N"),
        (
            "meta",
            "device 'meta': tp_loader places shards on cpu or cuda, not meta [rank=1, key=device]. "
            "Use cpu, cuda or cuda:N",
        ),
        ("cuda", f"device 'cuda' asked for, but {NO_CUDA} [rank=1, key=device]. {NO_CUDA_HINT}"),
        ("cuda:3", f"device 'cuda:3' asked for, but {NO_CUDA} [rank=1, key=device]. {NO_CUDA_HINT}"),
    ],
    ids=["foo", "meta", "cuda", "cuda:3"],
)
def test_bad_device_on_rank_1_alone_is_rank_1s_argument_error_on_every_rank(
    tmp_path: Path, device: str, message: str
) -> None:
    arguments = [{"device": "cpu"}, {"device": device}]
    error = same_error(run_ranks(2, _load_with_rank_arguments, tmp_path / "no-such-model", arguments))
    assert (error.type, error.message) == ("ArgumentError", message)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "TP_LOADER_TIMEOUT_S",
            "nan",
            "'nan' is not a positive number of seconds [rank=1]. Set it to seconds, e.g. 300",
        ),
        (
            "TP_LOADER_TIMEOUT_S",
            "inf",
            "'inf' is not a positive number of seconds [rank=1]. Set it to seconds, e.g. 300",
        ),
        ("TP_LOADER_TIMEOUT_S", "-1", "'-1' is not a positive number of seconds [rank=1]. Set it to seconds, e.g. 300"),
        (
            "TP_LOADER_TIMEOUT_S",
            "abc",
            "'abc' is not a positive number of seconds [rank=1]. Set it to seconds, e.g. 300",
        ),
        (
            "TP_LOADER_NUM_THREADS",
            "x",
            "'x' is not an integer [rank=1]. Set TP_LOADER_NUM_THREADS to a whole number or unset it",
        ),
        (
            "TP_LOADER_READER",
            "zzz",
            "'zzz' is not one of mmap, safetensors, pread [rank=1]. Set TP_LOADER_READER to one of them or unset it",
        ),
    ],
    ids=["timeout nan", "timeout inf", "timeout -1", "timeout abc", "threads x", "reader zzz"],
)
def test_bad_setting_on_rank_1_alone_is_an_argument_error_naming_the_variable_on_every_rank(
    tmp_path: Path, name: str, value: str, message: str
) -> None:
    env = [{}, {name: value}]
    error = same_error(run_ranks(2, _load_with_rank_env, tmp_path / "no-such-model", env))
    assert (error.type, error.message) == ("ArgumentError", f"environment variable {name}={message}")


def test_report_path_that_is_a_directory_is_refused_on_every_rank_before_the_model_is_looked_at(
    tmp_path: Path,
) -> None:
    error = same_error(run_ranks(2, _load, tmp_path / "no-such-model", {"report": tmp_path}))
    assert (error.type, error.message) == (
        "ArgumentError",
        f"cannot write the report to {tmp_path}: it is a directory [rank=0, file={tmp_path}]. "
        "Pass a path in a writable directory",
    )


@pytest.mark.parametrize(
    ("rank_0", "rank_1", "difference"),
    [
        ({"dtype": "float32"}, {"dtype": "bfloat16"}, "dtype='bfloat16' vs 'float32'"),
        ({"dtype": "fp32"}, {"dtype": torch.bfloat16}, "dtype='bfloat16' vs 'float32'"),
        ({"strict": False}, {"strict": True}, "strict=True vs False"),
        ({"plan": "auto"}, {"plan": "llama"}, "plan='llama' vs 'auto'"),
        ({}, {"mode": "ep", "zero_copy": False}, "mode='ep' vs None; zero_copy=False vs True"),
    ],
    ids=["dtype", "dtype aliases", "strict", "plan", "mode and zero_copy"],
)
def test_ranks_passing_different_arguments_get_a_distributed_error_naming_the_ranks_and_the_argument(
    tmp_path: Path, rank_0: dict, rank_1: dict, difference: str
) -> None:
    found = errors(run_ranks(2, _load_with_rank_arguments, tmp_path / "no-such-model", [rank_0, rank_1]))
    assert [(e.type, e.wire["message"], e.wire["hint"]) for e in found] == 2 * [
        (
            "DistributedError",
            f"ranks [1] passed different arguments than rank 0 ({difference})",
            SAME_ARGUMENTS_HINT,
        )
    ]


def test_ranks_passing_different_arguments_raise_the_same_error_naming_the_differing_rank(tmp_path: Path) -> None:
    arguments = [{"dtype": "float32"}, {"dtype": "bfloat16"}]
    error = same_error(run_ranks(2, _load_with_rank_arguments, tmp_path / "no-such-model", arguments))
    assert error.message == (
        f"ranks [1] passed different arguments than rank 0 (dtype='bfloat16' vs 'float32') [rank=1]. "
        f"{SAME_ARGUMENTS_HINT}"
    )


# --- dry run: every rank planned, no process group, no tensor data ----------------------------------------------


def _refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError("a dry run read tensor data")


def test_plan_load_plans_every_rank_from_headers_alone_without_a_process_group(
    make_checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_checkpoint()
    for owner, name in [
        (torch.UntypedStorage, "from_file"),
        (torch, "load"),
        (os, "pread"),
        (os, "preadv"),
        (mmap, "mmap"),
        (safetensors, "safe_open"),
        (tp_loader.read, "safe_open"),
        (tp_loader.read, "read_tensors"),
    ]:
        monkeypatch.setattr(owner, name, _refuse)

    summary = tp_loader.plan_load(root, world_size=4)

    assert torch.distributed.is_initialized() is False
    assert isinstance(summary, PlanSummary)
    # per rank, float32: 2 layers x (q 12x48 + k, v 4x48 + o 48x12 + gate, up 25x48 + down 48x25 + 2 norms 48)
    # + vocab rows of embed_tokens and lm_head (101 in chunks of 26, 26, 26, 23) x 48 + norm 48
    assert summary.ranks == (
        RankPlan(0, 52032, 21, 52032, 104064),
        RankPlan(1, 52032, 21, 52032, 104064),
        RankPlan(2, 52032, 21, 52032, 104064),
        RankPlan(3, 50880, 21, 50880, 101760),
    )
    checkpoint_bytes = (root / "model.safetensors").stat().st_size - 8 - _header_length(root / "model.safetensors")
    replicated_bytes = 5 * 48 * 4  # the 2 x 2 layer norms and the final norm, on every rank
    assert sum(r.bytes_read for r in summary.ranks) == checkpoint_bytes + 3 * replicated_bytes
    shapes = {p.key: (p.placement, p.local_shapes) for p in summary.placements}
    assert shapes["model.embed_tokens.weight"] == ("Shard(0)", ((26, 48), (26, 48), (26, 48), (23, 48)))
    assert shapes["lm_head.weight"] == ("Shard(0)", ((26, 48), (26, 48), (26, 48), (23, 48)))
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == ("Shard(0)", 4 * ((4, 48),))
    assert shapes["model.layers.1.mlp.down_proj.weight"] == ("Shard(1)", 4 * ((48, 25),))
    assert shapes["model.norm.weight"] == ("Replicate()", 4 * ((48,),))
    assert len(shapes) == 21


def _header_length(path: Path) -> int:
    with open(path, "rb") as handle:
        return int.from_bytes(handle.read(8), "little")


# --- checkpoints the plan does not fit --------------------------------------------------------------------------

UNFIT_TENSORS = {
    "encoder.block.0.weight": torch.arange(64 * 48, dtype=torch.float32).reshape(64, 48),
    "encoder.block.1.weight": torch.ones(32, 48),
    "head.bias": torch.ones(7),
}


@pytest.mark.parametrize(
    ("prefix", "cause"),
    [
        ("", "keys have no 'model.' prefix (they start with 'encoder.', 'head.')"),
        ("model.", "keys do not have the names plan 'llama' expects (such as 'model.embed_tokens.weight')"),
    ],
    ids=["no model. prefix", "model. prefix, other names"],
)
def test_checkpoint_of_tensors_the_plan_does_not_expect_is_a_plan_error_on_every_rank(
    tmp_path: Path, prefix: str, cause: str
) -> None:
    root = write_checkpoint(tmp_path / "unfit", llama_config(), {prefix + k: t for k, t in UNFIT_TENSORS.items()})

    error = same_error(run_ranks(2, _load, root, {}))

    keys = [prefix + k for k in UNFIT_TENSORS]
    assert error.type == "PlanError"
    assert error.message == (
        f"100% of the bytes of {root} are in 3 of 3 tensors that plan 'llama' does not expect "
        f"(largest: {', '.join(keys)}): {cause} [rank=0, file={root}, key={keys[0]}]. {UNMATCHED_HINT}"
    )


def _load_unmatched(rank: int, world_size: int, root: Path) -> tuple:
    result = tp_loader.load(root, allow_unmatched=True)
    pieces = {
        key: (tuple(t.placements), torch.equal(t.to_local(), UNFIT_TENSORS[key]))
        for key, t in result.state_dict.items()
    }
    report = result.report
    return pieces, report.unexpected_keys, report.unmatched_keys, len(report.missing_keys), report.placements


def test_allow_unmatched_loads_every_unexpected_tensor_whole_on_every_rank_and_reports_it(tmp_path: Path) -> None:
    root = write_checkpoint(tmp_path / "unfit", llama_config(), UNFIT_TENSORS)

    per_rank = values(run_ranks(2, _load_unmatched, root))

    replicated = (Replicate(),)
    keys = tuple(UNFIT_TENSORS)
    for pieces, unexpected, unmatched, num_missing, placements in per_rank:
        assert pieces == {key: (replicated, True) for key in keys}
        assert (unexpected, unmatched, num_missing) == (keys, keys, 21)
        assert [(p.key, p.style, p.placement) for p in placements] == [
            (key, "replicate", "Replicate()") for key in keys
        ]


# --- the command line in process --------------------------------------------------------------------------------


def test_version_prints_the_packages_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        cli.main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"tp-loader {tp_loader.__version__}\n"


def test_dry_run_strict_exits_1_refusing_an_unexpected_key(make_checkpoint, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_checkpoint(extra={"extra.weight": torch.ones(3)})

    code = cli.main([str(root), "--dry-run", "2", "--strict"])

    assert code == 1
    assert capsys.readouterr() == (
        "",
        f"tp_loader: error: strict load of {root} refused: 1 unexpected: extra.weight. "
        "Fix the checkpoint or the plan, or load with strict=False to see the full report\n",
    )


def test_unparsable_option_exits_1_with_argparses_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        cli.main(["--dry-run", "two"])
    assert exit.value.code == 1
    assert capsys.readouterr().err.splitlines()[-1] == "tp-loader: error: argument --dry-run: invalid int value: 'two'"


class _Writes:
    """A stream that records each write."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_each_error_line_reaches_stderr_in_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = _Writes()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(cli, "OTHER_RANKS_DELAY_S", 0.0)
    error = ArgumentError("device 'foo' is not a device", key="device", rank=0)

    cli._print_error(error, 0)
    cli._print_error(error, 1)

    assert stream.writes == [
        "tp_loader: error: device 'foo' is not a device [rank=0, key=device]\n",
        "tp_loader: error on rank 1: ArgumentError: device 'foo' is not a device [rank=0, key=device]\n",
    ]
