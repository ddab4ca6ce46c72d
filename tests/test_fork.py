"""fork() after a runtime exists: the child knows its runtime is the parent's, and exits at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    from actorflow import Runtime, RuntimeConfig, RuntimeStopped

    runtime = Runtime(RuntimeConfig(journal_path=sys.argv[1]))
    first = runtime.submit({"name": "before-fork", "data": 1}).result(timeout=10)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what submit and result do, then exit normally (atexit runs)
        os.close(read_end)
        report = {}
        for name, call in (
            ("submit", lambda: runtime.submit({"name": "in-child", "data": 2})),
            ("join", lambda: runtime.join()),
            ("get", lambda: runtime.get(first.task_id)),
        ):
            try:
                call()
                report[name] = "returned"
            except RuntimeStopped as exc:
                report[name] = str(exc)
        report["closed"] = runtime.closed
        report["health"] = runtime.health()
        runtime.close()
        os.write(write_end, json.dumps(report).encode())
        os.close(write_end)
        sys.exit(0)
    os.close(write_end)
    started = time.monotonic()
    _, status = os.waitpid(pid, 0)
    child_s = time.monotonic() - started
    report = json.loads(os.read(read_end, 65536).decode())
    after = runtime.submit({"name": "after-fork", "data": 3}).result(timeout=10)
    runtime.close()
    print(json.dumps({"report": report, "status": status, "child_s": child_s, "parent": after.state.value}))
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.timeout(60)
def test_a_forked_child_refuses_to_use_the_parents_runtime_and_exits_at_once(tmp_path: Path) -> None:
    script = tmp_path / "fork_child.py"
    script.write_text(_SCRIPT)
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "tasks.db")],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout's actorflow, not an installed one
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    outcome = json.loads(completed.stdout.strip().splitlines()[-1])
    assert outcome["status"] == 0
    assert outcome["child_s"] < 5, outcome
    for call in ("submit", "join", "get"):
        assert "fork() child" in outcome["report"][call], outcome
    assert outcome["report"]["closed"] is True
    assert outcome["report"]["health"]["status"] == "stopped", outcome  # not "ok": nothing works there
    assert "fork() child" in outcome["report"]["health"]["reason"]
    assert outcome["parent"] == "COMPLETED"
    assert time.monotonic() - started < 30


_HOOKS_SCRIPT = textwrap.dedent(
    """
    import atexit, json, os

    registered = []
    real_atexit, real_at_fork = atexit.register, os.register_at_fork

    def note_atexit(fn, *args, **kwargs):
        registered.append(("atexit", fn.__module__))
        return real_atexit(fn, *args, **kwargs)

    def note_at_fork(**kwargs):
        registered.append(("fork", next(iter(kwargs.values())).__module__))
        return real_at_fork(**kwargs)

    atexit.register, os.register_at_fork = note_atexit, note_at_fork
    import actorflow
    from actorflow import Runtime

    at_import = [entry for entry in registered if entry[1] == "actorflow.actors.runtime.hooks"]
    Runtime().close()
    Runtime().close()
    after = [entry for entry in registered if entry[1] == "actorflow.actors.runtime.hooks"]
    print(json.dumps({"at_import": at_import, "after": after}))
    """
)


@pytest.mark.timeout(60)
def test_the_runtime_module_registers_its_exit_and_fork_hooks_with_the_first_runtime_not_at_import(
    tmp_path: Path,
) -> None:
    script = tmp_path / "hooks.py"
    script.write_text(_HOOKS_SCRIPT)
    completed = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    outcome = json.loads(completed.stdout.strip().splitlines()[-1])
    assert outcome["at_import"] == []
    expected = [["atexit", "actorflow.actors.runtime.hooks"]]
    if hasattr(os, "register_at_fork"):
        expected.append(["fork", "actorflow.actors.runtime.hooks"])
    assert outcome["after"] == expected  # once, however many runtimes are made
