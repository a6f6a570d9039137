"""The fields a plan file may have, as data, and the check that refuses any other.

Takes one plan file's parsed TOML and its text (before ``extends`` merges it over its parent); gives nothing, or a
PlanError naming the file, the line, the field and the closest valid name. A misspelt optional field would
otherwise be ignored: ``haeds = "kv"`` on a rule shards a GQA projection without its head groups, and
``transposed = "false"`` (a string) would read as true. Field values are left to the plan's builder, except the
booleans (a string or a number there is refused) and a rule's style (checked against the known styles here too,
so that its line is named).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

from .errors import PlanError
from .styles import STYLES

#: Every top-level field (docs/plan-format.md); ``[defaults]`` holds config names, so its keys are free.
TOP = frozenset(
    {
        "name",
        "description",
        "extends",
        "model_types",
        "architectures",
        "layers",
        "experts",
        "prefix",
        "defaults",
        "heads",
        "groups",
        "rules",
        "tensors",
        "ties",
        "converters",
        "modes",
        "drop_rules",
        "drop_tensors",
        "skip",
        "attributes",
        "renames",
        "targets",
        "expert_modules",
    }
)
#: The fields of each entry of an array of tables (``[[rules]]``), and of ``parts`` inside a rule.
ENTRIES = {
    "rules": frozenset({"pattern", "style", "heads", "parts", "transposed", "stacked", "gathered_norm"}),
    "rules.parts": frozenset({"size", "heads"}),
    "tensors": frozenset({"key", "shape", "when", "group", "layers"}),
    "ties": frozenset({"source", "target", "when"}),
    "converters": frozenset(
        {"op", "source", "sources", "target", "targets", "pattern", "replacement", "sizes", "heads", "direction"}
    ),
    "skip": frozenset({"name", "pattern", "reason", "from_layer", "when"}),
    "attributes": frozenset({"module", "name", "value"}),
    "renames": frozenset({"checkpoint", "module"}),
    "targets": frozenset({"key", "parts"}),
    "expert_modules": frozenset({"module", "routing", "index_arg", "weights_arg", "input_arg", "num_experts"}),
}
#: The fields of each named table (``[heads.NAME]``).
NAMED = {
    "heads": frozenset({"num_heads", "head_dim", "replicate_when_fewer"}),
    "groups": frozenset({"architectures"}),
}
#: A mode is merged over its plan: it may hold any top-level field but these.
MODE = (TOP - {"extends", "modes", "name", "model_types", "architectures"}) | {"description"}
#: Fields that must be TOML booleans.
BOOLEANS = frozenset({"transposed", "stacked", "gathered_norm", "replicate_when_fewer"})


def check_plan_fields(data: dict[str, Any], path: Path, text: str) -> None:
    """Refuses any field of ``data`` (one plan file, parsed) that the plan format does not have.

    Raises:
        PlanError: an unknown field, a boolean field that is not a boolean, or an unknown style, with the line of
            the file it is on and the closest valid name.
    """
    _check_table(data, TOP, "the top level", path, text)
    for name, mode in _named(data, "modes", path, text):
        _check_table(mode, MODE, f"[modes.{name}]", path, text)
        _check_parts(mode, f"[modes.{name}]", path, text, prefix=f"modes.{name}.")
    _check_parts(data, "", path, text)


def _check_parts(data: dict[str, Any], within: str, path: Path, text: str, prefix: str = "") -> None:
    for table, fields in NAMED.items():
        for name, entry in _named(data, table, path, text):
            _check_table(entry, fields, f"[{table}.{name}]", path, text)
    for table, fields in ENTRIES.items():
        if "." in table:
            continue
        entries = data.get(table, [])
        if not isinstance(entries, list):
            message = f"{within or 'the top level'}: '{table}' must be an array of tables [[{table}]]"
            raise _error(message, path, text, table, hint="See docs/plan-format.md")
        for i, entry in enumerate(entries):
            where = f"{within} [[{table}]] entry {i + 1}".strip()
            if not isinstance(entry, dict):
                raise _error(f"{where} is not a table", path, text, table, hint="See docs/plan-format.md")
            header = (prefix + table, i)
            _check_table(entry, fields, where, path, text, header)
            if table == "rules":
                _check_rule(entry, where, path, text, header)


def _check_rule(rule: dict[str, Any], where: str, path: Path, text: str, header: tuple[str, int]) -> None:
    style = rule.get("style")
    if isinstance(style, str) and style not in STYLES:
        known = ", ".join(sorted(STYLES))
        message = f"rule {rule.get('pattern')!r} names unknown style {style!r}; known styles: {known}"
        raise _error(message, path, text, style, hint=_closest(style, STYLES), header=header)
    parts = rule.get("parts", [])
    for j, part in enumerate(parts if isinstance(parts, list) else []):
        if isinstance(part, dict):
            _check_table(part, ENTRIES["rules.parts"], f"{where}, part {j + 1}", path, text, header)


def _named(data: dict[str, Any], table: str, path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    tables = data.get(table, {})
    if not isinstance(tables, dict) or not all(isinstance(v, dict) for v in tables.values()):
        raise _error(f"'{table}' must be tables [{table}.NAME]", path, text, table, hint="See docs/plan-format.md")
    return list(tables.items())


def _check_table(
    table: dict[str, Any],
    fields: frozenset[str],
    where: str,
    path: Path,
    text: str,
    header: tuple[str, int] | None = None,
) -> None:
    for field, value in table.items():
        if field not in fields:
            hint = _closest(field, fields)
            raise _error(f"{where}: unknown field {field!r}", path, text, field, hint=hint, header=header)
        if field in BOOLEANS and not isinstance(value, bool):
            message = f"{where}: {field!r} must be true or false, got {value!r}"
            hint = "Write it as a TOML boolean, unquoted: true or false"
            raise _error(message, path, text, field, hint=hint, header=header)


def _closest(wrong: str, valid: Collection[str]) -> str:
    """The hint for a name that is not one of ``valid``: the closest of them, if one is close, and all of them."""
    closest = difflib.get_close_matches(wrong, sorted(valid), n=1, cutoff=0.6)
    suggestion = f"Did you mean {closest[0]!r}? " if closest else ""
    return f"{suggestion}Valid here: {', '.join(sorted(valid))} (docs/plan-format.md)"


def _error(
    message: str, path: Path, text: str, word: str, *, hint: str, header: tuple[str, int] | None = None
) -> PlanError:
    """A PlanError on the line of ``text`` that sets, opens or holds ``word``, searched from the ``header`` (a table
    and the index of its entry) on. Lines are looked for only here, once a plan is refused: a valid plan pays for
    none."""
    line = _line_of(text, word, _header_line(text, *header) if header else 0)
    # no key: the field is named in the message, and an error's key is a checkpoint key everywhere else
    return PlanError(f"line {line}: {message}" if line else message, file=str(path), hint=hint)


def _header_line(text: str, table: str, index: int) -> int:
    """The line of the ``index``-th ``[[table]]`` header (``table`` dotted for a mode's: ``modes.NAME.rules``), or 0
    when the entries are written inline: where the search for that entry's fields starts."""
    header = re.compile(rf"^\s*\[\[\s*{re.escape(table)}\s*\]\]")
    found = [number for number, line in enumerate(text.splitlines(), 1) if header.search(line)]
    return found[index] if index < len(found) else 0


def _line_of(text: str, word: str, after: int = 0) -> int | None:
    """The 1-based number of the first line from line ``after`` on that sets ``word`` (``word =``, quoted or not,
    also inside an inline table) or opens a table of that name, or that holds it as a quoted value (a misspelt
    style); from the top when nothing after ``after`` does."""
    name = re.escape(word)
    patterns = (
        rf"(?:^|[{{,\s])[\"']?{name}[\"']?\s*=",
        rf"^\s*\[\[?\s*(?:[\w\"'.-]+\.)?{name}\s*\]\]?",
        rf"=\s*[\"']{name}[\"']",
    )
    lines = list(enumerate(text.splitlines(), 1))
    for start in (after, 0) if after else (0,):
        for pattern in patterns:
            for number, line in lines:
                if number >= start and re.search(pattern, line):
                    return number
    return None
