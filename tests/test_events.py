"""Every event and milestone the package emits is declared once, in `actorflow.core.events`.

The package's source is read with `ast`. An *emission* is the first argument of
a call to an event logger's ``debug``/``info``/``warning``/``error`` (or of a
name bound to one of those methods), the first argument of ``Milestones.emit``
or of ``Milestone(...)``, and the value of an ``"event"`` key in a dict literal
(the lines the JSON log sink writes about itself). A stdlib logger's message is
prose, with spaces; an event name is a dotted identifier, so only name-shaped
literals are flagged.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from actorflow.cli import traceview
from actorflow.core import events

PACKAGE = Path(__file__).resolve().parent.parent / "actorflow"
EVENTS_SOURCE = PACKAGE / "core" / "events.py"
VIEWER_SOURCES = (PACKAGE / "cli" / "traceview.py", PACKAGE / "cli" / "tracecheck.py")
_LEVELS = frozenset({"debug", "info", "warning", "error"})
_NAME_SHAPED = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*\Z")
_DOTTED = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+\Z")

Kind = Literal["event", "milestone"]


@dataclass(frozen=True)
class Emission:
    """One place that names what it emits."""

    kind: Kind
    where: str
    """``path:line``, for the failure message."""
    name: ast.expr
    """The expression that gives the event's or milestone's name."""
    declared: frozenset[str]
    """The constants of `actorflow.core.events` that the expression refers to."""


def package_sources() -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def declared_constants() -> dict[str, str]:
    """Every public string constant of the events module: its name -> its value."""
    return {name: value for name, value in vars(events).items() if name.isupper() and isinstance(value, str)}


def _imports_of_events(tree: ast.Module) -> tuple[dict[str, str], set[str]]:
    """(local name -> constant, for ``from actorflow.core.events import X``; aliases of the module itself)."""
    names: dict[str, str] = {}
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "actorflow.core.events":
            names.update((alias.asname or alias.name, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module == "actorflow.core":
            modules.update(alias.asname or alias.name for alias in node.names if alias.name == "events")
    return names, modules


def _constants_in(expression: ast.expr, names: dict[str, str], modules: set[str]) -> frozenset[str]:
    found: set[str] = set()
    for node in ast.walk(expression):
        if isinstance(node, ast.Name) and node.id in names:
            found.add(names[node.id])
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            found.add(node.attr)
    return frozenset(found)


def _logger_method_aliases(tree: ast.Module) -> set[str]:
    """Names bound to a logger's method, as in ``emit = log.info if ... else log.warning``."""
    aliases: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            values = [node.value.body, node.value.orelse] if isinstance(node.value, ast.IfExp) else [node.value]
            if all(isinstance(value, ast.Attribute) and value.attr in _LEVELS for value in values):
                aliases.add(node.targets[0].id)
    return aliases


def emissions() -> Iterator[Emission]:
    """Every emission in the package (the events module aside)."""
    for path, tree in package_sources():
        if path == EVENTS_SOURCE:
            continue
        names, modules = _imports_of_events(tree)
        aliases = _logger_method_aliases(tree)
        for node in ast.walk(tree):
            kind: Kind | None = None
            name: ast.expr | None = None
            if isinstance(node, ast.Call) and node.args:
                func = node.func
                if (isinstance(func, ast.Attribute) and func.attr in _LEVELS) or (
                    isinstance(func, ast.Name) and func.id in aliases
                ):
                    kind = "event"
                elif (isinstance(func, ast.Attribute) and func.attr == "emit") or (
                    isinstance(func, ast.Name) and func.id == "Milestone"
                ):
                    kind = "milestone"
                name = node.args[0]
            elif isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value == "event":
                        kind, name = "event", value
            if kind is not None and name is not None:
                where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
                yield Emission(kind, where, name, _constants_in(name, names, modules))


def _spelled_inline(expression: ast.expr) -> bool:
    """A name written out where it is emitted: a name-shaped literal, or an f-string without spaces."""
    if isinstance(expression, ast.Constant):
        return isinstance(expression.value, str) and bool(_NAME_SHAPED.match(expression.value))
    if isinstance(expression, ast.JoinedStr):
        text = "".join(part.value for part in expression.values if isinstance(part, ast.Constant))
        return not any(character.isspace() for character in text)
    return False


