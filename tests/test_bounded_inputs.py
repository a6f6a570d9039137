"""Inputs that are not what they claim to be are refused at once and cheaply (issue 22, item 4): a plan path (given,
extended or recorded in a pre-sharded directory's manifest) naming a device or a FIFO, a plan file too large to be
one, a ``.bin`` whose tensor records are malformed, and header dimensions that safetensors itself refuses."""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import resource
import struct
import time
from pathlib import Path

import pytest
import torch

import tp_loader
from tp_loader import sharded, sharded_save
from tp_loader.demo import llama_tensors, write_checkpoint
from tp_loader.errors import CheckpointError, TPLoaderError
from tp_loader.index import read_safetensors_header
from tp_loader.testing import run_ranks, values

CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": 10,
}
MAX_PLAN_BYTES = 1024**2  # tp_loader.spec.MAX_PLAN_BYTES, pinned
NOT_REGULAR = "is not a regular file (a directory, FIFO, socket or device), so it is not read"
#: What a refusal may take, generously: each is measured in well under a second (see docs/guarantees.md).
REFUSED_WITHIN_S = 5.0


def _checkpoint(root: Path) -> Path:
    return write_checkpoint(root, CONFIG, llama_tensors(CONFIG), num_shards=1)


def _refusal(rank: int, world_size: int, root: Path, kwargs: dict) -> tuple[dict, float]:
    """Loads ``root`` and returns the tp_loader error's fields and the seconds it took. The address space is
    capped 2 GiB above what the rank holds, so that a read without a bound ends in a MemoryError, not in the
    machine's memory."""
    with open("/proc/self/status") as status:
        size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size + 2 * 1024**3, resource.getrlimit(resource.RLIMIT_AS)[1]))
    start = time.monotonic()
    try:
        tp_loader.load(root, **kwargs)
    except TPLoaderError as exc:
        return exc.to_wire(), time.monotonic() - start
    raise AssertionError("the load succeeded")


def _refused_on_every_rank(root: Path, **kwargs: object) -> dict:
    """The error both ranks of a world-2 load raised (the same fields on each), each within seconds."""
    results = values(run_ranks(2, _refusal, root, kwargs, timeout=60))
    (wire, _), (other, _) = results
    assert {**wire, "rank": None} == {**other, "rank": None}
    assert max(seconds for _, seconds in results) < REFUSED_WITHIN_S
    return wire


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _dev_zero(path: Path) -> Path:
    path.symlink_to("/dev/zero")
    return path


@pytest.mark.parametrize("make", [_fifo, _dev_zero], ids=["fifo", "dev-zero"])
def test_a_plan_path_that_is_a_fifo_or_a_device_is_refused_at_once(tmp_path: Path, make) -> None:
    root = _checkpoint(tmp_path / "ckpt")
    plan = make(tmp_path / "plan.toml")
    wire = _refused_on_every_rank(root, plan=str(plan))
    assert wire["type"] == "PlanError"
    assert wire["message"] == f"the plan file {NOT_REGULAR}"
    assert wire["file"] == str(plan)
    assert wire["hint"] == "Pass a built-in plan name or the path of a .toml plan file"


def test_dev_zero_itself_as_the_plan_is_refused_at_once(tmp_path: Path) -> None:
    wire = _refused_on_every_rank(_checkpoint(tmp_path / "ckpt"), plan="/dev/zero")
    assert (wire["type"], wire["message"], wire["file"]) == ("PlanError", f"the plan file {NOT_REGULAR}", "/dev/zero")


@pytest.mark.parametrize("make", [_fifo, _dev_zero], ids=["fifo", "dev-zero"])
def test_a_plan_that_extends_a_fifo_or_a_device_is_refused_at_once_naming_the_extended_file(
    tmp_path: Path, make
) -> None:
    root = _checkpoint(tmp_path / "ckpt")
    parent = make(tmp_path / "parent.toml")
    (tmp_path / "plan.toml").write_text('extends = "parent.toml"\n')
    wire = _refused_on_every_rank(root, plan=str(tmp_path / "plan.toml"))
    assert wire["type"] == "PlanError"
    assert wire["message"] == f"the plan file {NOT_REGULAR}"
    assert wire["file"] == str(parent)


def test_a_plan_that_extends_dev_zero_by_its_absolute_path_is_refused_at_once(tmp_path: Path) -> None:
    (tmp_path / "plan.toml").write_text('extends = "/dev/zero"\n')
    wire = _refused_on_every_rank(_checkpoint(tmp_path / "ckpt"), plan=str(tmp_path / "plan.toml"))
    assert (wire["type"], wire["message"], wire["file"]) == ("PlanError", f"the plan file {NOT_REGULAR}", "/dev/zero")


