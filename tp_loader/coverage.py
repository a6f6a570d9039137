"""Coverage at a glance: which tests prove which built-in plan, with which stored format, in which mode.

The data is ``coverage.toml`` beside this module (one ``[[cell]]`` per proven combination of plan, format
and mode, naming its tests). :func:`render_markdown` gives the table in ``docs/architecture.md`` and
:func:`render_text` the one ``tp-loader --list-plans`` prints; built-in plans without a cell show as
"no test". Reading and rendering are pure; the plan files are parsed (and torch imported) only to check
the cells' plans and modes.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import textwrap
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PlanError

#: Stored formats a cell may name, in table order: float checkpoints by dtype, then the quantized formats
#: (docs/architecture.md, "Quantized formats"). A quantized checkpoint keeps its unquantized tensors as stored.
FORMATS = (
    "fp32",
    "bf16",
    "block-fp8",
    "compressed-tensors fp8",
    "compressed-tensors int8",
    "compressed-tensors int4",
    "gptq",
    "awq",
    "fp8 per-tensor",
    "fbgemm_fp8",
    "mxfp4",
)
#: The mode a plan has without ``mode=`` (its own rules); other modes are the plan's ``[modes.*]``.
DEFAULT_MODE = "tp"
#: What a test may prove: each rank's shards bitwise, and a tensor-parallel forward (or generation).
PROVES = ("shards", "forward")
LEGEND = (
    "shards: every rank's shard equals the slice the test computes from the stored tensor, bitwise; "
    "forward: a tensor-parallel forward from the shards equals the single-process forward (transformers' "
    "or the test's own), or greedy generation equals transformers'. Mode tp is the plan itself, ep its "
    "expert-parallel mode."
)
ANY_PLAN_TITLE = (
    "Formats proven only on a plan the test writes itself (tp_loader.quant gives every plan these formats, "
    "but no test loads a built-in plan with them):"
)
NO_TEST = "no test"
#: Width the legend and titles are wrapped to.
WIDTH = 110
_TEST_ID = re.compile(r"tests/test_\w+\.py::test_\w+")
_FIELDS = {
    "cell": ("plan", "format", "mode", "proves", "tests"),
    "any_plan": ("format", "proves", "tests"),
}


@dataclass(frozen=True)
class Cell:
    """A proven combination. ``plan`` and ``mode`` are empty for an ``[[any_plan]]`` entry.

    Attributes:
        plan: a built-in plan's name.
        format: how the checkpoint stores its weights (one of :data:`FORMATS`).
        mode: :data:`DEFAULT_MODE` or one of the plan's modes.
        proves: what the tests assert (of :data:`PROVES`).
        tests: ``tests/FILE.py::FUNCTION`` of each test.
    """

    plan: str
    format: str
    mode: str
    proves: tuple[str, ...]
    tests: tuple[str, ...]


@dataclass(frozen=True)
class Coverage:
    """The cells on built-in plans, the formats proven on a test's own plan, and every built-in plan."""

    cells: tuple[Cell, ...]
    any_plan: tuple[Cell, ...]
    plans: tuple[str, ...]


def coverage_path() -> Path:
    """The ``coverage.toml`` shipped with the package."""
    return Path(str(importlib.resources.files("tp_loader").joinpath("coverage.toml")))


def builtin_plan_modes() -> dict[str, tuple[str, ...]]:
    """Every built-in plan's name → its modes, :data:`DEFAULT_MODE` first (parses the plan files)."""
    from .spec import builtin_plan_paths, load_spec

    return {name: (DEFAULT_MODE, *load_spec(path).modes) for name, path in sorted(builtin_plan_paths().items())}


