"""Mutation check: plant one small bug at a time in a scratch copy of tp_loader and run the tests that
must catch it.

    python -m benchmarks.mutants                    # every mutant; prints a Markdown table
    python -m benchmarks.mutants --only tie-target-branch-dropped --workers 1
    python -m benchmarks.mutants --list

The working tree is never touched: ``tp_loader/``, ``plans/`` (as ``tp_loader/plans``, where the
installed package has them), ``tests/`` and ``pyproject.toml`` are copied to a temporary directory,
each mutant is one exact ``old -> new`` string replacement there (``old`` must occur exactly once),
and pytest runs in that copy with ``PYTHONPATH`` set to it first (the copy's ``tp_loader`` is checked
to be the one imported, ahead of the editable install) and no bytecode written (a mutant restored
within the same second must not leave a stale ``.pyc`` behind). The unmutated copy must pass every
named test first. A mutant is killed when at least one of its tests fails; the table says which.
tests/mutants.md lists the mutants and their results.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

LD = "tests/test_load_distributed.py"
PLAN = "tests/test_plan.py"
DS = "tests/test_deepseek.py"
READ = "tests/test_read_paths.py"

#: Short label → the test (every parametrization of it) it stands for.
TESTS = {
    "tie-load": f"{LD}::test_tie_whose_target_alone_is_stored_maps_the_source_to_the_targets_shard_on_every_rank",
    "tie-plan": f"{PLAN}::test_tie_whose_target_alone_is_stored_covers_the_source_and_shards_the_target",
    "strict-load": f"{LD}::test_strict_load_with_only_an_unexpected_key_is_refused_on_every_rank_before_reading",
    "strict-plan": f"{PLAN}::test_strict_plan_refuses_each_kind_of_key_problem_on_its_own",
    "fp8-in-step": f"{DS}::test_non_square_fp8_blocks_with_partial_edges_are_sharded_in_step_with_their_weights",
    "fp8-dequant": f"{DS}::test_non_square_fp8_blocks_cut_by_shards_dequantize_to_slices_of_the_whole_dequantization",
    "fp8-cut": f"{DS}::test_shard_that_cuts_a_non_square_fp8_block_is_refused_on_every_rank",
    "fp8-mismatch": f"{DS}::test_scale_of_a_mismatched_weight_is_reported_with_the_shape_its_non_square_blocks_imply",
    "fp8-zero-copy": f"{DS}::test_zero_copy_never_counts_a_dequantized_weight_as_a_view",
    "tiling": f"{PLAN}::test_every_world_size_1_to_9_plans_slices_that_tile_each_tensor_exactly",
    "readers": f"{READ}::test_every_reader_returns_the_torch_chunk_slices_of_get_tensor",
    "readers-load": f"{READ}::test_every_reader_loads_the_torch_chunk_slices_of_get_tensor_at_world_size_2",
    "placed": f"{LD}::test_placed_dtensors_carry_the_placement_shape_and_stride_the_plan_implies",
}


@dataclass(frozen=True)
class Mutant:
    """One planted bug: ``old`` replaced by ``new`` in ``file``, and the tests (labels of ``TESTS``) that
    must catch it."""

    name: str
    file: str
    old: str
    new: str
    what: str
    tests: tuple[str, ...]


MUTANTS = (
    # (a) a tie whose target alone is stored
    Mutant(
        "tie-target-branch-dropped",
        "tp_loader/tie.py",
        'elif tie.stored == "target":\n            state_dict[tie.source] = state_dict[tie.target]',
        'elif tie.stored == "target":\n            pass',
        "apply_ties never maps the source when only the target is stored",
        ("tie-load",),
    ),
    Mutant(
        "tie-target-not-covered",
        "tp_loader/plan.py",
        '{t.target for t in ties if t.stored == "source"} | {t.source for t in ties if t.stored == "target"}',
        '{t.target for t in ties if t.stored == "source"}',
        "make_plan reports the source of a target-only tie missing",
        ("tie-plan", "tie-load"),
    ),
    Mutant(
        "tie-target-decided-neither",
        "tp_loader/plan.py",
        '(False, True): "target"',
        '(False, True): "neither"',
        '_decide_ties calls a target-only tie "neither"',
        ("tie-plan", "tie-load"),
    ),
    # (b) strict
    Mutant(
        "strict-ignores-unexpected",
        "tp_loader/plan.py",
        '"unexpected": list(load_plan.unexpected),',
        '"unexpected": [],',
        "refuse_key_problems lets unexpected keys through",
        ("strict-plan", "strict-load"),
    ),
    Mutant(
        "strict-ignores-missing",
        "tp_loader/plan.py",
        '"missing": list(load_plan.missing),',
        '"missing": [],',
        "refuse_key_problems lets missing keys through",
        ("strict-plan",),
    ),
    # (c) block-fp8 scales
    Mutant(
        "scale-stop-rounded-down",
        "tp_loader/styles.py",
        "ranges.append((a // size, -(-b // size)) if a < b",
        "ranges.append((a // size, b // size) if a < b",
        "block_slice drops the partial last scale block of a shard",
        ("fp8-in-step",),
    ),
    Mutant(
        "covering-stop-rounded-down",
        "tp_loader/styles.py",
        "((touched[0][0] // size, -(-touched[-1][1] // size)),)",
        "((touched[0][0] // size, touched[-1][1] // size),)",
        "block_slice(covering=True) misses the last block a dequantized slice touches",
        ("fp8-dequant",),
    ),
    Mutant(
        "scale-block-dims-swapped",
        "tp_loader/styles.py",
        "dim, size = piece.dim, block[piece.dim]",
        "dim, size = piece.dim, block[1 - piece.dim]",
        "block_slice pairs a dim with the other dim's block size",
        ("fp8-in-step", "fp8-dequant", "fp8-cut"),
    ),
    Mutant(
        "expected-scale-dims-swapped",
        "tp_loader/plan.py",
        "expected[scale] = tuple(-(-d // b) for d, b in zip(shape, block))",
        "expected[scale] = tuple(-(-d // b) for d, b in zip(shape, block[::-1]))",
        "_expect_scales expects [ceil(out / b1), ceil(in / b0)] (seen only in the report of a mismatched scale)",
        ("fp8-mismatch",),
    ),
    Mutant(
        "placed-scale-shape-rounded-down",
        "tp_loader/plan.py",
        "want = tuple(-(-d // b) for d, b in zip(item.info.shape, block))",
        "want = tuple(d // b for d, b in zip(item.info.shape, block))",
        "_place_scales checks the scale against floor(out / b0) x floor(in / b1)",
        ("fp8-in-step", "fp8-dequant"),
    ),
    Mutant(
        "dequantize-block-dims-swapped",
        "tp_loader/read.py",
        "rows, cols = item.block",
        "cols, rows = item.block",
        "dequantize widens each scale to a b1 x b0 block",
        ("fp8-dequant",),
    ),
    Mutant(
        "zero-copy-counts-dequantized",
        "tp_loader/read.py",
        "and not item.info.segments\n                    and item.scale is None\n",
        "and not item.info.segments\n",
        "a dequantized weight (a fresh tensor) is counted as a zero-copy view",
        ("fp8-zero-copy",),
    ),
    # slicing and placement
    Mutant(
        "chunk-range-off-by-one",
        "tp_loader/styles.py",
        "step = -(-size // world_size) if size else 0",
        "step = size // world_size + 1 if size else 0",
        "chunk_range uses floor + 1 for the piece size (wrong whenever world divides size)",
        ("tiling", "readers", "readers-load"),
    ),
    Mutant(
        "rowwise-dim-swapped",
        "tp_loader/styles.py",
        "return _shard(0 if transposed else 1, shape, heads, world_size, rank)",
        "return _shard(1 if transposed else 0, shape, heads, world_size, rank)",
        "rowwise shards a Linear weight's rows instead of its columns",
        ("tiling", "readers", "readers-load", "placed"),
    ),
    Mutant(
        "kv-head-index-rank-mod-heads",
        "tp_loader/styles.py",
        "head = rank * n // world_size",
        "head = rank % n",
        "replicated KV heads go round-robin (rank % kv) instead of rank * kv // world",
        ("tiling", "readers"),
    ),
    Mutant(
        "dtensor-stride-from-local-shard",
        "tp_loader/place.py",
        "TensorMeta(torch.Size(shape), contiguous_stride(shape), tensor.dtype)",
        "TensorMeta(torch.Size(shape), tuple(tensor.stride()), tensor.dtype)",
        "the DTensor's global stride is the local shard's",
        ("placed",),
    ),
)


def make_copy(root: Path) -> None:
    """The package (with its plans where the installed package has them), the tests and pytest's settings."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "tp_loader", root / "tp_loader", ignore=ignore)
    shutil.copytree(REPO / "plans", root / "tp_loader" / "plans", ignore=ignore, dirs_exist_ok=True)
    shutil.copytree(REPO / "tests", root / "tests", ignore=ignore)
    shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")


