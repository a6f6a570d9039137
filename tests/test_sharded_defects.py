"""Restarts from directories that were edited, mixed or left behind by a changed source (issue 22, item 3).

- A rank file's header passes the validation a source header passes (overlapping or negative byte ranges are
  refused even when the manifest's header digest was updated to match).
- Every file of one save carries the save's id, checked on every restart from the header alone: a rank file or a
  manifest from another save is refused.
- The source's files are fingerprinted by a few fixed pages at save: a source rewritten in place with its sizes
  and modification times kept is refused.
- Every manifest field is checked for type and range: a bad one is a :class:`CheckpointError` (or, where it shows
  only against the plan, a :class:`StaleShardsError`) naming the field, never an internal error.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import llama_config
from test_sharded import _same_tensors

import tp_loader
from tp_loader import sharded, sharded_manifest, sharded_save
from tp_loader.demo import llama_tensors, write_checkpoint
from tp_loader.errors import CheckpointError, StaleShardsError
from tp_loader.testing import run_ranks, same_error

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
O_PROJ = "model.layers.0.self_attn.o_proj.weight"


def _source(root: Path, seed: int = 0) -> Path:
    config = llama_config()
    return write_checkpoint(root, config, llama_tensors(config, seed=seed), num_shards=2)


def _saved(tmp_path: Path, world_size: int = 1, seed: int = 0, name: str = "") -> tuple[Path, Path]:
    src = _source(tmp_path / f"src{name}", seed)
    out = tmp_path / f"out{name}"
    sharded_save.save_offline(src, out, world_size)
    return src, out


def _edit_manifest(out: Path, edit) -> None:
    data = json.loads((out / sharded.MANIFEST).read_text())
    edit(data)
    (out / sharded.MANIFEST).write_text(json.dumps(data))


def _rewrite_rank_header(out: Path, rank: int, world_size: int, edit) -> None:
    """Edits a rank file's header in place (its length kept, padded with spaces) and sets the manifest's header
    digest to the edited header's, as a hand-made or edited directory would."""
    path = out / sharded.rank_file(rank, world_size)
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    text += b" " * (length - len(text))
    path.write_bytes(raw[:8] + text + raw[8 + length :])
    digest = hashlib.sha256(raw[:8] + text).hexdigest()
    _edit_manifest(out, lambda data: data["files"][rank].update(header_sha256=digest))


# --- rank-file headers are validated as source headers are -------------------------------------------------


def _overlap(header: dict) -> str:
    """The later of two tensors of one size pointed at the earlier one's bytes."""
    first, later = sorted((Q_PROJ, O_PROJ), key=lambda key: header[key]["data_offsets"][0])
    header[later]["data_offsets"] = list(header[first]["data_offsets"])
    return later


def _negative(header: dict) -> str:
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [-8, end - begin - 8]  # the last 8 header bytes and the tensor's first bytes
    return last


@pytest.mark.parametrize(
    ("edit", "what"),
    [(_overlap, "overlaps the previous tensor"), (_negative, "data_offsets [-8, ")],
    ids=["overlapping", "negative"],
)
def test_a_rank_file_header_with_byte_ranges_safetensors_refuses_is_refused(tmp_path: Path, edit, what: str) -> None:
    _, out = _saved(tmp_path)
    edited: list[str] = []
    _rewrite_rank_header(out, 0, 1, lambda header: edited.append(edit(header)))
    with pytest.raises(StaleShardsError) as info:
        tp_loader.load(out)
    error = info.value
    assert type(error) is StaleShardsError
    assert error.message.startswith("rank 0's file: malformed safetensors header: "), error.message
    assert what in error.message, error.message
    assert (error.file, error.key) == (str(out / sharded.rank_file(0, 1)), edited[0])
    assert "rebuild=True" in error.hint and "save-sharded" in error.hint


# --- one save id in every file of a save ---------------------------------------------------------------------


def _restart(rank: int, world_size: int, out: Path) -> None:
    tp_loader.load(out)


