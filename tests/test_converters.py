"""Converters are tensor-parallel exact: every rank's shard of a converter target equals converting
the whole stored tensors first and then sharding the result, bitwise, for colwise and rowwise targets
and even and uneven sizes, and a rank reads only the stored bytes its shard needs.

Planning is pure, so each rank of each world size is planned and read here in one process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reference import chunk_piece
from safetensors.torch import save_file

from tp_loader.byteranges import slice_ranges
from tp_loader.convert import Conversion, permute_for_rope
from tp_loader.errors import CheckpointError, PlanError
from tp_loader.index import index_checkpoint
from tp_loader.plan import make_plan
from tp_loader.read import ReadOptions, read_tensors
from tp_loader.resolve import find_weights
from tp_loader.spec import load_spec

HEAD_DIM = 4


def write(root: Path, tensors: dict[str, torch.Tensor], num_files: int = 1) -> Path:
    root.mkdir(parents=True)
    keys = list(tensors)
    for i in range(num_files):
        save_file({k: tensors[k].contiguous() for k in keys[i::num_files]}, str(root / f"part{i}.safetensors"))
    if num_files > 1:
        weight_map = {k: f"part{i}.safetensors" for i in range(num_files) for k in keys[i::num_files]}
        (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"model_type": "toy", "num_hidden_layers": 2, "num_experts": 3}))
    return root


def plan_file(root: Path, converters: str, targets: dict[str, tuple[int, ...]], style: str) -> Path:
    """A plan that applies ``converters`` and shards every target with ``style``."""
    tensors = "\n".join(f'[[tensors]]\nkey = "{key}"\nshape = {list(shape)}\n' for key, shape in targets.items())
    text = (
        'name = "toy"\nlayers = "num_hidden_layers"\nexperts = "num_experts"\n'
        f'[heads.q]\nnum_heads = "6"\nhead_dim = "{HEAD_DIM}"\n\n{converters}\n'
        f'[[rules]]\npattern = "**"\nstyle = "{style}"\n\n{tensors}'
    )
    path = root / "plan.toml"
    path.write_text(text)
    return path


def load_rank(
    root: Path, plan: Path, world_size: int, rank: int, reader: str = "mmap"
) -> tuple[dict[str, torch.Tensor], int, int]:
    """One rank's local tensors, the bytes its plan reads, and the bytes of its byte ranges."""
    checkpoint = index_checkpoint(find_weights(root))
    load_plan = make_plan(checkpoint, load_spec(plan), world_size, rank, model=str(root))
    options = ReadOptions(None, torch.device("cpu"), num_threads=2, max_inflight_bytes=1 << 30, reader=reader)
    local, stats = read_tensors(root, "safetensors", load_plan.tensors, options)
    ranged = sum(r.length for item in load_plan.tensors for r in slice_ranges(item))
    assert stats.bytes_read == load_plan.read_bytes
    return local, load_plan.read_bytes, ranged


def assert_tp_equals_convert_then_shard(
    root: Path,
    plan: Path,
    converted: dict[str, torch.Tensor],
    style: str,
    world_sizes=(1, 2, 3, 4),
    reader: str = "mmap",
) -> None:
    dim = {"colwise": 0, "rowwise": 1}[style]
    for world_size in world_sizes:
        for rank in range(world_size):
            local, read_bytes, ranged = load_rank(root, plan, world_size, rank, reader)
            assert set(local) == set(converted)
            for key, full in converted.items():
                want = chunk_piece(full, world_size, rank, dim) if full.dim() > dim else full
                assert local[key].dtype == want.dtype and torch.equal(local[key], want), (key, world_size, rank)
            assert read_bytes == ranged


