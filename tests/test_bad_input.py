"""Every kind of bad input, at world size 2: every rank raises the same tp_loader error, naming the
file (and key) concerned, before any tensor data is read."""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import llama_config, rewrite_header
from safetensors.torch import save_file

import tp_loader
import tp_loader.loader
from tp_loader.testing import errors, run_ranks, same_error, values

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
KEY = "model.embed_tokens.weight"  # the first tensor of shard 1
LAST = "model.layers.1.input_layernorm.weight"  # the last tensor of shard 1


def _edit_index(root: Path, key: str, value: str) -> None:
    path = root / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"][key] = value
    path.write_text(json.dumps(index))


def _truncate(root: Path, tmp: Path) -> None:
    path = root / SHARD2
    path.write_bytes(path.read_bytes()[:-100])


def _corrupt_json(root: Path, tmp: Path) -> None:
    raw = bytearray((root / SHARD1).read_bytes())
    raw[8] = ord("[")
    (root / SHARD1).write_bytes(bytes(raw))


def _offsets_out_of_range(root: Path, tmp: Path) -> None:
    def edit(header: dict) -> None:
        begin, end = header[LAST]["data_offsets"]
        header[LAST]["data_offsets"] = [begin, end + 800000]  # same number of digits: the header keeps its length

    rewrite_header(root / SHARD1, edit)


def _overlap(root: Path, tmp: Path) -> None:
    def edit(header: dict) -> None:
        second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[1]
        size = header[second]["data_offsets"][1] - header[second]["data_offsets"][0]
        header[second]["data_offsets"] = [0, size]

    rewrite_header(root / SHARD1, edit)


def _trailing_bytes(root: Path, tmp: Path) -> None:
    with open(root / SHARD1, "ab") as handle:
        handle.write(b"\0" * 64)


def _unknown_dtype(root: Path, tmp: Path) -> None:
    rewrite_header(root / SHARD1, lambda h: h[KEY].update(dtype="Q4"))


def _shape_vs_bytes(root: Path, tmp: Path) -> None:
    rewrite_header(root / SHARD1, lambda h: h[KEY].update(shape=[100, 48]))


def _index_names_missing_file(root: Path, tmp: Path) -> None:
    (root / SHARD2).unlink()


def _index_names_absent_key(root: Path, tmp: Path) -> None:
    _edit_index(root, "model.layers.0.mlp.extra.weight", SHARD1)


def _index_climbs_out(root: Path, tmp: Path) -> None:
    _edit_index(root, "model.norm.weight", "../outside.safetensors")


def _index_absolute(root: Path, tmp: Path) -> None:
    _edit_index(root, "model.norm.weight", str(tmp / "outside.safetensors"))


def _symlink_out(root: Path, tmp: Path) -> None:
    (root / SHARD2).rename(tmp / "moved.safetensors")
    (root / SHARD2).symlink_to(tmp / "moved.safetensors")


def _duplicate_key(root: Path, tmp: Path) -> None:
    (root / "model.safetensors.index.json").unlink()
    save_file({"model.norm.weight": torch.ones(48)}, str(root / "model-extra.safetensors"))


def _config_missing(root: Path, tmp: Path) -> None:
    (root / "config.json").unlink()


def _config_malformed(root: Path, tmp: Path) -> None:
    (root / "config.json").write_text('{"model_type": "llama",')


def _config_zero_heads(root: Path, tmp: Path) -> None:
    (root / "config.json").write_text(json.dumps(llama_config(num_attention_heads=0)))


def _config_contradicts_shapes(root: Path, tmp: Path) -> None:
    (root / "config.json").write_text(json.dumps(llama_config(intermediate_size=64)))


def _plan_malformed(root: Path, tmp: Path) -> None:
    (tmp / "plan.toml").write_text("[[rules]\n")


def _plan_unknown_style(root: Path, tmp: Path) -> None:
    (tmp / "plan.toml").write_text('extends = "llama"\n[[rules]]\npattern = "lm_head.weight"\nstyle = "sideways"\n')


def _empty_directory(root: Path, tmp: Path) -> None:
    for path in root.iterdir():
        path.unlink()


SENTINEL = "pwned"  # the file the pickle below would create, in the test's tmp directory


