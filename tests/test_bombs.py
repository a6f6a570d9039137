"""Configs that would make planning build huge strings or name billions of keys are refused at once,
with a short message, on every rank; planning and reporting stay near-linear in the number of keys.
Safetensors headers as large as safetensors allows (100 MB) cost a bounded memory and time, refused or read."""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import torch

import tp_loader
from tp_loader.demo import write_checkpoint
from tp_loader.testing import run_ranks, same_error

MIXTRAL = {
    "model_type": "mixtral",
    "architectures": ["MixtralForCausalLM"],
    "hidden_size": 8,
    "intermediate_size": 8,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": 10,
    "num_local_experts": 2,
    "num_experts_per_tok": 2,
}


def _load_and_measure(rank: int, world_size: int, root: Path) -> None:
    start = time.monotonic()
    try:
        tp_loader.load(root)
    finally:  # an AssertionError here replaces the load's error, and the test sees it
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        assert time.monotonic() - start < 10, "refused within seconds"
        assert peak_mib < 1024, f"peak RSS {peak_mib} MiB"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"num_hidden_layers": 100_000, "num_local_experts": 100_000},
            "config gives 100000 layers (num_hidden_layers) and 100000 experts (num_local_experts): plan 'mixtral' "
            "would name 30001100006 keys, more than 10004 for a checkpoint of 1 tensors",
        ),
        (
            {"head_dim": "x", "num_attention_heads": 10**9},
            "config values head_dim='x', num_attention_heads=1000000000 give no valid shape of "
            "model.layers.{layer}.self_attn.q_proj.weight (num_attention_heads * head_dim: arithmetic needs whole "
            "numbers, got 'x')",
        ),
        (
            {"head_dim": "y" * 10_000},
            "config values head_dim='yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy… "
            "(10002 characters)",
        ),
    ],
    ids=["layers-times-experts", "string-times-heads", "long-string-value"],
)
def test_config_bombs_are_refused_fast_with_a_short_message_on_every_rank(
    tmp_path: Path, overrides: dict, message: str
) -> None:
    root = write_checkpoint(tmp_path, {**MIXTRAL, **overrides}, {"model.embed_tokens.weight": torch.zeros(10, 8)})
    start = time.monotonic()
    error = same_error(run_ranks(2, _load_and_measure, root, timeout=60))
    assert time.monotonic() - start < 20
    assert error.type == "CheckpointError"
    assert error.message.startswith(message)
    assert len(error.message) < 2048
    assert error.wire["file"] == str(root / "config.json")


def _plan_unexpected_keys(root: Path, count: int) -> float:
    """Seconds to plan and tabulate a checkpoint of ``count`` unexpected keys (and one expected)."""
    from safetensors.torch import save_file

    root.mkdir()
    tensors = {f"model.extra.{i}": torch.zeros(0) for i in range(count)}
    tensors["model.embed_tokens.weight"] = torch.zeros(10, 8)
    root.joinpath("config.json").write_text(
        '{"model_type": "llama", "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 0, '
        '"num_attention_heads": 2, "vocab_size": 10}'
    )
    save_file(tensors, str(root / "model.safetensors"))
    start = time.monotonic()
    summary = tp_loader.plan_load(root, world_size=2)
    table = summary.format_table(full=True)
    planned = time.monotonic() - start
    assert len(summary.unexpected_keys) == count
    assert table.count("(no plan rule)") == count
    return planned


def test_planning_and_reporting_100k_keys_scales_linearly(tmp_path: Path) -> None:
    """Unexpected keys, the warning and the table over 10^5 tensors: near-linear work, not quadratic. Ten times
    the keys must cost well under the hundred times a quadratic step would (a ratio, so a loaded machine's
    slowness cancels out), and never minutes."""
    small = _plan_unexpected_keys(tmp_path / "small", 10_000)
    large = _plan_unexpected_keys(tmp_path / "large", 100_000)
    assert large < 30 * max(small, 0.05), f"10^4 keys {small:.2f} s, 10^5 keys {large:.2f} s"
    assert large < 120, f"{large:.1f} s"


# --- safetensors headers up to safetensors' 100 MB ----------------------------------------------------------

SMALL_CONFIG = {
    "model_type": "llama",
    "hidden_size": 8,
    "intermediate_size": 8,
    "num_hidden_layers": 0,
    "num_attention_heads": 2,
    "vocab_size": 10,
}
EMBED = '"model.embed_tokens.weight":{"dtype":"F32","shape":[10,8],"data_offsets":[0,320]}'


def _empty_tensors(count: int, name: str = "model.extra.zero") -> Iterator[str]:
    """``count`` header entries of empty tensors, 80 bytes each."""
    for i in range(count):
        yield f',"{name}.{i:07d}":{{"dtype":"F32","shape":[0],"data_offsets":[320,320]}}'


