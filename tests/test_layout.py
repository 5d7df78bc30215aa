"""The package layout's one-way dependencies, checked on the AST of every module (so lazy imports
inside functions count too): a wrong-way import fails here, not in a reader's head.

- `core` (the shared runtime) imports no stage;
- `infer` imports no `train`, `data_prep`, `eval`, `audit` or `encoder`;
- no package imports `bench` or `tests`; stages import each other only along ALLOWED;
- nothing in `core` imports DeepSpeed when imported (training's alone: train/zero3.py);
- `core/qwen_omni/`'s modules import each other one way, and the package re-exports all they define.
"""

from __future__ import annotations

import ast
import importlib
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
# core/qwen_omni/'s modules, each importing only those before it (the package docstring's order).
QWEN_OMNI_ORDER = ("model", "chat", "checkpoint", "processor", "lora_targets", "attention")


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


def module_level_imports(path: Path) -> set[tuple[str, int]]:
    """(dotted module, line) of the imports that run when the file is imported: all but those in functions."""
    found = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Import):
                found.update((alias.name, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.update((f"{child.module}.{alias.name}", child.lineno) for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def test_the_module_level_checker_skips_functions_only(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("try:\n    import deepspeed.zero\nexcept ImportError:\n    pass\n"
                      "def f():\n    import deepspeed\nclass C:\n    from core.qwen_omni import chat\n")
    assert module_level_imports(module) == {("deepspeed.zero", 2), ("core.qwen_omni.chat", 8)}


def test_core_imports_no_deepspeed_when_imported():
    """Every stage imports core; DeepSpeed (seconds to import, and only training runs under it) must not come along."""
    found = [f"{path.relative_to(REPO)}:{line} imports {name}"
             for path in sorted((REPO / "core").rglob("*.py"))
             for name, line in sorted(module_level_imports(path))
             if name.split(".")[0] == "deepspeed"]
    assert found == []


def test_qwen_omni_modules_import_one_way():
    package = REPO / "core" / "qwen_omni"
    assert {p.stem for p in package.glob("*.py")} == {"__init__", *QWEN_OMNI_ORDER}
    wrong = []
    for position, name in enumerate(QWEN_OMNI_ORDER):
        path = package / f"{name}.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("core"):
                targets = [node.module] if node.module.startswith("core.qwen_omni.") else \
                    [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            wrong += [f"{name}.py:{node.lineno} imports {target}" for target in targets
                      if target.startswith("core.qwen_omni")
                      and target.removeprefix("core.qwen_omni.") not in QWEN_OMNI_ORDER[:position]]
    assert wrong == []


def test_qwen_omni_re_exports_every_public_name():
    """`qo.X` is the one way in: a name a module of the package defines is reachable from the package."""
    qo = importlib.import_module("core.qwen_omni")
    missing = []
    for name in QWEN_OMNI_ORDER:
        module = importlib.import_module(f"core.qwen_omni.{name}")
        tree = ast.parse(Path(module.__file__).read_text())
        defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        defined |= {target.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                    for target in ast.walk(node.targets[0] if isinstance(node, ast.Assign) else node.target)
                    if isinstance(target, ast.Name)}
        missing += [f"{name}.{n}" for n in sorted(defined)
                    if not n.startswith("_") and getattr(qo, n, None) is not getattr(module, n)]
    assert missing == []

