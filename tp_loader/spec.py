"""Plan files: per-architecture tensor-parallel plans kept as data (TOML) under ``plans/``.

A plan file says only *what*: which style each checkpoint key gets (glob rules), which tensors the
config implies and with which shapes, which attention head groups the styles must respect, and which
keys are tied. How a style becomes slices and placements lives in :mod:`tp_loader.styles`.
See ``docs/plan-format.md`` for the format.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib.resources
import operator
import os
import re
import tomllib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .aliases import with_aliases
from .convert import ConverterSpec, parse_converters
from .errors import CheckpointError, PlanError, TPLoaderError, short_repr
from .resolve import read_regular_file
from .schema import check_plan_fields
from .styles import STYLES


@dataclass(frozen=True)
class Rule:
    """One plan rule: keys matching ``pattern`` are loaded with ``style``. ``parts`` (for ``packed``)
    lists each fused part as ``(size expression, head group or None)``; ``transposed`` marks weights
    stored ``[in, out]`` (GPT-2's Conv1D), so that the style's output and input dims swap; ``stacked``
    marks a stack of such weights along a leading dim (fused experts ``[experts, out, in]``), each
    sharded as the style says; ``gathered_norm`` marks the weight (or bias) of a norm over features
    that a colwise layer before it shards (OLMo 2's ``q_norm``): ``parallelize`` gathers the features
    for the norm's statistic."""

    pattern: str
    style: str
    heads: str | None = None
    parts: tuple[tuple[str, str | None], ...] = ()
    transposed: bool = False
    stacked: bool = False
    gathered_norm: bool = False


@dataclass(frozen=True)
class HeadGroup:
    """Attention heads that a sharded dimension is made of.

    Attributes:
        name: the group's name in the plan (``q``, ``kv``).
        num_heads: expression for the number of heads.
        head_dim: expression for the size of one head.
        replicate_when_fewer: whether ranks may share heads when there are fewer heads than ranks.
    """

    name: str
    num_heads: str
    head_dim: str
    replicate_when_fewer: bool = False


@dataclass(frozen=True)
class ExpectedTensor:
    """A tensor the config implies: ``key`` may contain ``{layer}`` and ``{expert}``; ``shape`` holds
    expressions; ``when`` may use ``layer`` (dense and sparse layers of one model); ``group`` names the
    task head (or optional module) the tensor belongs to, expected only when that group is present;
    ``layers`` is what ``{layer}`` ranges over for this tensor when not the plan's ``layers`` (a vision
    tower's blocks beside the language model's layers)."""

    key: str
    shape: tuple[str, ...]
    when: str | None = None
    group: str | None = None
    layers: str | None = None


@dataclass(frozen=True)
class TensorGroup:
    """A task head or optional module (``lm_head``, a classifier, BERT's pooler): its tensors are
    expected when the config's ``architectures`` match one of ``architectures`` (globs such as
    ``*ForCausalLM``) or when the checkpoint stores any of them."""

    name: str
    architectures: tuple[str, ...]


@dataclass(frozen=True)
class TieSpec:
    """``target`` is the same tensor as ``source`` when ``when`` holds."""

    source: str
    target: str
    when: str


@dataclass(frozen=True)
class SkipSpec:
    """Stored keys no model of the architecture runs (transformers' ``_keys_to_ignore_on_load_unexpected``:
    rotary ``inv_freq`` buffers, DeepSeek-V3's multi-token-prediction layer): never read, never placed, listed in
    the report under ``skipped``. ``load(keep=[name])`` (or a glob of keys) plans them like any other key.

    Attributes:
        name: the handle ``keep=`` names (``mtp``).
        pattern: a key glob; ``{layer}`` in it matches a layer index.
        reason: why no model runs them, for the report.
        from_layer: expression: only keys whose ``{layer}`` is at least this are skipped.
        when: expression over the config: the entry applies only when it holds.
    """

    name: str
    pattern: str
    reason: str
    from_layer: str | None = None
    when: str | None = None

    def regex(self) -> re.Pattern[str]:
        head, sep, tail = self.pattern.partition("{layer}")
        return re.compile(glob_to_regex(head) + (r"(?P<layer>\d+)" + glob_to_regex(tail) if sep else ""))


@dataclass(frozen=True)
class AttributeSpec:
    """A module attribute that :func:`tp_loader.parallelize` sets from the local (per-rank) sizes.

    Attributes:
        module: pattern of the module paths (``*`` one dotted segment, ``**`` any run of them).
        name: the attribute (``num_key_value_groups``).
        value: expression over config names and ``local_heads_<group>`` (this rank's heads of a group).
    """

    module: str
    name: str
    value: str


@dataclass(frozen=True)
class TargetSpec:
    """A module tensor made of checkpoint tensors (transformers 5's fused experts).

    ``parts`` are checkpoint key templates. With ``{expert}`` in them, ``module[e]`` is the parts of
    expert ``e`` concatenated along their dim 0 (``gate_up_proj[e] = cat(w1_e, w3_e)``); a part the
    plan's converters stack (``merge_modulelist``) is used stacked, concatenated along dim 1.
    """

    key: str
    parts: tuple[str, ...]


@dataclass(frozen=True)
class ExpertModuleSpec:
    """A module whose forward runs the routed experts: ``parallelize`` runs it on local shards and sums
    its output over the ranks. Under expert parallelism its argument ``index_arg`` (the routed expert
    ids) is renumbered to this rank's experts, a token routed to another rank's expert gets the local
    expert 0 with weight 0 in argument ``weights_arg`` (so every implementation of the forward adds
    nothing for it), and the attribute ``num_experts`` is set to the local count.

    ``routing = "stacked"`` is for a forward that takes every expert's (router-weighted) copy of the
    tokens, expert-major ``[experts * tokens, hidden]``, in argument ``input_arg`` and returns the same
    layout (Llama 4): under expert parallelism a rank runs its experts' rows, and its output is zero in
    the other experts' rows before the sum."""

    module: str
    index_arg: int
    weights_arg: int
    num_experts: str
    routing: str = "index"
    input_arg: int = 0


@dataclass(frozen=True)
class PlanSpec:
    """A parsed plan file."""

    name: str
    path: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    layers: str
    defaults: dict[str, str]
    heads: dict[str, HeadGroup]
    rules: tuple[Rule, ...]
    tensors: tuple[ExpectedTensor, ...]
    ties: tuple[TieSpec, ...]
    matcher: re.Pattern[str]
    converters: tuple[ConverterSpec, ...] = ()
    experts: str = "0"
    mode: str | None = None
    modes: tuple[str, ...] = ()
    prefix: str = ""
    groups: dict[str, TensorGroup] = dataclasses.field(default_factory=dict)
    attributes: tuple[AttributeSpec, ...] = ()
    targets: tuple[TargetSpec, ...] = ()
    renames: tuple[tuple[str, str], ...] = ()
    expert_modules: tuple[ExpertModuleSpec, ...] = ()
    skip: tuple[SkipSpec, ...] = ()

    def match(self, key: str) -> Rule | None:
        """The first rule whose pattern matches ``key``, or ``None``."""
        found = self.matcher.fullmatch(key)
        return self.rules[int(found.lastgroup[1:])] if found and found.lastgroup else None


def glob_to_regex(pattern: str) -> str:
    """Translates a key glob: ``*`` is one dotted segment (or part of one), ``**`` any run of segments."""
    out = []
    for token in re.split(r"(\*\*|\*)", pattern):
        out.append(".+" if token == "**" else "[^.]+" if token == "*" else re.escape(token))
    return "".join(out)


def compile_rules(rules: tuple[Rule, ...]) -> re.Pattern[str]:
    """Compiles every rule into one alternation; the first listed rule that matches wins."""
    if not rules:
        return re.compile(r"(?!)")
    return re.compile("|".join(f"(?P<r{i}>{glob_to_regex(rule.pattern)})" for i, rule in enumerate(rules)))


def builtin_plan_paths() -> dict[str, Path]:
    """Plan name → file of every plan shipped with the package."""
    root = importlib.resources.files("tp_loader.plans")
    return {Path(entry.name).stem: Path(str(entry)) for entry in root.iterdir() if entry.name.endswith(".toml")}


#: Parsed plans, reused while none of the files each was read from has changed (size and mtime): a
#: load parses its plan (and what it extends) once per process, not once per call.
_SPECS: dict[tuple[str, str | None], tuple[tuple[tuple[str, int, int], ...], PlanSpec]] = {}
_HEADERS: dict[str, tuple[tuple[int, int], tuple[list[str], list[str]]]] = {}


def _stamp(path: Path) -> tuple[int, int]:
    try:
        info = path.stat()
    except OSError:
        return (-1, -1)
    return (info.st_mtime_ns, info.st_size)


def load_spec(path: str | os.PathLike[str], mode: str | None = None) -> PlanSpec:
    """Parses and validates one plan file, with one of its ``[modes.*]`` merged over it.

    Raises:
        PlanError: the file is missing, is not valid TOML, has a malformed or unknown entry, or has no
            such mode.
    """
    key = (os.fspath(path), mode)
    cached = _SPECS.get(key)
    if cached is not None and all(_stamp(Path(name)) == (mtime, size) for name, mtime, size in cached[0]):
        return cached[1]
    read: list[Path] = []
    spec = _load_spec(Path(path), mode, read)
    _SPECS[key] = (tuple((os.fspath(p), *_stamp(p)) for p in read), spec)
    return spec


def _load_spec(path: Path, mode: str | None, read: list[Path]) -> PlanSpec:
    try:
        data = _read_toml(path, seen=(), read=read)
        modes = data.pop("modes", {})
        if mode is not None:
            if mode not in modes:
                known = ", ".join(sorted(modes)) or "none"
                raise PlanError(
                    f"plan {data.get('name', path.stem)!r} has no mode {mode!r}; its modes: {known}",
                    file=str(path),
                    hint="Pass one of the plan's modes, or no mode",
                )
            data = merge_plan_data(data, modes[mode])
        return _build_spec(path, {**data, "mode": mode, "modes": sorted(modes)})
    except PlanError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PlanError(
            f"malformed plan file: {type(exc).__name__}: {exc}",
            file=str(path),
            hint="See docs/plan-format.md for the format",
        ) from None


#: The most bytes a plan file may have: the largest built-in plan is 10 KB. Every plan path (``plan=``, a plan's
#: ``extends``, the path a pre-sharded directory's manifest records) is read through :func:`read_plan_text`.
MAX_PLAN_BYTES = 1024 * 1024
_PLAN_HINT = "Pass a built-in plan name or the path of a .toml plan file"


def read_plan_text(path: Path) -> str:
    """The text of a plan file: a regular file (never a FIFO or a device, which could block or never end) of
    at most :data:`MAX_PLAN_BYTES`, in UTF-8; at most one byte past the cap is read.

    Raises:
        PlanError: the file is missing, not a regular file, larger than the cap, unreadable, or not UTF-8.
    """
    try:
        raw = read_regular_file(
            path, what="plan file", limit=MAX_PLAN_BYTES, limit_text="1 MiB", hint=_PLAN_HINT, error=PlanError
        )
    except FileNotFoundError:
        raise PlanError("plan file does not exist", file=str(path), hint=_PLAN_HINT) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PlanError(
            f"cannot parse plan file: it is not UTF-8 ({exc.reason} at byte {exc.start})",
            file=str(path),
            hint="Save the plan as UTF-8 text",
        ) from None


def _read_toml_file(path: Path) -> dict[str, Any]:
    """One plan file, parsed, with every field checked against the plan format (:mod:`tp_loader.schema`)."""
    text = read_plan_text(path)
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise PlanError(f"cannot parse plan file: {exc}", file=str(path), hint="Fix the TOML syntax") from None
    check_plan_fields(data, path, text)
    return data


def _read_toml(path: Path, seen: tuple[Path, ...], read: list[Path]) -> dict[str, Any]:
    """Reads a plan file, merged over the plan it ``extends`` (a built-in name or a path beside it);
    every file read is appended to ``read``."""
    read.append(path)
    data = _read_toml_file(path)
    parent_name = data.pop("extends", None)
    if parent_name is None:
        return data
    parent_path = builtin_plan_paths().get(parent_name) or path.parent / str(parent_name)
    if parent_path in seen or parent_path == path:
        raise PlanError(
            f"plan extends itself through {parent_name!r}", file=str(path), hint="Break the cycle of 'extends'"
        )
    return merge_plan_data(_read_toml(parent_path, seen + (path,), read), data)


_MERGED = (
    "defaults",
    "heads",
    "groups",
    "rules",
    "tensors",
    "converters",
    "modes",
    "drop_tensors",
    "drop_rules",
    "attributes",
    "targets",
    "renames",
    "expert_modules",
    "skip",
)


def merge_plan_data(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``parent``: scalars and ``ties`` replace, ``defaults``/``heads``/``modes`` merge,
    ``groups`` merge, the child's rules come first (so they win), its converters run after the parent's, and a child's
    tensor entry replaces the parent's with the same key; ``drop_tensors`` and ``drop_rules`` remove
    the parent's entries with those keys and patterns."""
    merged = {
        **parent,
        **{k: v for k, v in child.items() if k not in _MERGED},
    }
    merged["groups"] = {**parent.get("groups", {}), **child.get("groups", {})}
    merged["converters"] = list(parent.get("converters", [])) + list(child.get("converters", []))
    for name in ("attributes", "targets", "renames", "expert_modules", "skip"):
        merged[name] = list(parent.get(name, [])) + list(child.get(name, []))
    merged["modes"] = {**parent.get("modes", {}), **child.get("modes", {})}
    merged["defaults"] = {**parent.get("defaults", {}), **child.get("defaults", {})}
    merged["heads"] = {**parent.get("heads", {}), **child.get("heads", {})}
    merged["rules"] = list(child.get("rules", [])) + [
        r for r in parent.get("rules", []) if r["pattern"] not in child.get("drop_rules", [])
    ]
    # one key may be expected by several groups (``score.weight`` of two classification heads)
    dropped = child.get("drop_tensors", [])
    tensors = {(t["key"], t.get("group")): t for t in parent.get("tensors", []) if t["key"] not in dropped}
    tensors.update({(t["key"], t.get("group")): t for t in child.get("tensors", [])})
    merged["tensors"] = list(tensors.values())
    return merged


def _build_spec(path: Path, data: dict[str, Any]) -> PlanSpec:
    heads = {
        name: HeadGroup(
            name, str(group["num_heads"]), str(group["head_dim"]), bool(group.get("replicate_when_fewer", False))
        )
        for name, group in data.get("heads", {}).items()
    }
    rules = tuple(
        Rule(
            str(r["pattern"]),
            str(r["style"]),
            r.get("heads"),
            tuple((str(p["size"]), p.get("heads")) for p in r.get("parts", [])),
            bool(r.get("transposed", False)),
            bool(r.get("stacked", False)),
            bool(r.get("gathered_norm", False)),
        )
        for r in data.get("rules", [])
    )
    for rule in rules:
        if (rule.style == "packed") != bool(rule.parts):
            raise PlanError(
                f"rule {rule.pattern!r}: style 'packed' needs parts, and only 'packed' takes them",
                file=str(path),
                hint="Give a packed rule parts = [{size = ..., heads = ...}, ...]",
            )
        for _, part_heads in rule.parts:
            if part_heads is not None and part_heads not in heads:
                raise PlanError(
                    f"rule {rule.pattern!r} has a part with head group {part_heads!r}, which [heads] does not define",
                    file=str(path),
                    hint="Define it under [heads]",
                )
        if rule.style not in STYLES:
            raise PlanError(
                f"rule {rule.pattern!r} names unknown style {rule.style!r}; known styles: {', '.join(sorted(STYLES))}",
                file=str(path),
                hint="Use a known style or add one to tp_loader.styles",
            )
        if rule.gathered_norm and rule.style != "colwise":
            raise PlanError(
                f"rule {rule.pattern!r}: gathered_norm needs style 'colwise' (the norm's weight sharded with the "
                f"features it normalizes), not {rule.style!r}",
                file=str(path),
                hint="Give the norm's weight the style and heads of the layer whose output it normalizes",
            )
        if rule.heads is not None and rule.heads not in heads:
            raise PlanError(
                f"rule {rule.pattern!r} names head group {rule.heads!r}, which [heads] does not define",
                file=str(path),
                hint="Define it under [heads]",
            )
    groups = {
        name: TensorGroup(name, tuple(str(a) for a in group.get("architectures", [])))
        for name, group in data.get("groups", {}).items()
    }
    tensors = tuple(
        ExpectedTensor(str(t["key"]), tuple(str(d) for d in t["shape"]), t.get("when"), t.get("group"), t.get("layers"))
        for t in data.get("tensors", [])
    )
    for tensor in tensors:
        if tensor.group is not None and tensor.group not in groups:
            raise PlanError(
                f"tensor {tensor.key!r} names group {tensor.group!r}, which [groups] does not define",
                file=str(path),
                hint="Define it under [groups] with the architectures that have it",
            )
    ties = tuple(TieSpec(str(t["source"]), str(t["target"]), str(t.get("when", "True"))) for t in data.get("ties", []))
    spec = PlanSpec(
        name=str(data.get("name", path.stem)),
        path=str(path),
        model_types=tuple(data.get("model_types", [])),
        architectures=tuple(data.get("architectures", [])),
        layers=str(data.get("layers", "num_hidden_layers")),
        defaults={str(k): str(v) for k, v in data.get("defaults", {}).items()},
        heads=heads,
        rules=rules,
        tensors=tensors,
        ties=ties,
        matcher=compile_rules(rules),
        converters=parse_converters(data.get("converters", []), str(path)),
        experts=str(data.get("experts", "0")),
        mode=data.get("mode"),
        modes=tuple(data.get("modes", ())),
        prefix=str(data.get("prefix", "")),
        attributes=tuple(
            AttributeSpec(str(a["module"]), str(a["name"]), str(a["value"])) for a in data.get("attributes", [])
        ),
        targets=tuple(TargetSpec(str(t["key"]), tuple(map(str, t["parts"]))) for t in data.get("targets", [])),
        renames=tuple((str(r["checkpoint"]), str(r["module"])) for r in data.get("renames", [])),
        expert_modules=tuple(
            ExpertModuleSpec(
                str(e["module"]),
                int(e.get("index_arg", 1)),
                int(e.get("weights_arg", 2)),
                str(e.get("num_experts", "num_experts")),
                str(e.get("routing", "index")),
                int(e.get("input_arg", 0)),
            )
            for e in data.get("expert_modules", [])
        ),
        groups=groups,
        skip=tuple(_skip_spec(path, entry) for entry in data.get("skip", [])),
    )
    for expert_module in spec.expert_modules:
        if expert_module.routing not in ("index", "stacked"):
            raise PlanError(
                f"expert module {expert_module.module!r} has routing {expert_module.routing!r}; "
                "known: 'index' (routed ids and weights), 'stacked' (each expert's tokens stacked)",
                file=str(path),
                hint="Use one of the known routings",
            )
    for conv in spec.converters:
        if conv.heads is not None and conv.heads not in heads:
            raise PlanError(
                f"converter {conv.describe} names head group {conv.heads!r}, which [heads] does not define",
                file=str(path),
                hint="Define it under [heads]",
            )
    for tensor in spec.tensors:
        probe = tensor.key.replace("{layer}", "0").replace("{expert}", "0")
        if spec.match(probe) is None:
            raise PlanError(
                f"expected tensor {tensor.key!r} is matched by no rule",
                file=str(path),
                hint="Add a rule that covers it",
            )
    for tie in spec.ties:
        source, target = spec.match(tie.source), spec.match(tie.target)
        if source is None or target is None or (source.style, source.heads) != (target.style, target.heads):
            raise PlanError(
                f"tied keys {tie.source} and {tie.target} would be placed differently (or not at all)",
                file=str(path),
                key=tie.target,
                hint="Give both sides of a tie rules with the same style, so one tensor can serve both",
            )
    return spec


def _skip_spec(path: Path, entry: Any) -> SkipSpec:
    if not isinstance(entry, dict) or not {"name", "pattern", "reason"} <= entry.keys():
        raise PlanError(
            f"a [[skip]] entry needs name, pattern and reason; got {short_repr(entry)}",
            file=str(path),
            hint='Write [[skip]] name = "mtp" pattern = "model.layers.{layer}.**" reason = "..."',
        )
    unknown = sorted(set(entry) - {"name", "pattern", "reason", "from_layer", "when"})
    if unknown:
        raise PlanError(
            f"[[skip]] entry {entry['name']!r} has unknown fields {unknown}",
            file=str(path),
            hint="A skip entry takes name, pattern, reason, from_layer and when",
        )
    spec = SkipSpec(
        str(entry["name"]),
        str(entry["pattern"]),
        str(entry["reason"]),
        None if entry.get("from_layer") is None else str(entry["from_layer"]),
        None if entry.get("when") is None else str(entry["when"]),
    )
    if spec.from_layer is not None and "{layer}" not in spec.pattern:
        raise PlanError(
            f"[[skip]] entry {spec.name!r} has from_layer but its pattern has no {{layer}}",
            file=str(path),
            hint="Put {layer} where the layer index is in the pattern",
        )
    return spec


def select_spec(
    plan: str | os.PathLike[str],
    config: dict,
    *,
    model: str,
    mode: str | None = None,
    keys: Collection[str] = (),
) -> PlanSpec:
    """Picks the plan: ``"auto"`` (by ``model_type``, then ``architectures``), a built-in name, or a
    path; then merges its ``mode`` (for example ``"ep"``: expert parallelism) over it.

    Args:
        keys: the checkpoint's tensor names; when no plan fits, the error names the plans whose tensor
            names are most like them (with the plans whose model types or architectures are most alike).

    Raises:
        PlanError: no plan fits, or the named plan does not exist.
    """
    text = os.fspath(plan)
    builtin = builtin_plan_paths()
    if text != "auto":
        if text in builtin:
            return load_spec(builtin[text], mode)
        if text.endswith(".toml") or os.sep in text:
            return load_spec(text, mode)
        raise PlanError(
            f"unknown plan {text!r}; built-in plans: {', '.join(sorted(builtin))}",
            file=model,
            hint="Pass a built-in plan name or a path to a .toml plan",
        )
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    named = builtin.get(model_type) if isinstance(model_type, str) else None
    if named is not None and model_type in _plan_header(named)[0]:  # no other plan claims it (a test checks)
        return load_spec(named, mode)
    heads = {name: _plan_header(path) for name, path in sorted(builtin.items())}
    for name, (model_types, _) in heads.items():
        if model_type in model_types:
            return load_spec(builtin[name], mode)
    for name, (_, plan_architectures) in heads.items():
        if any(a in plan_architectures for a in architectures):
            return load_spec(builtin[name], mode)
    by_name = _closest_by_name(model_type, architectures, heads)
    by_keys = (_closest_by_keys(keys, builtin) or "none") if keys else ""
    raise PlanError(
        f"no built-in plan for model_type={model_type!r}, architectures={architectures}; closest plans by "
        f"name: {by_name or 'none'}{f'; by tensor names: {by_keys}' if by_keys else ''}",
        file=model,
        hint="If one of them has this checkpoint's layout, pass plan=NAME (--plan NAME); otherwise write a plan "
        "for it (docs/plan-format.md, 'Write a plan in 15 minutes') and pass its path. Built-in plans: "
        + ", ".join(sorted(builtin)),
    )


#: How many plans an error for an unknown architecture suggests, and how alike a name must be.
CLOSEST_PLANS = 3
CLOSEST_NAME_RATIO = 0.6


def _closest_by_name(model_type: Any, architectures: list, heads: dict[str, tuple[list[str], list[str]]]) -> str:
    """The built-in plans whose model types or architectures are most alike the config's (difflib), an
    architecture compared by its stem (``OlmoForCausalLM`` as ``olmo``: the task suffix says nothing)."""
    wanted = {_stem(n) for n in [model_type, *architectures] if isinstance(n, str) and n}
    scored = []
    for name, (model_types, plan_architectures) in heads.items():
        best = max(
            (
                (difflib.SequenceMatcher(None, a, b).ratio(), b)
                for a in wanted
                for b in map(_stem, [*model_types, *plan_architectures])
            ),
            default=(0.0, ""),
        )
        if best[0] >= CLOSEST_NAME_RATIO:
            scored.append((-best[0], name, best[1]))
    return ", ".join(f"{name} ({stem!r})" for _, name, stem in sorted(scored)[:CLOSEST_PLANS])


def _stem(name: str) -> str:
    """``Olmo2ForCausalLM`` → ``olmo2``, ``gpt_neox`` → ``gptneox``: what names a model family."""
    return re.sub(r"(For[A-Z]\w*|LMHeadModel|Model)$", "", name).replace("_", "").replace("-", "").lower()


def _closest_by_keys(keys: Collection[str], builtin: dict[str, Path]) -> str:
    """The built-in plans whose tensors share most key names with the stored keys (layer and expert
    numbers aside, each plan's prefix dropped), over the names in either: the stored ones and the plan's
    unconditional base-model tensors. Parses every plan, so only for this error."""
    number = re.compile(r"\.\d+(?=\.|$)")
    scored = []
    for name, path in builtin.items():
        spec = load_spec(path)

        def short(key: str, spec: PlanSpec = spec) -> str:
            return re.sub(r"\{(layer|expert)\}", "#", key).removeprefix(spec.prefix)

        required = {short(t.key) for t in spec.tensors if t.group is None and t.when is None}
        known = required | {short(t.key) for t in spec.tensors}
        stored = {number.sub(".#", key).removeprefix(spec.prefix) for key in keys}
        shared, either = len(stored & known), len(stored | required)
        if shared:
            scored.append((-shared / either, name, shared, either))
    return ", ".join(
        f"{name} (shares {shared} of {either} key names)" for _, name, shared, either in sorted(scored)[:CLOSEST_PLANS]
    )


def _plan_header(path: Path) -> tuple[list[str], list[str]]:
    """A plan file's own ``model_types`` and ``architectures`` (what ``auto`` matches on). TOML puts
    top-level keys before any table, so only the text up to the first table header is parsed: ``auto``
    reads every built-in plan, and parsing them whole costs tens of milliseconds per load."""
    stamp = _stamp(path)
    cached = _HEADERS.get(os.fspath(path))
    if cached is not None and cached[0] == stamp:
        return cached[1]
    header = _read_plan_header(path)
    _HEADERS[os.fspath(path)] = (stamp, header)
    return header


def _read_plan_header(path: Path) -> tuple[list[str], list[str]]:
    text = read_plan_text(path)
    found = re.search(r"^\s*\[", text, flags=re.MULTILINE)
    try:
        data = tomllib.loads(text[: found.start()] if found else text)
    except tomllib.TOMLDecodeError:  # the cut fell inside a value (a nested array's line): parse it all
        data = _read_toml_file(path)
    return list(data.get("model_types", [])), list(data.get("architectures", []))


_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}


def evaluate(expression: str, values: dict[str, Any], *, where: str) -> Any:
    """Evaluates a plan expression over config values: names, numbers, ``+ - * // %`` on whole numbers,
    comparisons (``in`` included, for config lists), ``not``/``and``/``or``, ``len(name)`` and a value of
    a config section (``vision_config.hidden_size``). Nothing else (no other calls or attributes).

    Raises:
        CheckpointError: the config lacks a name the expression uses.
        PlanError: the expression is not of the allowed form.
    """
    try:
        tree = _parse(expression)
    except SyntaxError:
        raise PlanError(
            f"bad expression {expression!r} in {where}", hint="Use config names, integers and + - * // %"
        ) from None
    try:
        return _eval(tree.body, values, expression, where)
    except TPLoaderError:
        raise
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as exc:
        used = {n.id: values[n.id] for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id in values}
        used.update(
            {
                f"{n.value.id}.{n.attr}": used[n.value.id].get(n.attr)
                for n in ast.walk(tree)
                if isinstance(n, ast.Attribute) and isinstance(used.get(getattr(n.value, "id", None)), dict)
            }
        )
        shown = ", ".join(
            f"{name}={short_repr(value)}" for name, value in sorted(used.items()) if not isinstance(value, dict)
        )
        raise CheckpointError(
            f"config values {shown} give no valid {where} ({expression}: {exc})", hint="Fix these values in config.json"
        ) from None


@functools.lru_cache(maxsize=4096)
def _parse(expression: str) -> ast.Expression:
    return ast.parse(expression, mode="eval")


def evaluate_size(
    expression: str, values: dict[str, Any], *, where: str, minimum: int = 0, maximum: int = 2**48
) -> int:
    """Evaluates an expression that must be a whole number in ``[minimum, maximum]`` (a size or a count).

    Raises:
        CheckpointError: the config gives anything else.
    """
    value = evaluate(expression, values, where=where)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise CheckpointError(
            f"config gives {where} = {short_repr(value)} ({expression}), not a whole number in [{minimum}, {maximum}]",
            hint="Fix config.json",
        )
    return value


def _eval(node: ast.AST, values: dict[str, Any], expression: str, where: str) -> Any:
    if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, (int, float, bool, str))
        or isinstance(node, ast.Constant)
        and node.value is None
    ):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_eval(e, values, expression, where) for e in node.elts]
    if isinstance(node, ast.Name):
        if node.id in ("True", "False", "None"):
            return {"True": True, "False": False, "None": None}[node.id]
        if node.id not in values:
            raise CheckpointError(
                f"config.json has no {node.id!r}, which the plan needs for {where}",
                key=node.id,
                hint=f"Add {node.id} to config.json",
            )
        return values[node.id]
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):  # a config section's value
        section = _eval(node.value, values, expression, where)
        if not isinstance(section, dict) or section.get(node.attr) is None:
            name = f"{node.value.id}.{node.attr}"
            raise CheckpointError(
                f"config.json has no {name!r}, which the plan needs for {where}",
                key=name,
                hint=f"Add {node.attr} to {node.value.id} in config.json",
            )
        return section[node.attr]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left, values, expression, where), _eval(node.right, values, expression, where)
        for operand in (left, right):  # never str * int: a config string must not become a huge string
            if isinstance(operand, bool) or not isinstance(operand, int):
                raise TypeError(f"arithmetic needs whole numbers, got {short_repr(operand)}")
        return _BINARY[type(node.op)](left, right)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "len"
        and len(node.args) == 1
        and not node.keywords
    ):
        return len(_eval(node.args[0], values, expression, where))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return not _eval(node.operand, values, expression, where)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand, values, expression, where)
    if isinstance(node, ast.BoolOp):
        results = (_eval(v, values, expression, where) for v in node.values)
        return all(results) if isinstance(node.op, ast.And) else any(results)
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE:
        return _COMPARE[type(node.ops[0])](
            _eval(node.left, values, expression, where), _eval(node.comparators[0], values, expression, where)
        )
    raise PlanError(
        f"expression {expression!r} in {where} uses an unsupported construct",
        hint="Use config names, integers, + - * // %, comparisons, not/and/or, len(name)",
    )


