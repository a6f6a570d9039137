"""The declared runtime dependencies are enough: a world-2 load (its collectives and the demo
generator) runs in a process that cannot import anything else that is installed here (the test
extras: pytest, hypothesis, transformers, ...)."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def runtime_closure() -> set[str]:
    """The distributions the declared runtime dependencies pull in (extras and markers that do not
    apply here left out), by normalised name."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    todo = [_name(r) for r in declared]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for requirement in requires:
            marker = requirement.split(";", 1)[1] if ";" in requirement else ""
            if "extra" in marker:
                continue
            if marker:
                from packaging.markers import Marker

                if not Marker(marker).evaluate():
                    continue
            todo.append(_name(requirement))
    return seen


def blocked_modules() -> list[str]:
    """Top-level modules installed here that belong to no distribution of the runtime closure."""
    allowed = runtime_closure() | {"tp-loader", "pip", "setuptools"}
    blocked = set()
    for module, distributions in importlib.metadata.packages_distributions().items():
        names = {d.lower().replace("_", "-") for d in distributions}
        if not names & allowed and not module.startswith("_"):
            blocked.add(module)
    return sorted(blocked)


CHILD = textwrap.dedent(
    """
    import json, sys
    BLOCKED = set(json.loads(sys.argv[1]))
    for name in BLOCKED:  # `import name` fails, importlib.util.find_spec(name) says absent
        sys.modules[name] = None
    import torch
    torch.set_num_threads(1)
    import tp_loader
    from tp_loader.testing import run_ranks, values

    def load(rank, world_size):
        result = tp_loader.load(progress=False)
        loaded = sorted(name for name in BLOCKED if sys.modules.get(name) is not None)
        return result.report.clean, result.report.world_size, loaded

    print(json.dumps(values(run_ranks(2, load, timeout=120))))
    """
)


def test_blocked_set_holds_the_test_extras_and_not_the_runtime_dependencies() -> None:
    blocked = blocked_modules()
    assert {"pytest", "hypothesis", "transformers"} <= set(blocked)
    assert not {"torch", "safetensors", "huggingface_hub", "tqdm", "numpy"} & set(blocked)


def test_world_2_load_of_the_generated_demo_needs_only_the_declared_runtime_dependencies(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(blocked_modules())],
        capture_output=True,
        text=True,
        timeout=180,
        env={"TP_LOADER_DEMO_DIR": str(tmp_path / "demo"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [[True, 2, []], [True, 2, []]]
