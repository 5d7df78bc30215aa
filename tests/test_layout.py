"""The package layout's one-way dependencies, checked on the AST of every module (so lazy imports
inside functions count too): a wrong-way import fails here, not in a reader's head.

- `core` (the shared runtime) imports no stage;
- `infer` imports no `train`, `data_prep`, `eval`, `audit` or `encoder`;
- no package imports `bench` or `tests`; stages import each other only along ALLOWED.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("infer", "train", "data_prep", "eval", "audit", "encoder")
PACKAGES = ("core", *STAGES)
# Which project packages each package may import (itself and `core` always allowed for stages).
ALLOWED = {
    "core": set(),
    "infer": {"core"},
    "encoder": {"core"},
    # grpo: rollouts through the inference engine, answers by its parser; the reasoning reward through eval's judge backends and cache
    "train": {"core", "infer", "eval"},
    "eval": {"core"},
    "data_prep": {"core", "infer"},  # QA, CoT and verification generate through the inference engine
    "audit": {"core", "infer", "data_prep"},  # verify re-runs inference; compliance runs the MMAR guard
}
PROJECT_TOP_LEVEL = {*PACKAGES, "bench", "tests"}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level project package, line) of every import in a file, lazy ones included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {(name.split(".")[0], node.lineno) for name in names if name.split(".")[0] in PROJECT_TOP_LEVEL}
    return found


def wrong_way_imports(package: str) -> list[str]:
    allowed = ALLOWED[package] | {package}
    return [f"{path.relative_to(REPO)}:{line} imports {target}"
            for path in sorted((REPO / package).rglob("*.py"))
            for target, line in sorted(imported_packages(path))
            if target not in allowed]


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_one_way(package):
    assert wrong_way_imports(package) == []


def test_the_checker_sees_lazy_and_dotted_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\nimport train.sft\n\ndef f():\n    from eval import score\n    from .x import y\n")
    assert imported_packages(module) == {("train", 2), ("eval", 5)}


def test_every_package_is_declared_and_covered():
    """A new top-level package must be placed in the graph and shipped by pyproject.toml."""
    on_disk = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests", "bench"}
    assert on_disk == set(PACKAGES)
    pyproject = (REPO / "pyproject.toml").read_text()
    for package in PACKAGES:
        assert f'"{package}*"' in pyproject, package