def test_a_rank_file_or_manifest_from_another_save_of_the_same_shapes_is_refused_from_the_header(
    tmp_path: Path,
) -> None:
    _, first = _saved(tmp_path, 2, seed=0, name="a")
    _, other = _saved(tmp_path, 2, seed=7, name="b")  # another fine-tune: same keys, shapes and headers' layout
    mixed_file, mixed_manifest = tmp_path / "mixed-file", tmp_path / "mixed-manifest"
    shutil.copytree(first, mixed_file)
    shutil.copy2(other / sharded.rank_file(1, 2), mixed_file / sharded.rank_file(1, 2))
    shutil.copytree(first, mixed_manifest)
    shutil.copy2(other / sharded.MANIFEST, mixed_manifest / sharded.MANIFEST)
    errors = [same_error(run_ranks(2, _restart, out)) for out in (mixed_file, mixed_manifest)]
    ids = [json.loads((d / sharded.MANIFEST).read_text())["save_id"] for d in (first, other)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and ids[0] != ids[1]
    cases = ((mixed_file, 1, ids[1], ids[0]), (mixed_manifest, 0, ids[0], ids[1]))
    for error, (out, rank, found, wanted) in zip(errors, cases):
        assert error.type == "StaleShardsError"
        assert error.wire["message"] == (
            f"rank {rank}'s file was written by another save (save id {found}; the manifest's is {wanted}): the "
            "directory mixes the files of two saves"
        )
        assert (error.wire["file"], error.wire["rank"]) == (str(out / sharded.rank_file(rank, 2)), rank)
        assert "rebuild=True" in error.wire["hint"]


def test_every_file_of_a_save_carries_its_id_and_a_save_of_the_same_source_state_writes_the_same_files(
    tmp_path: Path,
) -> None:
    src, out = _saved(tmp_path, 2)
    sharded_save.save_offline(src, tmp_path / "again", 2)
    save_id = json.loads((out / sharded.MANIFEST).read_text())["save_id"]
    for rank in range(2):
        path = out / sharded.rank_file(rank, 2)
        raw = path.read_bytes()
        metadata = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
        assert metadata == {"format": sharded_manifest.FORMAT, "rank": str(rank), "world_size": "2", "save_id": save_id}
        assert (tmp_path / "again" / path.name).read_bytes() == raw  # mixing the two is harmless


def test_the_save_id_is_read_wherever_the_header_keeps_its_metadata(tmp_path: Path) -> None:
    _, out = _saved(tmp_path)
    save_id = json.loads((out / sharded.MANIFEST).read_text())["save_id"]
    other = "f" * 32

    def metadata_last_of_another_save(header: dict) -> None:
        metadata = header.pop("__metadata__")
        header["__metadata__"] = {**metadata, "save_id": other}

    _rewrite_rank_header(out, 0, 1, metadata_last_of_another_save)
    with pytest.raises(StaleShardsError) as info:
        tp_loader.load(out)
    assert info.value.message == (
        f"rank 0's file was written by another save (save id {other}; the manifest's is {save_id}): the directory "
        "mixes the files of two saves"
    )


def test_a_rank_file_renamed_as_another_ranks_is_refused_naming_both_ranks(tmp_path: Path) -> None:
    _, out = _saved(tmp_path, 2)
    shutil.copy2(out / sharded.rank_file(0, 2), out / sharded.rank_file(1, 2))
    sizes = [(out / sharded.rank_file(r, 2)).stat().st_size for r in range(2)]
    _edit_manifest(out, lambda data: data["files"][1].update(size=sizes[1]))
    error = same_error(run_ranks(2, _restart, out))
    assert error.type == "StaleShardsError"
    assert error.wire["message"] == "rank 1's file holds rank 0's shards"
    assert error.wire["rank"] == 1


# --- the source's content, not only its sizes and times -------------------------------------------------------


def _rewrite_keeping_times(src: Path, seed: int) -> None:
    """The source rewritten in place with sizes and modification times kept (``cp -p``, ``rsync -t``)."""
    before = {path.name: path.stat() for path in src.iterdir()}
    config = json.loads((src / "config.json").read_text())
    write_checkpoint(src, config, llama_tensors(config, seed=seed), num_shards=2)
    for path in src.iterdir():
        st = before[path.name]
        assert path.stat().st_size == st.st_size
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_source_rewritten_in_place_with_sizes_and_times_kept_is_refused_and_rebuilt(tmp_path: Path) -> None:
    src, out = _saved(tmp_path)
    _rewrite_keeping_times(src, seed=7)
    with pytest.raises(StaleShardsError) as info:
        tp_loader.load(out)
    error = info.value
    size = (src / "model-00001-of-00002.safetensors").stat().st_size
    assert error.message == (
        f"the source changed since save-sharded: model-00001-of-00002.safetensors has the same size ({size} bytes) "
        "and modification time but other content (copied over with times kept, as cp -p or rsync -t do)"
    )
    assert error.file == str(src / "model-00001-of-00002.safetensors")
    assert "rebuild=True" in error.hint
    rebuilt = tp_loader.load(out, rebuild=True)
    normal = tp_loader.load(src)
    _same_tensors(rebuilt.state_dict, normal.state_dict, "rebuilt")
    _same_tensors(tp_loader.load(out).state_dict, normal.state_dict, "restarted after rebuild")


def test_a_source_rewritten_with_the_same_bytes_and_times_still_restarts(tmp_path: Path) -> None:
    src, out = _saved(tmp_path)
    _rewrite_keeping_times(src, seed=0)
    _same_tensors(tp_loader.load(out).state_dict, tp_loader.load(src).state_dict, "same bytes")


def test_the_fingerprint_hashes_the_first_last_and_six_evenly_spaced_pages_and_the_size(tmp_path: Path) -> None:
    page = sharded_manifest.FINGERPRINT_PAGE_BYTES
    size = 1000 * page + 123
    assert sharded_manifest.fingerprint_pages(size) == [
        (0, page),
        (142 * page, page),  # 1/7 of the way to the last page, rounded down to a page
        (285 * page, page),
        (428 * page, page),
        (570 * page, page),
        (713 * page, page),
        (856 * page, page),
        (size - page, page),
    ]
    assert sharded_manifest.fingerprint_pages(5 * page) == [(0, 5 * page)]  # a small file: all of it
    path = tmp_path / "blob"
    path.write_bytes(bytes(size))
    base = sharded_manifest.content_fingerprint(path, size)
    assert re.fullmatch(r"[0-9a-f]{32}", base)

    def flipped(offset: int) -> str:
        with open(path, "r+b") as handle:
            handle.seek(offset)
            value = handle.read(1)
            handle.seek(offset)
            handle.write(bytes([value[0] ^ 1]))
        return sharded_manifest.content_fingerprint(path, size)

    assert flipped(285 * page + 17) != base  # inside a sampled page
    flipped(285 * page + 17)
    assert flipped(300 * page) == base  # between sampled pages: a change there is not seen (documented)


# --- every manifest field checked --------------------------------------------------------------------------------

DELETE = object()

#: (field, bad value, the key the error names when it is not the field itself); DELETE removes the field
BAD_FIELDS: list[tuple[str, Any, str | None]] = [
    ("format", "other", None),
    ("format", 3, None),
    ("format_version", "2", None),
    ("format_version", 2.0, None),
    ("format_version", True, None),
    ("format_version", 0, None),
    ("tp_loader_version", 3, None),
    ("tp_loader_version", DELETE, None),
    ("world_size", 2.5, None),
    ("world_size", 0, None),
    ("world_size", -1, None),
    ("world_size", "1", None),
    ("world_size", True, None),
    ("world_size", None, None),
    ("world_size", 2, "files"),
    ("plan", 7, None),
    ("plan", "", None),
    ("dtype", 7, None),
    ("dtype", "float33", None),
    ("dtype", "bfloat16", "arguments.dtype"),
    ("arguments", [], None),
    ("arguments.dtype", 3, None),
    ("arguments.plan", None, None),
    ("arguments.plan", DELETE, None),
    ("arguments.mode", 1, None),
    ("arguments.strict", "no", None),
    ("arguments.allow_unmatched", 1, None),
    ("arguments.zero_copy", "yes", None),
    ("arguments.device_type", 0, None),
    ("arguments.share", 0, None),
    ("checksum", "crc32", None),
    ("checksum.algorithm", "md5", None),
    ("checksum.block_bytes", 0, None),
    ("checksum.block_bytes", -1, None),
    ("checksum.block_bytes", 2.5, None),
    ("checksum.block_bytes", "64", None),
    ("checksum.block_bytes", True, None),
    ("checksum.block_bytes", 4096, "files[0].crc32"),  # more blocks than crc32s
    ("files", {}, None),
    ("files", [], None),
    ("files[0]", "rank-00000-of-00001.safetensors", None),
    ("files[0].rank", 1, None),
    ("files[0].rank", "0", None),
    ("files[0].name", "x.safetensors", None),
    ("files[0].name", DELETE, None),
    ("files[0].size", -1, None),
    ("files[0].size", 1.5, None),
    ("files[0].size", 4, None),
    ("files[0].header_sha256", "0" * 63, None),
    ("files[0].header_sha256", "g" * 64, None),
    ("files[0].header_sha256", "A" * 64, None),
    ("files[0].header_sha256", 5, None),
    ("files[0].layout_sha256", "z" * 64, None),
    ("files[0].crc32", "x", None),
    ("files[0].crc32", [1.5], "files[0].crc32[0]"),
    ("files[0].crc32", [-1], "files[0].crc32[0]"),
    ("files[0].crc32", [2**32], "files[0].crc32[0]"),
    ("files[0].crc32", [], None),
    ("files[0].crc32", [0, 0], None),
    ("tie_equal", {}, None),
    ("tie_equal", [], None),
    ("tie_equal[0]", "x", None),
    ("tie_equal[0]", [1], "tie_equal[0][0]"),
    ("tie_equal[0]", [True], None),  # one more tie than the plan stores on both sides
    ("save_id", 5, None),
    ("save_id", "abc", None),
    ("save_id", DELETE, None),
    ("source", [], None),
    ("source.model", 5, None),
    ("source.root", 5, None),
    ("source.root", "", None),
    ("source.root", "relative/dir", None),
    ("source.format", "gguf", None),
    ("source.fingerprint", "x", None),
    ("source.files", {}, None),
    ("source.files[0]", "config.json", None),
    ("source.files[0]", ["config.json", 1, 2], None),
    ("source.files[0][0]", 5, None),
    ("source.files[0][0]", "/etc/passwd", None),
    ("source.files[0][0]", "../config.json", None),
    ("source.files[0][1]", -1, None),
    ("source.files[0][2]", 1.5, None),
    ("source.files[0][3]", "x", None),
    ("source.config", [], None),
    ("source.tensors", {}, None),
    ("source.tensors[0]", ["model.embed_tokens.weight"], None),
    ("source.tensors[0][0]", 1, None),
    ("source.tensors[1][0]", "model.embed_tokens.weight", None),  # a key listed twice
    ("source.tensors[0][1]", None, None),
    ("source.tensors[0][2]", "F33", None),
    ("source.tensors[0][3]", [-1, 48], "source.tensors[0][3][0]"),
    ("source.tensors[0][3]", "x", None),
    ("source.tensors[0][3]", [2**64, 48], "source.tensors[0][3][0]"),
    ("source.tensors[0][4]", 1.5, None),
    ("source.tensors[0][5]", 5, None),  # ends before it begins
]


def _path(field: str) -> list[str | int]:
    return [int(part) if part.isdigit() else part for part in re.findall(r"[^.\[\]]+", field)]


def _corrupt(data: dict, field: str, value: Any) -> None:
    *parents, last = _path(field)
    target = data
    for part in parents:
        target = target[part]
    if value is DELETE:
        target.pop(last, None) if isinstance(target, dict) else target.pop(last)
    elif isinstance(target, list) and last == len(target):
        target.append(value)
    else:
        target[last] = value


def test_every_manifest_field_of_the_wrong_type_or_range_is_a_checkpoint_error_naming_the_field(
    tmp_path: Path,
) -> None:
    src, out = _saved(tmp_path)
    pristine = json.loads((out / sharded.MANIFEST).read_text())
    tp_loader.load(out, verify=True)  # the untouched directory restarts
    wrong = []
    for field, value, key in BAD_FIELDS:
        data = copy.deepcopy(pristine)
        _corrupt(data, field, value)
        (out / sharded.MANIFEST).write_text(json.dumps(data))
        try:
            tp_loader.load(out, verify=True)
        except (CheckpointError, StaleShardsError) as exc:
            got = (type(exc).__name__, exc.key, exc.file)
            want = (type(exc).__name__, key or field, str(out / sharded.MANIFEST))
            if type(exc) not in (CheckpointError, StaleShardsError) or got != want or "likely a bug" in str(exc):
                wrong.append((field, value, str(exc)))
            elif f"field {key or field} " not in exc.message or "save-sharded" not in (exc.hint or ""):
                wrong.append((field, value, str(exc)))
        except Exception as exc:  # noqa: BLE001 - every outcome is collected and shown at once
            wrong.append((field, value, f"{type(exc).__name__}: {exc}"))
        else:
            wrong.append((field, value, "accepted"))
    assert not wrong, "\n".join(f"{field} = {value!r}: {outcome}" for field, value, outcome in wrong)


def test_a_manifest_that_is_not_a_json_object_or_too_large_or_of_too_many_values_is_refused(tmp_path: Path) -> None:
    _, out = _saved(tmp_path)
    manifest = out / sharded.MANIFEST
    manifest.write_text("[]")
    with pytest.raises(CheckpointError, match=r"the manifest is not a JSON object") as info:
        tp_loader.load(out)
    assert info.value.file == str(manifest)
    values = sharded_manifest.MAX_MANIFEST_VALUES
    manifest.write_text("[" + "0," * values + "0]")  # 8 MB: a list and values + 1 numbers
    with pytest.raises(CheckpointError, match=rf"manifest holds up to {values + 2} JSON values, more than the "):
        tp_loader.load(out)
    manifest.unlink()
    with open(manifest, "wb") as handle:
        handle.truncate(sharded_manifest.MAX_MANIFEST_BYTES + 1)
    with pytest.raises(
        CheckpointError, match=rf"manifest is {sharded_manifest.MAX_MANIFEST_BYTES + 1} bytes, more than "
    ):
        tp_loader.load(out)


def test_a_manifest_that_is_a_fifo_is_refused_without_opening_it(tmp_path: Path) -> None:
    _, out = _saved(tmp_path)
    manifest = out / sharded.MANIFEST
    manifest.unlink()
    os.mkfifo(manifest)  # an open would block until a writer comes
    error = same_error(run_ranks(1, _restart, out, timeout=30))
    assert error.type == "CheckpointError"
    assert "not a regular file" in error.wire["message"] and error.wire["file"] == str(manifest)


# --- the format version ---------------------------------------------------------------------------------------


def test_a_directory_of_the_previous_format_version_is_refused_as_stale_and_rebuilt(tmp_path: Path) -> None:
    src, out = _saved(tmp_path)
    assert sharded_manifest.FORMAT_VERSION == 2

    def as_version_1(data: dict) -> None:
        data["format_version"] = 1
        data.pop("save_id", None)
        data["source"]["files"] = [entry[:3] for entry in data["source"]["files"]]

    _edit_manifest(out, as_version_1)
    with pytest.raises(StaleShardsError) as info:
        tp_loader.load(out)
    assert info.value.message == (
        f"pre-sharded directory is in format version 1 (written by tp_loader {tp_loader.__version__}); this "
        f"tp_loader ({tp_loader.__version__}) reads version 2"
    )
    assert "rebuild=True" in info.value.hint
    rebuilt = tp_loader.load(out, rebuild=True)
    _same_tensors(rebuilt.state_dict, tp_loader.load(src).state_dict, "rebuilt")
    assert json.loads((out / sharded.MANIFEST).read_text())["format_version"] == 2
