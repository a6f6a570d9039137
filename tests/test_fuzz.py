"""Property-based fuzzing: mutated checkpoints, configs and plans either load exactly the shards tensor
parallelism needs of what the files hold, or raise the same tp_loader error on every rank — never another
exception, never a wrong slice, never a strict load of a checkpoint whose keys do not match, never a hang.

Loads run at world sizes 2, 3 and 4 on forked gloo ranks. Every loaded slice is compared in full with an
independent reference computed here from what safetensors itself reads: ``torch.chunk`` pieces, rank ``r``'s
KV head ``r * kv_heads // world`` when KV heads are fewer than ranks, and the parts of a fused tensor each
split that way and then concatenated. Whether a key is expected, and its shape, comes from the config by
the same table.

Examples per test: ``--fuzz-examples`` (default 25; e.g. ``pytest tests/test_fuzz.py --fuzz-examples 2000``).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import llama_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import chunk_piece
from safetensors.torch import load_file

import tp_loader
from tp_loader.demo import llama_tensors, write_checkpoint
from tp_loader.index import Checkpoint, index_checkpoint
from tp_loader.plan import make_plan
from tp_loader.resolve import find_weights
from tp_loader.spec import builtin_plan_paths, load_spec
from tp_loader.testing import run_ranks, values

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
WORLD_SIZES = (2, 3, 4)
#: KV heads of the base checkpoints per world size: sharded one per rank at 2, one head replicated 3x at 3,
#: two heads each replicated 2x at 4. 12 query heads, a vocabulary of 101 and (llama) 100 MLP rows split
#: unevenly; phi3's fused gate_up parts must split evenly, so it has 96.
KV_HEADS = {2: 2, 3: 1, 4: 2}
FAMILIES = ("llama", "phi3")


def _base_config(family: str, world_size: int) -> dict:
    config = llama_config(num_hidden_layers=1, num_key_value_heads=KV_HEADS[world_size])
    if family == "phi3":
        config.update(model_type="phi3", architectures=["Phi3ForCausalLM"], intermediate_size=96)
    return config


def _phi3_tensors(config: dict) -> dict[str, torch.Tensor]:
    """Llama-named weights in phi3's fused layout: q, k, v stacked as qkv_proj, gate and up as gate_up_proj."""
    tensors = llama_tensors(config)
    for p in [k.removesuffix("self_attn.q_proj.weight") for k in tensors if k.endswith("q_proj.weight")]:
        q, k, v = (tensors.pop(f"{p}self_attn.{n}_proj.weight") for n in "qkv")
        tensors[f"{p}self_attn.qkv_proj.weight"] = torch.cat([q, k, v])
        gate, up = (tensors.pop(f"{p}mlp.{n}_proj.weight") for n in ("gate", "up"))
        tensors[f"{p}mlp.gate_up_proj.weight"] = torch.cat([gate, up])
    return tensors


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], Path]:
    """(family, world size) → a valid checkpoint in two shards that loads at that world size."""
    root = tmp_path_factory.mktemp("fuzz")
    out = {}
    for family in FAMILIES:
        for world_size in WORLD_SIZES:
            config = _base_config(family, world_size)
            tensors = _phi3_tensors(config) if family == "phi3" else llama_tensors(config)
            out[family, world_size] = write_checkpoint(root / f"{family}{world_size}", config, tensors, num_shards=2)
    return out


def _fuzz_settings(examples: int):
    return settings(
        max_examples=examples,
        deadline=20_000,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
        database=None,
    )


# ---- the independent reference ------------------------------------------------------------------------


class ShouldRefuse(AssertionError):
    """The reference cannot split this tensor over these ranks: the load should have refused."""


@dataclass(frozen=True)
class HeadGroup:
    num_heads: int
    head_dim: int
    replicate_when_fewer: bool


@dataclass(frozen=True)
class Style:
    """How a key is sharded: a style name, its head group (``None``: none), and a fused tensor's parts."""

    name: str
    heads: HeadGroup | None = None
    parts: tuple[tuple[int, HeadGroup | None], ...] = ()


