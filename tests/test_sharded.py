"""Fast restarts from pre-sharded directories (``save-sharded``).

- A restart from the directory gives every key the DTensor a normal load gives (placement, global shape and
  stride, local shard bitwise), the same ties and the same report, at world sizes 1, 2 and 4, for a GQA Llama with
  fewer KV heads than ranks, a tied Llama, phi3's fused projections and Mixtral's experts (also as ``mode="ep"`` and
  converted to bf16); each rank reads exactly its own file.
- One process writing every rank (``save-sharded --tp N``) writes the very files the ranks of a load write.
- Every mismatch is refused on every rank with the same :class:`StaleShardsError` naming what differs; ``rebuild``
  rebuilds from the source instead; a save that fails on one rank leaves no manifest behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TRANSFORMERS_LLAMA, llama_config
from models import moe_tensors
from test_fused import _fuse, phi3_config
from test_moe import mixtral_config
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import tp_loader
from tp_loader import cli, sharded, sharded_save
from tp_loader.demo import llama_tensors, write_checkpoint
from tp_loader.errors import ArgumentError, CheckpointError, StaleShardsError
from tp_loader.testing import run_ranks, same_error, values

#: name → (config, tensors, load arguments)
CASES = {
    "llama-gqa-bf16": (
        llama_config(num_key_value_heads=2),
        lambda c: llama_tensors(c, dtype=torch.bfloat16),
        {},
    ),
    "llama-tied": (llama_config(tie_word_embeddings=True), llama_tensors, {}),
    "phi3-fused": (phi3_config(num_key_value_heads=2), lambda c: _fuse(llama_tensors(c), c), {}),
    "mixtral-to-bf16": (mixtral_config(), moe_tensors, {"dtype": "bfloat16"}),
    "mixtral-ep": (mixtral_config(num_local_experts=4), moe_tensors, {"mode": "ep"}),
}


def _sources(base: Path) -> dict[str, Path]:
    return {
        name: write_checkpoint(base / name, config, make(config), num_shards=2)
        for name, (config, make, _) in CASES.items()
    }


def _same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    """Every key: the same kind of tensor, placement, global shape, stride and dtype, and a bitwise equal local
    shard; keys tied on one side are tied on the other."""
    assert list(got) == list(want), f"{what}: keys differ"
    for key, tensor in want.items():
        other = got[key]
        assert type(other) is type(tensor), (what, key)
        assert (other.shape, other.stride(), other.dtype) == (tensor.shape, tensor.stride(), tensor.dtype), (what, key)
        if isinstance(tensor, DTensor):
            assert other.placements == tensor.placements, (what, key)
            other, tensor = other.to_local(), tensor.to_local()
            assert other.shape == tensor.shape, (what, key)
        assert torch.equal(other.contiguous().view(torch.uint8), tensor.contiguous().view(torch.uint8)), (what, key)
    tied = {(a, b) for a in want for b in want if a < b and want[a] is want[b]}
    assert tied == {(a, b) for a in got for b in got if a < b and got[a] is got[b]}, f"{what}: ties differ"


def _without_timings(report: tp_loader.LoadReport) -> tp_loader.LoadReport:
    return dataclasses.replace(report, ranks=())


def _restart_equals_load(rank: int, world_size: int, sources: dict[str, Path], out: Path) -> None:
    for name, root in sources.items():
        arguments = CASES[name][2]
        normal = tp_loader.load(root, **arguments)
        saving = tp_loader.load(root, save_sharded=out / name, **arguments)
        restarted = tp_loader.load(out / name)
        copied = tp_loader.load(out / name, zero_copy=False)
        _same_tensors(saving.state_dict, normal.state_dict, f"{name} saving")
        _same_tensors(restarted.state_dict, normal.state_dict, f"{name} restarted")
        _same_tensors(copied.state_dict, normal.state_dict, f"{name} restarted, copies")
        assert restarted.report.ranks[rank].zero_copy_tensors == restarted.report.num_tensors + sum(
            t.stored == "both" for t in restarted.report.ties
        )
        assert copied.report.ranks[rank].zero_copy_tensors == 0
        assert _without_timings(restarted.report) == _without_timings(normal.report), name
        # what each rank read is its own file's tensor bytes, nothing more
        path = out / name / sharded.rank_file(rank, world_size)
        header = int.from_bytes(path.read_bytes()[:8], "little")
        data_bytes = path.stat().st_size - 8 - header
        mapped, read = restarted.report.ranks[rank], copied.report.ranks[rank]
        assert (mapped.bytes_planned, mapped.bytes_read, mapped.bytes_mapped) == (data_bytes, 0, data_bytes)
        assert (read.bytes_planned, read.bytes_read, read.bytes_mapped) == (data_bytes, data_bytes, 0)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_restart_places_the_same_dtensors_ties_and_report_as_a_normal_load(tmp_path: Path, world_size: int) -> None:
    sources = _sources(tmp_path / "src")
    values(run_ranks(world_size, _restart_equals_load, sources, tmp_path / "out", timeout=300))
    manifest = json.loads((tmp_path / "out" / "llama-gqa-bf16" / sharded.MANIFEST).read_text())
    assert manifest["world_size"] == world_size
    assert [f["name"] for f in manifest["files"]] == [sharded.rank_file(r, world_size) for r in range(world_size)]
    assert (manifest["plan"], manifest["dtype"], manifest["format_version"]) == ("llama", None, 2)


def _with_replicas(rank: int, world_size: int, root: Path, out: Path) -> None:
    mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("dp", "tp"))
    normal = tp_loader.load(root, mesh=mesh)
    tp_loader.load(root, mesh=mesh, save_sharded=out)
    restarted = tp_loader.load(out, mesh=mesh)
    _same_tensors(restarted.state_dict, normal.state_dict, "replicas")
    assert _without_timings(restarted.report) == _without_timings(normal.report)


def test_two_replicas_of_two_ranks_write_one_file_per_tensor_parallel_rank_and_restart_from_it(tmp_path: Path) -> None:
    root = _sources(tmp_path / "src")["llama-gqa-bf16"]
    values(run_ranks(4, _with_replicas, root, tmp_path / "out", timeout=300))
    assert sorted(os.listdir(tmp_path / "out")) == [
        "config.json",
        *(sharded.rank_file(r, 2) for r in range(2)),
        sharded.MANIFEST,
    ]


def test_restart_in_a_plain_process_gives_the_plain_tensors_of_a_normal_load(tmp_path: Path) -> None:
    root = _sources(tmp_path / "src")["llama-tied"]
    normal = tp_loader.load(root)
    tp_loader.load(root, save_sharded=tmp_path / "out")
    restarted = tp_loader.load(tmp_path / "out", verify=True)
    _same_tensors(restarted.state_dict, normal.state_dict, "plain")
    assert _without_timings(restarted.report) == _without_timings(normal.report)


def _save_while_loading(rank: int, world_size: int, root: Path, out: Path) -> None:
    tp_loader.load(root, save_sharded=out)


def test_one_process_writing_every_rank_writes_the_files_the_ranks_of_a_load_write(tmp_path: Path) -> None:
    root = _sources(tmp_path / "src")["phi3-fused"]
    assert cli.main(["save-sharded", str(root), str(tmp_path / "one"), "--tp", "2", "-q"]) == 0
    values(run_ranks(2, _save_while_loading, root, tmp_path / "ranks"))
    for rank in range(2):
        name = sharded.rank_file(rank, 2)
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "ranks" / name).read_bytes(), name
    one, ranks = (json.loads((tmp_path / d / sharded.MANIFEST).read_text()) for d in ("one", "ranks"))
    assert one["files"] == ranks["files"]
    assert one["source"] == ranks["source"]
    assert sorted(os.listdir(tmp_path / "one")) == [
        "config.json",
        *(sharded.rank_file(r, 2) for r in range(2)),
        sharded.MANIFEST,
    ]


def test_save_sharded_alone_needs_the_world_size(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = _sources(tmp_path / "src")["llama-tied"]
    assert cli.main(["save-sharded", str(root), str(tmp_path / "out")]) == 1
    assert "--tp N" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_command_line_restarts_from_the_directory_and_prints_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = _sources(tmp_path / "src")["llama-tied"]
    assert cli.main(["save-sharded", str(root), str(tmp_path / "out"), "--tp", "1", "-q"]) == 0
    assert cli.main([str(tmp_path / "out"), "--verify"]) == 0
    table = capsys.readouterr().out
    assert f"tp_loader: {root}" in table and "20 tensors" in table


# --- refusals ---------------------------------------------------------------------------------------------


def _rewrite_weights(root: Path) -> None:
    """The source rewritten in place with other weights of the same shapes (its headers unchanged)."""
    config = json.loads((root / "config.json").read_text())
    write_checkpoint(root, config, llama_tensors(config, seed=7, dtype=torch.bfloat16), num_shards=2)


def _edit_manifest(out: Path, edit) -> None:
    data = json.loads((out / sharded.MANIFEST).read_text())
    edit(data)
    (out / sharded.MANIFEST).write_text(json.dumps(data))


def _flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def _data_start(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


#: name → (world size saved for, how the directory or source is changed, load arguments, error message start)
REFUSALS = {
    "world-size": (4, lambda src, out: None, {}, "pre-sharded directory was written for 4 ranks; this load has 2"),
    "dtype": (
        2,
        lambda src, out: None,
        {"dtype": "float32"},
        "pre-sharded directory does not match this load's plan: dtype None → 'float32'",
    ),
    "plan": (
        2,
        lambda src, out: None,
        {"plan": "qwen2"},
        "pre-sharded directory does not match this load's plan: plan 'llama' → 'qwen2'",
    ),
    "plan-file-changed": (  # as when an upgrade changes a plan: the layout a rank plans is not the one it wrote
        2,
        lambda src, out: _edit_manifest(out, lambda d: d["files"][1].update(layout_sha256="0" * 64)),
        {},
        "pre-sharded directory does not match this load's plan: the plan gives other slices than when it was "
        f"written (tp_loader {tp_loader.__version__} then, {tp_loader.__version__} now, or the plan file changed)",
    ),
    "format-version": (
        2,
        lambda src, out: _edit_manifest(out, lambda d: d.update(format_version=1)),
        {},
        f"pre-sharded directory is in format version 1 (written by tp_loader {tp_loader.__version__}); this "
        f"tp_loader ({tp_loader.__version__}) reads version 2",
    ),
    "source-rewritten": (
        2,
        lambda src, out: _rewrite_weights(src),
        {},
        "the source changed since save-sharded: config.json is",
    ),
    "source-touched": (
        2,
        lambda src, out: os.utime(src / "model-00002-of-00002.safetensors", ns=(1, 10**18)),
        {},
        "the source changed since save-sharded: model-00002-of-00002.safetensors is",
    ),
    "source-index-edited": (
        2,
        lambda src, out: _edit_manifest(out, lambda d: d["source"]["tensors"][0][3].reverse()),
        {},
        "the manifest's copy of the source's config and headers does not match its digest",
    ),
    "rank-file-missing": (
        2,
        lambda src, out: (out / "rank-00001-of-00002.safetensors").unlink(),
        {},
        "rank 1's file is missing",
    ),
    "rank-file-resized": (
        2,
        lambda src, out: open(out / "rank-00001-of-00002.safetensors", "ab").write(b"\0"),
        {},
        "rank file is ",
    ),
    "header-altered": (
        2,
        lambda src, out: _flip_byte(out / "rank-00001-of-00002.safetensors", 20),
        {},
        "rank file's header differs from the one save-sharded wrote",
    ),
    "data-damaged-verified": (
        2,
        lambda src, out: _flip_byte(
            out / "rank-00001-of-00002.safetensors", _data_start(out / "rank-00001-of-00002.safetensors") + 5
        ),
        {"verify": True},
        "rank file's bytes [0, ",
    ),
}


def _refusals(rank: int, world_size: int, dirs: dict[str, Path]) -> dict[str, tuple]:
    found = {}
    for name, out in dirs.items():
        try:
            tp_loader.load(out, **REFUSALS[name][2])
        except StaleShardsError as exc:
            found[name] = (exc.message, exc.file, exc.rank, exc.hint)
    return found


def test_every_mismatch_is_refused_on_every_rank_naming_what_differs(tmp_path: Path) -> None:
    dirs = {}
    for name, (saved_for, change, _, _) in REFUSALS.items():
        config = llama_config()
        src = write_checkpoint(
            tmp_path / name / "src", config, llama_tensors(config, dtype=torch.bfloat16), num_shards=2
        )
        out = tmp_path / name / "out"
        sharded_save.save_offline(src, out, saved_for)
        change(src, out)
        dirs[name] = out
    per_rank = values(run_ranks(2, _refusals, dirs, timeout=300))
    assert per_rank[0] == per_rank[1], "ranks raised different errors"
    for name, (_, _, _, message) in REFUSALS.items():
        assert name in per_rank[0], f"{name}: not refused"
        got, file, _, hint = per_rank[0][name]
        assert got.startswith(message), (name, got)
        assert "rebuild=True" in hint and str(dirs[name]) in hint, (name, hint)
    assert per_rank[0]["rank-file-missing"][1:3] == (str(dirs["rank-file-missing"] / sharded.rank_file(1, 2)), 1)
    assert per_rank[0]["header-altered"][2] == 1
    assert per_rank[0]["data-damaged-verified"][0].endswith("the file is damaged")


def _one_rank_elsewhere(rank: int, world_size: int, src: Path, out: Path) -> None:
    tp_loader.load(out if rank == 0 else src)


def test_ranks_that_do_not_all_see_the_directory_refuse_together(tmp_path: Path) -> None:
    config = llama_config()
    src = write_checkpoint(tmp_path / "src", config, llama_tensors(config), num_shards=1)
    sharded_save.save_offline(src, tmp_path / "out", 2)
    error = same_error(run_ranks(2, _one_rank_elsewhere, src, tmp_path / "out"))
    assert error.type == "DistributedError"
    assert error.wire["message"].startswith("ranks [1] see a different tp_loader-sharded.json (or none)")


def test_a_mode_other_than_the_directorys_is_refused_naming_it(tmp_path: Path) -> None:
    config = mixtral_config(num_local_experts=4)
    src = write_checkpoint(tmp_path / "src", config, moe_tensors(config), num_shards=1)
    sharded_save.save_offline(src, tmp_path / "out", 1)
    with pytest.raises(StaleShardsError, match="does not match this load's plan: mode None → 'ep'"):
        tp_loader.load(tmp_path / "out", mode="ep")


def test_a_data_byte_damaged_is_found_only_by_verify_and_an_intact_directory_passes_it(tmp_path: Path) -> None:
    config = llama_config()
    src = write_checkpoint(tmp_path / "src", config, llama_tensors(config), num_shards=1)
    sharded_save.save_offline(src, tmp_path / "out", 1)
    tp_loader.load(tmp_path / "out", verify=True)
    path = tmp_path / "out" / sharded.rank_file(0, 1)
    _flip_byte(path, _data_start(path))
    tp_loader.load(tmp_path / "out")  # sizes and headers are checked on every restart, data bytes on request
    with pytest.raises(StaleShardsError, match=r"bytes \[0, \d+\) fail their checksum"):
        tp_loader.load(tmp_path / "out", verify=True)


def _rebuild(rank: int, world_size: int, src: Path, out: Path) -> None:
    rebuilt = tp_loader.load(out, rebuild=True)
    _same_tensors(rebuilt.state_dict, tp_loader.load(src).state_dict, "rebuilt")
    restarted = tp_loader.load(out)  # the directory is current again
    _same_tensors(restarted.state_dict, rebuilt.state_dict, "restarted after rebuild")


def test_rebuild_rebuilds_a_stale_directory_from_its_source_for_this_load(tmp_path: Path) -> None:
    config = llama_config()
    src = write_checkpoint(tmp_path / "src", config, llama_tensors(config, dtype=torch.bfloat16), num_shards=2)
    sharded_save.save_offline(src, tmp_path / "out", 4)
    _rewrite_weights(src)
    values(run_ranks(2, _rebuild, src, tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == [
        "config.json",
        *(sharded.rank_file(r, 2) for r in range(2)),
        sharded.MANIFEST,
    ]


def test_rebuild_of_a_directory_whose_source_is_gone_says_so(tmp_path: Path) -> None:
    config = llama_config()
    src = write_checkpoint(tmp_path / "src", config, llama_tensors(config), num_shards=1)
    sharded_save.save_offline(src, tmp_path / "out", 2)
    shutil.rmtree(src)
    with pytest.raises(StaleShardsError, match="rebuild=True cannot rebuild it: its source .* is gone"):
        tp_loader.load(tmp_path / "out", rebuild=True)


def test_a_directory_whose_source_is_gone_still_restarts(tmp_path: Path) -> None:
    config = llama_config()
    src = write_checkpoint(tmp_path / "src", config, llama_tensors(config), num_shards=1)
    normal = tp_loader.load(src)
    sharded_save.save_offline(src, tmp_path / "out", 1)
    shutil.rmtree(src)
    _same_tensors(tp_loader.load(tmp_path / "out").state_dict, normal.state_dict, "source gone")


def _failing_save(rank: int, world_size: int, src: Path, out: Path) -> None:
    write = sharded_save.write_rank

    def fail_on_rank_1(*args, **kwargs):
        written = write(*args, **kwargs)
        if rank == 1:
            raise ArgumentError("disk full (injected)", key="save_sharded")
        return written

    sharded_save.write_rank = fail_on_rank_1
    tp_loader.load(src, save_sharded=out)


def test_a_save_that_fails_on_one_rank_fails_everywhere_and_leaves_no_valid_directory(tmp_path: Path) -> None:
    config = llama_config()
    src = write_checkpoint(tmp_path / "src", config, llama_tensors(config), num_shards=1)
    sharded_save.save_offline(src, tmp_path / "out", 2)  # a complete directory, about to be overwritten
    _rewrite_weights(src)
    errors = [value for _, value in run_ranks(2, _failing_save, src, tmp_path / "out")]
    assert [(e.type, e.wire["message"], e.wire["rank"]) for e in errors] == [
        ("ArgumentError", "disk full (injected)", 1)
    ] * 2
    # the previous save's files, no manifest and no temporary file
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", *(sharded.rank_file(r, 2) for r in range(2))]
    with pytest.raises(CheckpointError, match="holds rank files but no tp_loader-sharded.json"):
        tp_loader.load(tmp_path / "out")


def test_saving_into_the_source_or_a_directory_of_other_files_is_refused(tmp_path: Path) -> None:
    config = llama_config()
    src = write_checkpoint(tmp_path / "src", config, llama_tensors(config), num_shards=1)
    with pytest.raises(ArgumentError, match="the source checkpoint's own directory"):
        tp_loader.load(src, save_sharded=src)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(ArgumentError, match=r"holds files save-sharded does not write \(notes.txt\)"):
        tp_loader.load(src, save_sharded=tmp_path / "other")
    assert os.listdir(tmp_path / "other") == ["notes.txt"]


def test_rebuild_and_verify_need_a_pre_sharded_directory_and_it_is_not_saved_again(tmp_path: Path) -> None:
    config = llama_config()
    src = write_checkpoint(tmp_path / "src", config, llama_tensors(config), num_shards=1)
    for flag in ("rebuild", "verify"):
        with pytest.raises(ArgumentError, match=f"{flag}=True applies to a pre-sharded directory"):
            tp_loader.load(src, **{flag: True})
    sharded_save.save_offline(src, tmp_path / "out", 1)
    with pytest.raises(ArgumentError, match="with a model that is already pre-sharded"):
        tp_loader.load(tmp_path / "out", save_sharded=tmp_path / "again")


# --- serving ----------------------------------------------------------------------------------------------


def _tp_model(root: Path, world_size: int) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    accelerate = pytest.importorskip("accelerate")
    config = transformers.AutoConfig.from_pretrained(root)
    with accelerate.init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    mesh = init_device_mesh("cpu", (world_size,))
    tp_loader.parallelize(model, mesh=mesh)
    tp_loader.load_into(model, root, mesh=mesh)
    return model


def _serve(rank: int, world_size: int, src: Path, out: Path) -> None:
    from_source, from_directory = _tp_model(src, world_size), _tp_model(out, world_size)
    _same_tensors(from_directory.state_dict(), from_source.state_dict(), "load_into")
    prompt = torch.tensor([[5, 17, 33, 2, 71, 9]])
    with torch.no_grad():
        assert torch.equal(from_directory(prompt).logits, from_source(prompt).logits)


def test_load_into_a_parallelized_model_from_the_directory_equals_load_into_from_the_source(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TRANSFORMERS_LLAMA)).save_pretrained(tmp_path / "src")
    assert cli.main(["save-sharded", str(tmp_path / "src"), str(tmp_path / "out"), "--tp", "2", "-q"]) == 0
    values(run_ranks(2, _serve, tmp_path / "src", tmp_path / "out", timeout=300))
