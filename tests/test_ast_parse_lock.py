"""Two threads parsing Python source at once, as Hypothesis and the runtime's workers do during the suite.

See tests/ast_parse_lock.py for the CPython bug (python/cpython#106905) that once
failed ``tests/test_api_schema.py`` on a fresh clone, and for the lock that the
suite's conftest puts around ``ast.parse`` on the interpreters that have it.
"""

from __future__ import annotations

import ast
import gc
import threading
from typing import Any

import pytest

from tests.ast_parse_lock import AFFECTED, SerialParse

WAIT_S = 10.0
# A tree of some thousands of nodes: building it takes many collections of the garbage collector.
SOURCE = "\n".join(
    f"def f{i}(a, b=[1, {{'k': (2, 3)}}]):\n    return [x * a + b[0] for x in range({i})] if a else {{y: y for y in b}}"
    for i in range(40)
)


def parse_from_deeper_in_the_stack(depth: int) -> ast.Module:
    """`ast.parse` from `depth` frames further down: its count of depth starts elsewhere than the main thread's."""
    if depth:
        return parse_from_deeper_in_the_stack(depth - 1)
    tree: ast.Module = ast.parse("x = [1, 2, (3, 4)]")
    return tree


@pytest.mark.timeout(60)
def test_a_parse_on_another_thread_in_the_middle_of_a_parse_never_makes_it_fail() -> None:
    if AFFECTED:
        assert isinstance(ast.parse, SerialParse), "conftest serialises ast.parse on this interpreter"
    guard = ast.parse if isinstance(ast.parse, SerialParse) else None
    other_done = threading.Event()
    main = threading.current_thread()
    collections = 0
    parsing = False

    def other_thread() -> None:
        parse_from_deeper_in_the_stack(100)
        other_done.set()

    def hand_over(phase: str, info: dict[str, Any]) -> None:
        # A collection in the middle of building the main thread's tree: let another thread parse now,
        # and wait until it has, or (with the lock) until it waits for this parse to end.
        nonlocal collections
        if phase != "start" or threading.current_thread() is not main or not parsing:
            return
        collections += 1
        if collections != 5:
            return
        contended = guard.contended if guard is not None else 0
        threading.Thread(target=other_thread, name="other-parser").start()
        if guard is None:
            assert other_done.wait(WAIT_S)
        else:
            assert guard.wait_until_contended(contended + 1, WAIT_S)

    threshold = gc.get_threshold()
    gc.set_threshold(50, *threshold[1:])
    gc.callbacks.append(hand_over)
    try:
        parsing = True
        tree = ast.parse(SOURCE)  # without the lock, on 3.11.0-3.11.7: SystemError, recursion depth mismatch
        parsing = False
    finally:
        parsing = False
        gc.callbacks.remove(hand_over)
        gc.set_threshold(*threshold)
    assert other_done.wait(WAIT_S)

    assert collections >= 5, "the tree was built without the collections this test needs; make SOURCE bigger"
    assert len(tree.body) == 40