def _split(tensor: torch.Tensor, dim: int, heads: HeadGroup | None, world_size: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s piece of ``dim``: ``torch.chunk``; with heads, whole heads (rank r's KV head
    ``r * kv // world`` when there are fewer heads than ranks)."""
    if heads is None:
        return chunk_piece(tensor, world_size, rank, dim)
    n, size = heads.num_heads, heads.head_dim
    if tensor.shape[dim] != n * size:
        raise ShouldRefuse(f"dim {dim} of {tuple(tensor.shape)} is not {n} heads of {size}")
    if n % world_size == 0:
        return chunk_piece(tensor, world_size, rank, dim)
    if heads.replicate_when_fewer and n < world_size and world_size % n == 0:
        head = rank * n // world_size
        return tensor.narrow(dim, head * size, size)
    raise ShouldRefuse(f"{n} heads cannot be split over {world_size} ranks")


def reference_piece(
    tensor: torch.Tensor, style: Style, world_size: int, rank: int
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The local shard rank ``rank`` must hold of ``tensor``, and the DTensor's global shape."""
    shape = tuple(tensor.shape)
    if style.name == "replicate" or (style.name == "rowwise" and tensor.dim() < 2):
        return tensor, shape
    if style.name == "vocab":
        return chunk_piece(tensor, world_size, rank, 0), shape
    if style.name in ("colwise", "rowwise"):
        dim = 0 if style.name == "colwise" else 1
        piece = _split(tensor, dim, style.heads, world_size, rank)
        heads = style.heads
        replicated = heads is not None and heads.num_heads % world_size != 0  # each rank one whole head
        return piece, (shape[:dim] + (world_size * piece.shape[dim],) + shape[dim + 1 :]) if replicated else shape
    if style.name == "packed":
        if sum(size for size, _ in style.parts) != shape[0]:
            raise ShouldRefuse(f"parts {style.parts} do not add up to {shape[0]} rows")
        pieces = []
        for part, (size, heads) in zip(torch.split(tensor, [size for size, _ in style.parts]), style.parts):
            if heads is None and size % world_size:
                raise ShouldRefuse(f"a part of {size} rows cannot be split evenly over {world_size} ranks")
            pieces.append(_split(part, 0, heads, world_size, rank))
        piece = torch.cat(pieces)
        return piece, (world_size * piece.shape[0],) + shape[1:]
    raise ShouldRefuse(f"unknown style {style.name!r}")


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Layout:
    """What a config implies for the plan family that ``plan="auto"`` picks: expected keys with their shapes,
    the head groups, and whether the embeddings are tied."""

    family: str
    shapes: dict[str, tuple[int, ...]]
    q: HeadGroup
    kv: HeadGroup
    intermediate_size: int
    tied: bool


def layout(config: dict, base_family: str) -> Layout | None:
    """The config's layout, or ``None`` when a value it needs is not a whole number within the documented
    bounds (sizes in [0, 2**48], at least one head of at least one element, at most 100,000 layers): the load
    must refuse."""
    family = config.get("model_type") if config.get("model_type") in ("llama", "qwen3") else base_family
    given_values = {k: v for k, v in config.items() if v is not None}  # null means "not set"
    names = ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size", "num_hidden_layers")
    if not all(_whole(given_values.get(name)) for name in names):
        return None
    hidden, inter, heads, vocab, layers = (given_values[name] for name in names)
    kv = given_values.get("num_key_value_heads", heads)
    head_dim = given_values.get("head_dim", hidden // heads if heads else None)
    if not (_whole(kv) and _whole(head_dim)):
        return None
    sizes = (hidden, inter, vocab, heads * head_dim, kv * head_dim)
    if not (all(0 <= size <= 2**48 for size in sizes) and min(heads, kv, head_dim) >= 1 and 0 <= layers <= 100_000):
        return None
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for layer in range(layers):
        p = f"model.layers.{layer}."
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)}
        shapes |= {
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
        if family == "phi3":
            shapes[p + "self_attn.qkv_proj.weight"] = ((heads + 2 * kv) * head_dim, hidden)
            shapes[p + "mlp.gate_up_proj.weight"] = (2 * inter, hidden)
            continue
        for name, rows in (("q", heads * head_dim), ("k", kv * head_dim), ("v", kv * head_dim)):
            shapes[p + f"self_attn.{name}_proj.weight"] = (rows, hidden)
            if given_values.get("attention_bias", False):
                shapes[p + f"self_attn.{name}_proj.bias"] = (rows,)
        if given_values.get("attention_bias", False):
            shapes[p + "self_attn.o_proj.bias"] = (hidden,)
        for name in ("gate", "up"):
            shapes[p + f"mlp.{name}_proj.weight"] = (inter, hidden)
        if given_values.get("mlp_bias", False):
            shapes |= {
                p + "mlp.gate_proj.bias": (inter,),
                p + "mlp.up_proj.bias": (inter,),
                p + "mlp.down_proj.bias": (hidden,),
            }
        if family == "qwen3":
            shapes |= {p + "self_attn.q_norm.weight": (head_dim,), p + "self_attn.k_norm.weight": (head_dim,)}
    return Layout(
        family,
        shapes,
        HeadGroup(heads, head_dim, False),
        HeadGroup(kv, head_dim, True),
        inter,
        bool(given_values.get("tie_word_embeddings", False)),
    )


def plan_style(key: str, lay: Layout) -> Style:
    """The style the built-in plan gives an expected key."""
    if key in ("model.embed_tokens.weight", "lm_head.weight"):
        return Style("vocab")
    part = key.split(".")[-2]
    if lay.family == "phi3" and part in ("qkv_proj", "gate_up_proj"):
        if part == "gate_up_proj":
            return Style("packed", parts=((lay.intermediate_size, None),) * 2)
        q, kv = lay.q, lay.kv
        q_rows, kv_rows = q.num_heads * q.head_dim, kv.num_heads * kv.head_dim
        return Style("packed", parts=((q_rows, q), (kv_rows, kv), (kv_rows, kv)))
    table = {
        "q_proj": Style("colwise", lay.q),
        "k_proj": Style("colwise", lay.kv),
        "v_proj": Style("colwise", lay.kv),
        "o_proj": Style("rowwise", lay.q),
        "gate_proj": Style("colwise"),
        "up_proj": Style("colwise"),
        "down_proj": Style("rowwise"),
    }
    return table.get(part, Style("replicate"))  # the norms: **norm.weight


#: A plan rule: glob pattern, style and head group name (or None), as the plan-rule fuzzer writes them.
Rule = tuple[str, str, str | None]


def _glob(pattern: str) -> re.Pattern[str]:
    """The documented pattern syntax: ``*`` within one dotted segment, ``**`` across segments."""
    tokens = re.split(r"(\*\*|\*)", pattern)
    return re.compile("".join(".+" if t == "**" else "[^.]+" if t == "*" else re.escape(t) for t in tokens))


def key_style(key: str, lay: Layout, rules: tuple[Rule, ...]) -> Style:
    """An expected key's style: the first of ``rules`` (a child plan's, ahead of the built-in's) that matches."""
    for pattern, style, heads in rules:
        if _glob(pattern).fullmatch(key):
            if style not in ("colwise", "rowwise", "vocab", "replicate") or heads not in (None, "q", "kv"):
                raise ShouldRefuse(f"rule {pattern!r} has style {style!r} and heads {heads!r}")
            return Style(style, {"q": lay.q, "kv": lay.kv, None: None}[heads])
    return plan_style(key, lay)


# ---- ranks that load what rank 0 sends them ----------------------------------------------------------------


def _attempt(root: str, kwargs: dict) -> tuple:
    """One rank's load: ("loaded", {key: (local shard, global shape)}, report), ("refused", the error's wire)
    or ("crashed", traceback) for any other exception."""
    try:
        result = tp_loader.load(root, **kwargs)
    except tp_loader.TPLoaderError as exc:
        return ("refused", exc.to_wire())
    except Exception:  # noqa: BLE001 - reported to rank 0, which fails the example
        return ("crashed", traceback.format_exc())
    shards = {key: (t.to_local().clone(), tuple(t.shape)) for key, t in result.state_dict.items()}
    return ("loaded", shards, result.report)


class Ranks:
    """Rank 0's handle on the job: every rank loads what it is sent; rank 0 gets every rank's outcome."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def load(self, root: Path, **kwargs: Any) -> list[tuple]:
        task = [(str(root), kwargs)]
        dist.broadcast_object_list(task, src=0)
        gathered: list[Any] = [None] * self.world_size
        dist.gather_object(_attempt(*task[0]), gathered, dst=0)
        return gathered


def _drive(rank: int, world_size: int, prop: Callable[..., None], args: tuple) -> None:
    """Rank 0 runs the hypothesis property ``prop(ranks, *args)``; the other ranks load what it sends."""
    if rank == 0:
        try:
            prop(Ranks(world_size), *args)
        finally:
            dist.broadcast_object_list([None], src=0)
        return
    while True:
        task: list[Any] = [None]
        dist.broadcast_object_list(task, src=0)
        if task[0] is None:
            return
        dist.gather_object(_attempt(*task[0]), None, dst=0)


def run_property(
    request: pytest.FixtureRequest, world_size: int, prop: Callable[..., None], bases: dict[tuple[str, int], Path]
) -> None:
    """Runs ``prop(ranks, bases, examples)`` on ``world_size`` forked ranks, one process group for every example,
    over the base checkpoints that load at that world size."""
    examples = request.config.getoption("--fuzz-examples")
    at_world = {family: bases[family, world_size] for family in FAMILIES}
    outcomes = run_ranks(
        world_size, _drive, prop, (at_world, examples), timeout=60 + 20 * examples, env={"TP_LOADER_TIMEOUT_S": "30"}
    )
    values(outcomes)


# ---- the check ---------------------------------------------------------------------------------------------


def _truth(root: Path) -> dict[str, torch.Tensor] | None:
    """What safetensors (or, for a ``.bin``, ``torch.load`` with ``weights_only``) itself reads from the
    (mutated) files, or ``None`` if it refuses them."""
    out: dict[str, torch.Tensor] = {}
    try:
        for path in sorted(root.glob("*.safetensors")):
            out.update(load_file(str(path)))
        for path in sorted(root.glob("*.bin")):
            out.update(torch.load(path, weights_only=True, mmap=True))
    except Exception:  # noqa: BLE001 - whatever the reference library raises, it refuses the file
        return None
    return out


def check_load(ranks: Ranks, root: Path, base_family: str, rules: tuple[Rule, ...] = (), **kwargs: Any) -> str:
    """Loads ``root`` on every rank: all refuse with the same error, or each rank holds exactly its reference
    shard of every key, the report's key lists are the layout's, and a strict load had nothing to report."""
    outcomes = ranks.load(root, **kwargs)
    for rank, outcome in enumerate(outcomes):
        assert outcome[0] != "crashed", f"rank {rank} raised something other than a tp_loader error:\n{outcome[1]}"
    lay = layout(json.loads((root / "config.json").read_text()), base_family)
    truth = _truth(root)
    if outcomes[0][0] == "refused" or any(o[0] == "refused" for o in outcomes):
        assert all(o == outcomes[0] for o in outcomes), f"ranks disagree: {outcomes}"
        wire = outcomes[0][1]
        if wire["type"] == "StrictLoadError" and lay is not None and truth is not None:
            assert _key_problems(lay, truth) != ((), (), ()), f"strict load refused a matching checkpoint: {wire}"
        return "refused"
    assert truth is not None, "tp_loader loaded files that safetensors itself refuses"
    assert lay is not None, "tp_loader loaded a checkpoint whose config gives sizes out of bounds"
    reports = [o[2] for o in outcomes]
    assert all(r == reports[0] for r in reports), "ranks report differently"
    missing, unexpected, mismatched = _key_problems(lay, truth)
    report = reports[0]
    assert sorted(report.missing_keys) == sorted(missing), "the report's missing keys are not the layout's"
    assert report.unexpected_keys == unexpected, "the report's unexpected keys are not the layout's"
    assert tuple(sorted(m.key for m in report.mismatched_keys)) == mismatched, "the report's mismatches differ"
    if kwargs.get("strict"):
        assert (missing, unexpected, mismatched) == ((), (), ()), "strict load accepted non-matching keys"
    loaded = {k: t for k, t in truth.items() if k not in mismatched}
    if lay.tied and "model.embed_tokens.weight" in loaded:
        head = loaded.get("lm_head.weight")
        if head is None or torch.equal(head, loaded["model.embed_tokens.weight"]):
            loaded["lm_head.weight"] = loaded["model.embed_tokens.weight"]  # the tie's source serves both keys
        # stored twice with other values: each key keeps its own (as transformers does)
    for rank, (_, shards, _) in enumerate(outcomes):
        assert set(shards) == set(loaded), f"rank {rank} holds {sorted(set(shards) ^ set(loaded))} wrongly"
        for key, tensor in loaded.items():
            style = key_style(key, lay, rules) if key in lay.shapes else Style("replicate")
            piece, global_shape = reference_piece(tensor, style, ranks.world_size, rank)
            local, shape = shards[key]
            exact = local.dtype == piece.dtype and torch.equal(local, piece)
            assert exact, (
                f"{key} on rank {rank}: {local.dtype} {tuple(local.shape)} is not its slice {tuple(piece.shape)}"
            )
            assert shape == global_shape, f"{key}: global shape {shape}, expected {global_shape}"
    return "loaded"


def _key_problems(lay: Layout, truth: dict[str, torch.Tensor]) -> tuple[tuple[str, ...], ...]:
    """(missing, unexpected, mismatched) keys under ``lay``; the last two sorted, as the report lists them."""
    stored = {k: tuple(t.shape) for k, t in truth.items()}
    tie_covered = {"lm_head.weight"} if lay.tied and "model.embed_tokens.weight" in stored else set()
    missing = tuple(k for k in lay.shapes if k not in stored and k not in tie_covered)
    unexpected = tuple(sorted(k for k in stored if k not in lay.shapes))
    mismatched = tuple(sorted(k for k, shape in stored.items() if k in lay.shapes and lay.shapes[k] != shape))
    return missing, unexpected, mismatched


def _copy(base: Path) -> Path:
    root = Path(tempfile.mkdtemp(prefix="fuzz-")) / "ckpt"
    shutil.copytree(base, root)
    return root


# ---- the properties --------------------------------------------------------------------------------------


def _bases_load(ranks: Ranks, bases: dict[str, Path]) -> None:
    """The unmutated checkpoints load, so that the check behind every property is exercised at least once."""
    for family, base in bases.items():
        assert check_load(ranks, base, family) == "loaded"
        assert check_load(ranks, base, family, strict=True) == "loaded"


def _header_property(ranks: Ranks, bases: dict[str, Path], examples: int) -> None:
    _bases_load(ranks, bases)
    header_len = struct.unpack("<Q", (bases["llama"] / SHARDS[0]).read_bytes()[:8])[0]

    @_fuzz_settings(examples)
    @given(
        st.sampled_from(FAMILIES),
        st.lists(st.tuples(st.integers(0, header_len + 7), st.integers(0, 255)), min_size=1, max_size=4),
        st.sampled_from(SHARDS),
    )
    def run(family: str, edits: list[tuple[int, int]], shard: str) -> None:
        root = _copy(bases[family])
        path = root / shard
        raw = bytearray(path.read_bytes())
        for position, value in edits:
            raw[min(position, len(raw) - 1)] = value
        path.write_bytes(bytes(raw))
        try:
            check_load(ranks, root, family)
        finally:
            shutil.rmtree(root.parent)

    run()


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_fuzzed_header_bytes_load_exactly_or_raise_a_tp_loader_error(
    bases: dict, request: pytest.FixtureRequest, world_size: int
) -> None:
    run_property(request, world_size, _header_property, bases)


def _index_property(ranks: Ranks, bases: dict[str, Path], examples: int) -> None:
    _bases_load(ranks, bases)
    keys = sorted(
        {
            k
            for base in bases.values()
            for k in json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
        }
    )
    targets = st.one_of(
        st.sampled_from(SHARDS),
        st.sampled_from(["", ".", "..", "../x.safetensors", "/etc/passwd", "config.json", "missing.safetensors"]),
    )

    @_fuzz_settings(examples)
    @given(
        st.sampled_from(FAMILIES),
        st.lists(
            st.tuples(st.sampled_from(keys + ["model.extra.weight", ""]), st.one_of(st.none(), targets)),
            min_size=1,
            max_size=4,
        ),
    )
    def run(family: str, edits: list[tuple[str, str | None]]) -> None:
        root = _copy(bases[family])
        index_path = root / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        for key, value in edits:
            if value is None:
                index["weight_map"].pop(key, None)
            else:
                index["weight_map"][key] = value
        index_path.write_text(json.dumps(index))
        try:
            check_load(ranks, root, family)
        finally:
            shutil.rmtree(root.parent)

    run()


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_fuzzed_index_entries_load_exactly_or_raise_a_tp_loader_error(
    bases: dict, request: pytest.FixtureRequest, world_size: int
) -> None:
    run_property(request, world_size, _index_property, bases)


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
    st.integers(-3, 200),
    st.sampled_from([None, "x", "llama", "qwen3", 1.5, True, False, [], {}, 10**15]),
    # wrong types and huge values: each must be refused quickly, never planned or multiplied out
    st.sampled_from(
        [2**48, 2**48 + 1, 2**63, 10**100, -(10**18), 1e308, float("nan"), float("inf"), "12", "1" * 60, [[[1]]]]
    ),
    st.sampled_from([100_000, 100_001, {"a": 1}, [64], -1.0]),
)


def _config_property(ranks: Ranks, bases: dict[str, Path], examples: int) -> None:
    _bases_load(ranks, bases)

    @_fuzz_settings(examples)
    @given(
        st.sampled_from(FAMILIES),
        st.dictionaries(st.sampled_from(CONFIG_FIELDS), ODD_VALUES, min_size=1, max_size=3),
        st.booleans(),
    )
    def run(family: str, changes: dict, strict: bool) -> None:
        root = _copy(bases[family])
        config = {**json.loads((root / "config.json").read_text()), **changes}
        (root / "config.json").write_text(json.dumps(config))
        try:
            check_load(ranks, root, family, strict=strict)
        finally:
            shutil.rmtree(root.parent)

    run()


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_fuzzed_config_fields_load_exactly_or_raise_a_tp_loader_error(
    bases: dict, request: pytest.FixtureRequest, world_size: int
) -> None:
    run_property(request, world_size, _config_property, bases)


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


def _plan_property(ranks: Ranks, bases: dict[str, Path], examples: int) -> None:
    _bases_load(ranks, bases)

    @_fuzz_settings(examples)
    @given(
        st.sampled_from(FAMILIES),
        st.lists(
            st.tuples(
                PATTERNS,
                st.sampled_from(["colwise", "rowwise", "vocab", "replicate", "diagonal", ""]),
                st.sampled_from([None, "q", "kv", "zz"]),
            ),
            max_size=3,
        ),
        st.booleans(),
    )
    def run(family: str, rules: list[Rule], strict: bool) -> None:
        plan_dir = Path(tempfile.mkdtemp(prefix="fuzz-plan-"))
        text = f'extends = "{family}"\n' + "".join(
            f"[[rules]]\npattern = {json.dumps(p)}\nstyle = {json.dumps(s)}\n"
            + (f"heads = {json.dumps(h)}\n" if h else "")
            for p, s, h in rules
        )
        (plan_dir / "plan.toml").write_text(text)
        try:
            check_load(ranks, bases[family], family, tuple(rules), plan=str(plan_dir / "plan.toml"), strict=strict)
        finally:
            shutil.rmtree(plan_dir)

    run()


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_fuzzed_plan_rules_load_exactly_or_raise_a_tp_loader_error(
    bases: dict, request: pytest.FixtureRequest, world_size: int
) -> None:
    run_property(request, world_size, _plan_property, bases)


def _plans_exactly(checkpoint: Checkpoint, family: str, world_size: int) -> None:
    """Planning every rank either fails with a tp_loader error or gives each rank exactly its reference slice
    (and global shape) of every tensor, shown on a tensor whose every element differs."""
    spec = load_spec(builtin_plan_paths()[family])
    try:
        plans = [make_plan(checkpoint, spec, world_size, rank, model="m") for rank in range(world_size)]
    except tp_loader.TPLoaderError:
        return
    lay = layout(checkpoint.config, family)
    assert lay is not None, "planned a config whose sizes are out of bounds"
    for rank, plan in enumerate(plans):
        for item in plan.tensors:
            shape = item.info.shape
            stored = torch.arange(torch.Size(shape).numel()).reshape(shape)
            piece = item.slice
            got = (
                stored
                if piece.dim is None
                else torch.cat([stored.narrow(piece.dim, a, b - a) for a, b in piece.ranges], piece.dim)
            )
            style = plan_style(item.key, lay) if item.key in lay.shapes else Style("replicate")
            want, global_shape = reference_piece(stored, style, world_size, rank)
            assert torch.equal(got, want), f"{item.key} on rank {rank} of {world_size}: {piece}"
            assert tuple(piece.global_shape) == global_shape, f"{item.key}: {piece.global_shape} vs {global_shape}"


@pytest.mark.parametrize("family", FAMILIES)
def test_fuzzed_configs_plan_every_rank_to_its_exact_slices_for_any_world_size(
    bases: dict, request: pytest.FixtureRequest, family: str
) -> None:
    checkpoint = index_checkpoint(find_weights(bases[family, 2]))

    @_fuzz_settings(request.config.getoption("--fuzz-examples"))
    @given(
        st.dictionaries(
            st.sampled_from(["num_attention_heads", "num_key_value_heads", "vocab_size", "intermediate_size"]),
            st.integers(1, 130),
            max_size=3,
        ),
        st.integers(1, 9),
    )
    def run(changes: dict, world_size: int) -> None:
        config = {**checkpoint.config, **changes}
        _plans_exactly(Checkpoint(checkpoint.root, checkpoint.format, config, checkpoint.tensors), family, world_size)

    run()


def _bin_property(ranks: Ranks, bases: dict[str, Path], examples: int) -> None:
    """Byte edits anywhere in a ``.bin`` zip archive (local headers, records, ``data.pkl``, the central
    directory) and truncations: exact shards of what ``torch.load`` reads, or the same error everywhere."""
    bins = {}
    for family, base in bases.items():
        root = _copy(base)
        for shard in SHARDS:
            (root / shard).unlink()
        (root / "model.safetensors.index.json").unlink()
        tensors = {k: v for shard in SHARDS for k, v in load_file(str(base / shard)).items()}
        torch.save(tensors, root / "pytorch_model.bin")
        bins[family] = root
    for family, root in bins.items():
        assert check_load(ranks, root, family) == "loaded"
    size = min((root / "pytorch_model.bin").stat().st_size for root in bins.values())

    @_fuzz_settings(examples)
    @given(
        st.sampled_from(FAMILIES),
        st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 255)), max_size=4),
        st.one_of(st.none(), st.integers(0, size - 1)),
    )
    def run(family: str, edits: list[tuple[int, int]], cut: int | None) -> None:
        root = _copy(bins[family])
        path = root / "pytorch_model.bin"
        raw = bytearray(path.read_bytes())
        for position, value in edits:
            raw[position] = value
        path.write_bytes(bytes(raw[:cut] if cut is not None else raw))
        try:
            check_load(ranks, root, family)
        finally:
            shutil.rmtree(root.parent)

    try:
        run()
    finally:
        for root in bins.values():
            shutil.rmtree(root.parent)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_fuzzed_bin_archives_load_exactly_or_raise_a_tp_loader_error(
    bases: dict, request: pytest.FixtureRequest, world_size: int
) -> None:
    run_property(request, world_size, _bin_property, bases)
