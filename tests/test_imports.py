"""The package's import graph: no circle anywhere, and every import runs down the layers.

The layers, bottom up: ``core`` imports nothing of ours; ``services`` imports
``core``; ``actors`` wires ``core`` and ``services``; ``api`` sits on those, and
the command line (``cli``) on everything below it; the package's front door
(``actorflow/__init__.py``, ``__main__.py``) may import any of them.

The graph is read from the source with `ast`: module-level imports, imports
inside functions, and imports under ``if TYPE_CHECKING:`` alike (a type-only
import is a dependency all the same: it is what a reader and mypy follow).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "actorflow"

LAYERS = ("core", "services", "actors", "api", "cli")
"""Bottom up: a module may import its own layer and the ones before it."""
_FRONT = len(LAYERS)
"""The package's front door (``actorflow``, ``actorflow.__main__``): above every layer."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name (a package by its own name)."""
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: Mapping[str, Path]) -> Iterator[tuple[str, int]]:
    """(module of ours, line) for each import in the module's source, wherever it stands."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                keep = len(base) - node.level + (1 if is_package else 0)
                origin = ".".join(base[:keep] + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                # `from package import module` depends on the module; `from module import name` on the module.
                yield (submodule if submodule in known else origin), node.lineno


def import_graph() -> dict[str, dict[str, int]]:
    """Module -> {module of ours it imports: the first line that does}."""
    known = package_modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in known.items():
        edges: dict[str, int] = {}
        for target, line in imported_modules(name, path, known):
            if target != name and (target == "actorflow" or target.startswith("actorflow.")):
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def layer_of(name: str) -> int:
    parts = name.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        return _FRONT
    return LAYERS.index(parts[1])


def find_cycles(graph: Mapping[str, Mapping[str, int]]) -> list[list[str]]:
    """One cycle (as a closed path of modules) for each strongly connected group of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm; the package is small enough to recurse
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_closed_path(graph, group) for group in groups]


def _closed_path(graph: Mapping[str, Mapping[str, int]], group: list[str]) -> list[str]:
    """A path from the group's first module back to itself, through the group only (breadth first)."""
    members, start = set(group), group[0]
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in graph.get(node, {}):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, node, start]
                if target in members and target not in came_from:
                    came_from[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {group}")  # a strongly connected group always has one


def test_the_walk_finds_every_kind_of_import_and_every_module_of_the_package() -> None:
    graph = import_graph()
    assert {"actorflow", "actorflow.core", "actorflow.actors", "actorflow.api", "actorflow.cli"} <= set(graph)
    assert len(graph) > 40
    # A module-level import, an import inside a function and a type-only import of the same module.
    assert "actorflow.core.errors" in graph["actorflow.core.config"]
    assert "actorflow.core.otel" in graph["actorflow.actors.telemetry"]  # imported inside a function
    assert "actorflow.api.server" in graph["actorflow.api"]  # only under `if TYPE_CHECKING:`


def test_a_cycle_through_any_import_is_found_and_named_as_a_closed_path() -> None:
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}, "e": {"e": 1}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_module_of_the_package_takes_part_in_an_import_circle() -> None:
    graph = import_graph()
    circles = [" -> ".join(cycle) for cycle in find_cycles(graph)]
    assert circles == [], "import circles:\n" + "\n".join(circles)


def test_the_layers_stand_in_order_with_the_front_door_on_top() -> None:
    order = ["actorflow.core.types", "actorflow.services", "actorflow.actors.state", "actorflow.api.server"]
    order += ["actorflow.cli.serve", "actorflow"]
    assert [layer_of(module) for module in order] == sorted({layer_of(module) for module in order})
    assert layer_of("actorflow.__main__") == layer_of("actorflow")
    assert layer_of("actorflow.core.journal.sqlite") == layer_of("actorflow.core")


def test_every_import_runs_down_the_layers_never_up() -> None:
    upward = [
        f"{module}:{line} imports {target} ({_layer_name(target)} is above {_layer_name(module)})"
        for module, edges in sorted(import_graph().items())
        for target, line in sorted(edges.items())
        if layer_of(target) > layer_of(module)
    ]
    assert upward == [], "imports that run against the layering:\n" + "\n".join(upward)


def _layer_name(module: str) -> str:
    layer = layer_of(module)
    return "the package's front door" if layer == _FRONT else LAYERS[layer]


def test_only_the_command_line_parses_arguments_prints_or_exits_and_the_library_never_imports_it() -> None:
    importers = sorted(
        module
        for module, edges in import_graph().items()
        if not module.startswith("actorflow.cli") and any(target.startswith("actorflow.cli") for target in edges)
    )
    assert importers == ["actorflow.__main__"]
    found = []
    for name, path in package_modules().items():
        if name.startswith("actorflow.cli") or name == "actorflow.__main__":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            imported = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                imported = [node.module or ""]
            called = ast.unparse(node.func) if isinstance(node, ast.Call) else ""
            if "argparse" in imported or called in {"print", "sys.exit", "exit", "quit"}:
                found.append(f"{name}:{node.lineno}: {called or 'import argparse'}")
    assert found == [], "command-line work outside actorflow.cli:\n" + "\n".join(found)