def rows(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


STYLES = ["colwise", "rowwise"]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("sizes", [(8, 4, 4), (7, 3, 5)], ids=["even", "uneven"])
def test_chunk_target_shards_equal_chunking_the_whole_tensor_then_sharding(
    tmp_path: Path, style: str, sizes: tuple[int, ...]
) -> None:
    fused = {f"l.{i}.qkv": rows(sum(sizes), 6, seed=i) for i in range(2)}
    root = write(tmp_path / "ckpt", fused)
    converted = {
        f"l.{i}.{n}": t for i in range(2) for n, t in zip("qkv", torch.split(fused[f"l.{i}.qkv"], list(sizes)))
    }
    conv = (
        '[[converters]]\nop = "chunk"\nsource = "l.{layer}.qkv"\n'
        'targets = ["l.{layer}.q", "l.{layer}.k", "l.{layer}.v"]\n'
        f"sizes = {[str(s) for s in sizes]}\n"
    )
    plan = plan_file(tmp_path, conv, {k: tuple(v.shape) for k, v in converted.items()}, style)
    assert_tp_equals_convert_then_shard(root, plan, converted, style)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("sizes", [(8, 4, 4), (7, 3, 5)], ids=["even", "uneven"])
def test_concatenate_target_shards_equal_concatenating_the_whole_tensors_then_sharding(
    tmp_path: Path, style: str, sizes: tuple[int, ...]
) -> None:
    split = {f"l.{i}.{n}": rows(s, 6, seed=10 * i + j) for i in range(2) for j, (n, s) in enumerate(zip("qkv", sizes))}
    root = write(tmp_path / "ckpt", split, num_files=2)
    converted = {f"l.{i}.qkv": torch.cat([split[f"l.{i}.{n}"] for n in "qkv"]) for i in range(2)}
    conv = (
        '[[converters]]\nop = "concatenate"\n'
        'sources = ["l.{layer}.q", "l.{layer}.k", "l.{layer}.v"]\ntarget = "l.{layer}.qkv"\n'
    )
    plan = plan_file(tmp_path, conv, {k: tuple(v.shape) for k, v in converted.items()}, style)
    assert_tp_equals_convert_then_shard(root, plan, converted, style)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("shape", [(4, 6), (5, 7)], ids=["even", "uneven"])
def test_merged_experts_shard_equal_stacking_every_expert_then_sharding(
    tmp_path: Path, style: str, shape: tuple[int, int]
) -> None:
    """colwise on the stacked [experts, out, in] tensor is expert parallelism: whole experts per rank."""
    experts = {f"l.{i}.experts.{e}.w": rows(*shape, seed=10 * i + e) for i in range(2) for e in range(3)}
    root = write(tmp_path / "ckpt", experts, num_files=3)
    converted = {f"l.{i}.experts.w": torch.stack([experts[f"l.{i}.experts.{e}.w"] for e in range(3)]) for i in range(2)}
    conv = (
        '[[converters]]\nop = "merge_modulelist"\n'
        'source = "l.{layer}.experts.{expert}.w"\ntarget = "l.{layer}.experts.w"\n'
    )
    plan = plan_file(tmp_path, conv, {k: tuple(v.shape) for k, v in converted.items()}, style)
    assert_tp_equals_convert_then_shard(root, plan, converted, style)


def test_expert_parallel_rank_reads_only_its_own_experts_bytes(tmp_path: Path) -> None:
    experts = {f"l.{i}.experts.{e}.w": rows(4, 6, seed=10 * i + e) for i in range(2) for e in range(3)}
    root = write(tmp_path / "ckpt", experts)
    conv = (
        '[[converters]]\nop = "merge_modulelist"\n'
        'source = "l.{layer}.experts.{expert}.w"\ntarget = "l.{layer}.experts.w"\n'
    )
    plan = plan_file(tmp_path, conv, {f"l.{i}.experts.w": (3, 4, 6) for i in range(2)}, "colwise")
    checkpoint = index_checkpoint(find_weights(root))
    stored = checkpoint.tensors
    for rank, owned in enumerate([(0, 1), (2,)]):
        load_plan = make_plan(checkpoint, load_spec(plan), 2, rank, model="toy")
        ranges = sorted((r.offset, r.end) for item in load_plan.tensors for r in slice_ranges(item))
        want = sorted(
            (stored[f"l.{i}.experts.{e}.w"].begin, stored[f"l.{i}.experts.{e}.w"].end) for i in range(2) for e in owned
        )
        merged = [(a, b) for a, b in want]
        assert _union(ranges) == _union(merged)
        assert load_plan.read_bytes == 2 * len(owned) * 4 * 6 * 4


def _union(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a == out[-1][1]:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("shape", [(4, 6), (5, 7)], ids=["even", "uneven"])
def test_split_experts_shard_equal_unstacking_then_sharding(tmp_path: Path, style: str, shape: tuple[int, int]) -> None:
    stacked = {f"l.{i}.experts.w": rows(3, *shape, seed=i) for i in range(2)}
    root = write(tmp_path / "ckpt", stacked)
    converted = {f"l.{i}.experts.{e}.w": stacked[f"l.{i}.experts.w"][e] for i in range(2) for e in range(3)}
    conv = (
        '[[converters]]\nop = "split_modulelist"\n'
        'source = "l.{layer}.experts.w"\ntarget = "l.{layer}.experts.{expert}.w"\n'
    )
    plan = plan_file(tmp_path, conv, {k: tuple(v.shape) for k, v in converted.items()}, style)
    assert_tp_equals_convert_then_shard(root, plan, converted, style)


def test_permute_for_rope_matches_transformers_llama_conversion() -> None:
    """transformers' convert_llama_weights_to_hf: w.view(n, dim // n // 2, 2, in).transpose(1, 2)."""
    w = rows(24, 5)
    hf = w.view(6, HEAD_DIM // 2, 2, 5).transpose(1, 2).reshape(24, 5)
    assert torch.equal(permute_for_rope(w, HEAD_DIM, to_half=True), hf)
    assert torch.equal(permute_for_rope(hf, HEAD_DIM, to_half=False), w)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("direction", ["to_half", "to_interleaved"])
@pytest.mark.parametrize("reader", ["mmap", "safetensors", "pread"])
def test_rope_permuted_shards_equal_permuting_the_whole_tensor_then_sharding(
    tmp_path: Path, style: str, direction: str, reader: str
) -> None:
    """24 rows of 6 heads at world sizes 1-4 (world 4 cuts heads when colwise), weight and bias,
    through every reader."""
    stored = {"q.weight": rows(6 * HEAD_DIM, 5), "q.bias": rows(6 * HEAD_DIM, seed=1)}
    root = write(tmp_path / "ckpt", stored)
    converted = {k: permute_for_rope(v, HEAD_DIM, to_half=direction == "to_half") for k, v in stored.items()}
    conv = (
        f'[[converters]]\nop = "permute_for_rope"\nsource = "q.weight"\nheads = "q"\ndirection = "{direction}"\n'
        f'[[converters]]\nop = "permute_for_rope"\nsource = "q.bias"\nheads = "q"\ndirection = "{direction}"\n'
    )
    plan = plan_file(tmp_path, conv, {k: tuple(v.shape) for k, v in converted.items()}, style)
    assert_tp_equals_convert_then_shard(root, plan, converted, style, reader=reader)


def test_rope_shard_that_cuts_a_head_reads_the_whole_heads_and_says_so(tmp_path: Path) -> None:
    """24 rows over 5 ranks is 5 rows each, cutting 4-row heads: still exact,
    with a note and the extra bytes counted."""
    stored = {"q.weight": rows(6 * HEAD_DIM, 5)}
    root = write(tmp_path / "ckpt", stored)
    converted = {"q.weight": permute_for_rope(stored["q.weight"], HEAD_DIM, to_half=True)}
    conv = '[[converters]]\nop = "permute_for_rope"\nsource = "q.weight"\nheads = "q"\n'
    plan = plan_file(tmp_path, conv, {"q.weight": (24, 5)}, "colwise")
    assert_tp_equals_convert_then_shard(root, plan, converted, "colwise", world_sizes=(5,))
    load_plan = make_plan(index_checkpoint(find_weights(root)), load_spec(plan), 5, 1, model="toy")
    assert (
        load_plan.notes["q.weight"]
        == "shard cuts rotary heads: read 1 run(s) widened to whole heads, permuted, then trimmed"
    )
    assert load_plan.read_bytes == 2 * HEAD_DIM * 5 * 4  # rows 5..10 need heads 1 and 2 (rows 4..12)
    assert load_plan.tensors[0].nbytes == 5 * 5 * 4


@pytest.mark.parametrize("style", STYLES)
def test_chunk_then_rope_then_rename_chain_reports_its_op_chain(tmp_path: Path, style: str) -> None:
    fused = {"attn.qkv": rows(6 * HEAD_DIM + 2 * HEAD_DIM + 2 * HEAD_DIM, 5)}
    root = write(tmp_path / "ckpt", fused)
    q, k, v = torch.split(fused["attn.qkv"], [24, 8, 8])
    converted = {"model.q": permute_for_rope(q, HEAD_DIM, to_half=True), "model.k": k, "model.v": v}
    conv = (
        '[[converters]]\nop = "chunk"\nsource = "attn.qkv"\n'
        'targets = ["attn.q", "attn.k", "attn.v"]\nsizes = ["24", "8", "8"]\n'
        '[[converters]]\nop = "permute_for_rope"\nsource = "attn.q"\nheads = "q"\n'
        '[[converters]]\nop = "rename"\npattern = "^attn\\\\."\nreplacement = "model."\n'
    )
    plan = plan_file(tmp_path, conv, {k: tuple(v.shape) for k, v in converted.items()}, style)
    assert_tp_equals_convert_then_shard(root, plan, converted, style, world_sizes=(1, 2))
    load_plan = make_plan(index_checkpoint(find_weights(root)), load_spec(plan), 2, 0, model="toy")
    assert load_plan.conversions == (
        Conversion(
            "model.q",
            ("attn.qkv",),
            "chunk rows 0:24 -> permute_for_rope to_half -> rename",
            f"{style} Shard({0 if style == 'colwise' else 1})",
        ),
        Conversion(
            "model.k", ("attn.qkv",), "chunk rows 24:32 -> rename", f"{style} Shard({0 if style == 'colwise' else 1})"
        ),
        Conversion(
            "model.v", ("attn.qkv",), "chunk rows 32:40 -> rename", f"{style} Shard({0 if style == 'colwise' else 1})"
        ),
    )


def test_merge_with_an_expert_missing_names_the_missing_key(tmp_path: Path) -> None:
    experts = {f"l.{i}.experts.{e}.w": rows(4, 6) for i in range(2) for e in range(3) if (i, e) != (1, 2)}
    root = write(tmp_path / "ckpt", experts)
    conv = (
        '[[converters]]\nop = "merge_modulelist"\n'
        'source = "l.{layer}.experts.{expert}.w"\ntarget = "l.{layer}.experts.w"\n'
    )
    plan = plan_file(tmp_path, conv, {f"l.{i}.experts.w": (3, 4, 6) for i in range(2)}, "colwise")
    with pytest.raises(
        CheckpointError, match="merge_modulelist converter needs it beside l.1.experts.0.w, but the checkpoint lacks it"
    ) as info:
        make_plan(index_checkpoint(find_weights(root)), load_spec(plan), 2, 0, model="toy")
    assert info.value.key == "l.1.experts.2.w"


def test_merge_of_experts_with_different_shapes_is_refused(tmp_path: Path) -> None:
    experts = {f"l.0.experts.{e}.w": rows(4 + (e == 1), 6) for e in range(3)}
    root = write(tmp_path / "ckpt", experts)
    conv = (
        '[[converters]]\nop = "merge_modulelist"\n'
        'source = "l.{layer}.experts.{expert}.w"\ntarget = "l.{layer}.experts.w"\n'
    )
    plan = plan_file(tmp_path, conv, {"l.{layer}.experts.w": (3, 4, 6)}, "colwise")
    with pytest.raises(
        CheckpointError,
        match=r"l.0.experts.1.w is torch.float32 \[5, 6\] but l.0.experts.0.w is torch.float32 \[4, 6\]",
    ):
        make_plan(index_checkpoint(find_weights(root)), load_spec(plan), 2, 0, model="toy")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('op = "stack"\nsource = "a"\ntarget = "b"', "unknown op 'stack'"),
        (
            'op = "merge_modulelist"\nsource = "a.{layer}"\ntarget = "b"',
            "its source must contain {expert} and its target must not",
        ),
        (
            'op = "permute_for_rope"\nsource = "a"\ndirection = "sideways"\nheads = "q"',
            "needs heads = <head group> and direction",
        ),
        ('op = "concatenate"\nsources = ["a", "b"]\ntargets = ["c", "d"]', "takes exactly one target"),
        ('op = "rename"\npattern = "("\nreplacement = "x"', "bad regex"),
    ],
)
def test_malformed_converter_is_a_plan_error(tmp_path: Path, entry: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f'name = "bad"\n[heads.q]\nnum_heads = "1"\nhead_dim = "2"\n[[converters]]\n{entry}\n')
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace("{", r"\{").replace("}", r"\}")):
        load_spec(path)