def test_a_plan_file_larger_than_a_plan_can_be_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    root = _checkpoint(tmp_path / "ckpt")
    plan = tmp_path / "plan.toml"
    with open(plan, "w") as handle:
        handle.write('extends = "llama"\n')
        handle.truncate(8 * 1024**3)  # a sparse 8 GiB file: reading it whole would take the 2 GiB left to the rank
    wire = _refused_on_every_rank(root, plan=str(plan))
    assert wire["type"] == "PlanError"
    assert wire["message"] == (f"the plan file is {8 * 1024**3} bytes, more than the {MAX_PLAN_BYTES} allowed (1 MiB)")
    assert wire["file"] == str(plan)


def test_a_plan_file_within_the_cap_but_not_utf8_is_a_plan_error(tmp_path: Path) -> None:
    root = _checkpoint(tmp_path / "ckpt")
    (tmp_path / "plan.toml").write_bytes(b'extends = "llama"\n# \xff\n')
    wire = _refused_on_every_rank(root, plan=str(tmp_path / "plan.toml"))
    assert wire["type"] == "PlanError"
    assert wire["message"].startswith("cannot parse plan file: it is not UTF-8")
    assert wire["file"] == str(tmp_path / "plan.toml")


@pytest.mark.parametrize("make", [_fifo, _dev_zero], ids=["fifo", "dev-zero"])
def test_a_restart_whose_recorded_plan_file_became_a_fifo_or_a_device_is_refused_at_once(tmp_path: Path, make) -> None:
    """The plan path a pre-sharded directory's manifest records is read through the same bounded reader."""
    root = _checkpoint(tmp_path / "ckpt")
    plan = tmp_path / "plan.toml"
    plan.write_text('extends = "llama"\n')
    out = tmp_path / "out"
    sharded_save.save_offline(root, out, 2, plan=str(plan))
    assert json.loads((out / sharded.MANIFEST).read_text())["arguments"]["plan"] == str(plan)
    plan.unlink()
    make(plan)
    wire = _refused_on_every_rank(out)
    assert wire["type"] == "PlanError"
    assert wire["message"] == f"the plan file {NOT_REGULAR}"
    assert wire["file"] == str(plan)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_a_config_or_index_larger_than_the_cap_is_refused_without_reading_it_all(tmp_path: Path, name: str) -> None:
    root = write_checkpoint(tmp_path / "ckpt", CONFIG, llama_tensors(CONFIG), num_shards=2)
    with open(root / name, "a") as handle:
        handle.truncate(8 * 1024**3)
    wire = _refused_on_every_rank(root)
    assert wire["type"] == "CheckpointError"
    what = "config.json" if name == "config.json" else "index file"
    assert wire["message"] == f"the {what} is {8 * 1024**3} bytes, more than the {64 * 1024**2} allowed (64 MiB)"
    assert wire["file"] == str(root / name)


def test_an_index_of_more_json_values_than_the_cap_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    """60 MB of empty lists would parse to 20 million Python lists (1.7 GB)."""
    root = write_checkpoint(tmp_path / "ckpt", CONFIG, llama_tensors(CONFIG), num_shards=2)
    index = json.loads((root / "model.safetensors.index.json").read_text())
    (root / "model.safetensors.index.json").write_text(
        json.dumps(index)[:-1] + ', "padding": [' + "[]," * 20_000_000 + "[]]}"
    )
    wire = _refused_on_every_rank(root)
    assert wire["type"] == "CheckpointError"
    assert wire["message"].startswith("the index file holds up to 400000")
    assert wire["message"].endswith("JSON values, more than the 4000000 allowed")


# --- .bin pickles whose tensor records are malformed ---------------------------------------------------------


class _Storage:
    """Pickled as the persistent id ``("storage", FloatStorage, key, "cpu", numel)``: a tensor's storage record."""

    def __init__(self, key: str, numel: object) -> None:
        self.key, self.numel = key, numel


class _Rebuild:
    """Pickled as a call of ``torch._utils._rebuild_tensor_v2`` with ``args``."""

    def __init__(self, *args: object) -> None:
        self.args = args

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> object:
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def _write_bin(path: Path, state: dict, storages: dict[str, bytes]) -> None:
    """A torch zip archive written by torch's own writer, with a ``data.pkl`` pickled from ``state``."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(state)
    writer = torch._C.PyTorchFileWriter(str(path))
    writer.write_record("data.pkl", buffer.getvalue(), len(buffer.getvalue()))
    writer.write_record("byteorder", b"little", 6)
    for key, data in storages.items():
        writer.write_record(f"data/{key}", data, len(data))
    writer.write_end_of_file()


def _bin(root: Path, state: dict) -> Path:
    root.mkdir()
    (root / "config.json").write_text(json.dumps(CONFIG))
    _write_bin(root / "pytorch_model.bin", state, {"0": bytes(16)})
    return root


def test_the_bin_writer_writes_a_file_torch_loads(tmp_path: Path) -> None:
    """The helper's archive is sound: with well-formed records it loads as the tensor it describes."""
    good = _Rebuild(_Storage("0", 4), 0, (2, 2), (2, 1), False, collections.OrderedDict())
    root = _bin(tmp_path / "ckpt", {"model.norm.weight": good})
    loaded = torch.load(root / "pytorch_model.bin", weights_only=True)
    assert torch.equal(loaded["model.norm.weight"], torch.zeros(2, 2))


