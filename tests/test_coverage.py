"""Coverage at a glance (tp_loader/coverage.toml, tp_loader.coverage): every test the table names exists,
every built-in plan has a row, docs/architecture.md holds exactly the rendered table, a small coverage file
renders exactly, and a malformed entry is refused naming it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tp_loader.coverage import read_coverage, render_markdown, render_text
from tp_loader.errors import PlanError
from tp_loader.spec import builtin_plan_paths

ROOT = Path(__file__).parents[1]
BEGIN = "<!-- coverage:begin"
END = "<!-- coverage:end -->"


def _test_functions(path: Path) -> set[str]:
    """The test functions a file defines (at module level or in a class), by name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")
    }


def test_every_test_the_coverage_names_is_a_test_function_of_its_file() -> None:
    coverage = read_coverage()
    named = {test for cell in (*coverage.cells, *coverage.any_plan) for test in cell.tests}
    assert named, "the coverage names no test"
    defined: dict[str, set[str]] = {}
    absent = []
    for test in sorted(named):
        file, function = test.split("::")
        if file not in defined:
            defined[file] = _test_functions(ROOT / file) if (ROOT / file).is_file() else set()
        if function not in defined[file]:
            absent.append(test)
    assert absent == []


def test_every_built_in_plan_has_a_row_of_the_glance_table() -> None:
    lines = render_markdown().splitlines()
    first = lines.index(next(line for line in lines if line.startswith("| plan |")))
    rows = lines[first + 2 : lines.index("", first)]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == sorted(builtin_plan_paths())


def test_the_text_table_names_every_test_of_every_cell() -> None:
    text = render_text()
    coverage = read_coverage()
    for cell in (*coverage.cells, *coverage.any_plan):
        assert all(f"  {test}\n" in text for test in cell.tests), cell


def test_the_architecture_doc_holds_exactly_the_rendered_coverage() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    start = doc.index("\n", doc.index(BEGIN)) + 1
    assert doc[start : doc.index(END)] == render_markdown(), (
        "docs/architecture.md differs from tp_loader/coverage.toml: paste the output of "
        "`python -c 'from tp_loader.coverage import render_markdown; print(render_markdown(), end=\"\")'` "
        "between its coverage markers"
    )


EXAMPLE = """
[[cell]]
plan = "alpha"
format = "fp32"
mode = "ep"
proves = ["shards"]
tests = ["tests/test_a.py::test_experts"]

[[cell]]
plan = "beta"
format = "bf16"
mode = "tp"
proves = ["forward"]
tests = ["tests/test_b.py::test_generates", "tests/test_c.py::test_forward"]

[[cell]]
plan = "alpha"
format = "fp32"
mode = "tp"
proves = ["forward", "shards"]
tests = ["tests/test_a.py::test_shards"]

[[any_plan]]
format = "gptq"
proves = ["shards"]
tests = ["tests/test_q.py::test_formats"]
"""
PLANS = {"alpha": ("tp", "ep"), "beta": ("tp",), "gamma": ("tp",)}
LEGEND_MARKDOWN = """\
shards: every rank's shard equals the slice the test computes from the stored tensor, bitwise; forward: a
tensor-parallel forward from the shards equals the single-process forward (transformers' or the test's own),
or greedy generation equals transformers'. Mode tp is the plan itself, ep its expert-parallel mode.
"""
ANY_PLAN = """\
Formats proven only on a plan the test writes itself (tp_loader.quant gives every plan these formats, but no
test loads a built-in plan with them):
"""


