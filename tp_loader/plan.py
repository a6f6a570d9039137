"""Stage 3, plan: keys + config + plan file + world size → what this rank reads and how it is placed.

Pure: no I/O and no process group, so any world size can be planned (and printed) anywhere.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .convert import Conversion, apply_converters, expand, segment_reads
from .errors import CheckpointError, PlanError, ShardingError
from .index import Checkpoint, TensorInfo
from .spec import PlanSpec, Rule, config_values, evaluate, evaluate_size
from .styles import STYLES, Heads, Part, Slice, head_world_sizes


MAX_LAYERS = 100_000


@dataclass(frozen=True)
class TensorPlan:
    """How one stored tensor is loaded on this rank.

    Attributes:
        info: where the tensor is stored.
        slice: what this rank reads of it and how that is placed.
        style: the plan style applied (``replicate`` for unexpected keys).
        rule: the matching rule's pattern, or ``None`` when no rule matched.
    """

    info: TensorInfo
    slice: Slice
    style: str
    rule: str | None

    @property
    def key(self) -> str:
        return self.info.key

    @property
    def local_shape(self) -> tuple[int, ...]:
        return self.slice.local_shape(self.info.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensor that this rank's slice covers."""
        return math.prod(self.local_shape) * self.info.dtype.itemsize

    @property
    def read_bytes(self) -> int:
        """Bytes read for this slice: ``nbytes``, more only where a converter must widen a read."""
        if not self.info.segments:
            return self.nbytes
        return sum(math.prod(r.slice.local_shape(r.segment.info.shape)) * self.info.dtype.itemsize for r in segment_reads(self.info, self.slice))


@dataclass(frozen=True)
class Mismatch:
    """A stored tensor whose shape differs from what the config implies. It is not loaded."""

    key: str
    expected: tuple[int, ...]
    found: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.key} (config implies {list(self.expected)}, stored {list(self.found)})"


@dataclass(frozen=True)
class TieDecision:
    """A tied pair and which of its sides the checkpoint stores (``both``, ``source``, ``target``, ``neither``)."""

    source: str
    target: str
    stored: str


@dataclass(frozen=True)
class LoadPlan:
    """Everything one rank will do, decided before any tensor data is read."""

    model: str
    plan_name: str
    world_size: int
    rank: int
    tensors: tuple[TensorPlan, ...]
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    unmatched: tuple[str, ...] = ()
    mismatched: tuple[Mismatch, ...] = ()
    ties: tuple[TieDecision, ...] = ()
    notes: dict[str, str] = field(default_factory=dict)
    unused_rules: tuple[str, ...] = ()
    conversions: tuple[Conversion, ...] = ()

    @property
    def read_bytes(self) -> int:
        """Bytes this rank will read: the sum of its slices."""
        return sum(t.read_bytes for t in self.tensors)


def make_plan(checkpoint: Checkpoint, spec: PlanSpec, world_size: int, rank: int, *, model: str) -> LoadPlan:
    """Plans the load of ``checkpoint`` for ``rank`` of ``world_size``.

    Args:
        checkpoint: the indexed checkpoint (headers only).
        spec: the architecture's plan.
        world_size: number of tensor-parallel ranks.
        rank: this rank, ``0 <= rank < world_size``.
        model: the model's name for messages.

    Returns:
        The :class:`LoadPlan`, tensors in file and byte-offset order.

    Raises:
        ShardingError: a head group cannot be split over ``world_size``.
        CheckpointError: the config lacks a value the plan needs.
        PlanError: a plan expression is malformed.
    """
    try:
        values = config_values(spec, checkpoint.config)
        num_layers = _count(spec, spec.layers, "{layer}", values, "number of layers")
        num_experts = _count(spec, spec.experts, "{expert}", values, "number of experts")
        expected = _expected_shapes(spec, values, num_layers, num_experts)
        heads = {
            name: Heads(name, evaluate_size(g.num_heads, values, where=f"number of {name} heads", minimum=1), evaluate_size(g.head_dim, values, where=f"{name} head size", minimum=1), g.replicate_when_fewer)
            for name, g in spec.heads.items()
        }
        stored, conversions = _convert(checkpoint, spec, values, {name: h.head_dim for name, h in heads.items()}, num_layers, num_experts)
    except CheckpointError as exc:
        raise CheckpointError(exc.message, file=exc.file or str(checkpoint.root / "config.json"), key=exc.key, hint=exc.hint) from None
    rules = {key: spec.match(key) for key in (*stored, *expected)}
    _check_heads(heads, {rules[k] for k in expected}, world_size, model)

    tensors: list[TensorPlan] = []
    unexpected: list[str] = []
    unmatched: list[str] = []
    mismatched: list[Mismatch] = []
    for key, info in stored.items():
        rule = rules[key]
        want = expected.get(key)
        if want is None:
            unexpected.append(key)
            if rule is None:
                unmatched.append(key)
            tensors.append(TensorPlan(info, STYLES["replicate"](info.shape, None, world_size, rank), "replicate", rule.pattern if rule else None))
        elif want != info.shape:
            mismatched.append(Mismatch(key, want, info.shape))
        elif rule is None:
            raise PlanError("the plan expects this tensor but no rule gives it a style", file=spec.path, key=key, hint="Widen a rule's pattern to cover every layer")
        else:
            group = heads[rule.heads] if rule.heads else None
            parts = tuple(Part(evaluate_size(size, values, where=f"part size of {key}"), heads[h] if h else None) for size, h in rule.parts)
            try:
                piece = STYLES[rule.style](info.shape, group, world_size, rank, parts, transposed=rule.transposed)
            except ShardingError as exc:
                raise ShardingError(exc.message, key=key, file=info.file, hint=exc.hint) from None
            tensors.append(TensorPlan(info, piece, rule.style, rule.pattern))

    used = set(rules.values())
    unused_rules = tuple(rule.pattern for rule in spec.rules if rule not in used)
    ties = _decide_ties(spec, values, tensors)
    covered = {t.target for t in ties if t.stored == "source"} | {t.source for t in ties if t.stored == "target"}
    missing = tuple(k for k in expected if k not in stored and k not in covered)
    notes = {t.key: t.slice.note for t in tensors if t.slice.note}
    notes.update({t.key: widened for t in tensors if (widened := _widened_note(t))})
    placed = {t.key: f"{t.style} {'Replicate()' if t.slice.dim is None else f'Shard({t.slice.dim})'}" for t in tensors}
    conversions = tuple(dataclasses.replace(c, placement=placed.get(c.target, "not loaded")) for c in conversions)
    return LoadPlan(model, spec.name, world_size, rank, tuple(tensors), missing, tuple(sorted(unexpected)), tuple(sorted(unmatched)), tuple(mismatched), ties, notes, unused_rules, conversions)


