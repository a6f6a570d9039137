"""Stage 3, plan: keys + config + plan file + world size → what this rank reads and how it is placed.

Pure: no I/O and no process group, so any world size can be planned (and printed) anywhere.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from .arguments import FP8_DTYPES, conversion_dtype, dtype_name
from .convert import Conversion, SegmentRead, apply_converters, expand, segment_reads
from .errors import ArgumentError, CheckpointError, PlanError, ShardingError, StrictLoadError
from .index import Checkpoint, TensorInfo
from .prefix import detect_prefix, index_shape, present_groups, with_prefix
from .quant import (
    MAX_WORLD,
    Dequantize,
    PieceFor,
    QuantWeight,
    find_quantized,
    plan_quantized,
    quant_format,
    refuse_cuts,
)
from .spec import (
    ExpectedTensor,
    PlanSpec,
    Rule,
    config_values,
    evaluate,
    evaluate_size,
    glob_to_regex,
    select_spec,
)
from .styles import STYLES, Heads, Part, Slice, StyleFn, block_slice, head_world_sizes, stacked

MAX_LAYERS = 100_000


class _cached:
    """``functools.cached_property`` without its lock (Python 3.11 takes an RLock on every first access, which
    costs more than the values cached here): a non-data descriptor that stores the value in the instance's
    ``__dict__`` (a frozen dataclass has one), where later lookups find it first."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn
        self.name = fn.__name__
        self.__doc__ = fn.__doc__

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)
        return value


@dataclass(frozen=True)
class TensorPlan:
    """How one stored tensor is loaded on this rank.

    Attributes:
        info: where the tensor is stored.
        slice: what this rank reads of it and how that is placed.
        style: the plan style applied (``replicate`` for unexpected keys).
        rule: the matching rule's pattern, or ``None`` when no rule matched.
        scale: for a block-fp8 weight dequantized on load, the read of the scale blocks covering
            this rank's slice; ``block`` is the block size.
        quant: for a weight of another quantized format dequantized on load (``info`` is then the
            weight as the plan expects it, in float32), the windows of its stored tensors to read.
    """

    info: TensorInfo
    slice: Slice
    style: str
    rule: str | None
    scale: TensorPlan | None = None
    block: tuple[int, int] = ()
    quant: Dequantize | None = None

    @property
    def key(self) -> str:
        return self.info.key

    # Cached: summed and compared per tensor by the planner, the dry run and the report (92k tensors a rank in
    # DeepSeek-V3).
    @_cached
    def local_shape(self) -> tuple[int, ...]:
        return self.slice.local_shape(self.info.shape)

    @_cached
    def nbytes(self) -> int:
        """Bytes of the stored tensor that this rank's slice covers."""
        return math.prod(self.local_shape) * self.info.dtype.itemsize

    @_cached
    def read_bytes(self) -> int:
        """Bytes read for this slice: ``nbytes``, more where a converter must widen a read, plus the
        scale blocks of a weight dequantized on load."""
        if self.quant is not None:
            return self.quant.read_bytes
        own = sum(sub.nbytes for _, sub in self.segment_plans()) if self.info.segments else self.nbytes
        return own + (self.scale.read_bytes if self.scale is not None else 0)

    def quant_plans(self) -> list[TensorPlan]:
        """For a quantized weight dequantized on load: each read of its stored tensors (empty otherwise)."""
        if self.quant is None:
            return []
        return [
            TensorPlan(info, piece, self.style, self.rule)
            for window in self.quant.windows
            for _, info, piece in window.reads
        ]

    def segment_plans(self) -> list[tuple[SegmentRead, TensorPlan]]:
        """For a converter target: each stored piece's read, with the plan of that read of its own
        (what the readers and the byte accounting take); empty for a stored tensor."""
        return [
            (read, TensorPlan(read.segment.info, read.slice, self.style, self.rule))
            for read in segment_reads(self.info, self.slice)
        ]


@dataclass(frozen=True)
class Mismatch:
    """A stored tensor whose shape differs from what the config implies. It is not loaded."""

    key: str
    expected: tuple[int, ...]
    found: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.key} (config implies {list(self.expected)}, stored {list(self.found)})"


@dataclass(frozen=True)
class Skipped:
    """Stored keys of one ``[[skip]]`` entry of the plan: never read, never placed (``keep=`` loads them)."""

    name: str
    reason: str
    keys: tuple[str, ...]
    nbytes: int


@dataclass(frozen=True)
class TieDecision:
    """A tied pair and which of its sides the checkpoint stores (``both``, ``source``, ``target``, ``neither``)."""

    source: str
    target: str
    stored: str


