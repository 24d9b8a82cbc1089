"""The import layering of docs/design.md §9, checked by walking every module's imports.

types/linalg at the bottom -> io, subspace, audit -> methods -> api -> cli, tuning.
A lower layer never imports a higher one, so there is no import cycle to work around.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "csulora"

# module (or package prefix) -> the csulora modules it must not import, at any depth of the file
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "csulora.types": ("csulora.",),
    "csulora.linalg.lowrank": ("csulora.io", "csulora.methods", "csulora.pipeline.api", "csulora.linalg.geometry", "csulora.linalg.subspace"),
    "csulora.io": ("csulora.methods", "csulora.pipeline.api", "csulora.linalg.geometry", "csulora.tuning", "csulora.cli"),
    "csulora.linalg.subspace": ("csulora.methods", "csulora.pipeline.api", "csulora.tuning", "csulora.cli"),
    "csulora.linalg.geometry": ("csulora.methods", "csulora.pipeline.api", "csulora.tuning", "csulora.cli", "csulora.io"),
    "csulora.methods": ("csulora.pipeline.api", "csulora.tuning", "csulora.cli", "csulora.io"),
    "csulora.pipeline.api": ("csulora.tuning", "csulora.cli"),
    "csulora.pipeline.checkpoint_api": ("csulora.tuning", "csulora.cli"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every csulora module a file imports, including imports inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("csulora")}


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_lower_layers_do_not_import_higher_ones(path):
    name = module_name(path)
    rules = [bad for layer, bad in FORBIDDEN.items() if name == layer or name.startswith(layer + ".")]
    for forbidden in rules:
        offending = sorted(m for m in imported_modules(path) if m != name and m.startswith(forbidden))
        assert not offending, f"{name} imports {offending}, a higher layer (docs/design.md §9)"


def test_no_lazy_registry_workaround_remains():
    init = (PACKAGE / "methods" / "__init__.py").read_text()
    assert "__getattr__" not in init