def _write_header(root: Path, parts: Iterable[str], *, metadata: Iterable[str] = ()) -> int:
    """A checkpoint whose one file has the embedding's 320 bytes and a header of ``parts`` after the embedding's
    entry (and ``metadata``, the inside of ``__metadata__``), written piece by piece; returns the header's bytes."""
    root.mkdir()
    (root / "config.json").write_text(json.dumps(SMALL_CONFIG))
    path = root / "model.safetensors"
    with open(path, "wb") as handle:
        handle.write(bytes(8))
        handle.write(b'{"__metadata__":{')
        handle.writelines(part.encode() for part in metadata)
        handle.write(b"}," + EMBED.encode())
        handle.writelines(part.encode() for part in parts)
        handle.write(b"}")
        length = handle.tell() - 8
        handle.write(bytes(320))
        handle.seek(0)
        handle.write(struct.pack("<Q", length))
    return length


_MEASURE = """
import json, sys, time
import tp_loader
from tp_loader.index import index_checkpoint
from tp_loader.resolve import find_weights
start = time.monotonic()
try:
    if sys.argv[2] == "plan":
        tp_loader.plan_load(sys.argv[1], world_size=2)
    else:
        index_checkpoint(find_weights(tp_loader.resolve.resolve_source(sys.argv[1])))
    outcome = {"type": None, "message": ""}
except Exception as exc:
    outcome = {"type": type(exc).__name__, "message": getattr(exc, "message", str(exc))}
outcome["seconds"] = time.monotonic() - start
with open("/proc/self/status") as status:
    outcome["peak_mib"] = next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmHWM:"))
print(json.dumps(outcome))
"""


def _measured(root: Path, stage: str = "plan") -> dict:
    """The outcome of planning (``plan``: a dry run of 2 ranks) or indexing ``root`` in a fresh process: the error
    type and message (``None``, ``""`` if it succeeded), its seconds, and the process's peak RSS in MiB (torch and
    tp_loader imported: about 220 MiB of it)."""
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(root), stage],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root.parent,  # not the repository: the tp_loader imported is the installed one
        env={**os.environ, "TP_LOADER_PROGRESS": "0"},
    )
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.splitlines()[-1])
    print(f"{root.name}: {outcome}")  # the figures docs/guarantees.md gives, shown with pytest -s
    return outcome


def test_an_80_mb_header_of_a_million_empty_tensors_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    length = _write_header(tmp_path / "million", _empty_tensors(1_000_000))
    assert 80_000_000 < length < 81_000_000
    outcome = _measured(tmp_path / "million")
    assert outcome["type"] == "CheckpointError"
    assert outcome["message"] == (
        "malformed safetensors header: header holds up to 11000016 JSON values, more than the 4000000 a header can "
        "(about 363636 tensors a file)"
    )
    assert outcome["peak_mib"] < 1024
    assert outcome["seconds"] < 60  # measured: 0.3 s


def test_a_header_of_tensors_up_to_the_bound_with_a_bad_last_entry_is_refused_within_the_memory_bound(
    tmp_path: Path,
) -> None:
    parts = [*_empty_tensors(363_000), ',"model.z":{"dtype":"Q4","shape":[0],"data_offsets":[320,320]}']
    _write_header(tmp_path / "near", iter(parts))
    outcome = _measured(tmp_path / "near")
    assert outcome["type"] == "CheckpointError"
    assert outcome["message"].startswith("malformed safetensors header: unknown dtype 'Q4'")
    assert outcome["peak_mib"] < 1024
    assert outcome["seconds"] < 120


def test_the_costliest_header_within_the_bounds_stays_within_the_memory_bound(tmp_path: Path) -> None:
    """Distinct short strings cost the most memory a JSON value: a __metadata__ of 2 million of them (2 values
    each) is a header safetensors reads, and within the bound."""
    metadata = (f'{"," if i else ""}"{i:x}":"{i:x}"' for i in range(1_999_990))
    _write_header(tmp_path / "strings", iter(()), metadata=metadata)
    outcome = _measured(tmp_path / "strings", stage="index")
    assert outcome["type"] is None
    assert outcome["peak_mib"] < 1024
    assert outcome["seconds"] < 120


def test_a_100_mb_header_of_characters_beyond_the_bmp_is_refused_within_the_memory_bound(tmp_path: Path) -> None:
    """One character beyond U+FFFF makes Python keep the whole text at four bytes a character."""
    length = 100 * 1024 * 1024 - 200
    _write_header(tmp_path / "wide", iter(()), metadata=iter(['"a":"\U0001f600', "x" * length, '"']))
    outcome = _measured(tmp_path / "wide", stage="index")
    assert outcome["type"] == "CheckpointError"
    assert outcome["message"] == (
        f"malformed safetensors header: header of {length + 111} bytes takes {4 * (length + 107) + 80} bytes as text, "
        "more than the 209715200 a header can (it holds characters beyond U+FFFF)"
    )
    assert outcome["peak_mib"] < 1024


def test_a_legitimate_header_of_300_000_tensors_is_indexed_quickly(tmp_path: Path) -> None:
    """Three times DeepSeek-V3's 91,991 tensors in one file: read, validated and indexed."""
    _write_header(tmp_path / "big", _empty_tensors(300_000))
    outcome = _measured(tmp_path / "big", stage="index")
    assert outcome["type"] is None
    assert outcome["peak_mib"] < 1024
    assert outcome["seconds"] < 60