@dataclass(frozen=True)
class LoadPlan:
    """Everything one rank will do, decided before any tensor data is read. ``prefix`` is the prefix of
    the checkpoint's base-model keys, ``groups`` the plan's task heads and optional modules it has."""

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
    prefix: str = ""
    groups: tuple[str, ...] = ()
    spec: PlanSpec | None = field(default=None, compare=False, repr=False)  # the plan, with the prefix applied
    skipped: tuple[Skipped, ...] = ()

    @property
    def read_bytes(self) -> int:
        """Bytes this rank will read: the sum of its slices."""
        return sum(t.read_bytes for t in self.tensors)


def plan_rank(
    checkpoint: Checkpoint,
    world_size: int,
    rank: int,
    *,
    plan: str | os.PathLike[str] = "auto",
    mode: str | None = None,
    model: str,
    dtype: torch.dtype | None = None,
    strict: bool = False,
    allow_unmatched: bool = False,
    keep: tuple[str, ...] = (),
) -> LoadPlan:
    """Selects the plan for ``checkpoint`` and plans ``rank`` of ``world_size``: what :func:`tp_loader.load`
    does on every rank and :func:`tp_loader.plan_load` for every rank, before any tensor data is read.

    Raises:
        ArgumentError: an fp8 ``dtype`` for a checkpoint that stores no weights in it.
        StrictLoadError: ``strict`` and keys are missing, unexpected or mismatched.
        PlanError, ShardingError, CheckpointError: as :func:`make_plan` and :func:`select_spec`.
    """
    (load_plan,) = plan_ranks(
        checkpoint,
        world_size,
        (rank,),
        plan=plan,
        mode=mode,
        model=model,
        dtype=dtype,
        strict=strict,
        allow_unmatched=allow_unmatched,
        keep=keep,
    )
    return load_plan


def plan_ranks(
    checkpoint: Checkpoint,
    world_size: int,
    ranks: Sequence[int],
    *,
    plan: str | os.PathLike[str] = "auto",
    mode: str | None = None,
    model: str,
    dtype: torch.dtype | None = None,
    strict: bool = False,
    allow_unmatched: bool = False,
    keep: tuple[str, ...] = (),
) -> list[LoadPlan]:
    """:func:`plan_rank` for each of ``ranks``, with the plan selected and the keys laid out once."""
    if dtype in FP8_DTYPES and not any(info.dtype == dtype for info in checkpoint.tensors.values()):
        raise ArgumentError(
            f"dtype {dtype_name(dtype)} keeps fp8 weights as stored, but {model} stores none in it",
            key="dtype",
            hint="tp_loader does not quantize: pass float32, bfloat16 or float16, or no dtype",
        )
    spec = select_spec(plan, checkpoint.config, model=model, mode=mode, keys=checkpoint.tensors.keys())
    layout = lay_out_keys(checkpoint, spec, dequantize=conversion_dtype(dtype) is not None, keep=keep)
    plans = [plan_layout(layout, world_size, rank, model=model, allow_unmatched=allow_unmatched) for rank in ranks]
    if strict:
        refuse_key_problems(plans[0])  # the keys are every rank's alike
    return plans


def refuse_key_problems(load_plan: LoadPlan) -> None:
    """``strict=True``: any missing, unexpected or mismatched key is an error, raised before reading."""
    problems = {
        "missing": list(load_plan.missing),
        "unexpected": list(load_plan.unexpected),
        "mismatched": [m.describe() for m in load_plan.mismatched],
    }
    if any(problems.values()):
        summary = "; ".join(
            f"{len(v)} {k}: {', '.join(v[:5])}{' …' if len(v) > 5 else ''}" for k, v in problems.items() if v
        )
        raise StrictLoadError(
            f"strict load of {load_plan.model} refused: {summary}",
            hint="Fix the checkpoint or the plan, or load with strict=False to see the full report",
        )


def make_plan(
    checkpoint: Checkpoint,
    spec: PlanSpec,
    world_size: int,
    rank: int,
    *,
    model: str,
    dequantize: bool = False,
    allow_unmatched: bool = False,
    keep: tuple[str, ...] = (),
) -> LoadPlan:
    """Plans the load of ``checkpoint`` for ``rank`` of ``world_size``.

    Args:
        checkpoint: the indexed checkpoint (headers only).
        spec: the architecture's plan.
        world_size: number of tensor-parallel ranks.
        rank: this rank, ``0 <= rank < world_size``.
        model: the model's name for messages.
        dequantize: quantized weights are dequantized on load (the caller asked for a wider dtype):
            each rank reads its slice and the scale blocks (or, :mod:`tp_loader.quant`, the words and
            groups) covering it, and scales and other companions are not loaded.
        allow_unmatched: load a checkpoint even when most of its bytes are tensors the plan does not
            expect (they load replicated); otherwise that is a :class:`PlanError`.
        keep: names of the plan's ``[[skip]]`` entries, or globs of keys, to load instead of skipping: each
            kept key that a rule matches is planned by its rule, as stored; any other loads replicated.

    The plan's keys are first fitted to the checkpoint's prefix (:mod:`tp_loader.prefix`), and only
    the task heads the checkpoint has are expected.

    Returns:
        The :class:`LoadPlan`, tensors in file and byte-offset order.

    Raises:
        ShardingError: a head group cannot be split over ``world_size``, or (without ``dequantize``)
            a shard boundary cuts a block-fp8 weight's scale blocks or a quantized weight's packed
            words, groups or blocks (:func:`tp_loader.quant.refuse_cuts`).
        CheckpointError: the config lacks a value the plan needs.
        PlanError: a plan expression is malformed, or most bytes are unexpected (see ``allow_unmatched``).
    """
    layout = lay_out_keys(checkpoint, spec, dequantize=dequantize, keep=keep)
    return plan_layout(layout, world_size, rank, model=model, allow_unmatched=allow_unmatched)


