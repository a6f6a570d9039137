"""The read stage: exact byte accounting and coalescing, every reader bitwise equal to the plain
safetensors path, and the pinned staging ring's ordering, reuse and overlap (CPU standing in for CUDA)."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import torch
from conftest import llama_config
from reference import expected_shard
from safetensors import safe_open
from safetensors.torch import load_file

import tp_loader
from tp_loader.byteranges import ByteRange, coalesce, slice_ranges
from tp_loader.index import index_checkpoint
from tp_loader.plan import make_plan
from tp_loader.read import ReadOptions, read_tensors
from tp_loader.resolve import find_weights
from tp_loader.spec import select_spec
from tp_loader.staging import StagingRing
from tp_loader.testing import run_ranks, values


def _plans(root: Path, world_size: int):
    checkpoint = index_checkpoint(find_weights(root))
    spec = select_spec("auto", checkpoint.config, model="m")
    return checkpoint, [make_plan(checkpoint, spec, world_size, r, model="m") for r in range(world_size)]


def test_coalesce_merges_touching_ranges_of_one_file_and_keeps_gaps() -> None:
    ranges = [
        ByteRange("a", 0, 4),
        ByteRange("a", 4, 4),
        ByteRange("a", 10, 2),
        ByteRange("b", 12, 1),
        ByteRange("b", 13, 3),
    ]
    assert coalesce(ranges) == [ByteRange("a", 0, 8), ByteRange("a", 10, 2), ByteRange("b", 12, 4)]
    assert coalesce(ranges, max_length=6) == [
        ByteRange("a", 0, 4),
        ByteRange("a", 4, 4),
        ByteRange("a", 10, 2),
        ByteRange("b", 12, 4),
    ]


def test_coalesce_refuses_to_read_a_byte_twice() -> None:
    with pytest.raises(ValueError, match="overlap"):
        coalesce([ByteRange("a", 0, 8), ByteRange("a", 4, 8)])


def test_column_slice_is_one_run_per_row_and_row_slice_one_range(make_checkpoint) -> None:
    root = make_checkpoint()
    checkpoint, plans = _plans(root, 2)
    items = {t.key: t for t in plans[1].tensors}
    down = items["model.layers.0.mlp.down_proj.weight"]  # [48, 100] stored as f32, rank 1 holds columns 50:100
    runs = slice_ranges(down)
    assert len(runs) == 48
    assert runs[0] == ByteRange(down.info.file, down.info.begin + 50 * 4, 50 * 4)
    assert all(b.offset - a.offset == 100 * 4 for a, b in zip(runs, runs[1:]))
    up = items["model.layers.0.mlp.up_proj.weight"]  # [100, 48], rank 1 holds rows 50:100
    assert slice_ranges(up) == [ByteRange(up.info.file, up.info.begin + 50 * 48 * 4, 50 * 48 * 4)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_read_every_sharded_byte_exactly_once_and_nothing_outside_their_slices(
    make_checkpoint, world_size: int
) -> None:
    config = llama_config(num_key_value_heads=6 if world_size == 3 else 4 if world_size < 4 else 2)
    checkpoint, plans = _plans(make_checkpoint(config, num_shards=2), world_size)
    sharded = {t.key for t in plans[0].tensors if t.slice.dim is not None and not t.slice.note}
    per_rank = [[r for t in p.tensors if t.key in sharded for r in slice_ranges(t)] for p in plans]
    everything = sorted((r for rs in per_rank for r in rs), key=lambda r: (r.file, r.offset))
    covered = coalesce(everything)  # raises if any byte is read by two ranks
    whole = coalesce(
        sorted(
            (ByteRange(i.file, i.begin, i.nbytes) for k, i in checkpoint.tensors.items() if k in sharded),
            key=lambda r: (r.file, r.offset),
        )
    )
    assert covered == whole
    for plan, ranges in zip(plans, per_rank):
        ordered = sorted(plan.tensors, key=lambda t: (t.info.file, t.info.begin))
        assert sum(r.length for r in coalesce(r for t in ordered for r in slice_ranges(t))) == plan.read_bytes
        assert sum(r.length for r in ranges) == sum(t.nbytes for t in plan.tensors if t.key in sharded)


@pytest.mark.parametrize("reader", ["mmap", "pread"])
@pytest.mark.parametrize(
    ("stored", "wanted"), [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)]
)
def test_fast_readers_return_bitwise_the_same_shards_as_the_plain_safetensors_path(
    make_checkpoint, reader: str, stored: torch.dtype, wanted
) -> None:
    root = make_checkpoint(num_shards=2, dtype=stored)
    _, plans = _plans(root, 2)
    for plan in plans:
        plain, _ = read_tensors(
            root,
            "safetensors",
            plan.tensors,
            ReadOptions(wanted, torch.device("cpu"), 2, 1 << 20, reader="safetensors"),
        )
        fast, stats = read_tensors(
            root, "safetensors", plan.tensors, ReadOptions(wanted, torch.device("cpu"), 2, 1 << 20, reader=reader)
        )
        assert plain.keys() == fast.keys()
        for key in plain:
            assert fast[key].dtype == plain[key].dtype and fast[key].is_contiguous()
            assert torch.equal(fast[key], plain[key]), key
        assert stats.bytes_read == plan.read_bytes


def _reference_shards(root: Path, config: dict, world_size: int, rank: int) -> dict[str, torch.Tensor]:
    """Each stored tensor as ``safe_open(...).get_tensor`` returns it, cut by the test's own reference:
    ``torch.chunk(tensor, world_size, dim)[rank]``, or KV head ``rank * kv // world_size``."""
    out = {}
    for path in sorted(root.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                out[key] = expected_shard(key, handle.get_tensor(key), config, world_size, rank)
    return out


def _digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {
        k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() for k, v in tensors.items()
    }


READ_CASES = [
    pytest.param(3, llama_config(num_key_value_heads=6), torch.float32, None, id="world3-uneven-vocab-and-mlp"),
    pytest.param(4, llama_config(num_key_value_heads=2), torch.float32, None, id="world4-kv-heads-replicated"),
    pytest.param(2, llama_config(), torch.bfloat16, torch.float32, id="world2-bf16-read-as-fp32"),
]


@pytest.mark.parametrize("zero_copy", [False, True], ids=["copied", "zero-copy"])
@pytest.mark.parametrize("reader", ["mmap", "safetensors", "pread"])
@pytest.mark.parametrize(("world_size", "config", "stored", "wanted"), READ_CASES)
def test_every_reader_returns_the_torch_chunk_slices_of_get_tensor(
    make_checkpoint, reader: str, zero_copy: bool, world_size: int, config: dict, stored, wanted
) -> None:
    root = make_checkpoint(config, num_shards=2, dtype=stored)
    _, plans = _plans(root, world_size)
    options = ReadOptions(wanted, torch.device("cpu"), 2, 1 << 20, reader=reader, zero_copy=zero_copy)
    for rank, plan in enumerate(plans):
        want = _reference_shards(root, config, world_size, rank)
        local, stats = read_tensors(root, "safetensors", plan.tensors, options)
        assert local.keys() == want.keys()
        for key, tensor in want.items():
            expected = tensor if wanted is None else tensor.to(wanted)
            assert local[key].dtype == expected.dtype and torch.equal(local[key], expected), (rank, key)
        views = len(local) if zero_copy and reader == "mmap" and wanted is None else 0
        mapped = plan.read_bytes if views else 0  # every slice of these plans is one range: all or none are views
        assert (stats.bytes_planned, stats.bytes_read, stats.bytes_mapped, stats.zero_copy_tensors) == (
            plan.read_bytes,
            plan.read_bytes - mapped,
            mapped,
            views,
        )


def _load_with_reader(rank: int, world_size: int, root: Path) -> dict[str, str]:
    """Each shard's digest (tensors do not survive the trip back from a forked rank)."""
    return _digests({k: v.to_local() for k, v in tp_loader.load(root).state_dict.items()})


def test_every_reader_loads_the_torch_chunk_slices_of_get_tensor_at_world_size_2(make_checkpoint) -> None:
    """Through ``load`` and the environment (zero-copy matters to the mmap reader alone; every
    combination is read in-process above)."""
    config = llama_config()
    root = make_checkpoint(config, num_shards=3)
    want = [_digests(_reference_shards(root, config, 2, rank)) for rank in range(2)]
    for reader, zero_copy in (("mmap", "0"), ("safetensors", "0"), ("pread", "0"), ("mmap", "1")):
        env = {"TP_LOADER_READER": reader, "TP_LOADER_ZERO_COPY": zero_copy}
        assert values(run_ranks(2, _load_with_reader, root, env=env)) == want, env


class _FakeEvent:
    def __init__(self, log: list, index: int) -> None:
        self.log, self.index, self.done = log, index, False

    def synchronize(self) -> None:
        self.log.append(("wait", self.index))
        self.done = True


def test_staging_ring_reuses_a_buffer_only_after_its_copy_finished_and_reads_ahead_meanwhile() -> None:
    log: list = []
    events: dict[int, _FakeEvent] = {}

    def copy(dst: torch.Tensor, src: torch.Tensor) -> _FakeEvent:
        buffer = id(src.untyped_storage())
        assert buffer not in events or events[buffer].done, "a buffer was overwritten before its copy finished"
        dst.copy_(src)
        event = _FakeEvent(log, len(log))
        log.append(("copy", buffer, tuple(dst.shape)))
        events[buffer] = event
        return event

    ring = StagingRing(num_buffers=2, buffer_bytes=4 * 4 * 10, copy=copy)  # two buffers of 10 rows of 4 f32
    source = torch.arange(4 * 60, dtype=torch.float32).view(60, 4)
    view = source.t().contiguous().t()  # the same values, column-major: a non-contiguous view
    dest = torch.empty(60, 4)
    ring.transfer(view, dest)
    ring.drain()
    assert torch.equal(dest, source)
    copies = [e for e in log if e[0] == "copy"]
    assert [c[2] for c in copies] == [(10, 4)] * 6
    assert len({c[1] for c in copies}) == 2, "the ring has two buffers, used in turn"
    # the second chunk was read and queued before the first copy was waited on: reads overlap copies
    assert log.index(copies[1]) < log.index(("wait", log.index(copies[0])))


def test_staging_ring_converts_dtype_and_handles_rows_larger_than_a_buffer_from_many_threads() -> None:
    ring = StagingRing(num_buffers=3, buffer_bytes=16, copy=lambda dst, src: (dst.copy_(src), _FakeEvent([], 0))[1])
    sources = [torch.randn(7, 9, dtype=torch.bfloat16)[:, 2:8] for _ in range(8)]
    dests = [torch.empty(7, 6, dtype=torch.float32) for _ in sources]
    threads = [threading.Thread(target=ring.transfer, args=(s, d)) for s, d in zip(sources, dests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ring.drain()
    assert all(torch.equal(d, s.float()) for s, d in zip(sources, dests))


def _zero_copy_load(
    rank: int, world_size: int, root: Path
) -> tuple[dict[str, str], dict[str, str], int, int, list[str]]:
    def digests(state: dict) -> dict[str, str]:
        return {
            k: hashlib.sha256(v.to_local().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in state.items()
        }

    mapped = tp_loader.load(root)  # zero-copy is the default on CPU
    copied = tp_loader.load(root, zero_copy=False)
    strided = sorted(k for k, v in mapped.state_dict.items() if not v.to_local().is_contiguous())
    assert all(v.to_local().is_contiguous() for v in copied.state_dict.values())
    return (
        digests(mapped.state_dict),
        digests(copied.state_dict),
        mapped.report.ranks[rank].zero_copy_tensors,
        copied.report.ranks[rank].zero_copy_tensors,
        strided,
    )


def test_zero_copy_load_gives_bitwise_the_same_shards_all_views_of_the_mapping(make_checkpoint) -> None:
    config = llama_config()
    root = make_checkpoint(config, num_shards=2)
    for mapped, copied, num_mapped, num_copied, strided in values(run_ranks(2, _zero_copy_load, root)):
        assert mapped == copied
        assert (num_mapped, num_copied) == (len(mapped), 0)
        assert strided == sorted(
            f"model.layers.{i}.{name}.weight"
            for i in range(config["num_hidden_layers"])
            for name in ("mlp.down_proj", "self_attn.o_proj")
        )


def test_writing_to_a_zero_copy_shard_never_reaches_the_file(make_checkpoint) -> None:
    root = make_checkpoint()
    before = (root / "model.safetensors").read_bytes()
    result = tp_loader.load(root, zero_copy=True)
    norm = result.state_dict["model.norm.weight"]
    norm.fill_(7.0)
    assert (root / "model.safetensors").read_bytes() == before
    assert torch.equal(
        tp_loader.load(root).state_dict["model.norm.weight"],
        load_file(str(root / "model.safetensors"))["model.norm.weight"],
    )
    assert result.report.ranks[0].zero_copy_tensors == len(result.state_dict)


@pytest.mark.parametrize("reader", ["mmap", "safetensors", "pread"])
def test_tensor_stored_at_a_misaligned_offset_is_read_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    import json
    import struct

    tensors = {"a.odd": torch.arange(3, dtype=torch.float16), "b.weight": torch.randn(5, 7)}
    header = {
        "a.odd": {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]},
        "b.weight": {"dtype": "F32", "shape": [5, 7], "data_offsets": [6, 146]},
    }
    text = json.dumps(header).encode().ljust(256)  # b.weight starts 8 + 256 + 6 bytes in: not 4-byte aligned
    data = (
        tensors["a.odd"].view(torch.uint8).numpy().tobytes() + tensors["b.weight"].view(torch.uint8).numpy().tobytes()
    )
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data)
    (tmp_path / "config.json").write_text('{"model_type": "custom"}')
    (tmp_path / "plan.toml").write_text('[[rules]]\npattern = "**"\nstyle = "replicate"\n')
    monkeypatch.setenv("TP_LOADER_READER", reader)
    result = tp_loader.load(tmp_path, plan=str(tmp_path / "plan.toml"), allow_unmatched=True)
    assert all(torch.equal(result.state_dict[k], v) for k, v in tensors.items())


def _anonymous_bytes() -> int:
    """This process's anonymous memory, exactly (``/proc/self/status`` sums per-CPU counters lazily)."""
    with open("/proc/self/smaps_rollup") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith("Anonymous:"))


def test_prefaulting_a_private_mapping_makes_its_pages_the_process_own_without_changing_a_byte(
    tmp_path: Path,
) -> None:
    """What a reload into a model loaded zero-copy relies on: the copy-on-write of a contiguous destination's
    pages happens in the prefault (anonymous memory grows by its pages), values and the file stay as they were;
    a strided one (a column shard, whose span holds other ranks' columns) is left to its writes."""
    from tp_loader import read

    if not Path("/proc/self/smaps_rollup").is_file():
        pytest.skip("needs Linux's /proc/self/smaps_rollup")
    path = tmp_path / "weights.bin"
    data = torch.arange(4 * 1024 * 1024, dtype=torch.int32)  # 16 MiB: 1024 rows of 16 KiB
    path.write_bytes(data.numpy().tobytes())
    storage = torch.UntypedStorage.from_file(str(path), False, data.nbytes)
    mapped = torch.empty(0, dtype=torch.uint8).set_(storage).view(torch.int32).view(1024, 4096)
    rows, columns = mapped[256:768], mapped[:, 1024:3072]  # a row shard (8 MiB) and a column shard
    assert torch.equal(mapped, data.view(1024, 4096))  # every page read, still the file's
    assert read.copies_on_write(rows) and not read.copies_on_write(columns)
    assert not read.copies_on_write(torch.zeros(4)) and not read.copies_on_write(rows.clone())
    before = _anonymous_bytes()
    read.prefault_for_writing(rows)
    if read._MADVISE == [None]:
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux 5.14)")
    grown = _anonymous_bytes() - before
    assert rows.nbytes <= grown <= rows.nbytes + 1024 * 1024, grown
    assert torch.equal(mapped, data.view(1024, 4096))
    read.prefault_for_writing(rows[:0])  # nothing to fault: no call, no error
    rows.zero_()
    assert path.read_bytes() == data.numpy().tobytes()  # a private mapping: the writes never reach the file