def test_a_small_coverage_renders_sorted_with_a_no_test_row_as_markdown_and_as_text(tmp_path: Path) -> None:
    """Cells sorted by plan, format and mode (tp first), proofs in shards-forward order; gamma has no cell."""
    path = tmp_path / "coverage.toml"
    path.write_text(EXAMPLE)
    coverage = read_coverage(path, plans=PLANS)
    assert render_markdown(coverage) == LEGEND_MARKDOWN + (
        "\n"
        "| plan | fp32 tp | fp32 ep | bf16 tp |\n"
        "|---|---|---|---|\n"
        "| alpha | shards, forward | shards | - |\n"
        "| beta | - | - | forward |\n"
        "| gamma | - | - | - |\n"
        "\n"
        "| plan | format | mode | proves | tests |\n"
        "|---|---|---|---|---|\n"
        "| alpha | fp32 | tp | shards, forward | `tests/test_a.py::test_shards` |\n"
        "| alpha | fp32 | ep | shards | `tests/test_a.py::test_experts` |\n"
        "| beta | bf16 | tp | forward | `tests/test_b.py::test_generates`<br>`tests/test_c.py::test_forward` |\n"
        "| gamma | - | - | - | no test |\n"
        "\n"
    ) + ANY_PLAN + (
        "\n| format | proves | tests |\n|---|---|---|\n| gptq | shards | `tests/test_q.py::test_formats` |\n"
    )
    assert render_text(coverage) == LEGEND_MARKDOWN + (
        "\n"
        "plan   fp32 tp          fp32 ep  bf16 tp\n"
        "alpha  shards, forward  shards   -\n"
        "beta   -                -        forward\n"
        "gamma  -                -        -\n"
        "\n"
        "plan   format  mode  proves           tests\n"
        "alpha  fp32    tp    shards, forward  tests/test_a.py::test_shards\n"
        "alpha  fp32    ep    shards           tests/test_a.py::test_experts\n"
        "beta   bf16    tp    forward          tests/test_b.py::test_generates\n"
        "                                      tests/test_c.py::test_forward\n"
        "gamma  -       -     -                no test\n"
        "\n"
    ) + ANY_PLAN + ("format  proves  tests\ngptq    shards  tests/test_q.py::test_formats\n")


CELL = 'plan = "llama"\nformat = "fp32"\nmode = "tp"\nproves = ["shards"]\ntests = ["tests/test_a.py::test_b"]\n'


@pytest.mark.parametrize(
    ("text", "message", "key"),
    [
        (
            "[[cell]]\n" + CELL.replace('"llama"', '"llama9"'),
            "cell 0 names plan 'llama9', which is no built-in plan; built-in plans: {plans}",
            "cell[0]",
        ),
        (
            "[[cell]]\n" + CELL.replace('"tp"', '"ep"'),
            "cell 0 names mode 'ep', which plan 'llama' lacks; its modes: tp",
            "cell[0]",
        ),
        (
            "[[cell]]\n" + CELL.replace('"fp32"', '"int3"'),
            "cell 0 names format 'int3'; known formats: fp32, bf16, block-fp8, compressed-tensors fp8, "
            "compressed-tensors int8, compressed-tensors int4, gptq, awq, fp8 per-tensor, fbgemm_fp8, mxfp4",
            "cell[0]",
        ),
        (
            "[[cell]]\n" + CELL.replace('["shards"]', '["shards", "speed"]'),
            "cell 0 proves ['shards', 'speed']; it must list some of shards, forward, once each",
            "cell[0]",
        ),
        (
            "[[cell]]\n" + CELL.replace("::test_b", "::test_b[world2]"),
            "cell 0 has test 'tests/test_a.py::test_b[world2]', not tests/test_FILE.py::test_FUNCTION",
            "cell[0]",
        ),
        (
            "[[cell]]\n" + CELL + "\n[[cell]]\n" + CELL.replace("test_b", "test_c"),
            "cell 1 repeats plan 'llama', format 'fp32', mode 'tp'",
            "cell[1]",
        ),
        ("[[cell]]\n" + CELL.replace("proves", "shows"), "cell 0 lacks proves", "cell[0]"),
        (
            '[[any_plan]]\nformat = "gptq"\nmode = "tp"\nproves = ["shards"]\ntests = ["tests/test_a.py::test_b"]\n',
            "any_plan 0 has unknown field 'mode'",
            "any_plan[0]",
        ),
        ("[[cells]]\n" + CELL, "unknown key 'cells' in the coverage file; known: cell, any_plan", None),
    ],
    ids=[
        "unknown-plan",
        "mode-the-plan-lacks",
        "unknown-format",
        "unknown-proof",
        "parametrized-id",
        "repeated",
        "missing-field",
        "unknown-field",
        "unknown-table",
    ],
)
def test_a_malformed_coverage_entry_is_refused_naming_it(tmp_path: Path, text: str, message: str, key: str) -> None:
    path = tmp_path / "coverage.toml"
    path.write_text(text)
    with pytest.raises(PlanError) as caught:
        read_coverage(path)
    assert caught.value.message == message.format(plans=", ".join(sorted(builtin_plan_paths())))
    assert (caught.value.file, caught.value.key) == (str(path), key)


def test_importing_the_coverage_module_imports_no_torch() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import sys, tp_loader.coverage; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (0, "False\n"), done.stderr