def _pickle_exploit(root: Path, tmp: Path) -> None:
    for path in root.glob("model*"):
        path.unlink()
    torch.save({"model.norm.weight": torch.zeros(2), "x": _Exploit(tmp / SENTINEL)}, root / "pytorch_model.bin")


class _Exploit:
    """Unpickling this runs ``touch PATH``: code execution that leaves a trace."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.sentinel))}",))


INDEX = "model.safetensors.index.json"

# (damage, load kwargs, error type, message pattern, file the error names, key it names). The file is relative
# to the checkpoint ("." is the checkpoint directory itself) or to the test's tmp directory ("TMP/..."), or None
# where the error concerns no single file; a key of None means the error names no key.
CASES: list[tuple[Callable[[Path, Path], None], dict, str, str, str | None, str | None]] = [
    (
        _truncate,
        {},
        "CheckpointError",
        r"data_offsets \[101760, 101952\) fall outside the 101852 data bytes",
        SHARD2,
        "model.norm.weight",
    ),
    (_corrupt_json, {}, "CheckpointError", "header is not valid JSON", SHARD1, None),
    (
        _offsets_out_of_range,
        {},
        "CheckpointError",
        r"data_offsets \[101952, 902144\) fall outside the 102144 data bytes",
        SHARD1,
        LAST,
    ),
    (_overlap, {}, "CheckpointError", r"byte range \[0, 19392\) overlaps the previous tensor", SHARD1, KEY),
    (
        _trailing_bytes,
        {},
        "CheckpointError",
        "64 bytes after the last tensor are not described by the header",
        SHARD1,
        None,
    ),
    (_unknown_dtype, {}, "CheckpointError", "unknown dtype 'Q4'; known: F64, F32, F16, BF16", SHARD1, KEY),
    (
        _shape_vs_bytes,
        {},
        "CheckpointError",
        r"shape \[100, 48\] of F32 needs 19200 bytes but data_offsets span 19392",
        SHARD1,
        KEY,
    ),
    (_index_names_missing_file, {}, "CheckpointError", "^weight file does not exist$", SHARD2, None),
    (
        _index_names_absent_key,
        {},
        "CheckpointError",
        f"^index maps the key to {SHARD1}, but that file's header has no such tensor$",
        INDEX,
        "model.layers.0.mlp.extra.weight",
    ),
    (
        _index_climbs_out,
        {},
        "CheckpointError",
        "^weight file '../outside.safetensors' lies outside the model directory$",
        INDEX,
        "model.norm.weight",
    ),
    (
        _index_absolute,
        {},
        "CheckpointError",
        "^weight file 'TMP/outside.safetensors' lies outside the model directory$",
        INDEX,
        "model.norm.weight",
    ),
    (
        _symlink_out,
        {},
        "CheckpointError",
        f"^weight file '{SHARD2}' lies outside the model directory$",
        INDEX,
        "model.layers.1.self_attn.q_proj.weight",  # the index's first key in that file
    ),
    (
        _duplicate_key,
        {},
        "CheckpointError",
        f"^key is stored twice, in {SHARD2} and model-extra.safetensors$",
        "model-extra.safetensors",
        "model.norm.weight",
    ),
    (_config_missing, {}, "CheckpointError", "^config.json is missing$", "config.json", None),
    (_config_malformed, {}, "CheckpointError", "^cannot parse config.json", "config.json", None),
    (
        _config_zero_heads,
        {},
        "CheckpointError",
        r"^config values hidden_size=48, num_attention_heads=0 give no valid default head_dim",
        "config.json",
        None,
    ),
    (
        _config_contradicts_shapes,
        {"strict": True},
        "StrictLoadError",
        r"^strict load of ROOT refused: 6 mismatched: "
        r"model.layers.0.mlp.down_proj.weight \(config implies \[48, 64\], stored \[48, 100\]\)",
        None,  # the refusal concerns the checkpoint as a whole, which its message names
        None,
    ),
    (_plan_malformed, {"plan": "TMP/plan.toml"}, "PlanError", "^cannot parse plan file", "TMP/plan.toml", None),
    (
        _plan_unknown_style,
        {"plan": "TMP/plan.toml"},
        "PlanError",
        r"^line 4: rule 'lm_head.weight' names unknown style 'sideways'",
        "TMP/plan.toml",
        None,
    ),
    (_empty_directory, {}, "CheckpointError", "^no weights in ROOT$", ".", None),
    (
        _pickle_exploit,
        {},
        "CheckpointError",
        "^refused or could not read the .bin file with weights_only=True",
        "pytorch_model.bin",
        None,
    ),
]


def _load(rank: int, world_size: int, root: Path, kwargs: dict) -> object:
    return tp_loader.load(root, **kwargs).report


def _load_without_reading(rank: int, world_size: int, root: Path, kwargs: dict) -> object:
    """``_load`` with the read stage replaced by a tripwire: every bad input must be refused before it."""
    import tp_loader.loader

    def tripwire(*args: object, **kwargs: object) -> None:
        raise AssertionError("tensor data was read before the error")

    tp_loader.loader.read_tensors = tripwire
    return _load(rank, world_size, root, kwargs)


@pytest.mark.parametrize(
    ("damage", "kwargs", "kind", "message", "file", "key"), CASES, ids=[c[0].__name__.strip("_") for c in CASES]
)
def test_bad_input_raises_the_same_error_on_every_rank(
    make_checkpoint, tmp_path: Path, damage, kwargs, kind, message, file, key
) -> None:
    root = make_checkpoint(num_shards=2)
    damage(root, tmp_path)
    kwargs = {k: v.replace("TMP", str(tmp_path)) if isinstance(v, str) else v for k, v in kwargs.items()}
    start = time.monotonic()
    results = run_ranks(2, _load_without_reading, root, kwargs, timeout=60)
    assert time.monotonic() - start < 15  # the timeout is 60 s
    assert not (tmp_path / SENTINEL).exists(), "a rank ran code from the checkpoint"
    error = same_error(results)
    assert [e.wire for e in errors(results)] == [error.wire] * 2  # file, key, rank and hint too, not only the text
    assert len(error.message) < 2048
    assert max(e.peak_rss_mib for e in errors(results)) < 1024
    assert error.type == kind
    pattern = message.replace("TMP", re.escape(str(tmp_path))).replace("ROOT", re.escape(str(root)))
    assert re.search(pattern, error.wire["message"]), error.wire["message"]
    if file is None:
        assert error.wire["file"] is None
    elif file.startswith("TMP/"):
        assert error.wire["file"] == str(tmp_path / file.removeprefix("TMP/"))
    else:
        assert error.wire["file"] == str(root if file == "." else root / file)
    assert error.wire["key"] == key
    assert error.wire["rank"] == 0


def test_the_pickle_exploit_case_runs_code_when_loaded_without_weights_only(tmp_path: Path) -> None:
    """The payload of ``[pickle_exploit]`` is live: only tp_loader's refusal keeps its sentinel file away."""
    root = tmp_path / "ckpt"
    root.mkdir()
    _pickle_exploit(root, tmp_path)
    assert not (tmp_path / SENTINEL).exists()
    torch.load(root / "pytorch_model.bin", weights_only=False)
    assert (tmp_path / SENTINEL).exists()


