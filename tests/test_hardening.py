"""Inputs that used to hang a job, load garbage or end in a raw traceback: each is a TPLoaderError
naming the file, raised on every rank of a world-2 load, quickly and with a short message."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import llama_config, rewrite_header
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

import tp_loader
import tp_loader.index
import tp_loader.loader
import tp_loader.plan
import tp_loader.read
from tp_loader.demo import llama_tensors
from tp_loader.testing import errors, run_ranks, same_error, values

SHARD1 = "model-00001-of-00002.safetensors"


def _load(rank: int, world_size: int, root: Path) -> int:
    return len(tp_loader.load(root).state_dict)


def _refused_on_every_rank(
    root: Path, load: Callable = _load, *args: object, env: dict[str, str] | None = None
) -> tp_loader.testing.RankError:
    """The error every rank of a world-2 load raised: the same on both, under 2 KB, within 15 s (the
    timeout is 60 s), and each rank's peak RSS under 1 GiB."""
    start = time.monotonic()
    results = run_ranks(2, load, root, *args, timeout=60, env=env)
    error = same_error(results)
    assert time.monotonic() - start < 15
    assert len(error.message) < 2048
    assert max(e.peak_rss_mib for e in errors(results)) < 1024
    return error


def _replace_with_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


@pytest.mark.parametrize("name", [SHARD1, "model.safetensors.index.json", "config.json"])
def test_a_fifo_in_place_of_a_checkpoint_file_is_refused_without_opening_it(make_checkpoint, name: str) -> None:
    root = make_checkpoint(num_shards=2)
    _replace_with_fifo(root / name)
    error = _refused_on_every_rank(root)
    assert error.type == "CheckpointError"
    assert error.wire["file"] == str(root / name)
    assert "is not a regular file (a directory, FIFO, socket or device), so it is not read" in error.message


def test_a_symlink_loop_as_a_weight_file_is_a_checkpoint_error(make_checkpoint) -> None:
    root = make_checkpoint(num_shards=2)
    (root / SHARD1).unlink()
    (root / SHARD1).symlink_to(root / SHARD1)
    error = _refused_on_every_rank(root)
    assert error.type == "CheckpointError"
    assert error.message.startswith(f"cannot resolve weight file '{SHARD1}'")


def test_an_index_entry_through_a_subdirectory_and_back_stays_inside_and_loads(make_checkpoint) -> None:
    root = make_checkpoint(num_shards=2)
    (root / "sub").mkdir()
    index = json.loads((root / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: (f"sub/../{v}" if v == SHARD1 else v) for k, v in index["weight_map"].items()}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    assert values(run_ranks(2, _load, root)) == [21, 21]


def _bom(raw: bytes) -> bytes:
    return b"\xef\xbb\xbf" + raw


def _utf16(raw: bytes) -> bytes:
    return raw.decode().encode("utf-16")


def _write_header(path: Path, transform: Callable[[bytes], bytes]) -> None:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = transform(data[8 : 8 + length].rstrip(b" "))
    # keep the data where it was: pad the new header with spaces to the old length (or move the data)
    body = data[8 + length :]
    padded = header.ljust(length, b" ") if len(header) <= length else header
    path.write_bytes(struct.pack("<Q", len(padded)) + padded + body)


@pytest.mark.parametrize(
    ("transform", "message"),
    [
        (_bom, "cannot parse header: header is not valid JSON (Unexpected UTF-8 BOM"),
        (_utf16, "cannot parse header: header is not UTF-8 (invalid start byte at byte 0)"),
    ],
    ids=["utf8-bom", "utf16"],
)
def test_headers_safetensors_refuses_are_refused_too(make_checkpoint, transform, message: str) -> None:
    root = make_checkpoint()
    _write_header(root / "model.safetensors", transform)
    with pytest.raises(SafetensorError):
        safe_open(str(root / "model.safetensors"), "pt")
    error = _refused_on_every_rank(root)
    assert (error.type, error.wire["file"]) == ("CheckpointError", str(root / "model.safetensors"))
    assert error.message.startswith(message)


def test_metadata_that_is_not_a_string_map_is_refused_as_safetensors_does(make_checkpoint) -> None:
    root = make_checkpoint()
    rewrite_header(root / "model.safetensors", lambda h: h.update({"__metadata__": {"format": 1}}))
    with pytest.raises(SafetensorError):
        safe_open(str(root / "model.safetensors"), "pt")
    error = _refused_on_every_rank(root)
    assert error.wire["message"] == (
        "malformed safetensors header: __metadata__ is not a map of strings to strings (safetensors refuses it too)"
    )


def test_a_dtype_that_is_a_list_is_an_unknown_dtype(make_checkpoint) -> None:
    root = make_checkpoint()
    rewrite_header(root / "model.safetensors", lambda h: h["model.norm.weight"].update({"dtype": ["F32"]}))
    error = _refused_on_every_rank(root)
    assert error.message.startswith("malformed safetensors header: unknown dtype ['F32']; known: F64, F32")
    assert error.wire["key"] == "model.norm.weight"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "cannot parse config.json: config.json nests too deeply"),
        ('{"vocab_size": ' + "9" * 5000 + "}", "cannot parse config.json: config.json is not valid JSON (Exceeds"),
    ],
    ids=["deeply-nested", "5000-digit-integer"],
)
def test_config_json_that_breaks_the_parser_is_a_checkpoint_error(make_checkpoint, text: str, message: str) -> None:
    root = make_checkpoint()
    (root / "config.json").write_text(text)
    error = _refused_on_every_rank(root)
    assert (error.type, error.wire["file"]) == ("CheckpointError", str(root / "config.json"))
    assert error.message.startswith(message)


