"""Converters: a plan may declare a target layout different from the stored one. Part of planning
(pure, no I/O): stored tensors become the target tensors the plan's rules then shard.

``chunk`` splits a fused tensor along dim 0 into targets (``qkv_proj`` → ``q_proj``, ``k_proj``,
``v_proj``). Each target is a run of the source's rows, hence its own byte range in the file: every
style then applies to the target as if it were stored, and rank r reads q[r], k[r] and v[r] straight
out of the fused rows — never the source sliced by the first target's placement.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointError, PlanError
from .index import TensorInfo

OPS = ("chunk",)


@dataclass(frozen=True)
class ConverterSpec:
    """One converter of a plan: ``op`` maps ``source`` to ``targets`` (keys may contain ``{layer}``);
    ``sizes`` are the targets' row counts as expressions."""

    op: str
    source: str
    targets: tuple[str, ...]
    sizes: tuple[str, ...]


@dataclass(frozen=True)
class Conversion:
    """How one target tensor was made: from which stored keys, by which op."""

    target: str
    sources: tuple[str, ...]
    op: str


def parse_converters(raw: list[dict[str, Any]], path: str) -> tuple[ConverterSpec, ...]:
    """Validates a plan's ``[[converters]]`` entries.

    Raises:
        PlanError: an unknown op, or targets and sizes of different lengths.
    """
    out = []
    for entry in raw:
        spec = ConverterSpec(str(entry["op"]), str(entry["source"]), tuple(map(str, entry["targets"])), tuple(map(str, entry["sizes"])))
        if spec.op not in OPS:
            raise PlanError(f"converter for {spec.source!r} names unknown op {spec.op!r}; known ops: {', '.join(OPS)}", file=path, hint="Use a known op")
        if len(spec.targets) != len(spec.sizes) or not spec.targets:
            raise PlanError(f"converter for {spec.source!r} has {len(spec.targets)} targets but {len(spec.sizes)} sizes", file=path, hint="Give one size per target")
        out.append(spec)
    return tuple(out)


def apply_converters(tensors: dict[str, TensorInfo], converters: tuple[ConverterSpec, ...], sizes: dict[str, int], num_layers: int) -> tuple[dict[str, TensorInfo], tuple[Conversion, ...]]:
    """The tensors with each converter's sources replaced by its targets, in the sources' places.

    Args:
        tensors: stored key → where it lives.
        converters: the plan's converters.
        sizes: each size expression of the converters, evaluated.
        num_layers: what ``{layer}`` ranges over.

    Raises:
        CheckpointError: a source's rows differ from the sum of its targets' sizes.
    """
    replaced: dict[str, list[TensorInfo]] = {}
    conversions: list[Conversion] = []
    for conv in converters:
        layers = range(num_layers) if "{layer}" in conv.source else [0]
        for layer in layers:
            source = tensors.get(conv.source.replace("{layer}", str(layer)))
            if source is None or source.key in replaced:
                continue
            rows = [sizes[s] for s in conv.sizes]
            if not source.shape or sum(rows) != source.shape[0]:
                raise CheckpointError(
                    f"{conv.op} converter: the stored tensor has shape {list(source.shape)}, but its targets' sizes add up to {sum(rows)} rows",
                    file=source.file,
                    key=source.key,
                    hint="The plan's sizes and the config disagree with this checkpoint",
                )
            row_bytes = math.prod(source.shape[1:]) * source.dtype.itemsize
            offset, pieces = 0, []
            for target, count in zip(conv.targets, rows):
                key = target.replace("{layer}", str(layer))
                begin = source.begin + offset * row_bytes if source.begin >= 0 else -1
                pieces.append(dataclasses.replace(source, key=key, shape=(count,) + source.shape[1:], begin=begin, end=begin + count * row_bytes if begin >= 0 else -1, stored_key=source.source_key, row_offset=source.row_offset + offset))
                conversions.append(Conversion(key, (source.key,), f"{conv.op} rows {offset}:{offset + count}"))
                offset += count
            replaced[source.key] = pieces
    out: dict[str, TensorInfo] = {}
    for key, info in tensors.items():
        for piece in replaced.get(key, [info]):
            out[piece.key] = piece
    return out, tuple(conversions)
