"""The package's arrows point one way (DESIGN.md): a module imports only from its own layer or
the layers below it. Static (ast over the sources, imports inside functions included), so it
also sees the lazy imports that a runtime check would miss; ~0.1 s."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_wmss"

# Bottom to top. interop sits below training: training, curriculum and evaluation load and
# convert checkpoints through it, and it reads checkpoints through models/checkpoint.py.
LAYERS = [
    {"platform"},
    {"config"},
    {"models", "loss", "data"},
    {"interop"},
    {"training", "curriculum", "evaluation"},
    {"pipeline"},
    {"plan"},  # `wmss plan` reads run configs through pipeline's stage plan
    {"cli"},
]
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}
# megatron_wmss.testing (the distributed test harness) and the top-level __init__ are no layer.
UNCHECKED = {"testing", "__init__"}


def _imported_subpackages(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, first component under megatron_wmss) of every import in ``path``."""
    out = []
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # `from megatron_wmss import training` imports the subpackage itself.
            targets = ([f"{base}.{alias.name}" for alias in node.names]
                       if base == "megatron_wmss" else [base])
        else:
            continue
        for target in targets:
            parts = target.split(".")
            if parts[0] == "megatron_wmss" and len(parts) > 1:
                out.append((node.lineno, parts[1]))
    return out


def _upward_imports() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        own = rel.parts[0].removesuffix(".py")
        if own in UNCHECKED:
            continue
        module = "megatron_wmss." + ".".join(rel.with_suffix("").parts)
        for line, target in _imported_subpackages(path, module):
            if target in LEVEL and LEVEL[target] > LEVEL[own]:
                bad.append(f"megatron_wmss/{rel}:{line} ({own}) imports megatron_wmss.{target}")
    return bad


def test_every_subpackage_has_a_layer():
    found = {p.name.removesuffix(".py") for p in PACKAGE.iterdir()
             if (p.is_dir() and (p / "__init__.py").is_file()) or p.suffix == ".py"}
    assert found - UNCHECKED == set(LEVEL), "add the new subpackage to LAYERS"


def test_no_module_imports_from_a_layer_above_it():
    # Chiefly: models, loss, data, config, platform and interop never import training.
    assert _upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The check itself: a lazy, relative import of training from interop is caught."""
    fake = tmp_path / "megatron_wmss"
    for name in ("interop", "training"):
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text("")
    (fake / "interop" / "io.py").write_text(
        "def load():\n    from ..training import checkpoint\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", fake)
    assert _upward_imports() == [
        "megatron_wmss/interop/io.py:2 (interop) imports megatron_wmss.training"]