def _bin_checkpoint(root: Path, tensors: dict[str, torch.Tensor], **save: object) -> Path:
    root.mkdir()
    (root / "config.json").write_text(json.dumps(llama_config()))
    torch.save(tensors, root / "pytorch_model.bin", **save)
    return root


def _shrink_record(path: Path, record: str, new_size: int) -> None:
    """Makes one storage record of a torch zip archive claim fewer bytes (local and central headers)."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith(record))
        struct.pack_into("<II", raw, archive.getinfo(name).header_offset + 18, new_size, new_size)
    at = raw.find(b"PK\x01\x02")
    while at != -1:
        (name_len,) = struct.unpack_from("<H", raw, at + 28)
        if bytes(raw[at + 46 : at + 46 + name_len]) == name.encode():
            struct.pack_into("<II", raw, at + 20, new_size, new_size)
        at = raw.find(b"PK\x01\x02", at + 4)
    path.write_bytes(raw)


def test_a_bin_record_cut_short_is_refused_where_torch_load_would_read_past_it(tmp_path: Path) -> None:
    tensors = llama_tensors(llama_config())
    root = _bin_checkpoint(tmp_path / "bin", tensors)
    _shrink_record(root / "pytorch_model.bin", "data/0", 16)
    torch.load(root / "pytorch_model.bin", weights_only=True, mmap=True)  # torch itself does not notice
    error = _refused_on_every_rank(root)
    assert (error.type, error.wire["file"]) == ("CheckpointError", str(root / "pytorch_model.bin"))
    assert error.message.startswith(".bin file storage record 0 holds 16 bytes, but data.pkl needs")


def test_a_legacy_non_zip_bin_is_refused_for_what_it_is(tmp_path: Path) -> None:
    root = _bin_checkpoint(tmp_path / "bin", {"a": torch.zeros(2)}, _use_new_zipfile_serialization=False)
    error = _refused_on_every_rank(root)
    assert error.wire["message"] == (
        ".bin file is in torch's legacy (pre-1.6, non-zip) format, which cannot be memory-mapped or checked"
    )


def test_a_sparse_tensor_in_a_bin_is_refused_when_indexing_before_any_read(tmp_path: Path) -> None:
    tensors = {**llama_tensors(llama_config()), "extra": torch.eye(3).to_sparse()}
    root = _bin_checkpoint(tmp_path / "bin", tensors)
    error = _refused_on_every_rank(root)
    assert (error.wire["message"], error.wire["key"]) == ("tensor is sparse, which tp_loader cannot shard", "extra")


@pytest.mark.parametrize("value", ["nan", "inf", "-3", "soon"])
def test_a_timeout_that_is_not_a_positive_number_names_the_variable(make_checkpoint, value: str) -> None:
    error = same_error(run_ranks(2, _load, make_checkpoint(), env={"TP_LOADER_TIMEOUT_S": value}))
    assert (error.type, error.wire["message"]) == (
        "ArgumentError",
        f"environment variable TP_LOADER_TIMEOUT_S={value!r} is not a positive number of seconds",
    )


@pytest.mark.parametrize("case", ["read-only-parent", "file-in-the-way"])
def test_a_demo_directory_that_cannot_be_made_names_the_variable_on_every_rank(tmp_path: Path, case: str) -> None:
    if case == "read-only-parent":
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o500)
        if os.access(parent, os.W_OK):  # root ignores permissions: a file as the parent fails for everyone
            parent.chmod(0o700)
            parent.rmdir()
            parent.write_text("")
        demo = parent / "demo"
    else:
        demo = tmp_path / "demo"
        (tmp_path / "demo").write_text("not a directory")
        demo = demo / "inner"
    error = same_error(run_ranks(2, _load_demo, env={"TP_LOADER_DEMO_DIR": str(demo)}))
    assert (error.type, error.wire["key"], error.wire["file"]) == ("ArgumentError", "TP_LOADER_DEMO_DIR", str(demo))
    assert error.wire["message"].startswith(f"cannot generate the demo checkpoint in {demo}: ")


def _load_demo(rank: int, world_size: int) -> int:
    return len(tp_loader.load().state_dict)


def _load_on_a_mesh_without_rank_1(rank: int, world_size: int, root: Path) -> str:
    from torch.distributed.device_mesh import DeviceMesh

    mesh = DeviceMesh("cpu", torch.tensor([0]))
    if rank == 0:
        return f"{len(tp_loader.load(root, mesh=mesh).state_dict)} tensors"
    try:
        tp_loader.load(root, mesh=mesh)
    except tp_loader.DistributedError as exc:
        return exc.message
    return "loaded"


def test_a_rank_outside_the_mesh_it_passes_gets_a_distributed_error(make_checkpoint) -> None:
    outcomes = values(run_ranks(2, _load_on_a_mesh_without_rank_1, make_checkpoint()))
    assert outcomes == ["21 tensors", "this process (global rank 1) is not in the mesh it passed (ranks [0])"]


def _two_threads_load_at_once(rank: int, world_size: int, root: Path) -> list[int]:
    import threading

    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(len(tp_loader.load(root).state_dict))) for _ in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_two_threads_loading_at_once_are_served_in_turn(make_checkpoint) -> None:
    assert values(run_ranks(2, _two_threads_load_at_once, make_checkpoint(), timeout=90)) == [[21, 21], [21, 21]]


def test_loading_again_after_the_job_is_torn_down_under_torchrun_works_every_time(make_checkpoint) -> None:
    """torchrun's store outlives a destroyed job; each initialization the loader makes has a namespace
    of its own in it (before, 4 of 5 runs lost contact on the second load)."""
    root = make_checkpoint()
    script = Path(__file__).parent / "reinit_job.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    for _ in range(2):
        done = subprocess.run(
            [*command, str(root)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "TP_LOADER_TIMEOUT_S": "20"},
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert sorted(done.stdout.splitlines()) == sorted(
            f"rank {rank} attempt {attempt}: 21 tensors" for attempt in range(3) for rank in range(2)
        )


def _load_on_fake_nodes(rank: int, world_size: int, demo: Path, marks: Path) -> int:
    import tp_loader.loader

    real = tp_loader.loader.ensure_demo

    def recording(path: str) -> Path:
        (marks / f"rank{rank}").touch()
        return real(path)

    tp_loader.loader.host_name = lambda: f"node{rank // 2}"
    tp_loader.loader.ensure_demo = recording
    return len(tp_loader.load().state_dict)


def test_the_first_rank_of_each_node_fetches_and_the_others_wait(tmp_path: Path) -> None:
    """Node grouping with a fake host list: ranks 0-1 on node0, 2-3 on node1 (until a two-agent test)."""
    marks = tmp_path / "marks"
    marks.mkdir()
    demo = tmp_path / "demo"
    outcomes = values(run_ranks(4, _load_on_fake_nodes, demo, marks, env={"TP_LOADER_DEMO_DIR": str(demo)}))
    assert outcomes == [21, 21, 21, 21]
    assert sorted(p.name for p in marks.iterdir()) == ["rank0", "rank2"]


def _truncate_during_read(rank: int, world_size: int, root: Path, name: str, hook: str, zero_copy: bool) -> int:
    """Rank 0 truncates weight file ``name`` just before its first read from it (``hook`` names the
    source method that reads), or, for a zero-copy load, just after mapping it. Rank 1 waits for the
    truncation before its own first read from the file, so that no rank is copying from it while it
    shrinks (for the safetensors reader that would be a SIGBUS, which that library cannot avoid)."""
    path = root / name
    cls_name, method = hook.split(".")
    cls = getattr(tp_loader.read, cls_name)
    original = getattr(cls, method)
    size = path.stat().st_size
    done: list[bool] = []

    def truncating(self: object, item: tp_loader.plan.TensorPlan, *args: torch.Tensor) -> torch.Tensor:
        if not done and item.info.file == path.name:
            done.append(True)
            if rank != 0:
                deadline = time.monotonic() + 10
                while path.stat().st_size == size and time.monotonic() < deadline:
                    time.sleep(0.01)
            elif zero_copy:
                view = original(self, item)
                os.truncate(path, item.info.begin)
                return view
            else:
                os.truncate(path, item.info.begin)
        return original(self, item, *args)

    setattr(cls, method, truncating)
    return len(tp_loader.load(root, zero_copy=zero_copy).state_dict)


@pytest.mark.parametrize(
    ("reader", "hook", "zero_copy"),
    [
        ("mmap", "PreadSource.read_into", False),
        ("mmap", "MappedSource.view", True),
        ("pread", "PreadSource.read_into", False),
        ("safetensors", "SafetensorsSource.slice", False),
        ("bin", "PreadSource.read_into", False),
    ],
)
def test_a_file_that_shrinks_mid_load_is_a_read_error_on_every_rank_never_a_sigbus(
    make_checkpoint, tmp_path: Path, reader: str, hook: str, zero_copy: bool
) -> None:
    root, name = make_checkpoint(num_shards=2), "model-00002-of-00002.safetensors"
    if reader == "bin":
        stored = {k: v for f in sorted(root.glob("*.safetensors")) for k, v in load_file(f).items()}
        root, name = _bin_checkpoint(tmp_path / "bin", stored), "pytorch_model.bin"
    env = {"TP_LOADER_READER": reader if reader != "bin" else "mmap", "TP_LOADER_NUM_THREADS": "1"}
    error = _refused_on_every_rank(root, _truncate_during_read, name, hook, zero_copy, env=env)
    assert error.type == "ReadError"
    assert error.wire["file"] == str(root / name)
    assert "it shrank during the load" in error.message


def _stall_one_read(rank: int, world_size: int, root: Path) -> int:
    """Rank 0's first read from the second shard never returns, like a read from a hung network mount."""
    original = tp_loader.read.PreadSource._pread
    forever = threading.Event()

    def stalling(self: tp_loader.read.PreadSource, item: tp_loader.plan.TensorPlan, *args: object) -> None:
        if rank == 0 and item.info.file == "model-00002-of-00002.safetensors":
            forever.wait()
        original(self, item, *args)

    tp_loader.read.PreadSource._pread = stalling
    return len(tp_loader.load(root).state_dict)