def read_coverage(
    path: str | os.PathLike[str] | None = None,
    *,
    plans: Mapping[str, Collection[str]] | None = None,
) -> Coverage:
    """Reads and checks a coverage file.

    Args:
        path: the file; ``None`` reads the one shipped with the package.
        plans: plan name → its modes (:data:`DEFAULT_MODE` included); ``None`` takes the built-in plans.

    Returns:
        The cells, sorted by plan, format (in :data:`FORMATS` order) and mode (the default first).

    Raises:
        PlanError: the file is missing or not TOML, or an entry lacks a field, has an unknown one, names an
            unknown plan, format, mode or proof, a malformed test id, or repeats another entry.
    """
    file = Path(path) if path is not None else coverage_path()
    try:
        data = tomllib.loads(file.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PlanError(f"cannot read the coverage file: {exc}", file=str(file), hint="Fix the file") from None
    modes = {name: tuple(m) for name, m in (builtin_plan_modes() if plans is None else plans).items()}
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise PlanError(
            f"unknown key {unknown[0]!r} in the coverage file; known: {', '.join(_FIELDS)}",
            file=str(file),
            hint="Write each proven combination as [[cell]], a format proven on a test's own plan as [[any_plan]]",
        )
    cells = tuple(_cell(entry, "cell", i, modes, file) for i, entry in enumerate(data.get("cell", [])))
    any_plan = tuple(_cell(entry, "any_plan", i, modes, file) for i, entry in enumerate(data.get("any_plan", [])))
    for name, entries in (("cell", cells), ("any_plan", any_plan)):
        seen: set[tuple[str, str, str]] = set()
        for i, cell in enumerate(entries):
            what = (cell.plan, cell.format, cell.mode)
            if what in seen:
                raise PlanError(
                    f"{name} {i} repeats {_describe(cell)}",
                    file=str(file),
                    key=f"{name}[{i}]",
                    hint="List every test of a combination in one entry",
                )
            seen.add(what)
    return Coverage(tuple(sorted(cells, key=_order)), tuple(sorted(any_plan, key=_order)), tuple(sorted(modes)))


def _cell(entry: Any, table: str, index: int, modes: dict[str, tuple[str, ...]], file: Path) -> Cell:
    """One entry, checked field by field."""
    where = f"{table} {index}"

    def fail(message: str, hint: str) -> PlanError:
        return PlanError(f"{where} {message}", file=str(file), key=f"{table}[{index}]", hint=hint)

    fields = _FIELDS[table]
    if not isinstance(entry, dict):
        raise fail("is not a table", f"Write it as [[{table}]] with {', '.join(fields)}")
    missing = [f for f in fields if f not in entry]
    extra = sorted(set(entry) - set(fields))
    if missing or extra:
        problem = f"lacks {', '.join(missing)}" if missing else f"has unknown field {extra[0]!r}"
        raise fail(problem, f"A [[{table}]] entry has exactly: {', '.join(fields)}")
    plan, mode = str(entry.get("plan", "")), str(entry.get("mode", ""))
    fmt, proves, tests = entry["format"], entry["proves"], entry["tests"]
    if table == "cell" and plan not in modes:
        raise fail(
            f"names plan {plan!r}, which is no built-in plan; built-in plans: {', '.join(sorted(modes))}",
            "Name a plan in plans/ by its file name without .toml",
        )
    if fmt not in FORMATS:
        raise fail(f"names format {fmt!r}; known formats: {', '.join(FORMATS)}", "Add a new format to FORMATS first")
    if table == "cell" and mode not in modes[plan]:
        raise fail(
            f"names mode {mode!r}, which plan {plan!r} lacks; its modes: {', '.join(modes[plan])}",
            f"Use {DEFAULT_MODE!r} for the plan itself, or one of its [modes.*]",
        )
    if not isinstance(proves, list) or not proves or len(set(proves)) != len(proves) or set(proves) - set(PROVES):
        raise fail(f"proves {proves!r}; it must list some of {', '.join(PROVES)}, once each", "Fix proves")
    if not isinstance(tests, list) or not tests:
        raise fail(f"has tests {tests!r}, not a list of test ids", "List the tests that prove the combination")
    bad = [t for t in tests if not (isinstance(t, str) and _TEST_ID.fullmatch(t))]
    if bad:
        raise fail(
            f"has test {bad[0]!r}, not tests/test_FILE.py::test_FUNCTION",
            "Name each test by its file and function, without parametrized ids",
        )
    return Cell(plan, str(fmt), mode, tuple(p for p in PROVES if p in proves), tuple(tests))


def _order(cell: Cell) -> tuple[str, int, bool, str]:
    return (cell.plan, FORMATS.index(cell.format), cell.mode != DEFAULT_MODE, cell.mode)


def _describe(cell: Cell) -> str:
    if not cell.plan:
        return f"format {cell.format!r}"
    return f"plan {cell.plan!r}, format {cell.format!r}, mode {cell.mode!r}"


def _by_plan(coverage: Coverage) -> dict[str, list[Cell]]:
    """Every plan (those without a cell too), in name order, with its cells."""
    by_plan: dict[str, list[Cell]] = {name: [] for name in coverage.plans}
    for cell in coverage.cells:
        by_plan.setdefault(cell.plan, []).append(cell)
    return dict(sorted(by_plan.items()))


def _matrix(coverage: Coverage) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """The glance: a row per plan, a column per (format, mode) that some cell has, what the tests prove."""
    columns = sorted({(c.format, c.mode) for c in coverage.cells}, key=lambda fm: _order(Cell("", *fm, (), ())))
    header = ("plan", *(f"{fmt} {mode}" for fmt, mode in columns))
    rows = []
    for name, cells in _by_plan(coverage).items():
        proves = {(c.format, c.mode): ", ".join(c.proves) for c in cells}
        rows.append((name, *(proves.get(column, "-") for column in columns)))
    return header, rows


def _rows(coverage: Coverage) -> list[tuple[str, str, str, str, tuple[str, ...]]]:
    """(plan, format, mode, proves, tests) for every cell, and a "no test" row for each plan without one."""
    rows = []
    for name, cells in _by_plan(coverage).items():
        rows += [(c.plan, c.format, c.mode, ", ".join(c.proves), c.tests) for c in cells]
        if not cells:
            rows.append((name, "-", "-", "-", (NO_TEST,)))
    return rows


def render_markdown(coverage: Coverage | None = None) -> str:
    """The coverage tables in Markdown (``docs/architecture.md``, "Coverage at a glance"): what is proven
    per plan, then the tests of each cell, then the formats proven only on a test's own plan.

    Args:
        coverage: what to render; ``None`` reads the shipped file.

    Raises:
        PlanError: the coverage file does not check (:func:`read_coverage`).
    """
    coverage = read_coverage() if coverage is None else coverage

    def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
            "| " + " | ".join(row) + " |" for row in rows
        ]

    def tests(names: tuple[str, ...]) -> str:
        return "<br>".join(name if name == NO_TEST else f"`{name}`" for name in names)

    lines = [*_wrapped(LEGEND), "", *table(*_matrix(coverage)), ""]
    lines += table(("plan", "format", "mode", "proves", "tests"), [(*r[:4], tests(r[4])) for r in _rows(coverage)])
    if coverage.any_plan:
        rows = [(c.format, ", ".join(c.proves), tests(c.tests)) for c in coverage.any_plan]
        lines += ["", *_wrapped(ANY_PLAN_TITLE), "", *table(("format", "proves", "tests"), rows)]
    return "\n".join(lines) + "\n"