@dataclass(frozen=True)
class KeyLayout:
    """What planning decides for every rank alike: which stored keys are skipped, expected, quantized or scales,
    and the rule of each. Built once by :func:`lay_out_keys`; :func:`plan_layout` then slices it for one rank (a dry
    run lays the keys out once for all its ranks)."""

    spec: PlanSpec  # with the checkpoint's prefix applied
    dequantize: bool
    groups: tuple[str, ...]
    values: dict
    skipped: tuple[Skipped, ...]
    expected: dict[str, tuple[int, ...]]
    heads: dict[str, Heads]
    stored: dict[str, TensorInfo]
    conversions: tuple[Conversion, ...]
    block: tuple[int, int] | None
    scales: dict[str, str]
    quantized: dict[str, QuantWeight]
    logical: tuple[str, ...]
    companions: frozenset[str]
    rules: dict[str, Rule | None]
    expected_rules: frozenset[Rule | None]  # the rules of the tensors the plan expects
    unused_rules: tuple[str, ...]


def lay_out_keys(
    checkpoint: Checkpoint, spec: PlanSpec, *, dequantize: bool = False, keep: tuple[str, ...] = ()
) -> KeyLayout:
    """The rank-independent half of :func:`make_plan` (no world size, no rank)."""
    _refuse_unconfigured_scales(checkpoint)
    spec = with_prefix(spec, detect_prefix(spec, checkpoint.tensors))
    groups = present_groups(spec, checkpoint.config, checkpoint.tensors)
    try:
        values = config_values(spec, checkpoint.config)
        skipped, kept = _skip(spec, values, checkpoint.tensors, keep)
        if skipped:
            gone = {key for group in skipped for key in group.keys}
            tensors_left = {k: v for k, v in checkpoint.tensors.items() if k not in gone}
            checkpoint = dataclasses.replace(checkpoint, tensors=tensors_left)
        num_layers = _count(spec, spec.layers, "{layer}", values, "number of layers")
        num_experts = _count(spec, spec.experts, "{expert}", values, "number of experts")
        _check_key_budget(spec, num_layers, num_experts, len(checkpoint.tensors), values)
        expected = _expected_shapes(spec, values, num_layers, num_experts, groups)
        expected.update({key: checkpoint.tensors[key].shape for key in kept if spec.match(key) is not None})
        heads = {
            name: Heads(
                name,
                evaluate_size(g.num_heads, values, where=f"number of {name} heads", minimum=1),
                evaluate_size(g.head_dim, values, where=f"{name} head size", minimum=1),
                g.replicate_when_fewer,
            )
            for name, g in spec.heads.items()
        }
        stored, conversions = _convert(
            checkpoint, spec, values, {name: h.head_dim for name, h in heads.items()}, num_layers, num_experts
        )
        block = fp8_block(checkpoint.config)
        quant = quant_format(checkpoint.config)
    except CheckpointError as exc:
        raise CheckpointError(
            exc.message, file=exc.file or str(checkpoint.root / "config.json"), key=exc.key, hint=exc.hint
        ) from None
    scales = _expect_scales(stored, expected, block) if block else {}
    quantized = find_quantized(quant, stored, expected)  # by the key of the quantized values
    logical = [q.key for q in quantized.values()]
    companions = frozenset({c.key for q in quantized.values() for c in q.scheme.companions if c.key != q.primary})
    match = rule_matcher(spec)
    rules = {key: match(key) for key in {**dict.fromkeys(stored), **dict.fromkeys(expected), **dict.fromkeys(logical)}}
    # a rule is in use if it matched a key, or one of the plan's own tensor templates (a tensor a
    # `when` turned off for this config is not a typo), or a key it skips (what keep= would load)
    used = set(rules.values()) | {
        spec.match(t.key.replace("{layer}", "0").replace("{expert}", "0")) for t in spec.tensors
    }
    used |= {match(key) for group in skipped for key in group.keys}
    return KeyLayout(
        spec=spec,
        dequantize=dequantize,
        groups=groups,
        values=values,
        skipped=skipped,
        expected=expected,
        heads=heads,
        stored=stored,
        conversions=tuple(conversions),
        block=block,
        scales=scales,
        quantized=quantized,
        logical=tuple(logical),
        companions=companions,
        rules=rules,
        expected_rules=frozenset(rules[k] for k in (*expected, *logical)),
        unused_rules=tuple(rule.pattern for rule in spec.rules if rule not in used),
    )


