"""The package's layering: no import cycles anywhere in src/codegen_lm (imports inside functions
included), and the model knows nothing of the engine or the kernels."""

from __future__ import annotations

import ast
from pathlib import Path

import codegen_lm

ROOT = Path(codegen_lm.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports. An import of a package's own ancestors is left out
    (Python has imported them before the module runs), as is `from package import module` for the
    package itself: the edge goes to the module."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in modules and t != name and not name.startswith(t + "."))
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    assert "codegen_lm.engine.engine" in graph and "codegen_lm.model" in graph  # the graph is real
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_model_knows_nothing_of_the_engine_or_the_kernels():
    graph = import_graph()
    for dep in graph["codegen_lm.model"] | graph["codegen_lm.kv_cache"]:
        assert not dep.startswith(("codegen_lm.engine", "codegen_lm.kernels")), dep
    # (model.generate reaches generation lazily; generation and the engine never import the model back)
    for name, deps in graph.items():
        if name.startswith(("codegen_lm.engine", "codegen_lm.kernels", "codegen_lm.generation")):
            assert "codegen_lm.model" not in deps, name
