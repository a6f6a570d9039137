"""Resolving sources (local, Hub cache offline, .bin fallback) and indexing headers, in one process."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import llama_config
from safetensors.torch import load_file

import tp_loader
from tp_loader.errors import CheckpointError, ModelNotFoundError
from tp_loader.index import read_safetensors_header
from tp_loader.resolve import find_weights, resolve_source
from tp_loader.testing import run_ranks, values


def _stored(root: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(root.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def test_plain_process_loads_every_tensor_as_a_plain_tensor_equal_to_the_checkpoint(make_checkpoint) -> None:
    root = make_checkpoint(num_shards=2)
    result = tp_loader.load(root)
    stored = _stored(root)
    assert result.mesh is None
    assert set(result.state_dict) == set(stored)
    for key, tensor in stored.items():
        assert type(result.state_dict[key]) is torch.Tensor
        assert torch.equal(result.state_dict[key], tensor), key
    assert result.report.ranks[0].bytes_planned == sum(t.numel() * t.element_size() for t in stored.values())


def test_header_index_gives_exact_byte_ranges_without_reading_data(make_checkpoint) -> None:
    root = make_checkpoint()
    infos = read_safetensors_header(root, "model.safetensors")
    raw = (root / "model.safetensors").read_bytes()
    stored = _stored(root)
    for info in infos:
        assert raw[info.begin : info.end] == stored[info.key].numpy().tobytes(), info.key


def _hub_cache(cache: Path, repo_id: str, source: Path, revision: str = "main") -> Path:
    """huggingface_hub's cache layout: files in blobs/, snapshots/<sha>/ holds relative symlinks to them."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = folder / "snapshots" / sha
    for directory in (folder / "refs", folder / "blobs", snapshot):
        directory.mkdir(parents=True)
    (folder / "refs" / revision).write_text(sha)
    for i, path in enumerate(sorted(source.iterdir())):
        shutil.copy(path, folder / "blobs" / f"blob{i}")
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    return snapshot


