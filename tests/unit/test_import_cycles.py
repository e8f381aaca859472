"""Imports inside ``megatron_wmss`` run one way: no two modules import each other.

A mutual import works only while one side defers its import into a function, and breaks the
day someone moves that import to the top (a half-initialised module, an ImportError naming a
name that exists). The check reads the source with ``ast``: no import runs, so it takes well
under a second.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_wmss"


def _module_names(package: Path) -> dict[str, Path]:
    """``megatron_wmss.data.collate`` -> its file, for every module and package of ``package``."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``module`` imports anywhere in its file (top level, functions,
    classes), except under ``if TYPE_CHECKING:``, which never runs. ``from a.b import c``
    counts as importing ``a.b.c`` when that is a module, else ``a.b``."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y, from .. import z
                anchor = package[:len(package) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in modules:
                    found.add(full)
                elif base in modules:
                    found.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    found.discard(module)
    return found


def mutual_imports(package: Path = PACKAGE) -> list[tuple[str, str]]:
    """Every pair of modules of ``package`` that import each other, sorted."""
    modules = _module_names(package)
    graph = {name: _imported(name, path, modules) for name, path in modules.items()}
    return sorted({tuple(sorted((a, b))) for a, targets in graph.items() for b in targets
                   if a in graph.get(b, ())})


def test_no_two_modules_import_each_other():
    assert mutual_imports() == [], (
        "these modules import each other; move what both need into the lower one (or a small "
        "new module) so that imports run one way")


def test_the_check_sees_imports_inside_functions_and_relative_ones(tmp_path):
    """The check itself: a loop closed by a function-level or relative import is found; one
    closed only under TYPE_CHECKING is not (it never runs)."""
    pkg = tmp_path / "megatron_wmss"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from megatron_wmss.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from . import a\n")
    (pkg / "sub" / "c.py").write_text("import megatron_wmss.sub.a\n")
    (pkg / "sub" / "d.py").write_text(
        "from typing import TYPE_CHECKING\nfrom megatron_wmss.sub.c import x\n"
        "if TYPE_CHECKING:\n    from megatron_wmss.sub import d\n")
    (pkg / "sub" / "e.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from megatron_wmss.sub import f\n")
    (pkg / "sub" / "f.py").write_text("from .e import y\n")
    assert mutual_imports(pkg) == [("megatron_wmss.sub.a", "megatron_wmss.sub.b")]