def _count(spec: PlanSpec, expression: str, placeholder: str, values: dict, where: str) -> int:
    """What ``placeholder`` ranges over; the config is asked only when some key of the plan has it."""
    keys = (*(t.key for t in spec.tensors), *(k for c in spec.converters for k in (*c.sources, *c.targets)))
    return evaluate_size(expression, values, where=where, maximum=MAX_LAYERS) if any(placeholder in key for key in keys) else 0


def _convert(checkpoint: Checkpoint, spec: PlanSpec, values: dict, head_dims: dict[str, int], num_layers: int, num_experts: int) -> tuple[dict[str, TensorInfo], tuple[Conversion, ...]]:
    """The stored tensors in the plan's target layout (unchanged when the plan has no converters)."""
    if not spec.converters:
        return checkpoint.tensors, ()
    sizes = {expr: evaluate_size(expr, values, where=f"converter size {expr}") for conv in spec.converters for expr in conv.sizes}
    return apply_converters(checkpoint.tensors, spec.converters, sizes, head_dims, num_layers, num_experts)


def _expected_shapes(spec: PlanSpec, values: dict, num_layers: int, num_experts: int) -> dict[str, tuple[int, ...]]:
    """Every tensor the config implies; a ``when`` is evaluated per layer, with ``layer`` set."""
    expected: dict[str, tuple[int, ...]] = {}
    for tensor in spec.tensors:
        shape = tuple(evaluate_size(d, values, where=f"shape of {tensor.key}") for d in tensor.shape)
        for layer in range(num_layers) if "{layer}" in tensor.key else [None]:
            scope = values if layer is None else {**values, "layer": layer}
            if tensor.when is not None and not evaluate(tensor.when, scope, where=f"when of {tensor.key}"):
                continue
            for key, _ in expand(tensor.key, num_layers, num_experts, {} if layer is None else {"layer": layer}):
                expected[key] = shape
    return expected


def _check_heads(heads: dict[str, Heads], rules: set[Rule | None], world_size: int, model: str) -> None:
    """Fails before any I/O when a head group that expected tensors use cannot be split over ``world_size``."""
    names = {r.heads for r in rules if r is not None and r.heads} | {h for r in rules if r is not None for _, h in r.parts if h}
    groups = [heads[name] for name in sorted(names)]
    if not groups or world_size in head_world_sizes(groups, limit=world_size):
        return
    counts = ", ".join(f"{g.num_heads} {g.name} heads" for g in groups)
    working = head_world_sizes(groups, limit=max(64, world_size))
    raise ShardingError(
        f"model {model} ({counts}) cannot be sharded over {world_size} ranks",
        hint=f"World sizes that work: {', '.join(map(str, working))}",
    )


def _decide_ties(spec: PlanSpec, values: dict, tensors: list[TensorPlan]) -> tuple[TieDecision, ...]:
    by_key = {t.key: t for t in tensors}
    decisions = []
    for tie in spec.ties:
        if not evaluate(tie.when, values, where=f"tie {tie.source} -> {tie.target}"):
            continue
        has_source, has_target = tie.source in by_key, tie.target in by_key
        stored = {(True, True): "both", (True, False): "source", (False, True): "target", (False, False): "neither"}[(has_source, has_target)]
        decisions.append(TieDecision(tie.source, tie.target, stored))
    return tuple(decisions)


def _widened_note(item: TensorPlan) -> str | None:
    """A remark when a converter target's slice cannot be read exactly (a rotary permutation whose
    shard cuts a head): the whole heads it touches are read, permuted, then trimmed."""
    if not item.info.segments or item.slice.dim != 0:
        return None
    widened = [r for r in segment_reads(item.info, item.slice) if r.trim is not None]
    return f"shard cuts rotary heads: read {len(widened)} run(s) widened to whole heads, permuted, then trimmed" if widened else None
