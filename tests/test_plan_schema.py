"""A plan file's fields are checked against the plan format: an unknown or misspelt field, a boolean written as a
string, or an unknown style is a PlanError naming the file, the line and the closest valid name, never ignored."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import tp_loader
from tp_loader.spec import builtin_plan_paths, load_spec

GQA_RULES = """extends = "llama"

[[rules]]
pattern = "model.layers.*.self_attn.k_proj.weight"
style = "colwise"
{field} = {value}
"""


def _refusal(tmp_path: Path, text: str, root: Path | None = None) -> tp_loader.PlanError:
    plan = tmp_path / "plan.toml"
    plan.write_text(text)
    with pytest.raises(tp_loader.PlanError) as caught:
        if root is None:
            load_spec(plan)
        else:
            tp_loader.load(root, plan=str(plan), progress=False)
    assert caught.value.file == str(plan)
    return caught.value


def test_a_misspelt_rule_field_is_refused_with_its_line_and_the_closest_field(make_checkpoint, tmp_path) -> None:
    """``haeds`` would otherwise be ignored and the KV projection split without its head groups."""
    root = make_checkpoint()
    error = _refusal(tmp_path, GQA_RULES.format(field="haeds", value='"kv"'), root)
    assert error.message == "line 6: [[rules]] entry 1: unknown field 'haeds'"
    assert error.hint.startswith("Did you mean 'heads'? Valid here: gathered_norm, heads, parts, pattern, stacked,")


def test_the_correctly_spelt_field_loads(make_checkpoint, tmp_path) -> None:
    root = make_checkpoint()
    plan = tmp_path / "plan.toml"
    plan.write_text(GQA_RULES.format(field="heads", value='"kv"'))
    result = tp_loader.load(root, plan=str(plan), progress=False)
    assert "model.layers.0.self_attn.k_proj.weight" in result.state_dict


def test_a_boolean_written_as_a_string_is_refused(tmp_path) -> None:
    """``bool("false")`` is true: a quoted boolean would transpose what it says not to."""
    error = _refusal(tmp_path, GQA_RULES.format(field="transposed", value='"false"'))
    assert error.message == "line 6: [[rules]] entry 1: 'transposed' must be true or false, got 'false'"
    assert error.hint == "Write it as a TOML boolean, unquoted: true or false"


def test_a_misspelt_style_is_refused_with_its_line_and_the_closest_style(tmp_path) -> None:
    error = _refusal(tmp_path, 'extends = "llama"\n\n[[rules]]\npattern = "lm_head.weight"\nstyle = "colwize"\n')
    assert error.message == (
        "line 5: rule 'lm_head.weight' names unknown style 'colwize'; "
        "known styles: colwise, experts, packed, replicate, rowwise, vocab"
    )
    assert error.hint.startswith("Did you mean 'colwise'?")


@pytest.mark.parametrize(
    ("text", "message", "closest"),
    [
        ('extends = "llama"\nprefx = "model."\n', "line 2: the top level: unknown field 'prefx'", "prefix"),
        (
            'extends = "llama"\n[heads.kv]\nnum_heads = "2"\nhead_dims = "4"\n',
            "line 4: [heads.kv]: unknown field 'head_dims'",
            "head_dim",
        ),
        (
            'extends = "llama"\n[[rules]]\npattern = "x"\nstyle = "packed"\nparts = [{ size = "4", head = "kv" }]\n',
            "line 5: [[rules]] entry 1, part 1: unknown field 'head'",
            "heads",
        ),
        (
            'extends = "llama"\n[[tensors]]\nkey = "x"\nshape = ["1"]\nwhen_ = "True"\n',
            "line 5: [[tensors]] entry 1: unknown field 'when_'",
            "when",
        ),
        (
            'extends = "llama"\n[modes.tp]\ndescription = "x"\ndrop_rule = ["lm_head.weight"]\n',
            "line 4: [modes.tp]: unknown field 'drop_rule'",
            "drop_rules",
        ),
        (
            'extends = "llama"\n[modes.tp]\n[[modes.tp.rules]]\npattern = "x"\nstyle = "colwise"\nstackd = true\n',
            "line 6: [modes.tp] [[rules]] entry 1: unknown field 'stackd'",
            "stacked",
        ),
        (
            'extends = "llama"\n[[converters]]\nop = "rename"\npatern = "a"\nreplacement = "b"\n',
            "line 4: [[converters]] entry 1: unknown field 'patern'",
            "pattern",
        ),
    ],
)
def test_a_misspelt_field_anywhere_in_a_plan_is_refused(tmp_path, text: str, message: str, closest: str) -> None:
    error = _refusal(tmp_path, text)
    assert error.message == message
    assert error.hint.startswith(f"Did you mean {closest!r}?")


def test_a_misspelt_field_in_a_parent_plan_names_the_parent_file(tmp_path) -> None:
    parent = tmp_path / "parent.toml"
    parent.write_text('extends = "llama"\n\n[[ties]]\nsource = "a"\ntraget = "b"\n')
    child = tmp_path / "child.toml"
    child.write_text('extends = "parent.toml"\n')
    with pytest.raises(tp_loader.PlanError) as caught:
        load_spec(child)
    assert caught.value.file == str(parent)
    assert re.match(r"line 5: \[\[ties\]\] entry 1: unknown field 'traget'", caught.value.message)


@pytest.mark.parametrize("name", sorted(builtin_plan_paths()))
def test_every_built_in_plan_and_each_of_its_modes_passes_the_check(name: str) -> None:
    spec = load_spec(builtin_plan_paths()[name])
    for mode in spec.modes:
        load_spec(builtin_plan_paths()[name], mode=mode)


def test_the_line_named_is_the_offending_entrys_not_the_first_that_has_the_field(tmp_path) -> None:
    rule = '[[rules]]\npattern = "{}"\nstyle = "colwise"\ntransposed = {}\n'
    text = 'extends = "llama"\n' + rule.format("a", "false") + rule.format("b", "true") + rule.format("c", '"no"')
    error = _refusal(tmp_path, text)
    assert error.message == "line 13: [[rules]] entry 3: 'transposed' must be true or false, got 'no'"