def test_a_zero_copy_view_is_exactly_the_slicing_it_replaced_and_an_inconsistent_span_is_a_read_error(
    make_checkpoint,
) -> None:
    """Each view (one ``as_strided`` of the file's elements) has the shape, strides, offset and bytes that slicing
    the tensor's bytes gives, for every rank's slice at TP 1, 2 and 4; a view whose byte span disagrees with its
    shape, or whose range leaves the tensor, is refused instead of reading a neighbour's bytes."""
    import dataclasses

    from tp_loader.read import MappedSource, _take

    root = make_checkpoint(llama_config(num_hidden_layers=1), num_shards=2, dtype=torch.bfloat16)
    for world_size in (1, 2, 4):
        checkpoint, plans = _plans(root, world_size)
        source = MappedSource(checkpoint.root, checkpoint.file_sizes)
        for plan in plans:
            for item in plan.tensors:
                if not source.can_view(item) or item.info.nbytes == 0:
                    continue
                info = item.info
                whole = torch.from_file(
                    str(root / info.file), size=(root / info.file).stat().st_size, dtype=torch.uint8
                )
                expected = _take(item, whole[info.begin : info.end].view(info.dtype).view(info.shape), row_offset=0)
                view = source.view(item)
                assert (view.shape, view.stride(), view.dtype) == (expected.shape, expected.stride(), expected.dtype)
                assert view.storage_offset() == expected.storage_offset()
                assert torch.equal(view, expected), item.key
        sharded = next(item for item in plans[-1].tensors if item.slice.dim is not None and source.can_view(item))
        short = dataclasses.replace(sharded, info=dataclasses.replace(sharded.info, end=sharded.info.end - 4))
        with pytest.raises(tp_loader.ReadError, match="out of bounds"):
            source.view(short)
        (first, stop), dim = sharded.slice.ranges[0], sharded.slice.dim
        beyond = dataclasses.replace(sharded.slice, ranges=((first, stop + sharded.info.shape[dim]),))
        with pytest.raises(tp_loader.ReadError, match="out of bounds"):
            source.view(dataclasses.replace(sharded, slice=beyond))
        source.close()
