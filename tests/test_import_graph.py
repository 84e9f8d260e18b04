"""`src/soul` has no import cycle, neither among its modules' top-level imports nor counting the imports
inside functions (the layering: each package imports only downward).

Top-level edges are the imports a module runs when it is imported: statements at module level and in class
bodies, including those under ``if``/``try``. Imports inside functions run later (when called) and imports
under ``if TYPE_CHECKING:`` never run, so neither can make importing a module fail half-way; but a circle
through them is still two modules that need each other, so a second test counts function-level imports, and
the pipeline's test counts ``TYPE_CHECKING`` imports too (its preset types sit below the tasks and the grid).
``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``. The implicit
import of a package's ``__init__`` before its submodule is not an edge (that direction is what packages are).
"""

from __future__ import annotations

import ast
from pathlib import Path

import soul

ROOT = Path(soul.__file__).resolve().parent  # src/soul


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _top_level_imports(tree: ast.Module, functions: bool | str = False) -> list[ast.Import | ast.ImportFrom]:
    if functions == "all":  # every import statement, TYPE_CHECKING blocks included
        return [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    if functions:  # every import statement, wherever it is (TYPE_CHECKING blocks still excluded)
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
                for stmt in node.body for n in ast.walk(stmt)}
        return [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom) and id(n) not in skip]
    out: list[ast.Import | ast.ImportFrom] = []

    def visit(stmts: list[ast.stmt]) -> None:
        for node in stmts:
            if isinstance(node, ast.Import | ast.ImportFrom):
                out.append(node)
            elif isinstance(node, ast.If):
                if not _is_type_checking(node):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, ast.With | ast.ClassDef):
                visit(node.body)

    visit(tree.body)
    return out


def import_graph(functions: bool | str = False) -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _top_level_imports(ast.parse(path.read_text(), str(path)), functions):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first = last), or None (iterative DFS, white/grey/black)."""
    state: dict[str, int] = dict.fromkeys(graph, 0)
    for start in sorted(graph):
        if state[start]:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state[child] == 1:
                return [*path[path.index(child):], child]
            elif state[child] == 0:
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_soul_has_no_import_cycle():
    graph = import_graph()
    assert "soul.pipeline.preset" in graph and "soul.pipeline.tasks.tofu" in graph["soul.pipeline.tasks"]
    assert "soul.pipeline.tasks" in graph["soul.pipeline.preset"]
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_the_pipeline_package_has_no_cycle_even_through_function_level_or_type_checking_imports():
    """The pipeline's modules do not import each other in both directions anywhere (the old
    pipeline.py / tasks.py pair did, hidden inside functions; preset ↔ grid and preset ↔ tasks did through
    annotation-only imports): the preset types live in `preset_types`, which imports no pipeline module."""
    graph = {m: {t for t in ts if t.startswith("soul.pipeline")} for m, ts in import_graph(functions="all").items()
             if m.startswith("soul.pipeline")}
    assert "soul.pipeline.preset_types" in graph["soul.pipeline.grid"]  # the edge that replaced grid -> preset
    assert not graph["soul.pipeline.preset_types"]
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_soul_has_no_import_cycle_counting_function_level_imports():
    """Each package imports only downward, lazy imports included (attack.report <-> report.results,
    the pipeline's preset/grid/tasks circle and soul -> soul.train -> soul were hidden inside functions)."""
    graph = import_graph(functions=True)
    assert "soul.report.results" in graph["soul.pipeline.api"]  # function-level and top-level edges both seen
    assert "soul.attack.report" in graph["soul.pipeline.robustness"]  # (this one is inside a method)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"