def plan_layout(
    layout: KeyLayout, world_size: int, rank: int, *, model: str, allow_unmatched: bool = False
) -> LoadPlan:
    """The per-rank half of :func:`make_plan`: every kept key's slice on ``rank`` of ``world_size``."""
    spec, values, heads, stored, expected = layout.spec, layout.values, layout.heads, layout.stored, layout.expected
    rules, scales, quantized, companions = layout.rules, layout.scales, layout.quantized, layout.companions
    groups, skipped, block, dequantize = layout.groups, layout.skipped, layout.block, layout.dequantize
    head_groups = _check_heads(heads, set(layout.expected_rules), world_size, model)

    tensors: list[TensorPlan] = []
    # keyed by the rule's id, not the rule: a frozen dataclass hashes every field on each lookup, once a key
    pieces: dict[tuple[int, tuple[int, ...]], Slice] = {}
    styles: dict[int, tuple[Heads | None, tuple[Part, ...], StyleFn]] = {}
    quant_notes: dict[str, str] = {}
    cuts: list[tuple[QuantWeight, PieceFor, str]] = []  # stored-form slices must not cut words or groups
    unexpected: list[str] = []
    unmatched: list[str] = []
    mismatched: list[Mismatch] = []
    for key, info in stored.items():
        weight = quantized.get(key)  # a quantized weight is planned as the weight the plan expects
        rule = rules[weight.key if weight else key]
        want = expected.get(key)
        if key in scales or key in companions:
            continue  # placed with its weight, below
        if want is None:
            unexpected.append(key)
            if rule is None:
                unmatched.append(key)
            tensors.append(
                TensorPlan(
                    info,
                    STYLES["replicate"](info.shape, None, world_size, rank),
                    "replicate",
                    rule.pattern if rule else None,
                )
            )
        elif want != info.shape:
            mismatched.append(Mismatch(key, want, info.shape))
        elif rule is None:
            raise PlanError(
                "the plan expects this tensor but no rule gives it a style",
                file=spec.path,
                key=key,
                hint="Widen a rule's pattern to cover every layer",
            )
        else:
            if id(rule) not in styles:  # once per rule: its head group, fused parts and style function
                parts = tuple(
                    Part(evaluate_size(size, values, where=f"part size of {key}"), heads[h] if h else None)
                    for size, h in rule.parts
                )
                styled = partial(stacked, STYLES[rule.style]) if rule.stacked else STYLES[rule.style]
                styles[id(rule)] = (heads[rule.heads] if rule.heads else None, parts, styled)
            group, parts, style = styles[id(rule)]
            shape = weight.shape if weight else info.shape
            try:
                memo = (id(rule), shape)  # a rule's slice depends on the stored shape alone (experts share theirs)
                piece = pieces.get(memo)
                if piece is None:
                    piece = pieces[memo] = style(shape, group, world_size, rank, parts, transposed=rule.transposed)
            except ShardingError as exc:
                raise ShardingError(
                    exc.message, key=weight.key if weight else key, file=info.file, hint=exc.hint
                ) from None
            if weight is None:
                tensors.append(TensorPlan(info, piece, rule.style, rule.pattern))
            else:
                tensors += _place_quantized(weight, stored, piece, rule, dequantize, world_size, quant_notes)
                piece_for = partial(_piece_for, style, shape, group, parts, rule.transposed)
                cuts.append((weight, piece_for, rule.pattern))

    if not dequantize:
        refuse_cuts(cuts, stored, world_size, head_world_sizes(head_groups, limit=MAX_WORLD))
    notes: dict[str, str] = quant_notes
    placed = {t.key for t in tensors} | {t.quant.weight.primary for t in tensors if t.quant}
    mismatched += [  # the stored tensors of a quantized weight whose values are mismatched are not loaded
        Mismatch(c.key, expected[c.key], stored[c.key].shape)
        for primary, q in quantized.items()
        if primary not in placed
        for c in q.scheme.companions
        if c.key != primary and c.key in stored and c.key in expected
    ]
    if scales:
        tensors = _place_scales(tensors, scales, stored, block, dequantize, notes)
        planned = {t.key for t in tensors}  # a scale whose weight is not loaded is not loaded either
        mismatched += [
            Mismatch(s, expected[s], stored[s].shape)
            for s, w in scales.items()
            if w not in planned and s not in planned
        ]
    unused_rules = layout.unused_rules
    ties = _decide_ties(spec, values, tensors, groups)
    covered = {t.target for t in ties if t.stored == "source"} | {t.source for t in ties if t.stored == "target"}
    missing = tuple(k for k in expected if k not in stored and k not in covered)
    notes.update({t.key: t.slice.note for t in tensors if t.slice.note})
    notes.update({t.key: widened for t in tensors if (widened := _widened_note(t))})
    if layout.conversions:
        by_key = {t.key: t for t in tensors}

        def placement(key: str) -> str:
            t = by_key.get(key)
            return (
                "not loaded"
                if t is None
                else f"{t.style} {'Replicate()' if t.slice.dim is None else f'Shard({t.slice.dim})'}"
            )

        conversions = tuple(dataclasses.replace(c, placement=placement(c.target)) for c in layout.conversions)
    else:
        conversions = ()
    if not allow_unmatched:
        _refuse_unmatched(spec, stored, unexpected, model)
    return LoadPlan(
        model,
        spec.name,
        world_size,
        rank,
        tuple(tensors),
        missing,
        tuple(sorted(unexpected)),
        tuple(sorted(unmatched)),
        tuple(mismatched),
        ties,
        notes,
        unused_rules,
        conversions,
        spec.prefix,
        groups,
        spec,
        skipped,
    )