def test_hub_repo_id_resolves_from_the_local_cache_when_offline(
    make_checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = _hub_cache(tmp_path / "hub", "org/tiny-llama", make_checkpoint(num_shards=2))
    result = tp_loader.load("org/tiny-llama", cache_dir=tmp_path / "hub")
    assert result.report.model == str(snapshot)
    assert torch.equal(result.state_dict["model.norm.weight"], _stored(snapshot)["model.norm.weight"])


def test_hub_revision_that_is_not_cached_is_a_clear_not_found_error_offline(
    make_checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _hub_cache(tmp_path / "hub", "org/tiny-llama", make_checkpoint())
    with pytest.raises(
        ModelNotFoundError,
        match=r"model 'org/tiny-llama' \(revision v2\) is not in the local Hub cache",
    ) as info:
        tp_loader.load("org/tiny-llama", cache_dir=tmp_path / "hub", revision="v2")
    assert info.value.hint == (
        f"Run `hf download org/tiny-llama --revision v2 --cache-dir {tmp_path / 'hub'}` where the Hub is reachable, "
        "or unset HF_HUB_OFFLINE to let tp_loader download it"
    )


def test_path_that_does_not_exist_is_not_mistaken_for_a_repo_id(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_source(tmp_path / "nope")


def test_empty_directory_has_no_weights(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no weights in"):
        find_weights(tmp_path)


def _bin_copy(source: Path, root: Path, stored: dict[str, torch.Tensor]) -> Path:
    root.mkdir()
    shutil.copy(source / "config.json", root / "config.json")
    torch.save(stored, root / "pytorch_model.bin")
    return root


def _same_shards_and_bytes(rank: int, world_size: int, bin_root: Path, safetensors_root: Path) -> int:
    by_bin, by_safetensors = tp_loader.load(bin_root), tp_loader.load(safetensors_root)
    assert by_bin.state_dict.keys() == by_safetensors.state_dict.keys()
    for key, shard in by_safetensors.state_dict.items():
        assert torch.equal(by_bin.state_dict[key].to_local(), shard.to_local()), key
    bytes_read = by_bin.report.ranks[rank].bytes_planned
    assert bytes_read == by_safetensors.report.ranks[rank].bytes_planned
    return bytes_read


def test_a_bin_checkpoint_is_read_slice_by_slice_like_safetensors(make_checkpoint, tmp_path: Path) -> None:
    source = make_checkpoint()
    stored = _stored(source)
    root = _bin_copy(source, tmp_path / "bin", stored)
    bytes_read = values(run_ranks(2, _same_shards_and_bytes, root, source))
    assert max(bytes_read) < sum(t.numel() * t.element_size() for t in stored.values())


def test_a_bin_tensor_stored_as_a_strided_view_is_sliced_from_the_mapped_file_with_a_warning(
    make_checkpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = make_checkpoint()
    stored = _stored(source)
    key = "model.layers.0.self_attn.o_proj.weight"
    stored[key] = stored[key].t().contiguous().t()  # same values, column-major storage
    root = _bin_copy(source, tmp_path / "bin", stored)
    with caplog.at_level(logging.WARNING, logger="tp_loader"):
        result = tp_loader.load(root)
    assert all(torch.equal(result.state_dict[k], v) for k, v in stored.items())
    assert "hold tensors that are not one contiguous run of their record" in caplog.text


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_bin_file_whose_pickle_would_run_code_is_refused(make_checkpoint, tmp_path: Path) -> None:
    root = tmp_path / "evil"
    root.mkdir()
    shutil.copy(make_checkpoint() / "config.json", root / "config.json")
    torch.save({"model.norm.weight": torch.zeros(2), "x": _Exploit()}, root / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused or could not read the .bin file with weights_only=True") as info:
        tp_loader.load(root)
    assert info.value.file == str(root / "pytorch_model.bin")


@pytest.mark.parametrize("entry", ["../elsewhere.safetensors", "/etc/passwd", "link.safetensors"])
def test_index_entry_outside_the_model_directory_is_refused(make_checkpoint, tmp_path: Path, entry: str) -> None:
    root = make_checkpoint(num_shards=2)
    (tmp_path / "outside.safetensors").write_bytes(b"")
    (root / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    index_path = root / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = entry
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"weight file '{entry}' lies outside the model directory") as info:
        find_weights(root)
    assert info.value.key == "model.norm.weight"


def test_single_weight_file_symlinked_out_of_the_model_directory_is_refused(make_checkpoint, tmp_path: Path) -> None:
    root = make_checkpoint()
    (root / "model.safetensors").rename(tmp_path / "moved.safetensors")
    (root / "model.safetensors").symlink_to(tmp_path / "moved.safetensors")
    with pytest.raises(CheckpointError, match="'model.safetensors' lies outside the model directory"):
        find_weights(root)


def test_report_lists_unexpected_keys_loaded_replicated_and_one_warning_counts_them(
    make_checkpoint, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_checkpoint(extra={"model.rotary_emb.scaling": torch.arange(4, dtype=torch.float32)})
    with caplog.at_level(logging.WARNING, logger="tp_loader"):
        result = tp_loader.load(root)
    assert result.report.unexpected_keys == ("model.rotary_emb.scaling",)
    assert result.report.unmatched_keys == ("model.rotary_emb.scaling",)
    assert torch.equal(result.state_dict["model.rotary_emb.scaling"], torch.arange(4, dtype=torch.float32))
    assert [r.getMessage() for r in caplog.records] == [
        f"{root} with plan llama: 1 unexpected (loaded replicated): model.rotary_emb.scaling"
    ]
    assert "model.rotary_emb.scaling (no plan rule)" in result.report.format_table()
    assert not result.report.clean


def test_many_unexpected_keys_give_one_short_warning_and_a_cut_table_with_everything_in_json(
    make_checkpoint, caplog: pytest.LogCaptureFixture
) -> None:
    extra = {f"model.extra.{i}": torch.zeros(1) for i in range(40)}
    root = make_checkpoint(extra=extra)
    with caplog.at_level(logging.WARNING, logger="tp_loader"):
        result = tp_loader.load(root)
    [record] = caplog.records
    assert record.getMessage() == (
        f"{root} with plan llama: 40 unexpected (loaded replicated): model.extra.0, model.extra.1, model.extra.10, …"
    )
    table = result.report.format_table()
    assert "  unexpected keys (loaded replicated) (40):" in table
    assert table.count("(no plan rule)") == 10
    assert "    … 30 more: all in the JSON report (--report) and at -v" in table
    assert result.report.format_table(full=True).count("(no plan rule)") == 40
    assert len(json.loads(result.report.to_json())["unexpected_keys"]) == 40


def test_report_json_round_trips_every_field(make_checkpoint, tmp_path: Path) -> None:
    result = tp_loader.load(make_checkpoint(llama_config(tie_word_embeddings=True)))
    data = json.loads(result.report.to_json())
    assert data["plan"] == "llama"
    assert data["ties"] == [
        {"source": "model.embed_tokens.weight", "target": "lm_head.weight", "stored": "source", "identical": None}
    ]
    assert data["ranks"][0]["bytes_read"] == result.report.bytes_read
    assert data["clean"] is True


def test_sharded_bin_fallback_with_its_index_loads_exact_shards_at_world_size_2(
    make_checkpoint, tmp_path: Path
) -> None:
    from tp_loader.testing import run_ranks, values

    source = make_checkpoint()
    stored = _stored(source)
    root = tmp_path / "bin-sharded"
    root.mkdir()
    shutil.copy(source / "config.json", root / "config.json")
    keys = sorted(stored)
    halves = {
        "pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
        "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :],
    }
    for name, part in halves.items():
        torch.save({k: stored[k] for k in part}, root / name)
    (root / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {k: name for name, part in halves.items() for k in part}})
    )

    def load_rank(rank: int, world_size: int) -> bool:
        from reference import expected_shard

        result = tp_loader.load(root)
        return all(
            torch.equal(result.state_dict[k].to_local(), expected_shard(k, v, llama_config(), world_size, rank))
            for k, v in stored.items()
        )

    assert values(run_ranks(2, load_rank)) == [True, True]


# --- a Mistral repository: consolidated.safetensors beside the transformers-named shards -------------------------

#: transformers' Llama / Mistral names → Mistral's own (``consolidated.safetensors``), as its conversion script maps.
MISTRAL_NAMES = {
    "model.embed_tokens.": "tok_embeddings.",
    "model.norm.": "norm.",
    "lm_head.": "output.",
    "model.layers.": "layers.",
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
STORED_TWICE = "key is stored twice, in consolidated.safetensors and model-00001-of-00002.safetensors"


def _mistral_name(key: str) -> str:
    for ours, theirs in MISTRAL_NAMES.items():
        key = key.replace(ours, theirs)
    return key


def _mistral_repo(make_checkpoint, *, naming: str, index: bool, extra: dict | None = None) -> Path:
    """A two-shard checkpoint with a ``consolidated.safetensors`` of other values (seed 1) beside it, under
    Mistral's names or the shards' own, with or without the shards' index; ``extra`` goes into it too."""
    from safetensors.torch import save_file

    root = make_checkpoint(num_shards=2)
    other = _stored(make_checkpoint(num_shards=1, seed=1))
    copy = {(_mistral_name(k) if naming == "mistral" else k): v for k, v in other.items()}
    save_file({**copy, **(extra or {})}, str(root / "consolidated.safetensors"))
    if not index:
        (root / "model.safetensors.index.json").unlink()
    return root


def _shards(root: Path) -> dict[str, torch.Tensor]:
    return {k: v for name in SHARDS for k, v in load_file(str(root / name)).items()}


@pytest.mark.parametrize("naming", ["mistral", "same"])
@pytest.mark.parametrize("index", [True, False], ids=["index", "no-index"])
def test_consolidated_safetensors_beside_complete_hf_shards_is_ignored(
    make_checkpoint, naming: str, index: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """With the index, only the files it names are read; without it, the HF-named shards are preferred when they
    hold every tensor of the consolidated copy (by name, or under Mistral's names by dtype and shape), as vLLM
    filters a Mistral repository's files."""
    from tp_loader.index import index_checkpoint

    root = _mistral_repo(make_checkpoint, naming=naming, index=index)
    checkpoint = index_checkpoint(find_weights(root))
    assert sorted(checkpoint.file_sizes) == list(SHARDS)
    assert {info.file for info in checkpoint.tensors.values()} == set(SHARDS)
    shards = _shards(root)
    caplog.clear()
    result = tp_loader.load(root, strict=True)
    assert set(result.state_dict) == set(shards)
    for key, tensor in shards.items():
        assert torch.equal(result.state_dict[key], tensor), key
    assert list(result.report.unexpected_keys) == []
    ignored = [r.getMessage() for r in caplog.records if "consolidated.safetensors" in r.getMessage()]
    if index:
        assert ignored == []
    else:
        how = "under its own names" if naming == "same" else "by dtype and shape, under other names"
        assert ignored == [
            f"{root}: consolidated.safetensors is not read: the 2 HF-named shards model-*-of-00002.safetensors "
            f"hold every one of its 21 tensors ({how})"
        ]


def test_consolidated_safetensors_with_a_tensor_the_shards_lack_is_still_refused_as_a_duplicate(
    make_checkpoint,
) -> None:
    root = _mistral_repo(make_checkpoint, naming="same", index=False, extra={"model.extra.weight": torch.ones(3)})
    with pytest.raises(CheckpointError) as caught:
        tp_loader.load(root)
    assert (
        caught.value.message == "key is stored twice, in consolidated.safetensors and model-00001-of-00002.safetensors"
    )
    assert caught.value.file == str(root / "model-00001-of-00002.safetensors")
    assert caught.value.key == "model.embed_tokens.weight"
    assert caught.value.hint == (
        "consolidated.safetensors is a second copy of the weights (Mistral's own format), and the HF-named shards "
        "do not hold every one of its tensors, so neither can be chosen: restore model.safetensors.index.json, or "
        "move consolidated.safetensors out of the directory"
    )


def test_consolidated_safetensors_beside_an_incomplete_set_of_shards_is_still_refused_as_a_duplicate(
    make_checkpoint,
) -> None:
    root = _mistral_repo(make_checkpoint, naming="same", index=False)
    (root / SHARDS[1]).unlink()
    with pytest.raises(CheckpointError) as caught:
        tp_loader.load(root)
    assert (
        caught.value.message == "key is stored twice, in consolidated.safetensors and model-00001-of-00002.safetensors"
    )


def test_consolidated_safetensors_of_other_shapes_under_mistral_names_is_not_dropped(make_checkpoint) -> None:
    """Not every tensor of the copy has a counterpart of its dtype and shape: nothing is ignored, and its tensors
    are the checkpoint's unexpected keys, as before."""
    root = _mistral_repo(make_checkpoint, naming="mistral", index=False, extra={"extra.weight": torch.ones(3)})
    from tp_loader.index import index_checkpoint

    checkpoint = index_checkpoint(find_weights(root))
    assert "consolidated.safetensors" in checkpoint.file_sizes
    assert checkpoint.tensors["extra.weight"].file == "consolidated.safetensors"
