"""The package's cut: no step module imports another step, and the CLI stays apart.

Read with ``ast`` from the source, so a function-local import counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bmseg

PACKAGE = Path(bmseg.__file__).parent
STEPS = ("gather", "pages", "annotate", "classifiers", "report")
"""The steps whose modules this test checks (the re-cut of GATHER to REPORT)."""
ALL_STEPS = (
    "synth", "plan", "batching", "segment", "gather", "pages", "annotate", "classifiers",
    "finetune", "report", "models.making",
)  # fmt: skip
SHARED = (
    "cell_tables", "qupath", "seams", "summaries", "slide_records", "html_page", "metrics_html",
    "pictures", "labels", "contract",
)  # fmt: skip


def step_of(module: str) -> str | None:
    """The step a ``bmseg...`` module name belongs to, or None for a shared one."""
    name = module.removeprefix("bmseg.")
    return next((s for s in ALL_STEPS if name == s or name.startswith(f"{s}.")), None)


def module_files(name: str) -> list[Path]:
    """The source files of module or subpackage ``name`` of bmseg."""
    path = PACKAGE.joinpath(*name.split("."))
    return sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]


def imported_modules(path: Path) -> set[str]:
    """Every ``bmseg`` module ``path`` imports, wherever in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m == "bmseg" or m.startswith("bmseg.")}


@pytest.mark.parametrize("name", STEPS + SHARED)
def test_a_module_imports_no_step_but_its_own(name):
    own = step_of(f"bmseg.{name}")
    for path in module_files(name):
        others = {m for m in imported_modules(path) if step_of(m) not in (None, own)}
        assert not others, f"{path.name} imports steps {sorted(others)}"


@pytest.mark.parametrize("name", STEPS)
def test_a_step_holds_no_argparse_and_imports_no_cli(name):
    for path in module_files(name):
        text = path.read_text(encoding="utf-8")
        assert "argparse" not in text, path.name
        assert not any(m.startswith("bmseg.cli") for m in imported_modules(path)), path.name


def test_no_module_of_these_steps_is_over_600_lines():
    for name in STEPS + SHARED:
        for path in module_files(name):
            lines = len(path.read_text(encoding="utf-8").splitlines())
            assert lines <= 600, f"{path.name}: {lines} lines"