def rule_matcher(spec: PlanSpec) -> Callable[[str], Rule | None]:
    """``spec.match`` with one regex match per distinct key shape (keys with their layer and expert indices
    replaced by 0): DeepSeek-V3's 92k keys have a few dozen shapes. Exact whenever no rule pattern has a digit in
    a segment that also holds a glob or only digits (a pattern naming layer 3 alone): then plain ``spec.match``."""
    segments = [seg for rule in spec.rules for seg in rule.pattern.split(".")]
    if any(any(c.isdigit() for c in seg) and ("*" in seg or seg.isdigit()) for seg in segments):
        return spec.match
    cache: dict[str, Rule | None] = {}

    def match(key: str) -> Rule | None:
        shape = index_shape(key)
        if shape not in cache:
            cache[shape] = spec.match(key)
        return cache[shape]

    return match


def _skip(
    spec: PlanSpec, values: dict, tensors: dict[str, TensorInfo], keep: tuple[str, ...]
) -> tuple[tuple[Skipped, ...], tuple[str, ...]]:
    """The stored keys each ``[[skip]]`` entry of the plan skips, and the ones ``keep`` keeps instead.

    Raises:
        ArgumentError: a ``keep`` entry names no skip entry of the plan and matches no skipped key.
    """
    entries = [
        entry
        for entry in spec.skip
        if entry.when is None or evaluate(entry.when, values, where=f"when of [[skip]] {entry.name!r}")
    ]
    found: dict[str, list[str]] = {entry.name: [] for entry in entries}
    if entries:
        matchers = []
        for entry in entries:
            start = None
            if entry.from_layer is not None:
                start = evaluate_size(entry.from_layer, values, where=f"from_layer of [[skip]] {entry.name!r}")
            matchers.append((entry.name, entry.regex(), start))
        for key in tensors:
            for name, regex, start in matchers:
                hit = regex.fullmatch(key)
                if hit and (start is None or int(hit.group("layer")) >= start):
                    found[name].append(key)
                    break
    names = {entry.name for entry in spec.skip}
    globs = [re.compile(glob_to_regex(k)) for k in keep if k not in names]
    kept = [key for name, keys in found.items() for key in keys if name in keep or any(g.fullmatch(key) for g in globs)]
    unused = [k for k, g in zip([k for k in keep if k not in names], globs) if not any(g.fullmatch(x) for x in kept)]
    if unused:
        raise ArgumentError(
            f"keep={unused[0]!r} names no [[skip]] entry of plan {spec.name!r} ({', '.join(sorted(names)) or 'none'}) "
            "and matches no key it skips",
            key="keep",
            hint="Pass the name of a skip entry (the report lists them under 'skipped') or a glob of skipped keys",
        )
    kept_set = set(kept)
    reasons = {entry.name: entry.reason for entry in entries}
    skipped = tuple(
        Skipped(name, reasons[name], tuple(ks), sum(tensors[k].nbytes for k in ks))
        for name, keys in found.items()
        if (ks := [k for k in keys if k not in kept_set])
    )
    return skipped, tuple(kept)


def _count(spec: PlanSpec, expression: str, placeholder: str, values: dict, where: str) -> int:
    """What ``placeholder`` ranges over; the config is asked only when some key of the plan has it."""
    keys = (*(t.key for t in spec.tensors), *(k for c in spec.converters for k in (*c.sources, *c.targets)))
    return (
        evaluate_size(expression, values, where=where, maximum=MAX_LAYERS)
        if any(placeholder in key for key in keys)
        else 0
    )


#: The most keys a plan may expect or convert, as a multiple of the stored keys, plus slack: a config
#: whose layer and expert counts multiply past it cannot describe the checkpoint at hand.
KEY_BUDGET_FACTOR = 4
KEY_BUDGET_SLACK = 10_000