def environment(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_imports_copy(root: Path, env: dict[str, str]) -> None:
    code = "import tp_loader, tp_loader.plans; print(tp_loader.__file__); print(tp_loader.plans.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True)
    paths = out.stdout.split()
    if not all(Path(p).resolve().is_relative_to(root.resolve()) for p in paths):
        raise SystemExit(f"the copy is not what gets imported: {paths}")


def run_tests(root: Path, env: dict[str, str], labels: tuple[str, ...], workers: int) -> tuple[int, set[str], str]:
    """pytest's exit code, the labels of the tests that failed (any parametrization), and the output's tail."""
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *(TESTS[t] for t in labels)]
    if workers > 1:
        command[4:4] = ["-n", str(workers)]
    out = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    text = out.stdout + out.stderr
    failed = {re.sub(r"\[.*$", "", m) for m in re.findall(r"^(?:FAILED|ERROR) (\S+)", text, flags=re.M)}
    return out.returncode, {label for label in labels if TESTS[label] in failed}, text[-3000:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", help="run only this mutant (repeatable)")
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (default 2)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.only and len(mutants) != len(set(args.only)):
        raise SystemExit(f"unknown mutant among {args.only}; --list shows them")
    if args.list:
        for m in mutants:
            print(f"{m.name}: {m.file}: {m.old!r} -> {m.new!r}; tests: {', '.join(m.tests)}")
        for label, test in TESTS.items():
            print(f"{label}: {test}")
        return 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tp_loader_mutants_") as tmp:
        root = Path(tmp)
        make_copy(root)
        env = environment(root)
        check_imports_copy(root, env)
        originals = {m.file: (root / m.file).read_text() for m in mutants}
        for m in mutants:
            count = originals[m.file].count(m.old)
            if count != 1:
                raise SystemExit(f"mutant {m.name}: {m.old!r} occurs {count} times in {m.file}, not once")
        named = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
        code, failed, tail = run_tests(root, env, named, args.workers)
        if code != 0:
            print(tail)
            raise SystemExit(f"the unmutated copy fails {sorted(failed) or 'its tests'}: fix that first")
        rows, survivors = [], []
        for m in mutants:
            path = root / m.file
            path.write_text(originals[m.file].replace(m.old, m.new))
            start = time.perf_counter()
            try:
                code, failed, tail = run_tests(root, env, m.tests, args.workers)
            finally:
                path.write_text(originals[m.file])
            seconds = time.perf_counter() - start
            if code not in (0, 1):
                verdict = f"error (pytest exit {code})"
                print(tail, file=sys.stderr)
            else:
                verdict = "killed" if failed else "SURVIVED"
            if not failed:
                survivors.append(m.name)
            killers = [t for t in m.tests if t in failed]
            rows.append(
                f"| {m.name} | `{m.file}` | {verdict} | {len(killers)}/{len(m.tests)}: "
                f"{', '.join(killers) or '-'} | {seconds:.1f} |"
            )
            print(f"{m.name}: {verdict} ({len(killers)}/{len(m.tests)} named tests fail, {seconds:.1f} s)", flush=True)
    print()
    elapsed = time.perf_counter() - started
    print(f"Mutation run of {datetime.date.today().isoformat()}, {len(mutants)} mutants, {elapsed:.0f} s:")
    print()
    print("| mutant | file | result | named tests that fail | s |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
