"""The package's layering (docs/design.md §19): each subpackage imports only from those before it."""

import ast
from pathlib import Path

import nla

ORDER = ["core", "models", "data", "train", "stages"]


def nla_imports(path: Path) -> set[str]:
    """The subpackages a module imports from (any depth: function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = (
            [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else [a.name for a in getattr(node, "names", [])]
            if isinstance(node, ast.Import)
            else []
        )
        for name in names:
            parts = name.split(".")
            if parts[0] == "nla" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_each_subpackage_imports_only_from_those_before_it():
    root = Path(nla.__file__).parent
    wrong = []
    for i, package in enumerate(ORDER):
        modules = sorted((root / package).glob("*.py"))
        assert modules, package
        for module in modules:
            for dep in nla_imports(module) - set(ORDER[: i + 1]) - {"__version__"}:
                wrong.append(f"{package}/{module.name} imports nla.{dep}")
    assert not wrong, wrong
    flat = sorted(p.name for p in root.glob("*.py"))
    # the entry points and the test kit stay on top
    assert flat == ["__init__.py", "__main__.py", "cli.py", "testing.py"], flat