def _check_key_budget(spec: PlanSpec, num_layers: int, num_experts: int, num_stored: int, values: dict) -> None:
    """Refuses, before expanding any template, a config that would make the plan name more keys than
    the budget (layers x experts of a few thousand each is 10^7 keys or more, minutes and gigabytes)."""
    templates = [(t.key, _layers_of(t, values, num_layers)) for t in spec.tensors] + [
        (k, num_layers) for c in spec.converters for k in (*c.sources, *c.targets)
    ]
    planned = sum(
        (layers if "{layer}" in key else 1) * (num_experts if "{expert}" in key else 1) for key, layers in templates
    )
    budget = KEY_BUDGET_FACTOR * num_stored + KEY_BUDGET_SLACK
    if planned > budget:
        raise CheckpointError(
            f"config gives {num_layers} layers ({spec.layers}) and {num_experts} experts ({spec.experts}): plan "
            f"{spec.name!r} would name {planned} keys, more than {budget} for a checkpoint of {num_stored} tensors",
            key=spec.layers if num_experts <= 1 else spec.experts,
            hint="Fix these counts in config.json: they cannot describe this checkpoint",
        )


def _convert(
    checkpoint: Checkpoint, spec: PlanSpec, values: dict, head_dims: dict[str, int], num_layers: int, num_experts: int
) -> tuple[dict[str, TensorInfo], tuple[Conversion, ...]]:
    """The stored tensors in the plan's target layout (unchanged when the plan has no converters)."""
    if not spec.converters:
        return checkpoint.tensors, ()
    sizes = {
        expr: evaluate_size(expr, values, where=f"converter size {expr}")
        for conv in spec.converters
        for expr in conv.sizes
    }
    return apply_converters(checkpoint.tensors, spec.converters, sizes, head_dims, num_layers, num_experts)


def _layers_of(tensor: ExpectedTensor, values: dict, num_layers: int) -> int:
    """What ``{layer}`` ranges over in ``tensor``'s key: its own ``layers`` (a vision tower's blocks), else
    the plan's."""
    if tensor.layers is None or "{layer}" not in tensor.key:
        return num_layers
    return evaluate_size(tensor.layers, values, where=f"number of layers of {tensor.key}", maximum=MAX_LAYERS)


def _expected_shapes(
    spec: PlanSpec, values: dict, num_layers: int, num_experts: int, groups: tuple[str, ...]
) -> dict[str, tuple[int, ...]]:
    """Every tensor the config implies (those of a group only when the checkpoint has the group); a
    ``when`` is evaluated per layer, with ``layer`` set."""
    expected: dict[str, tuple[int, ...]] = {}
    for tensor in spec.tensors:
        if tensor.group is not None and tensor.group not in groups:
            continue
        shape = tuple(evaluate_size(d, values, where=f"shape of {tensor.key}") for d in tensor.shape)
        for layer in range(_layers_of(tensor, values, num_layers)) if "{layer}" in tensor.key else [None]:
            scope = values if layer is None else {**values, "layer": layer}
            if tensor.when is not None and not evaluate(tensor.when, scope, where=f"when of {tensor.key}"):
                continue
            for key, _ in expand(tensor.key, num_layers, num_experts, {} if layer is None else {"layer": layer}):
                expected[key] = shape
    return expected


def _check_heads(heads: dict[str, Heads], rules: set[Rule | None], world_size: int, model: str) -> list[Heads]:
    """Fails before any I/O when a head group that expected tensors use cannot be split over ``world_size``;
    returns the head groups in use."""
    names = {r.heads for r in rules if r is not None and r.heads} | {
        h for r in rules if r is not None for _, h in r.parts if h
    }
    groups = [heads[name] for name in sorted(names)]
    if not groups or world_size in head_world_sizes(groups, limit=world_size):
        return groups
    counts = ", ".join(f"{g.num_heads} {g.name} heads" for g in groups)
    working = head_world_sizes(groups, limit=max(64, world_size))
    raise ShardingError(
        f"model {model} ({counts}) cannot be sharded over {world_size} ranks",
        hint=f"World sizes that work: {', '.join(map(str, working))}",
    )


def _decide_ties(
    spec: PlanSpec, values: dict, tensors: list[TensorPlan], groups: tuple[str, ...]
) -> tuple[TieDecision, ...]:
    """Each tie that holds for this config and whose sides belong to groups the checkpoint has."""
    by_key = {t.key: t for t in tensors}
    absent = {t.key for t in spec.tensors if t.group is not None and t.group not in groups}
    decisions = []
    for tie in spec.ties:
        if tie.source in absent or tie.target in absent:
            continue
        if not evaluate(tie.when, values, where=f"tie {tie.source} -> {tie.target}"):
            continue
        has_source, has_target = tie.source in by_key, tie.target in by_key
        stored = {(True, True): "both", (True, False): "source", (False, True): "target", (False, False): "neither"}[
            (has_source, has_target)
        ]
        decisions.append(TieDecision(tie.source, tie.target, stored))
    return tuple(decisions)


#: Above this share of a checkpoint's bytes in tensors the plan does not expect, a load is refused.
UNMATCHED_LIMIT = 0.5