def test_no_event_or_milestone_is_named_by_a_literal_where_it_is_emitted() -> None:
    inline = [f"{e.where}: {ast.unparse(e.name)}" for e in emissions() if _spelled_inline(e.name)]
    assert inline == [], "emitted by a literal name; declare it in actorflow/core/events.py:\n" + "\n".join(inline)


def test_the_scan_finds_emissions_of_every_kind() -> None:
    found = list(emissions())
    wheres = {e.where.partition(":")[0] for e in found}
    # A logger's method, a logger's method bound to a name, a milestone, a dict the log sink writes.
    assert {"actorflow/actors/state.py", "actorflow/actors/backends/toolkit.py"} <= wheres
    assert {"actorflow/actors/orchestrator.py", "actorflow/core/tracing.py"} <= wheres
    assert any(e.declared == {"SERVICE_FAILED"} for e in found)
    assert any(e.kind == "milestone" and e.declared == {"MILESTONE_POOL_FAILING"} for e in found)
    assert any(e.declared == {"LOG_EVENTS_DROPPED"} for e in found)


def test_every_declared_event_is_emitted_by_the_package_and_every_emitted_one_is_declared() -> None:
    constants = declared_constants()
    emitted: dict[Kind, set[str]] = {"event": set(), "milestone": set()}
    for emission in emissions():
        emitted[emission.kind] |= emission.declared
    assert {constants[name] for name in emitted["event"]} == events.LOG_EVENTS
    assert {constants[name] for name in emitted["milestone"]} == events.MILESTONES


def test_log_events_are_emitted_as_events_and_milestones_as_milestones() -> None:
    constants = declared_constants()
    wrong = [
        f"{e.where}: {name} ({constants[name]!r}) emitted as {'a milestone' if e.kind == 'milestone' else 'an event'}"
        for e in emissions()
        for name in sorted(e.declared)
        if constants[name] not in (events.MILESTONES if e.kind == "milestone" else events.LOG_EVENTS)
    ]
    assert wrong == []


def test_no_string_in_the_package_spells_a_declared_name_outside_the_events_module() -> None:
    names = set(declared_constants().values())
    spelled = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.value!r}"
        for path, tree in package_sources()
        if path != EVENTS_SOURCE
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
    ]
    assert spelled == [], "use the constants of actorflow.core.events:\n" + "\n".join(spelled)


def test_the_viewer_reads_declared_events_only_and_names_none_by_a_literal() -> None:
    known = traceview.KNOWN_EVENTS
    assert known <= events.LOG_EVENTS | events.EARLIER_EVENTS
    assert known >= events.EARLIER_EVENTS  # kept only so that the viewer reads older logs
    assert {events.TASK_TRANSITION, events.SERVICE_CALL, events.TASK_COMPLETED, events.RUNTIME_STARTED} <= known
    dotted = [
        f"{path.name}:{node.lineno}: {node.value!r}"
        for path in VIEWER_SOURCES
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _DOTTED.match(node.value)
    ]
    assert dotted == []


def test_the_events_module_declares_each_name_once_in_one_group_with_a_docstring() -> None:
    constants = declared_constants()
    milestones = {name: value for name, value in constants.items() if name.startswith("MILESTONE_")}
    logged = {name: value for name, value in constants.items() if name not in milestones}
    assert set(milestones.values()) == events.MILESTONES
    assert len(events.MILESTONES) == len(milestones)  # no two milestone constants share a name
    for name, value in logged.items():
        groups = [value in events.LOG_EVENTS, value in events.EARLIER_EVENTS]
        assert sum(groups) == 1, f"{name} = {value!r} is in neither LOG_EVENTS nor EARLIER_EVENTS, or in both"
    assert len(events.LOG_EVENTS) + len(events.EARLIER_EVENTS) == len(logged)  # nor two event constants
    for name, value in constants.items():
        assert _NAME_SHAPED.match(value), f"{name} = {value!r} is not a dotted lower-case name"
    tree = ast.parse(EVENTS_SOURCE.read_text(encoding="utf-8"))
    body = tree.body
    undocumented = [
        target.id
        for index, node in enumerate(body)
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name) and target.id in constants
        if not (
            index + 1 < len(body)
            and isinstance(body[index + 1], ast.Expr)
            and isinstance(getattr(body[index + 1], "value", None), ast.Constant)
        )
    ]
    assert undocumented == []
