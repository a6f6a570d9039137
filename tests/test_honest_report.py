"""An honest report: per rank the bytes of its slices (``bytes_planned``), the bytes read from storage during the
load (``bytes_read``: copies, and mapped pages a later stage touched) and the bytes left as views of the page cache
(``bytes_mapped``), with seconds per stage; the summary says "mapped" for mapped bytes and gives a throughput only
for bytes read. Keys the plan skips are never read nor mapped (every read and every view is recorded)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import llama_config
from reference import expected_shard
from safetensors.torch import load_file
from test_skip import MTP_CONFIG, _mtp_tensors

import tp_loader
import tp_loader.read
from tp_loader.byteranges import slice_ranges
from tp_loader.demo import llama_tensors, write_checkpoint
from tp_loader.index import index_checkpoint
from tp_loader.report import RankReport
from tp_loader.resolve import find_weights
from tp_loader.testing import run_ranks, values

CONFIG = llama_config()
GiB = 2**30

#: name → (load arguments, environment): one zero-copy load and every way a load copies.
LOADS = {
    "zero-copy": ({}, {}),
    "converted": ({"dtype": torch.bfloat16}, {}),
    "copied": ({"zero_copy": False}, {}),
    "pread": ({}, {"TP_LOADER_READER": "pread"}),
    "safetensors": ({}, {"TP_LOADER_READER": "safetensors"}),
}


def _slice_bytes(root: Path, config: dict, world_size: int, rank: int) -> int:
    """The bytes of rank ``rank``'s slices, by the tests' own reference (stored dtype)."""
    stored = {k: v for path in sorted(root.glob("*.safetensors")) for k, v in load_file(str(path)).items()}
    return sum(expected_shard(k, t, config, world_size, rank).nbytes for k, t in stored.items())


def _every_load(rank: int, world_size: int, root: Path) -> dict[str, dict]:
    """Each load of :data:`LOADS` on this rank: its report (as JSON) and summary line."""
    out = {}
    for name, (arguments, env) in LOADS.items():
        os.environ.update(env)  # settings are read at call time
        try:
            report = tp_loader.load(root, **arguments).report
        finally:
            for variable in env:
                del os.environ[variable]
        out[name] = {"json": json.loads(report.to_json()), "summary": report.summary(), "table": report.format_table()}
    return out


@pytest.fixture(scope="module")
def loads(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict], list[int]]:
    """Every load of :data:`LOADS` at TP 2 (the report is the same on both ranks), and each rank's slice bytes."""
    root = write_checkpoint(tmp_path_factory.mktemp("honest") / "llama", CONFIG, llama_tensors(CONFIG), num_shards=2)
    outcomes = values(run_ranks(2, _every_load, root))
    assert outcomes[0] == outcomes[1], "ranks returned different reports"
    return outcomes[0], [_slice_bytes(root, CONFIG, 2, rank) for rank in range(2)]


def _counts(report: dict) -> list[tuple[int, int, int, int]]:
    return [(r["bytes_planned"], r["bytes_read"], r["bytes_mapped"], r["zero_copy_tensors"]) for r in report["ranks"]]


def test_a_zero_copy_load_reads_nothing_and_maps_every_planned_byte_on_both_ranks(loads) -> None:
    reports, slice_bytes = loads
    report = reports["zero-copy"]["json"]
    assert slice_bytes == [102720, 102336]
    assert _counts(report) == [(slice_bytes[0], 0, slice_bytes[0], 21), (slice_bytes[1], 0, slice_bytes[1], 21)]
    totals = (report["bytes_planned"], report["bytes_read"], report["bytes_mapped"])
    assert totals == (sum(slice_bytes), 0, sum(slice_bytes))
    assert sum(report["bytes_read_per_node"].values()) == 0