def config_values(spec: PlanSpec, config: dict) -> dict[str, Any]:
    """The config's values, then names the config lacks (or sets to null) filled in: first from their
    aliases (:data:`tp_loader.aliases.CONFIG_ALIASES`: ``num_local_experts`` for ``num_experts``, ``n_embd``
    for ``hidden_size``, ...), then from the plan's defaults, which may use each other in any order. A
    default named ``section.name`` fills a value that a config section lacks (``text_config.head_dim``:
    configs omit values equal to their class's defaults). A default that needs a name the config lacks
    is left out, so that only an expression that uses it fails, naming that name."""
    values = with_aliases({k: v for k, v in config.items() if v is not None})
    pending, progress = dict(spec.defaults), True
    while pending and progress:  # defaults may use each other in any order (a child's come after its parent's)
        progress = False
        for name, expression in list(pending.items()):
            section, _, leaf = name.rpartition(".")  # "text_config.head_dim": a value the section lacks
            holder = values.get(section) if section else values
            if isinstance(holder, dict) and holder.get(leaf) is None:
                try:
                    value = evaluate(expression, values, where=f"default {name}")
                except CheckpointError as exc:
                    if exc.key is None:
                        raise
                    continue
                values.update({section: {**holder, leaf: value}} if section else {name: value})
            del pending[name]
            progress = True
    return values
