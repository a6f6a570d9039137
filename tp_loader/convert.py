"""Converters: a plan may declare a target layout different from the stored one. Part of planning
(pure, no I/O): stored tensors become the target tensors that the plan's rules then shard.

Every target is described by where its bytes are, never by a copy: a ``chunk`` target is a run of
its source's rows (its own byte range); a target made of several stored tensors (``concatenate``,
``merge_modulelist``), reshaped (``split_modulelist``) or permuted (``permute_for_rope``) lists its
:class:`~tp_loader.index.Segment` pieces. Styles then apply to the target as if it were stored, and
:func:`segment_reads` turns a rank's slice of the target into slices of the stored tensors: rank r
reads q[r], k[r] and v[r] out of fused rows, or only its own experts out of per-expert tensors.

Ops (``{layer}`` and ``{expert}`` in keys range over the model's layers and experts):

- ``rename``: keys matching a regex ``pattern`` get ``replacement`` (``re.sub`` syntax).
- ``chunk``: ``source`` split along dim 0 into ``targets`` of ``sizes`` rows.
- ``concatenate``: ``sources`` joined along dim 0 into ``target``.
- ``merge_modulelist``: per-expert ``source`` (with ``{expert}``) stacked into ``target`` [experts, ...].
- ``split_modulelist``: stacked ``source`` split into per-expert ``target`` (with ``{expert}``).
- ``permute_for_rope``: ``source``'s rows permuted within each head of head group ``heads``, from
  the interleaved rotary layout to the half-split one (``direction = "to_half"``) or back
  (``"to_interleaved"``); ``target`` defaults to the source's key.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CheckpointError, PlanError
from .index import Segment, TensorInfo
from .styles import Slice

OPS = ("rename", "chunk", "concatenate", "merge_modulelist", "split_modulelist", "permute_for_rope")


@dataclass(frozen=True)
class ConverterSpec:
    """One converter of a plan (see the module docstring for each op's fields)."""

    op: str
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    sizes: tuple[str, ...] = ()
    heads: str | None = None
    direction: str = "to_half"

    @property
    def describe(self) -> str:
        return f"{self.op} of {', '.join(self.sources)}"


@dataclass(frozen=True)
class Conversion:
    """How one target tensor was made: from which stored keys, by which op chain, placed how."""

    target: str
    sources: tuple[str, ...]
    op: str
    placement: str = ""


def parse_converters(raw: list[dict[str, Any]], path: str) -> tuple[ConverterSpec, ...]:
    """Validates a plan's ``[[converters]]`` entries.

    Raises:
        PlanError: an unknown op, or fields that do not fit the op.
    """
    out = []
    for entry in raw:
        op = str(entry.get("op"))
        sources = entry.get("sources", [entry["source"]] if "source" in entry else [])
        targets = entry.get("targets", [entry["target"]] if "target" in entry else [])
        if op == "rename":
            sources, targets = [entry["pattern"]], [entry["replacement"]]
        elif op == "permute_for_rope" and not targets:
            targets = list(sources)
        spec = ConverterSpec(
            op,
            tuple(map(str, sources)),
            tuple(map(str, targets)),
            tuple(map(str, entry.get("sizes", []))),
            entry.get("heads"),
            str(entry.get("direction", "to_half")),
        )
        problem = _check(spec)
        if problem:
            raise PlanError(
                f"converter {spec.describe}: {problem}", file=path, hint="See docs/plan-format.md for each op's fields"
            )
        out.append(spec)
    return tuple(out)


def _check(spec: ConverterSpec) -> str | None:
    if spec.op not in OPS:
        return f"unknown op {spec.op!r}; known ops: {', '.join(OPS)}"
    if not spec.sources or not spec.targets:
        return "needs a source and a target"
    if spec.op == "rename":
        try:
            re.compile(spec.sources[0])
        except re.error as exc:
            return f"bad regex: {exc}"
        return None
    if spec.op == "chunk" and (len(spec.sources) != 1 or len(spec.targets) != len(spec.sizes)):
        return (
            f"has {len(spec.targets)} targets but {len(spec.sizes)} sizes "
            "(chunk takes one source and one size per target)"
        )
    if spec.op != "chunk" and spec.sizes:
        return "only chunk takes sizes"
    if spec.op in ("concatenate", "merge_modulelist", "permute_for_rope") and len(spec.targets) != 1:
        return "takes exactly one target"
    if spec.op in ("merge_modulelist", "split_modulelist", "permute_for_rope") and len(spec.sources) != 1:
        return "takes exactly one source"
    if spec.op == "merge_modulelist" and ("{expert}" not in spec.sources[0] or "{expert}" in spec.targets[0]):
        return "its source must contain {expert} and its target must not"
    if spec.op == "split_modulelist" and ("{expert}" in spec.sources[0] or "{expert}" not in spec.targets[0]):
        return "its target must contain {expert} and its source must not"
    if spec.op == "permute_for_rope" and (spec.heads is None or spec.direction not in ("to_half", "to_interleaved")):
        return "needs heads = <head group> and direction = 'to_half' or 'to_interleaved'"
    return None


def expand(
    template: str, num_layers: int, num_experts: int, fixed: dict[str, int] | None = None
) -> Iterator[tuple[str, dict[str, int]]]:
    """Every key a template names, with the ``layer`` / ``expert`` values that made it; placeholders
    given in ``fixed`` are not expanded."""
    fixed = fixed or {}
    layers = [fixed["layer"]] if "layer" in fixed else range(num_layers) if "{layer}" in template else [None]
    experts = [fixed["expert"]] if "expert" in fixed else range(num_experts) if "{expert}" in template else [None]
    for layer in layers:
        for expert in experts:
            values = {name: v for name, v in (("layer", layer), ("expert", expert)) if v is not None}
            yield template.replace("{layer}", str(layer)).replace("{expert}", str(expert)), values


def fill(template: str, values: dict[str, int]) -> str:
    for name, value in values.items():
        template = template.replace("{" + name + "}", str(value))
    return template


def carve(info: TensorInfo, first: int, count: int, key: str) -> TensorInfo:
    """Rows ``[first, first + count)`` of a stored (or carved) tensor, as a tensor of its own."""
    row_bytes = math.prod(info.shape[1:]) * info.dtype.itemsize
    begin = info.begin + first * row_bytes if info.begin >= 0 else -1
    end = begin + count * row_bytes if begin >= 0 else -1
    return dataclasses.replace(
        info,
        key=key,
        shape=(count,) + info.shape[1:],
        begin=begin,
        end=end,
        stored_key=info.source_key,
        row_offset=info.row_offset + first,
    )


class _Converting:
    """The tensors as the converters so far have made them, and how each target was made. Each key
    has an anchor, a tuple that sorts it where its first source was stored."""

    def __init__(self, tensors: dict[str, TensorInfo]) -> None:
        self.tensors = dict(tensors)
        self.anchor = {key: (i,) for i, key in enumerate(tensors)}
        self.made: dict[str, Conversion] = {}
        self._taken: dict[str, tuple[int, ...]] = {}
        self._count: dict[tuple[int, ...], int] = {}

    def take(self, key: str) -> TensorInfo:
        self._taken[key] = self.anchor.pop(key)
        return self.tensors.pop(key)

    def put(self, info: TensorInfo, after: str, sources: tuple[str, ...], op: str) -> None:
        if info.key in self.tensors:
            raise CheckpointError(
                f"converter target {info.key} is also stored (or made twice)",
                key=info.key,
                hint="Fix the plan's converters",
            )
        base = self._taken[after]
        self._count[base] = self._count.get(base, -1) + 1
        self.anchor[info.key] = base + (self._count[base],)
        chain = [self.made[s].op for s in sources if s in self.made]
        stored = tuple(dict.fromkeys(k for s in sources for k in (self.made[s].sources if s in self.made else (s,))))
        self.made[info.key] = Conversion(info.key, stored, " -> ".join(dict.fromkeys(chain + [op])))
        self.tensors[info.key] = info


def apply_converters(
    tensors: dict[str, TensorInfo],
    converters: tuple[ConverterSpec, ...],
    sizes: dict[str, int],
    head_dims: dict[str, int],
    num_layers: int,
    num_experts: int,
) -> tuple[dict[str, TensorInfo], tuple[Conversion, ...]]:
    """The tensors with each converter's sources replaced by its targets, in the sources' places.

    Args:
        tensors: stored key → where it lives.
        converters: the plan's converters, applied in order (a later one may consume an earlier one's targets).
        sizes: each size expression of the converters, evaluated.
        head_dims: head group name → head size.
        num_layers: what ``{layer}`` ranges over.
        num_experts: what ``{expert}`` ranges over.

    Raises:
        CheckpointError: the stored tensors do not fit the converter (sizes, shapes, dtypes, some
            experts stored and others not).
    """
    state = _Converting(tensors)
    for conv in converters:
        if conv.op == "rename":
            _rename(state, conv)
            continue
        # one application per layer (and expert) of the side that names a single tensor
        driver = conv.targets[0] if conv.op in ("merge_modulelist", "concatenate") else conv.sources[0]
        for _, at in expand(driver, num_layers, num_experts):
            sources = [key for template in conv.sources for key, _ in expand(template, num_layers, num_experts, at)]
            present = [key for key in sources if key in state.tensors]
            if not present:
                continue  # none of this converter here (a MoE model's dense layer, say): the plan reports the gap
            if len(present) < len(sources):
                absent = next(key for key in sources if key not in state.tensors)
                raise CheckpointError(
                    f"{conv.op} converter needs it beside {present[0]}, but the checkpoint lacks it",
                    key=absent,
                    file=state.tensors[present[0]].file,
                    hint="The checkpoint is incomplete, or the plan's converter does not fit it",
                )
            OPS_FN[conv.op](state, conv, [state.take(key) for key in sources], at, sizes, head_dims, num_experts)
    keys = sorted(state.tensors, key=state.anchor.__getitem__)
    return {key: state.tensors[key] for key in keys}, tuple(state.made[key] for key in keys if key in state.made)


def _rename(state: _Converting, conv: ConverterSpec) -> None:
    pattern = re.compile(conv.sources[0])
    for key in list(state.tensors):
        new = pattern.sub(conv.targets[0], key, count=1)
        if new != key:
            info = state.take(key)
            state.put(dataclasses.replace(info, key=new, stored_key=info.source_key), key, (key,), "rename")


def _chunk(
    state: _Converting,
    conv: ConverterSpec,
    sources: list[TensorInfo],
    at: dict[str, int],
    sizes: dict[str, int],
    head_dims: dict[str, int],
    num_experts: int,
) -> None:
    (source,) = sources
    _no_segments(source, conv)
    rows = [sizes[s] for s in conv.sizes]
    if not source.shape or sum(rows) != source.shape[0]:
        raise CheckpointError(
            f"chunk converter: the stored tensor has shape {list(source.shape)}, "
            f"but its targets' sizes add up to {sum(rows)} rows",
            file=source.file,
            key=source.key,
            hint="The plan's sizes and the config disagree with this checkpoint",
        )
    offset = 0
    for target, count in zip(conv.targets, rows):
        state.put(
            carve(source, offset, count, fill(target, at)),
            source.key,
            (source.key,),
            f"chunk rows {offset}:{offset + count}",
        )
        offset += count


def _concatenate(
    state: _Converting,
    conv: ConverterSpec,
    sources: list[TensorInfo],
    at: dict[str, int],
    sizes: dict[str, int],
    head_dims: dict[str, int],
    num_experts: int,
    lead: int = 0,
) -> None:
    first = sources[0]
    for other in sources:
        inner = other.shape[1:] if lead == 0 else other.shape
        if other.dtype != first.dtype or not other.shape or inner != (first.shape[1:] if lead == 0 else first.shape):
            raise CheckpointError(
                f"{conv.op} converter: {other.key} is {other.dtype} {list(other.shape)} "
                f"but {first.key} is {first.dtype} {list(first.shape)}; they cannot be joined along dim 0",
                file=other.file,
                key=other.key,
                hint="The checkpoint does not have the layout this plan's converter expects",
            )
    segments = tuple(
        segment
        for info in sources
        for segment in (info.segments if info.segments and lead == 0 else (Segment(_no_segments(info, conv), lead),))
    )
    rows = sum(segment.rows for segment in segments)
    shape = (rows,) + (first.shape[1:] if lead == 0 else first.shape)
    target = TensorInfo(fill(conv.targets[0], at), first.file, first.dtype, shape, first.begin, -1, segments=segments)
    keys = tuple(info.key for info in sources)
    state.put(target, first.key, keys, conv.op)


def _merge(
    state: _Converting,
    conv: ConverterSpec,
    sources: list[TensorInfo],
    at: dict[str, int],
    sizes: dict[str, int],
    head_dims: dict[str, int],
    num_experts: int,
) -> None:
    _concatenate(state, conv, sources, at, sizes, head_dims, num_experts, lead=1)


def _split(
    state: _Converting,
    conv: ConverterSpec,
    sources: list[TensorInfo],
    at: dict[str, int],
    sizes: dict[str, int],
    head_dims: dict[str, int],
    num_experts: int,
) -> None:
    (source,) = sources
    _no_segments(source, conv)
    if len(source.shape) < 2 or source.shape[0] != num_experts:
        raise CheckpointError(
            f"split_modulelist converter: the stored tensor has shape {list(source.shape)}, "
            f"not [{num_experts} experts, ...]",
            file=source.file,
            key=source.key,
            hint="The config's expert count and the checkpoint disagree",
        )
    for expert in range(num_experts):
        key = fill(conv.targets[0], {**at, "expert": expert})
        piece = carve(source, expert, 1, key)
        state.put(
            TensorInfo(
                key, source.file, source.dtype, source.shape[1:], piece.begin, -1, segments=(Segment(piece, -1),)
            ),
            source.key,
            (source.key,),
            f"split_modulelist expert {expert}",
        )


def _permute(
    state: _Converting,
    conv: ConverterSpec,
    sources: list[TensorInfo],
    at: dict[str, int],
    sizes: dict[str, int],
    head_dims: dict[str, int],
    num_experts: int,
) -> None:
    (source,) = sources
    _no_segments(source, conv)
    head_dim = head_dims[str(conv.heads)]
    if not source.shape or source.shape[0] % head_dim or head_dim % 2:
        raise CheckpointError(
            f"permute_for_rope converter: {source.shape[0] if source.shape else 0} rows "
            f"are not whole {conv.heads} heads of an even size {head_dim}",
            file=source.file,
            key=source.key,
            hint="The plan applies the rotary permutation to a tensor that is not made of those heads",
        )
    segment = Segment(source, 0, head_dim, conv.direction == "to_half")
    state.put(
        TensorInfo(
            fill(conv.targets[0], at), source.file, source.dtype, source.shape, source.begin, -1, segments=(segment,)
        ),
        source.key,
        (source.key,),
        f"permute_for_rope {conv.direction}",
    )


def _no_segments(info: TensorInfo, conv: ConverterSpec) -> TensorInfo:
    if info.segments:
        raise PlanError(
            f"converter {conv.describe} consumes {info.key}, which an earlier converter assembled "
            "from several pieces; this op cannot follow that one",
            key=info.key,
            hint="Reorder the plan's converters (chunk and permute first, then concatenate or merge)",
        )
    return info


OPS_FN = {
    "chunk": _chunk,
    "concatenate": _concatenate,
    "merge_modulelist": _merge,
    "split_modulelist": _split,
    "permute_for_rope": _permute,
}


@dataclass(frozen=True)
class SegmentRead:
    """One read of a stored tensor for a converter target: ``slice`` of ``segment.info``, then the
    segment's reshape and permutation, then rows ``trim`` of the result (head-widened reads only)."""

    segment: Segment
    slice: Slice
    trim: tuple[int, int] | None = None


def segment_reads(info: TensorInfo, piece: Slice) -> list[SegmentRead]:
    """What to read of each stored piece for this rank's ``piece`` of the target ``info``, in the order
    the results are concatenated along dim 0.

    A slice along dim 0 reads, for each of its ranges, the rows of every segment it overlaps; a slice
    along another dim reads that dim's ranges of every segment. A rotary permutation mixes rows within
    a head, so a dim-0 range that cuts a head reads the whole heads it touches and trims after
    permuting (noted by the caller; shards on head boundaries read exactly their rows).
    """
    reads: list[SegmentRead] = []
    if piece.dim is None:
        return [SegmentRead(segment, Slice(None, global_shape=segment.info.shape)) for segment in info.segments]
    if piece.dim > 0:
        return [
            SegmentRead(segment, Slice(piece.dim - segment.lead, piece.ranges, segment.info.shape))
            for segment in info.segments
        ]
    for a, b in piece.ranges:
        start = 0
        for segment in info.segments:
            stop = start + segment.rows
            lo, hi = max(a, start) - start, min(b, stop) - start
            start = stop
            if lo >= hi:
                continue
            if segment.lead == 1:
                reads.append(SegmentRead(segment, Slice(None, global_shape=segment.info.shape)))
            elif segment.lead == -1:
                reads.append(SegmentRead(segment, Slice(1, ((lo, hi),), segment.info.shape)))
            elif segment.rope_head_dim:
                hd = segment.rope_head_dim
                wide = (lo // hd * hd, -(-hi // hd) * hd)
                trim = None if wide == (lo, hi) else (lo - wide[0], hi - wide[0])
                reads.append(SegmentRead(segment, Slice(0, (wide,), segment.info.shape), trim))
            else:
                reads.append(SegmentRead(segment, Slice(0, ((lo, hi),), segment.info.shape)))
    return reads


def finish_read(read: SegmentRead, tensor: torch.Tensor) -> torch.Tensor:
    """A segment's read, reshaped, permuted and trimmed into its place in the target."""
    segment = read.segment
    if segment.lead == 1:
        tensor = tensor.unsqueeze(0)
    elif segment.lead == -1:
        tensor = tensor.squeeze(0)
    if segment.rope_head_dim:
        tensor = permute_for_rope(tensor, segment.rope_head_dim, to_half=segment.rope_to_half)
    if read.trim is not None:
        tensor = tensor[read.trim[0] : read.trim[1]]
    return tensor


def permute_for_rope(tensor: torch.Tensor, head_dim: int, *, to_half: bool) -> torch.Tensor:
    """Rows permuted within each head between the interleaved rotary layout (pairs ``2i, 2i+1``) and
    the half-split one (``i, i + head_dim/2``), as transformers' Llama conversion script does."""
    rows, rest = tensor.shape[0], tuple(tensor.shape[1:])
    split = (rows // head_dim, head_dim // 2, 2) if to_half else (rows // head_dim, 2, head_dim // 2)
    return tensor.reshape(split + rest).transpose(1, 2).reshape((rows,) + rest)
