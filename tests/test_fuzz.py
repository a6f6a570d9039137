"""Property-based fuzzing: mutated checkpoints, configs and plans either load exactly what the files
hold or raise a tp_loader error — never another exception, never a wrong tensor, never a hang.

Examples per test: ``--fuzz-examples`` (default 25; e.g. ``pytest tests/test_fuzz.py --fuzz-examples 2000``).
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import llama_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.torch import load_file

import tp_loader
from tp_loader.demo import llama_tensors, write_checkpoint
from tp_loader.index import Checkpoint, index_checkpoint
from tp_loader.plan import make_plan
from tp_loader.resolve import find_weights
from tp_loader.spec import builtin_plan_paths, load_spec

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = llama_config(num_hidden_layers=1)
    return write_checkpoint(tmp_path_factory.mktemp("fuzz") / "base", config, llama_tensors(config), num_shards=2)


def _fuzz_settings(request: pytest.FixtureRequest):
    return settings(
        max_examples=request.config.getoption("--fuzz-examples"),
        deadline=20_000,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
        database=None,
    )


def _truth(root: Path) -> dict[str, torch.Tensor] | None:
    """What safetensors itself reads from the (mutated) files, or ``None`` if it refuses them."""
    out: dict[str, torch.Tensor] = {}
    try:
        for path in sorted(root.glob("*.safetensors")):
            out.update(load_file(str(path)))
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None
    return out


def _check_outcome(root: Path, **kwargs: object) -> str:
    """Loads ``root``; a success must return exactly what safetensors reads from the same files."""
    try:
        result = tp_loader.load(root, **kwargs)
    except tp_loader.TPLoaderError:
        return "refused"
    truth = _truth(root)
    assert truth is not None, "tp_loader loaded files that safetensors itself refuses"
    # a tied pair is one tensor: the source when stored (a stored target that differs is reported), else the target
    stored_side = {t.target: t.source if t.stored in ("source", "both") else t.target for t in result.report.ties}
    stored_side.update({t.source: t.source if t.stored in ("source", "both") else t.target for t in result.report.ties})
    for key, tensor in result.state_dict.items():
        assert torch.equal(tensor, truth[stored_side.get(key, key)]), f"{key} differs from the file's bytes"
    for tie in result.report.ties:
        if tie.stored == "both":
            assert tie.identical is torch.equal(truth[tie.source], truth[tie.target])
    assert set(truth) - {m.key for m in result.report.mismatched_keys} <= set(result.state_dict)
    return "loaded"


def _copy(base: Path) -> Path:
    root = Path(tempfile.mkdtemp(prefix="fuzz-")) / "ckpt"
    shutil.copytree(base, root)
    return root


def test_fuzzed_header_bytes_load_exactly_or_raise_a_tp_loader_error(
    base: Path, request: pytest.FixtureRequest
) -> None:
    header_len = struct.unpack("<Q", (base / SHARDS[0]).read_bytes()[:8])[0]

    @_fuzz_settings(request)
    @given(
        st.lists(st.tuples(st.integers(0, header_len + 7), st.integers(0, 255)), min_size=1, max_size=4),
        st.sampled_from(SHARDS),
    )
    def run(edits: list[tuple[int, int]], shard: str) -> None:
        root = _copy(base)
        path = root / shard
        raw = bytearray(path.read_bytes())
        for position, value in edits:
            raw[min(position, len(raw) - 1)] = value
        path.write_bytes(bytes(raw))
        try:
            _check_outcome(root)
        finally:
            shutil.rmtree(root.parent)

    run()


def test_fuzzed_index_entries_load_exactly_or_raise_a_tp_loader_error(
    base: Path, request: pytest.FixtureRequest
) -> None:
    keys = list(json.loads((base / "model.safetensors.index.json").read_text())["weight_map"])
    values = st.one_of(
        st.sampled_from(SHARDS),
        st.sampled_from(["", ".", "..", "../x.safetensors", "/etc/passwd", "config.json", "missing.safetensors"]),
    )

    @_fuzz_settings(request)
    @given(
        st.lists(
            st.tuples(st.sampled_from(keys + ["model.extra.weight", ""]), st.one_of(st.none(), values)),
            min_size=1,
            max_size=4,
        )
    )
    def run(edits: list[tuple[str, str | None]]) -> None:
        root = _copy(base)
        index_path = root / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        for key, value in edits:
            if value is None:
                index["weight_map"].pop(key, None)
            else:
                index["weight_map"][key] = value
        index_path.write_text(json.dumps(index))
        try:
            _check_outcome(root)
        finally:
            shutil.rmtree(root.parent)

    run()


CONFIG_FIELDS = [
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "num_hidden_layers",
    "head_dim",
    "tie_word_embeddings",
    "model_type",
    "attention_bias",
]
ODD_VALUES = st.one_of(
    st.integers(-3, 200), st.sampled_from([None, "x", "llama", "qwen3", 1.5, True, False, [], {}, 10**15])
)


def test_fuzzed_config_fields_load_exactly_or_raise_a_tp_loader_error(
    base: Path, request: pytest.FixtureRequest
) -> None:
    @_fuzz_settings(request)
    @given(st.dictionaries(st.sampled_from(CONFIG_FIELDS), ODD_VALUES, min_size=1, max_size=3), st.booleans())
    def run(changes: dict, strict: bool) -> None:
        root = _copy(base)
        config = {**json.loads((root / "config.json").read_text()), **changes}
        (root / "config.json").write_text(json.dumps(config))
        try:
            _check_outcome(root, strict=strict)
        finally:
            shutil.rmtree(root.parent)

    run()


PATTERNS = st.sampled_from(
    [
        "*",
        "**",
        "model.*",
        "model.layers.*.mlp.*",
        "**.weight",
        "lm_head.weight",
        "model.layers.*.self_attn.*",
        "[",
        "model.layers.0.*.*.weight",
        "",
    ]
)


def test_fuzzed_plan_rules_load_exactly_or_raise_a_tp_loader_error(base: Path, request: pytest.FixtureRequest) -> None:
    @_fuzz_settings(request)
    @given(
        st.lists(
            st.tuples(
                PATTERNS,
                st.sampled_from(["colwise", "rowwise", "vocab", "replicate", "diagonal", ""]),
                st.sampled_from([None, "q", "kv", "zz"]),
            ),
            max_size=3,
        )
    )
    def run(rules: list[tuple[str, str, str | None]]) -> None:
        plan_dir = Path(tempfile.mkdtemp(prefix="fuzz-plan-"))
        text = 'extends = "llama"\n' + "".join(
            f"[[rules]]\npattern = {json.dumps(p)}\nstyle = {json.dumps(s)}\n"
            + (f"heads = {json.dumps(h)}\n" if h else "")
            for p, s, h in rules
        )
        (plan_dir / "plan.toml").write_text(text)
        try:
            _check_outcome(base, plan=str(plan_dir / "plan.toml"))
        finally:
            shutil.rmtree(plan_dir)

    run()


def _tiles(checkpoint: Checkpoint, spec_path: Path, world_size: int) -> None:
    """Planning every rank either fails with a tp_loader error or gives slices that tile each sharded dim."""
    spec = load_spec(spec_path)
    try:
        plans = [make_plan(checkpoint, spec, world_size, rank, model="m") for rank in range(world_size)]
    except tp_loader.TPLoaderError:
        return
    for items in zip(*(p.tensors for p in plans)):
        piece = items[0].slice
        if piece.dim is None:
            assert all(i.slice.dim is None for i in items)
            continue
        if piece.note:  # replicated heads: each rank one whole head
            continue
        spans = [(i.slice.start, i.slice.stop) for i in items]
        assert spans[0][0] == 0 and spans[-1][1] == items[0].info.shape[piece.dim]
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), spans


def test_fuzzed_configs_plan_to_exact_tilings_for_any_world_size(base: Path, request: pytest.FixtureRequest) -> None:
    checkpoint = index_checkpoint(find_weights(base))

    @_fuzz_settings(request)
    @given(
        st.dictionaries(
            st.sampled_from(["num_attention_heads", "num_key_value_heads", "vocab_size", "intermediate_size"]),
            st.integers(1, 130),
            max_size=3,
        ),
        st.integers(1, 9),
    )
    def run(changes: dict, world_size: int) -> None:
        _tiles(
            Checkpoint(checkpoint.root, checkpoint.format, {**checkpoint.config, **changes}, checkpoint.tensors),
            builtin_plan_paths()["llama"],
            world_size,
        )

    run()
