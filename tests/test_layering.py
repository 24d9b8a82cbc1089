"""The house of docs/design.md §9, checked by walking every module's imports (function-level ones too).

- Every module of ``src/csulora`` belongs to exactly one layer (a package, or a root module), and
  a module imports only from its own layer or a lower one. Two packages never share a layer: a
  sideways import would be a hidden cycle.
- The module import graph has no cycle at all (inside a package too).
- No module imports another module's private (``_underscored``) name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "csulora"

# Bottom to top. A module imports from its own layer or one listed before it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("csulora.types", "csulora.errors", "csulora.version"),  # leaf value types, the one-line errors, the version
    ("csulora.linalg",),  # pure tensor math
    ("csulora.io",),  # files at the edges (and loading a model for generation)
    ("csulora.methods",),  # one file per correction method, behind one interface
    ("csulora.training",),  # fine-tuning on transformers + peft
    ("csulora.eval",),  # prompt sets, generation, judges, metrics
    ("csulora.references",),  # once per model: the subspace, the calibration statistics
    ("csulora.pipeline",),  # audit and correct any update
    ("csulora.salora",),  # the training-time method
    ("csulora.tuning",),  # csulora tune
    ("csulora.worlds",),  # the tiny and SmolLM2 worlds
    ("csulora.demo",),  # csulora demo
    ("csulora.cli", "csulora.__main__"),  # commands
    ("csulora",),  # the package root: __version__ and the public API (imported lazily)
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(name: str) -> int:
    """The most specific layer prefix that owns ``name``."""
    best, rank = -1, None
    for index, owners in enumerate(LAYERS):
        for owner in owners:
            if (name == owner or name.startswith(owner + ".")) and len(owner) > best:
                best, rank = len(owner), index
    assert rank is not None, f"{name} belongs to no layer of tests/test_layering.py: add its package"
    return rank


def import_nodes(path: Path) -> list[ast.AST]:
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Import | ast.ImportFrom)]


def imported_modules(path: Path) -> set[str]:
    """Every csulora module a file imports, including imports inside functions."""
    modules = set(SOURCE_NAMES)
    found = set()
    for node in import_nodes(path):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif node.module and node.level == 0:
            for alias in node.names:  # `from csulora.x import y`: y may itself be a module
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
    return {name for name in found if name.startswith("csulora")}


SOURCES = sorted(PACKAGE.rglob("*.py"))
SOURCE_NAMES = [module_name(p) for p in SOURCES]


@pytest.mark.parametrize("path", SOURCES, ids=module_name)
def test_a_module_imports_only_its_own_layer_or_lower(path):
    name = module_name(path)
    mine = layer_of(name)
    higher = sorted(m for m in imported_modules(path) if m != name and layer_of(m) > mine)
    assert not higher, f"{name} imports {higher}, a higher layer (docs/design.md §9)"


def import_graph() -> dict[str, set[str]]:
    names = set(SOURCE_NAMES)
    graph = {}
    for path, name in zip(SOURCES, SOURCE_NAMES, strict=True):
        graph[name] = {m for m in imported_modules(path) if m in names and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("path", SOURCES, ids=module_name)
def test_no_private_name_crosses_a_module(path):
    private = [
        f"{node.module}.{alias.name}"
        for node in import_nodes(path)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("csulora")
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]
    assert not private, f"{module_name(path)} imports private names {private}"


def test_every_package_has_a_layer():
    packages = {module_name(p) for p in SOURCES if p.name == "__init__.py"}
    for package in packages:
        layer_of(package)
