"""The package's shape: few modules at the root, no import circles, short functions.

The import graph is read from the source with ``ast`` (no import is run): an edge A -> B for every
``import`` or ``from ... import`` in A that names module B of the package. Imports inside functions
are left out of the circle check: they run on first call, after both modules are loaded, and are
how a module reaches a later stage of the pipeline without depending on it at import time.
Imports under ``if TYPE_CHECKING:`` are left out too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "leanlora"
MAX_ROOT_MODULES = 10
MAX_FUNCTION_LINES = 80
# Functions still over MAX_FUNCTION_LINES; this list only shrinks. Split one, then delete its line.
LONG_FUNCTIONS: set[str] = set()


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _resolve(name: str, modules) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _top_level_imports(module: str, modules) -> set[str]:
    path, is_package = modules[module]
    package = module if is_package else module.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                out.update(r for a in child.names if (r := _resolve(a.name, modules)))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - child.level + 1] + ([child.module] if child.module else []))
                for alias in child.names:
                    target = f"{base}.{alias.name}"
                    if (r := _resolve(target if target in modules else base, modules)):
                        out.add(r)
            visit(child)

    visit(ast.parse(path.read_text()))
    out.discard(module)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_at_most_ten_modules_at_the_package_root():
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root) <= MAX_ROOT_MODULES, root


def test_every_subpackage_is_a_regular_package():
    # setuptools' package discovery (and so the wheel) only sees folders with an __init__.py
    for folder in PACKAGE.rglob("*"):
        if folder.is_dir() and any(folder.glob("*.py")):
            assert (folder / "__init__.py").exists(), folder


def test_no_import_circles_among_top_level_imports():
    modules = _modules()
    graph = {m: _top_level_imports(m, modules) for m in modules}
    assert _cycles(graph) == []


def test_the_circle_check_sees_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _long_functions() -> dict[str, int]:
    long = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{rel}::{node.name}"] = lines
    return long


def test_no_function_over_80_lines():
    long = _long_functions()
    assert set(long) <= LONG_FUNCTIONS, {k: v for k, v in long.items() if k not in LONG_FUNCTIONS}


def test_the_long_function_list_only_names_long_functions():
    assert LONG_FUNCTIONS <= set(_long_functions()), LONG_FUNCTIONS - set(_long_functions())
