"""The shape of the code, checked: imports point down, no circles, no borrowed private names, rooms of one size.

Imports are read with ``ast`` from the source (module-level and the lazy ones inside functions alike), so an edge
cannot hide in a function body. The layer rules (README "Architecture"):

* ``phi3v_core`` is the bottom: it never imports ``bench`` or ``planner``;
* ``bench`` may import ``planner``; ``planner`` never imports ``bench``;
* ``phi3v_core.training`` never imports ``phi3v_core.cli`` (shared entry-point code lives in ``phi3v_core.entrypoint``);
* no module imports a ``_private`` name of another module;
* no circle between modules;
* no module over 600 lines, no function over 80 lines unless its docstring says why it is one piece (``one piece:``).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("phi3v_core", "bench", "planner")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
ONE_PIECE = "one piece:"

# Over-long modules and functions accepted for now (none today). An entry that is no longer over the limit fails the
# test, so this list cannot go stale.
LONG_ALLOWED: frozenset[str] = frozenset()

# Private names imported across modules, accepted for now (none today); same rule: a stale entry fails the test.
PRIVATE_ALLOWED: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Import:
    """One imported module (``name`` set when a name, not a module, is imported from it)."""

    source: str
    target: str
    name: str | None
    line: int


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


MODULES = _modules()


def _absolute(source: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = source.split(".")
    if MODULES[source].name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _imports() -> list[Import]:
    found = []
    for source, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found += [Import(source, a.name, None, node.lineno) for a in node.names if a.name in MODULES]
            elif isinstance(node, ast.ImportFrom):
                target = _absolute(source, node)
                if target.split(".")[0] not in PACKAGES:
                    continue
                for alias in node.names:
                    child = f"{target}.{alias.name}"
                    found.append(Import(source, child, None, node.lineno) if child in MODULES
                                 else Import(source, target, alias.name, node.lineno))
    return found


IMPORTS = _imports()


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in IMPORTS:
        if imp.target in MODULES and imp.target != imp.source:
            graph[imp.source].add(imp.target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(set(graph) | {t for targets in graph.values() for t in targets}):
        if node not in index:
            visit(node)
    return found


def layer(module: str) -> str:
    """The README's unit of the layer graph: ``bench``, ``planner``, or ``phi3v_core.<subpackage or module>``."""
    parts = module.split(".")
    return parts[0] if parts[0] != "phi3v_core" else ".".join(parts[:2])


def layer_edges() -> set[tuple[str, str]]:
    """Edges between layers (the package root ``phi3v_core/__init__.py`` only registers the model: left out)."""
    return {
        (layer(imp.source), layer(imp.target))
        for imp in IMPORTS
        if imp.source != "phi3v_core" and layer(imp.source) != layer(imp.target)
    }


def _where(imp: Import) -> str:
    return f"{MODULES[imp.source].relative_to(ROOT)}:{imp.line} imports {imp.target}{'.' + imp.name if imp.name else ''}"


def test_the_sources_are_found() -> None:
    # Guards every test below against passing on an empty scan.
    assert {"phi3v_core.training.api", "bench.cli", "planner.cli"} <= set(MODULES)
    assert any(imp.source == "bench.worker" and imp.target.startswith("planner") for imp in IMPORTS)


def test_no_import_circles() -> None:
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize(
    ("importer", "forbidden"),
    [("phi3v_core", "bench"), ("phi3v_core", "planner"), ("planner", "bench"), ("phi3v_core.training", "phi3v_core.cli")],
)
def test_imports_point_down(importer: str, forbidden: str) -> None:
    def within(module: str, package: str) -> bool:
        return module == package or module.startswith(package + ".")

    bad = [_where(i) for i in IMPORTS if within(i.source, importer) and within(i.target, forbidden)]
    assert bad == []


def _private_imports() -> list[str]:
    found = []
    for imp in IMPORTS:
        if imp.name and imp.name.startswith("_") and not imp.name.startswith("__") and imp.target != imp.source:
            found.append(f"{imp.source} -> {imp.target}.{imp.name}")
        private_parts = [p for p in imp.target.split(".") if p.startswith("_") and not p.startswith("__")]
        parent = imp.target.rsplit(".", 1)[0]
        if private_parts and imp.source != parent:  # a package may import its own private module
            found.append(f"{imp.source} -> {imp.target}")
    return sorted(set(found))


def test_no_private_name_is_imported_from_another_module() -> None:
    found = set(_private_imports())
    assert sorted(found - PRIVATE_ALLOWED) == []
    assert sorted(PRIVATE_ALLOWED - found) == [], "allowed private imports that are gone: remove them from the list"


def _long_pieces() -> dict[str, int]:
    long: dict[str, int] = {}
    for path in MODULES.values():
        rel = path.relative_to(ROOT).as_posix()
        source = path.read_text(encoding="utf-8")
        if (lines := len(source.splitlines())) > MAX_MODULE_LINES:
            long[rel] = lines
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES and ONE_PIECE not in (ast.get_docstring(node) or ""):
                    long[f"{rel}:{node.name}"] = length
    return long


def test_no_module_or_function_is_over_long() -> None:
    long = _long_pieces()
    assert {k: v for k, v in long.items() if k not in LONG_ALLOWED} == {}
    assert sorted(LONG_ALLOWED - set(long)) == [], "allowed long pieces that are now short: remove them from the list"


def _readme_edges() -> set[tuple[str, str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- layer-graph -->\n```\n(.*?)```", text, re.S)
    assert block, "README.md has no <!-- layer-graph --> block"
    edges = set()
    for line in block.group(1).splitlines():
        if "->" in line:
            source, targets = (part.strip() for part in line.split("->", 1))
            edges |= {(source, t.strip()) for t in targets.split(",") if t.strip()}
    return edges


def test_readme_layer_graph_is_the_real_one() -> None:
    real, readme = layer_edges(), _readme_edges()
    assert sorted(real - readme) == [], "imports the README's layer graph does not show"
    assert sorted(readme - real) == [], "edges the README shows that the code does not have"


def readme_graph_text() -> str:
    """The README block's body, regenerated: ``python -c 'from tests.test_architecture import *; print(...)'``."""
    by_source: dict[str, set[str]] = defaultdict(set)
    for source, target in layer_edges():
        by_source[source].add(target)
    return "".join(f"{s} -> {', '.join(sorted(t))}\n" for s, t in sorted(by_source.items()))
