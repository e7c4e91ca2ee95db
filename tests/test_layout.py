"""The package's imports form no cycle, function-level imports included.

A cycle hidden in a function-level import still ties two modules into one: neither can be read,
tested or moved without the other. The graph is read from the source (ast), so an import only
reached at run time counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "neobench"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """neobench module -> the neobench modules it imports anywhere in its source."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "neobench":
                for alias in node.names:  # `from neobench import x` names the module neobench.x
                    target = f"{node.module}.{alias.name}"
                    graph[name].add(target if target in modules else node.module)
            elif isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name.split(".")[0] == "neobench"}
        graph[name] &= set(modules) - {name, "neobench"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle (a -> b -> ... -> a) if there is any, else []."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return []


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"neobench.train", "neobench.config", "neobench.report", "neobench.ablation"} <= set(graph)
    assert "neobench.optimizers" in graph["neobench.config"], "function-level imports are read too"
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_through_a_function_level_import_is_found():
    """The finder itself, on the shape the package had: config -> train (inside validate) -> config."""
    graph = {"a.config": {"a.train"}, "a.train": {"a.labels", "a.config"}, "a.labels": set()}
    assert find_cycle(graph) == ["a.config", "a.train", "a.config"]
    graph["a.train"].discard("a.config")
    assert find_cycle(graph) == []