def _refuse_unmatched(spec: PlanSpec, stored: dict[str, TensorInfo], unexpected: list[str], model: str) -> None:
    """Refuses a checkpoint most of whose bytes the plan does not expect: it would load replicated on
    every rank, which is a wrong plan, a wrong ``model_type`` or keys the plan cannot fit, not a load."""
    total = sum(info.nbytes for info in stored.values())
    extra = sum(stored[key].nbytes for key in unexpected)
    if not unexpected or extra <= UNMATCHED_LIMIT * total:
        return
    sample = sorted(unexpected, key=lambda k: -stored[k].nbytes)[:3]
    plan_keys = [t.key for t in spec.tensors if t.group is None]
    like = plan_keys[0].replace("{layer}", "0").replace("{expert}", "0") if plan_keys else "none"
    roots = sorted({k.split(".", 1)[0] + "." for k in unexpected})
    if spec.prefix and not any(k.startswith(spec.prefix) for k in unexpected):
        cause = f"keys have no '{spec.prefix}' prefix (they start with {', '.join(repr(r) for r in roots[:4])})"
    else:
        cause = f"keys do not have the names plan {spec.name!r} expects (such as {like!r})"
    raise PlanError(
        f"{100 * extra / total:.0f}% of the bytes of {model} are in {len(unexpected)} of {len(stored)} tensors that "
        f"plan {spec.name!r} does not expect (largest: {', '.join(sample)}): {cause}",
        file=model,
        key=sample[0],
        hint="Pass the plan that fits this checkpoint (plan=NAME or a .toml path), fix config.json's model_type, "
        "or pass allow_unmatched=True (--allow-unmatched) to load them replicated on every rank",
    )


def _widened_note(item: TensorPlan) -> str | None:
    """A remark when a converter target's slice cannot be read exactly (a rotary permutation whose
    shard cuts a head): the whole heads it touches are read, permuted, then trimmed."""
    if not item.info.segments or item.slice.dim != 0:
        return None
    widened = [r for r in segment_reads(item.info, item.slice) if r.trim is not None]
    return (
        f"shard cuts rotary heads: read {len(widened)} run(s) widened to whole heads, permuted, then trimmed"
        if widened
        else None
    )