MALFORMED_BIN = {
    "numel-none": (
        {"model.norm.weight": _Rebuild(_Storage("0", None), 0, (4,), (1,), False, collections.OrderedDict())},
        ".bin file has a malformed storage record in data.pkl: ('storage', 'FloatStorage', '0', 'cpu', None)",
    ),
    "numel-text": (
        {"model.norm.weight": _Rebuild(_Storage("0", "4"), 0, (4,), (1,), False, collections.OrderedDict())},
        ".bin file has a malformed storage record in data.pkl: ('storage', 'FloatStorage', '0', 'cpu', '4')",
    ),
    "rebuild-missing-arguments": (
        {"model.norm.weight": _Rebuild(_Storage("0", 4))},
        "refused or could not read the .bin file with weights_only=True: TypeError: _rebuild_tensor_v2() missing",
    ),
    "rebuild-bad-size": (
        {"model.norm.weight": _Rebuild(_Storage("0", 4), 0, None, (1,), False, collections.OrderedDict())},
        "refused or could not read the .bin file with weights_only=True: TypeError",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED_BIN))
def test_a_bin_whose_tensor_records_are_malformed_is_a_checkpoint_error_naming_the_file(
    tmp_path: Path, case: str
) -> None:
    state, message = MALFORMED_BIN[case]
    root = _bin(tmp_path / "ckpt", state)
    wire = _refused_on_every_rank(root)
    assert wire["type"] == "CheckpointError"
    assert wire["message"].startswith(message), wire["message"]
    assert wire["file"] == str(root / "pytorch_model.bin")


# --- header dimensions that safetensors refuses --------------------------------------------------------------


def _with_header(path: Path, edit) -> None:
    """Rewrites a safetensors file's header through ``edit`` (its length may change: offsets are relative)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])


EXTRA = "model.extra.weight"  # an empty tensor beside the model's: its dims may be anything whose product is 0

BAD_DIMS = {
    "2^64": ([2**64, 0], "shape [18446744073709551616, 0] has a dimension over 2^64 - 1"),
    "2^64-times-0-first": ([0, 2**64], "shape [0, 18446744073709551616] has a dimension over 2^64 - 1"),
    "product-overflows": (
        [2**32, 2**32, 0],
        "shape [4294967296, 4294967296, 0]: the product of its dimensions overflows 64 bits",
    ),
    "negative": ([-1, 0], "shape [-1, 0] is not a list of non-negative integers"),
    "float": ([1.5, 0], "shape [1.5, 0] is not a list of non-negative integers"),
    "bool": ([True, 0], "shape [True, 0] is not a list of non-negative integers"),
    "string": (["1", 0], "shape ['1', 0] is not a list of non-negative integers"),
    "not-a-list": (0, "shape 0 is not a list of non-negative integers"),
}


def _checkpoint_with_empty_tensor(root: Path, shape: object) -> Path:
    tensors = {**llama_tensors(CONFIG), EXTRA: torch.zeros(0)}
    root = write_checkpoint(root, CONFIG, tensors, num_shards=1)
    _with_header(root / "model.safetensors", lambda header: header[EXTRA].update(shape=shape))
    return root


@pytest.mark.parametrize("case", list(BAD_DIMS))
def test_a_header_dimension_safetensors_refuses_is_refused_at_header_validation(tmp_path: Path, case: str) -> None:
    shape, message = BAD_DIMS[case]
    root = _checkpoint_with_empty_tensor(tmp_path / "ckpt", shape)
    with pytest.raises(CheckpointError) as caught:
        read_safetensors_header(root, "model.safetensors")
    assert caught.value.message == f"malformed safetensors header: {message}"
    assert (caught.value.file, caught.value.key) == (str(root / "model.safetensors"), EXTRA)


def test_a_dimension_of_2_to_the_64_is_refused_on_every_rank_before_any_read(tmp_path: Path) -> None:
    root = _checkpoint_with_empty_tensor(tmp_path / "ckpt", [2**64, 0])
    wire = _refused_on_every_rank(root)
    assert wire["type"] == "CheckpointError"
    assert wire["message"] == (
        "malformed safetensors header: shape [18446744073709551616, 0] has a dimension over 2^64 - 1"
    )
    assert (wire["file"], wire["key"]) == (str(root / "model.safetensors"), EXTRA)


def test_the_largest_dimensions_safetensors_accepts_are_accepted(tmp_path: Path) -> None:
    """2^64 - 1, and products that reach 2^63, with a zero dimension: safetensors reads both, and so does this."""
    for shape in ([2**64 - 1, 0], [2**31, 2**32, 0]):
        root = _checkpoint_with_empty_tensor(tmp_path / f"ckpt{len(shape)}", shape)
        infos = {info.key: info for info in read_safetensors_header(root, "model.safetensors")}
        assert infos[EXTRA].shape == tuple(shape)
        assert infos[EXTRA].begin == infos[EXTRA].end
