"""The package's layout: no import cycle, no import of a later stage, and the README draws it as it is.

A cycle hidden in a function-level import still ties two modules into one: neither can be read,
tested or moved without the other. The graph is read from the source (ast), so an import only
reached at run time counts as much as one at the top of a module. Imports under
``if TYPE_CHECKING:`` are left out: they are never executed, and only name a type for readers.

The stages, in the order data flows through them (README, Layout): a module may import its own
stage and earlier ones, never a later one.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "neobench"
STAGES = ["core", "models", "data", "training", "evaluation", "runs", "ablation", "reporting", "commands", "cli"]
TOP_LEVEL_STAGE = {"neobench": "core", "neobench.cli": "cli", "neobench.__main__": "cli", "neobench.results": "runs"}
"""Modules outside the stage subpackages: the package itself, the command line, and
neobench.results, the README's `load_results` kept at its documented name."""
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """neobench module -> the neobench modules it imports anywhere in its source."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in executed_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "neobench":
                for alias in node.names:  # `from neobench import x` names the module neobench.x
                    target = f"{node.module}.{alias.name}"
                    graph[name].add(target if target in modules else node.module)
            elif isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name.split(".")[0] == "neobench"}
        graph[name] &= set(modules) - {name, "neobench"}
    return graph


def executed_nodes(tree: ast.AST):
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *executed_nodes(child)])
            continue
        yield node
        yield from executed_nodes(node)


def stage_of(module: str) -> str:
    parts = module.split(".")
    return TOP_LEVEL_STAGE[module] if len(parts) == 1 or module in TOP_LEVEL_STAGE else parts[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """"importer -> imported (stage -> later stage)" for every import of a later stage."""
    rank = {stage: i for i, stage in enumerate(STAGES)}
    return [
        f"{a} -> {b} ({stage_of(a)} -> {stage_of(b)})"
        for a in sorted(graph) for b in sorted(graph[a]) if rank[stage_of(b)] > rank[stage_of(a)]
    ]


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
    assert {"neobench.training.loop", "neobench.runs.config", "neobench.reporting.leaderboard", "neobench.ablation.worker"} <= set(graph)
    assert "neobench.training.optimizers" in graph["neobench.runs.config"], "function-level imports are read too"
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_through_a_function_level_import_is_found():
    """The finder itself, on the shape the package had: config -> train (inside validate) -> config."""
    graph = {"a.config": {"a.train"}, "a.train": {"a.labels", "a.config"}, "a.labels": set()}
    assert find_cycle(graph) == ["a.config", "a.train", "a.config"]
    graph["a.train"].discard("a.config")
    assert find_cycle(graph) == []


def test_every_module_belongs_to_a_stage_and_imports_only_down():
    graph = import_graph()
    unplaced = sorted(m for m in graph if stage_of(m) not in STAGES)
    assert not unplaced, f"modules outside every stage (move them into one, or add them to TOP_LEVEL_STAGE): {unplaced}"
    assert not upward_imports(graph), "imports of a later stage:\n" + "\n".join(upward_imports(graph))


def test_an_upward_import_is_found_and_a_type_only_one_is_not():
    """The checker itself: training importing runs imports a later stage, unless only under TYPE_CHECKING."""
    assert upward_imports({"neobench.training.loop": {"neobench.runs.config"}, "neobench.runs.config": set()}) == [
        "neobench.training.loop -> neobench.runs.config (training -> runs)"
    ]
    assert upward_imports({"neobench.runs.config": {"neobench.training.methods"}, "neobench.training.methods": set()}) == []
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\nelse:\n    import b\nimport c\n")
    imported = {alias.name for node in executed_nodes(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert imported == {"b", "c"}


def test_no_module_is_over_the_line_limit():
    """A module longer than this holds more than one idea: split it by responsibility."""
    lengths = {p.relative_to(PACKAGE.parent).as_posix(): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert not {path: n for path, n in lengths.items() if n > MAX_LINES}


def readme_tree() -> set[str]:
    """The package's entries as the README's Layout draws them: "core/", "core/errors.py", ..."""
    readme = (PACKAGE.parent / "README.md").read_text()
    block = readme[readme.index("## Layout"):].split("```")[1]
    lines = block[block.index("neobench/\n") + len("neobench/\n"):].splitlines()
    entries, folder = set(), ""
    for line in lines:
        indent, name = len(line) - len(line.lstrip()), (line.split() or [""])[0]
        if indent == 0:  # the package's tree ends where the repository's top level resumes
            break
        if not name.endswith(("/", ".py")) or indent > 4:  # a description's second line
            continue
        folder = name if indent == 2 and name.endswith("/") else folder if indent == 4 else ""
        entries.add(name if indent == 2 else folder + name)
    return entries


def package_tree() -> set[str]:
    """The same entries read from the files: modules, stage packages and the folders of data inside them."""
    entries = set()
    for path in PACKAGE.rglob("*"):
        parts = path.relative_to(PACKAGE).parts
        if "__pycache__" in parts or len(parts) > 2 or path.name == "__init__.py":
            continue
        if path.is_dir():
            entries.add("/".join(parts) + "/")
        elif path.suffix == ".py":
            entries.add("/".join(parts))
    return entries


def test_the_readme_layout_is_the_package_tree():
    """Docs follow the code: the README's Layout names every stage and module, and nothing else."""
    drawn, actual = readme_tree(), package_tree()
    assert {"core/", "core/errors.py", "evaluation/tasks/", "cli.py"} <= drawn, "the Layout's tree is read"
    assert not actual - drawn, f"in the package, not in README's Layout: {sorted(actual - drawn)}"
    assert not drawn - actual, f"in README's Layout, not in the package: {sorted(drawn - actual)}"