SCALE_SUFFIX = "_scale_inv"
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def fp8_block(config: dict) -> tuple[int, int] | None:
    """The block size of a block-fp8 checkpoint (``quantization_config`` with ``quant_method = "fp8"``
    and ``weight_block_size``, as DeepSeek-V3 and the Qwen3 FP8 models), or ``None``.

    Raises:
        CheckpointError: the block size is not two positive integers.
    """
    quant = config.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "fp8" or quant.get("weight_block_size") is None:
        return None
    block = quant["weight_block_size"]
    if not (
        isinstance(block, list)
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise CheckpointError(
            f"quantization_config.weight_block_size = {block!r} is not two positive integers",
            key="quantization_config",
            hint="Fix config.json",
        )
    return block[0], block[1]


#: The scale companions of an fp8 weight ``X``: block scales (``X_scale_inv``), per-tensor or per-channel ones.
_SCALE_SUFFIXES = (SCALE_SUFFIX, "_scale")


def _refuse_unconfigured_scales(checkpoint: Checkpoint) -> None:
    """fp8 weights stored beside their scales with no ``quantization_config``: without it the scales are
    unexpected keys and the weights load as stored, each off by its scale. That is never what the checkpoint
    means, so it is refused (strict or not) instead of loaded."""
    if isinstance(checkpoint.config.get("quantization_config"), dict):
        return
    tensors = checkpoint.tensors
    pairs = sorted(
        (key[: -len(suffix)], key)
        for key in tensors
        for suffix in _SCALE_SUFFIXES
        if key.endswith(suffix) and (weight := tensors.get(key[: -len(suffix)])) is not None and weight.dtype in FP8
    )
    if not pairs:
        return
    weight, scale = pairs[0]
    more = ", ..." if len(pairs) > 1 else ""
    example = ""
    if scale.endswith(SCALE_SUFFIX) and len(tensors[weight].shape) == 2 and len(tensors[scale].shape) == 2:
        block = [-(-size // max(1, num)) for size, num in zip(tensors[weight].shape, tensors[scale].shape)]
        example = f' (blocks of {weight!r}: {{"quant_method": "fp8", "weight_block_size": {block}}})'
    raise CheckpointError(
        f"{len(pairs)} fp8 tensors are stored with scales ({weight!r} beside {scale!r}{more}), but config.json has "
        "no quantization_config: loaded as stored, each weight would be off by its scale",
        file=str(checkpoint.root / "config.json"),
        key=scale,
        hint=f"Add the quantization_config the checkpoint was saved with to config.json{example}; tp_loader then "
        "keeps the fp8 weights with their scales, or dequantizes them with dtype=torch.bfloat16",
    )


def _expect_scales(
    stored: dict[str, TensorInfo], expected: dict[str, tuple[int, ...]], block: tuple[int, int]
) -> dict[str, str]:
    """Scale key → weight key for every expected 2-D weight stored as fp8 (its scale is then expected,
    one entry per block) or stored with a scale; adds the scales' shapes to ``expected``."""
    scales = {}
    for weight, shape in list(expected.items()):
        scale = weight + SCALE_SUFFIX
        info = stored.get(weight)
        if (
            len(shape) == 2
            and weight.endswith(".weight")
            and (scale in stored or (info is not None and info.dtype in FP8))
        ):
            expected[scale] = tuple(-(-d // b) for d, b in zip(shape, block))
            if scale in stored:
                scales[scale] = weight
    return scales


def _place_scales(
    tensors: list[TensorPlan],
    scales: dict[str, str],
    stored: dict[str, TensorInfo],
    block: tuple[int, int],
    dequantize: bool,
    notes: dict[str, str],
) -> list[TensorPlan]:
    """Each scale sharded in step with its weight (right after it), or, when dequantizing, read with
    the weight as the blocks covering its slice."""
    weights = {weight: scale for scale, weight in scales.items()}
    out: list[TensorPlan] = []
    pieces: dict[tuple[int, tuple[int, ...], tuple[int, ...]], Slice] = {}  # by the slice's id, as in plan_layout
    blocks: dict[tuple[int, ...], tuple[int, ...]] = {}  # a weight shape → its shape in blocks
    for item in tensors:
        scale_key = weights.get(item.key)
        if scale_key is None:
            if (
                dequantize
                and item.info.dtype in FP8
                and len(item.info.shape) == 2
                and item.key.endswith(".weight")
                and item.key + SCALE_SUFFIX not in stored
            ):
                raise CheckpointError(
                    "block-fp8 weight has no stored scale, so it cannot be dequantized",
                    file=item.info.file,
                    key=item.key,
                    hint=f"The checkpoint lacks {item.key + SCALE_SUFFIX}: re-download it, "
                    "or load without dtype to keep fp8",
                )
            out.append(item)
            continue
        scale = stored[scale_key]
        want = blocks.get(item.info.shape)
        if want is None:
            want = blocks[item.info.shape] = tuple(-(-d // b) for d, b in zip(item.info.shape, block))
        if scale.shape != want:
            raise CheckpointError(
                f"scale has shape {list(scale.shape)}, but the weight {list(item.info.shape)} "
                f"in {block[0]}x{block[1]} blocks needs {list(want)}",
                file=scale.file,
                key=scale_key,
                hint="The checkpoint's scales do not match its weights or config.json's weight_block_size",
            )
        if dequantize and item.info.dtype in FP8:
            covering = block_slice(item.slice, item.info.shape, scale.shape, block, covering=True)
            out.append(dataclasses.replace(item, scale=TensorPlan(scale, covering, "scale", None), block=block))
            stored_as = str(item.info.dtype).removeprefix("torch.")
            notes[item.key] = f"dequantized on load from {stored_as} with {scale_key} ({block[0]}x{block[1]} blocks)"
            continue
        memo = (id(item.slice), item.info.shape, scale.shape)
        piece = pieces.get(memo)
        if piece is None:
            try:
                piece = pieces[memo] = block_slice(item.slice, item.info.shape, scale.shape, block)
            except ShardingError as exc:
                raise ShardingError(exc.message, file=item.info.file, key=item.key, hint=exc.hint) from None
        out += [item, TensorPlan(scale, piece, f"{item.style} scale", item.rule)]
    return out


def _place_quantized(
    weight: QuantWeight,
    stored: dict[str, TensorInfo],
    piece: Slice,
    rule: Rule,
    dequantize: bool,
    world_size: int,
    notes: dict[str, str],
) -> list[TensorPlan]:
    """A quantized weight's stored tensors sharded in step with its slice (style ``colwise qzeros``...),
    or, when dequantizing, one plan of the weight as the plan expects it (:mod:`tp_loader.quant`)."""
    planned, windows, found = plan_quantized(weight, stored, piece, dequantize=dequantize, world_size=world_size)
    notes.update(found)
    if windows is None:
        return [TensorPlan(info, part, f"{rule.style} {role}", rule.pattern) for info, part, role in planned]
    values = stored[weight.primary]
    info = TensorInfo(weight.key, values.file, torch.float32, weight.shape, values.begin, values.end)
    return [TensorPlan(info, piece, rule.style, rule.pattern, quant=windows)]


def _piece_for(
    style: StyleFn,
    shape: tuple[int, ...],
    heads: Heads | None,
    parts: tuple[Part, ...],
    transposed: bool,
    world_size: int,
    rank: int,
) -> Slice:
    """The style's slice of ``shape`` for any world size and rank (quantized weights check every rank's)."""
    return style(shape, heads, world_size, rank, parts, transposed=transposed)