def test_a_read_that_makes_no_progress_is_a_read_error_on_every_rank_within_the_timeout(make_checkpoint) -> None:
    root = make_checkpoint(num_shards=2)
    start = time.monotonic()
    error = _refused_on_every_rank(root, _stall_one_read, env={"TP_LOADER_TIMEOUT_S": "4", "TP_LOADER_ZERO_COPY": "0"})
    assert 2 <= time.monotonic() - start < 4 + 10
    assert error.type == "ReadError"
    assert error.wire["file"] == str(root / "model-00002-of-00002.safetensors")
    assert error.message.startswith("no read made progress for 2 s (half of TP_LOADER_TIMEOUT_S")


def _stall_header_read(rank: int, world_size: int, root: Path, replicas: bool) -> int:
    """Rank 0's header read of the second shard never returns (a hung network mount)."""
    original = tp_loader.index.read_safetensors_header
    forever = threading.Event()

    def stalling(directory: Path, name: str) -> list:
        if rank == 0 and name == "model-00002-of-00002.safetensors":
            forever.wait()
        return original(directory, name)

    tp_loader.index.read_safetensors_header = stalling
    if replicas:  # two replicas of tensor-parallel degree 1: no tensor-parallel peer, but a replica waits
        return len(tp_loader.load(root, tp_size=1).state_dict)
    return len(tp_loader.load(root).state_dict)


@pytest.mark.parametrize("replicas", [False, True], ids=["tp2", "two-replicas-of-tp1"])
def test_a_header_read_that_never_returns_is_a_read_error_on_every_rank_within_the_timeout(
    make_checkpoint, replicas: bool
) -> None:
    root = make_checkpoint(num_shards=2)
    start = time.monotonic()
    error = _refused_on_every_rank(root, _stall_header_read, replicas, env={"TP_LOADER_TIMEOUT_S": "4"})
    assert 2 <= time.monotonic() - start < 4 + 10
    assert error.type == "ReadError"
    assert error.wire["file"] == str(root)
    assert error.message.startswith("reading the checkpoint's headers did not finish within 2 s")