def render_text(coverage: Coverage | None = None) -> str:
    """The coverage tables as aligned plain text (``tp-loader --list-plans``): what is proven per plan,
    then the tests of each cell one a line, then the formats proven only on a test's own plan.

    Args:
        coverage: what to render; ``None`` reads the shipped file.

    Raises:
        PlanError: the coverage file does not check (:func:`read_coverage`).
    """
    coverage = read_coverage() if coverage is None else coverage
    lines = [*_aligned(*_matrix(coverage)), ""]
    lines += _aligned(("plan", "format", "mode", "proves", "tests"), _rows(coverage))
    if coverage.any_plan:
        rows = [(c.format, ", ".join(c.proves), c.tests) for c in coverage.any_plan]
        lines += ["", *_wrapped(ANY_PLAN_TITLE), *_aligned(("format", "proves", "tests"), rows)]
    return "\n".join([*_wrapped(LEGEND), "", *lines]) + "\n"


def _wrapped(text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH)


def _aligned(header: tuple[str, ...], rows: list[tuple[str | tuple[str, ...], ...]]) -> list[str]:
    """Columns padded to their widest line (the last one unpadded); a cell that is a tuple of names takes one
    line each."""
    table = [tuple((cell,) if isinstance(cell, str) else cell for cell in row) for row in [header, *rows]]
    widths = [max(len(line) for row in table for line in row[i]) for i in range(len(header) - 1)] + [0]
    out = []
    for row in table:
        for n in range(max(len(cell) for cell in row)):
            parts = (cell[n] if n < len(cell) else "" for cell in row)
            out.append("  ".join(part.ljust(width) for part, width in zip(parts, widths, strict=True)).rstrip())
    return out