@pytest.mark.parametrize("name", ["converted", "copied", "pread", "safetensors"])
def test_a_copying_load_reads_every_planned_byte_and_maps_none_on_both_ranks(loads, name: str) -> None:
    reports, slice_bytes = loads
    report = reports[name]["json"]
    assert _counts(report) == [(slice_bytes[0], slice_bytes[0], 0, 0), (slice_bytes[1], slice_bytes[1], 0, 0)]
    assert (report["bytes_planned"], report["bytes_read"], report["bytes_mapped"]) == (sum(slice_bytes),) * 2 + (0,)


def test_the_summary_of_a_mapped_only_load_says_mapped_and_gives_no_throughput(loads) -> None:
    reports, _ = loads
    summary = reports["zero-copy"]["summary"]
    pattern = (
        r"21 tensors, 200\.25 KiB planned: 200\.25 KiB mapped \(read when first touched\) in \d+\.\d\d s; "
        r"\d+\.\d\d s in all \(slowest rank\)"
    )
    assert re.fullmatch(pattern, summary), summary
    assert "/s" not in summary and " read in " not in summary
    assert reports["zero-copy"]["table"].splitlines()[2] == "  " + summary


def test_the_summary_of_a_copying_load_gives_the_read_bytes_throughput(loads) -> None:
    reports, _ = loads
    summary = reports["pread"]["summary"]
    pattern = (
        r"21 tensors, 200\.25 KiB planned: 200\.25 KiB read in (\d+\.\d\d) s \((\d+\.\d\d) (KiB|MiB|GiB)/s\); "
        r"\d+\.\d\d s in all \(slowest rank\)"
    )
    assert re.fullmatch(pattern, summary), summary
    assert "mapped" not in summary


def test_the_summary_of_a_mixed_load_gives_a_throughput_for_the_read_bytes_alone(make_checkpoint) -> None:
    report = tp_loader.load(make_checkpoint()).report
    ranks = (
        RankReport(0, 6 * GiB, 21, 3.1, 3.2, 3, bytes_planned=8 * GiB, bytes_mapped=2 * GiB, plan_seconds=0.05),
        RankReport(1, 6 * GiB, 21, 2.0, 2.5, 4, bytes_planned=int(8.4 * GiB), bytes_mapped=int(2.4 * GiB)),
    )
    report = dataclasses.replace(report, ranks=ranks)
    assert report.summary() == (
        "21 tensors, 16.40 GiB planned: 12.00 GiB read in 3.10 s (3.87 GiB/s), 4.40 GiB mapped (read when first "
        "touched); 3.20 s in all (slowest rank)"
    )
    assert report.format_table().splitlines()[2:6] == [
        "  " + report.summary(),
        "",
        "  rank  tensors       planned          read        mapped   plan s   read s  place s  total s",
        "     0       21      8.00 GiB      6.00 GiB      2.00 GiB    0.050    3.100    0.000    3.200",
    ]
    data = json.loads(report.to_json())
    assert (data["bytes_planned"], data["bytes_read"], data["bytes_mapped"]) == (
        8 * GiB + int(8.4 * GiB),
        12 * GiB,
        2 * GiB + int(2.4 * GiB),
    )


def test_every_rank_reports_seconds_per_stage_within_its_total(loads) -> None:
    reports, _ = loads
    for name in LOADS:
        for r in reports[name]["json"]["ranks"]:
            stages = [r["plan_seconds"], r["read_seconds"], r["place_seconds"], r["tie_seconds"]]
            assert all(s >= 0 for s in stages) and r["plan_seconds"] > 0 and r["read_seconds"] > 0, (name, r)
            assert sum(stages) <= r["seconds"], (name, r)


def _tied_load(rank: int, world_size: int, root: Path) -> tuple:
    report = tp_loader.load(root).report
    return [(r.bytes_planned, r.bytes_read, r.bytes_mapped) for r in report.ranks], [t.identical for t in report.ties]


