"""Part of planning: fit a plan's key names to the checkpoint as it was saved.

A plan names keys as a task model stores them (``model.layers.0...``, ``bert.encoder...``). transformers
saves a base model without that prefix (``LlamaModel``: ``layers.0...``; ``BertModel``: ``encoder...``)
and a task model with heads of its own (``lm_head``, ``score``, ``classifier``, ``cls.predictions``).
:func:`detect_prefix` finds the prefix the stored keys use, :func:`with_prefix` rewrites the plan to
it (the result keeps the checkpoint's own key names), and :func:`present_groups` says which of the
plan's task heads the checkpoint has. Pure: keys and config in, no I/O.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections import Counter
from collections.abc import Callable, Iterable

from .convert import ConverterSpec
from .spec import PlanSpec, TieSpec, compile_rules


def _base_templates(spec: PlanSpec) -> list[str]:
    """The plan's key templates under its prefix, without the prefix."""
    keys = [t.key for t in spec.tensors] + [
        k for c in spec.converters if c.op != "rename" for k in (*c.sources, *c.targets)
    ]
    return [k[len(spec.prefix) :] for k in keys if k.startswith(spec.prefix)]


def _template_regex(templates: list[str]) -> re.Pattern[str]:
    parts = [re.escape(t).replace(r"\{layer\}", r"\d+").replace(r"\{expert\}", r"\d+") for t in templates]
    return re.compile("|".join(parts) or r"(?!)")


#: A dotted segment of digits alone: a layer or expert index (after a dot or at the start, before a dot or at the
#: end: two negative lookarounds, which Python's re runs faster than the equivalent alternations; docs/performance.md)
_INDEX = re.compile(r"(?<![^.])\d+(?![^.])")


def index_shape(key: str) -> str:
    """``key`` with each layer and expert index replaced by 0: DeepSeek-V3's 92k keys have a few dozen shapes."""
    return _INDEX.sub("0", key)


#: Prefixes seen most often in stored keys that :func:`detect_prefix` scores, besides the plan's and none.
MAX_CANDIDATES = 8


def detect_prefix(spec: PlanSpec, keys: Iterable[str]) -> str:
    """The prefix under which ``keys`` hold the plan's base-model tensors: the plan's own prefix, none
    (a base model saved alone), or any other that stored keys show (``model.language_model.``).

    Candidates come from stored keys that end in one of the plan's fixed base keys (``norm.weight``,
    ``embeddings.word_embeddings.weight``); the one under which most stored keys are base keys of the
    plan wins, the plan's own prefix on a tie. O(keys x fixed templates).
    """
    if not spec.prefix:
        return ""
    keys = list(keys)
    templates = _base_templates(spec)
    fixed = [t for t in templates if "{" not in t]
    found: Counter[str] = Counter()
    for key in keys:
        for suffix in fixed:
            if key.endswith(suffix) and (len(key) == len(suffix) or key[-len(suffix) - 1] == "."):
                found[key[: -len(suffix)]] += 1
    # the most frequent few only: a header of 10^5 keys each under a prefix of its own stays linear
    candidates = {spec.prefix, ""} | {c for c, _ in found.most_common(MAX_CANDIDATES)}
    regex = _template_regex(templates)
    # a template's indices are \d+, so keys of one index shape all match or all fail: score each shape once
    # (unless a template names an index literally)
    literal = any(seg.isdigit() for t in templates for seg in t.split("."))
    shapes = Counter(keys if literal else map(index_shape, keys))
    scores = {
        c: sum(n for shape, n in shapes.items() if shape.startswith(c) and regex.fullmatch(shape, len(c)))
        for c in candidates
    }
    return max(sorted(candidates), key=lambda c: (scores[c], c == spec.prefix))


def with_prefix(spec: PlanSpec, prefix: str) -> PlanSpec:
    """``spec`` with its own prefix replaced by ``prefix`` in every rule, tensor, tie and converter key."""
    if prefix == spec.prefix:
        return spec

    def fix(key: str) -> str:
        return prefix + key[len(spec.prefix) :] if key.startswith(spec.prefix) else key

    rules = tuple(dataclasses.replace(r, pattern=fix(r.pattern)) for r in spec.rules)
    return dataclasses.replace(
        spec,
        prefix=prefix,
        rules=rules,
        matcher=compile_rules(rules),
        tensors=tuple(dataclasses.replace(t, key=fix(t.key)) for t in spec.tensors),
        ties=tuple(TieSpec(fix(t.source), fix(t.target), t.when) for t in spec.ties),
        converters=tuple(_fix_converter(c, fix) for c in spec.converters),
        attributes=tuple(dataclasses.replace(a, module=fix(a.module + ".").removesuffix(".")) for a in spec.attributes),
        targets=tuple(dataclasses.replace(t, key=fix(t.key), parts=tuple(map(fix, t.parts))) for t in spec.targets),
        expert_modules=tuple(
            dataclasses.replace(e, module=fix(e.module + ".").removesuffix(".")) for e in spec.expert_modules
        ),
        skip=tuple(dataclasses.replace(s, pattern=fix(s.pattern)) for s in spec.skip),
    )


def _fix_converter(conv: ConverterSpec, fix: Callable[[str], str]) -> ConverterSpec:
    if conv.op == "rename":
        return conv
    return dataclasses.replace(conv, sources=tuple(map(fix, conv.sources)), targets=tuple(map(fix, conv.targets)))


def present_groups(spec: PlanSpec, config: dict, keys: Iterable[str]) -> tuple[str, ...]:
    """The plan's groups (task heads, optional modules) this checkpoint has: those whose architecture
    globs match the config's ``architectures``, and those with a tensor of their own stored (a key no
    other group has: a stored ``score.weight`` tells no classification head from another)."""
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list):
        architectures = []
    present = {
        name
        for name, group in spec.groups.items()
        if any(isinstance(a, str) and fnmatch.fnmatchcase(a, g) for a in architectures for g in group.architectures)
    }
    owners: dict[str, set[str]] = {}
    for tensor in spec.tensors:
        if tensor.group is not None:
            owners.setdefault(tensor.key, set()).add(tensor.group)
    by_group: dict[str, list[str]] = {}
    for key, groups in owners.items():
        (group,) = groups if len(groups) == 1 else (None,)
        if group is not None and group not in present:
            by_group.setdefault(group, []).append(key)
    if by_group:
        regexes = {name: _template_regex(templates) for name, templates in by_group.items()}
        for key in keys:
            for name in [n for n, r in regexes.items() if r.fullmatch(key)]:
                present.add(name)
                del regexes[name]
            if not regexes:
                break
    return tuple(sorted(present))
