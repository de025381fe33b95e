"""The package's cut: no step module imports another step, the CLI stays apart, no import
cycle, no module over ~600 lines.

Read with ``ast`` from the source, so a function-local import counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bmseg

PACKAGE = Path(bmseg.__file__).parent
STEPS = (
    "synth", "plan", "batching", "segment", "gather", "pages", "annotate", "classifiers",
    "finetune", "report", "models.making",
)  # fmt: skip
"""The step modules (or subpackages): each a pipeline step's logic, called by one CLI module."""


def module_name(path: Path) -> str:
    """``bmseg.segment.cells`` for src/bmseg/segment/cells.py (a package by its ``__init__``)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts).removesuffix(".__init__")


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def step_of(module: str) -> str | None:
    """The step a ``bmseg...`` module name belongs to, or None for a shared one."""
    name = module.removeprefix("bmseg.")
    return next((s for s in STEPS if name == s or name.startswith(f"{s}.")), None)


def module_files(name: str) -> list[Path]:
    """The source files of module or subpackage ``name`` of bmseg."""
    path = PACKAGE.joinpath(*name.split("."))
    return sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]


def imported_modules(path: Path, top_only: bool = False) -> set[str]:
    """The ``bmseg`` modules ``path`` imports (anywhere, or at the module's top only); a name
    imported from a package counts as its submodule when it is one."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m == "bmseg" or m.startswith("bmseg.")}


@pytest.mark.parametrize("name", sorted(m for m in MODULES if not m.startswith("bmseg.cli")))
def test_a_module_imports_no_step_but_its_own(name):
    own = step_of(name)
    others = {m for m in imported_modules(MODULES[name]) if step_of(m) not in (None, own)}
    assert not others, f"{name} imports steps {sorted(others)}"


@pytest.mark.parametrize("name", STEPS)
def test_a_step_holds_no_argparse_and_imports_no_cli(name):
    for path in module_files(name):
        text = path.read_text(encoding="utf-8")
        assert "argparse" not in text, path.name
        assert not any(m.startswith("bmseg.cli") for m in imported_modules(path)), path.name


def test_no_module_is_over_600_lines():
    for name, path in MODULES.items():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        assert lines <= 600, f"{name}: {lines} lines"


def test_no_import_cycle_at_module_level():
    graph = {name: imported_modules(path, top_only=True) - {name} for name, path in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in sorted(graph[name] & graph.keys()):
            assert state.get(other) != 1, "import cycle: " + " -> ".join([*path, name, other])
            if other not in state:
                visit(other, [*path, name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_the_cycle_check_finds_a_cycle(monkeypatch):
    """The check above can fail: two modules importing each other are reported."""
    fake = {"bmseg.a": {"bmseg.b"}, "bmseg.b": {"bmseg.a"}}
    monkeypatch.setattr(
        "test_layout.imported_modules", lambda path, top_only=False: fake[str(path)] - set()
    )
    monkeypatch.setattr("test_layout.MODULES", {name: name for name in fake})
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycle_at_module_level()