def test_comparing_a_tie_stored_on_both_sides_reads_the_mapped_pages_it_compares(tmp_path: Path) -> None:
    config = llama_config(tie_word_embeddings=True)
    tensors = llama_tensors(config)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    root = write_checkpoint(tmp_path / "tied", config, tensors)
    counts, identical = values(run_ranks(2, _tied_load, root))[0]
    assert identical == [True]
    embed_rows = [51, 50]  # 101 rows in chunks of 51 and 50, float32 rows of 48
    for rank, (planned, read, mapped) in enumerate(counts):
        compared = 2 * embed_rows[rank] * 48 * 4  # the rank's rows of embed_tokens and of lm_head, both views
        assert (planned, read, mapped) == (
            _slice_bytes(root, config, 2, rank),
            compared,
            _slice_bytes(root, config, 2, rank) - compared,
        )


def _recorded_load(rank: int, world_size: int, root: Path) -> dict:
    """A zero-copy load and a copying one (fp8 weights dequantized: preads of weights and scale windows), with
    every ``os.preadv`` and every view of a file mapping recorded as (file, offset, length)."""
    reads: list[tuple[str, int, int]] = []
    views: list[tuple[str, int, int]] = []
    real_preadv, real_view = os.preadv, tp_loader.read.MappedSource.view

    def preadv(fd: int, buffers, offset: int, *args) -> int:
        got = real_preadv(fd, buffers, offset, *args)
        reads.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), offset, got))
        return got

    def view(self, item):
        views.extend((r.file, r.offset, r.length) for r in slice_ranges(item))
        return real_view(self, item)

    os.preadv, tp_loader.read.MappedSource.view = preadv, view
    try:
        mapped = tp_loader.load(root).report.ranks[rank]
        copied = tp_loader.load(root, dtype=torch.float32, zero_copy=False).report.ranks[rank]
    finally:
        os.preadv, tp_loader.read.MappedSource.view = real_preadv, real_view
    counts = [(r.bytes_planned, r.bytes_read, r.bytes_mapped) for r in (mapped, copied)]
    return {"reads": reads, "views": views, "counts": counts}


def test_a_skipped_key_is_never_read_nor_mapped_by_a_zero_copy_or_a_copying_load(tmp_path: Path) -> None:
    tensors = _mtp_tensors()
    mtp_prefix = f"model.layers.{MTP_CONFIG['num_hidden_layers']}."
    with_mtp = write_checkpoint(tmp_path / "with_mtp", MTP_CONFIG, tensors, num_shards=2)
    decoder = {k: v for k, v in tensors.items() if not k.startswith(mtp_prefix)}
    without = write_checkpoint(tmp_path / "without_mtp", MTP_CONFIG, decoder, num_shards=2)
    skipped = {k: i for k, i in index_checkpoint(find_weights(with_mtp)).tensors.items() if k.startswith(mtp_prefix)}
    assert len(skipped) == 53
    loaded = values(run_ranks(2, _recorded_load, with_mtp))
    reference = values(run_ranks(2, _recorded_load, without))
    for rank, (outcome, decoder_only) in enumerate(zip(loaded, reference)):
        assert outcome["reads"] and outcome["views"], "both loads must go through the recorded paths"
        for kind in ("reads", "views"):
            for file, offset, length in outcome[kind]:  # no read and no view covers a byte of a skipped tensor
                hit = [k for k, i in skipped.items() if i.file == file and offset < i.end and i.begin < offset + length]
                assert not hit, (rank, kind, file, offset, length, hit[:3])
        (planned, read, mapped), (converted, copied, none) = outcome["counts"]
        assert outcome["counts"] == decoder_only["counts"], "each rank moves what it moves without the MTP layer"
        assert read + mapped == planned and mapped > 0  # a zero-copy load: fp8 weights kept as stored, views
        assert (copied, none) == (converted, 0)  # copied, fp8 weights dequantized: every planned byte read
        # the preads cover at least the copied bytes (a column shard of short rows is read in whole row blocks)
        assert sum(length for _, _, length in outcome["reads"]) >= read + copied