def test_uncached_hub_id_offline_raises_model_not_found_on_every_rank(tmp_path: Path) -> None:
    error = same_error(
        run_ranks(
            2,
            lambda rank, world: tp_loader.load("org/absent", cache_dir=tmp_path),
            timeout=60,
            env={"HF_HUB_OFFLINE": "1"},
        )
    )
    assert error.type == "ModelNotFoundError"
    assert error.message.startswith("model 'org/absent' (revision main) is not in the local Hub cache")


def test_config_contradicting_shapes_without_strict_loads_the_rest_and_reports_the_same_mismatches_everywhere(
    make_checkpoint,
) -> None:
    root = make_checkpoint()
    _config_contradicts_shapes(root, root)
    reports = values(run_ranks(2, _load, root, {}))
    assert reports[0] == reports[1]
    assert {m.key for m in reports[0].mismatched_keys} == {
        f"model.layers.{i}.mlp.{p}.weight" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")
    }


def test_plan_rule_that_matches_nothing_is_a_warning_not_an_error(make_checkpoint, tmp_path: Path) -> None:
    plan = tmp_path / "typo.toml"
    plan.write_text('extends = "llama"\n[[rules]]\npattern = "model.layers.*.mlp.gate_projj.*"\nstyle = "colwise"\n')
    reports = values(run_ranks(2, _load, make_checkpoint(), {"plan": str(plan)}))
    assert reports[0].unused_rules == reports[1].unused_rules == ("model.layers.*.mlp.gate_projj.*",)
