"""The `actorflow` command: its dispatcher, `--json` for scripts, a read-only `inspect`, and `serve --app`."""

from __future__ import annotations

import json
import multiprocessing.forkserver
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import actorflow
from actorflow import Runtime, RuntimeConfig, ServiceSet
from actorflow.cli import main
from actorflow.cli.apps import AppSpecError, load_runtime
from tests.test_api_cli import Served

ROOT = Path(__file__).resolve().parent.parent


def test_help_lists_every_command_and_version_prints_the_packages_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("demo", "serve", "trace", "inspect"):
        assert f"  {command} " in out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"actorflow {actorflow.__version__}"


def test_an_unknown_command_is_a_usage_error_naming_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'frobnicate'" in err
    assert "demo" in err


def test_python_dash_m_actorflow_is_the_same_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "actorflow", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"actorflow {actorflow.__version__}"


def test_run_demo_runs_the_demo_by_default_and_takes_the_same_subcommands(tmp_path: Path) -> None:
    journal = tmp_path / "demo.db"
    demo = subprocess.run(
        [sys.executable, str(ROOT / "run_demo.py"), "--tasks", "9", "--journal", str(journal)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert demo.returncode == 0, demo.stderr
    assert "all terminal" in demo.stdout
    inspected = subprocess.run(
        [sys.executable, str(ROOT / "run_demo.py"), "inspect", str(journal), "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert inspected.returncode == 0, inspected.stderr
    counts = json.loads(inspected.stdout)["counts"]
    assert (counts["COMPLETED"], counts["FAILED"]) == (8, 1)


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    path = tmp_path / "tasks.db"
    with Runtime(RuntimeConfig(journal_path=str(path))) as runtime:
        for index in range(3):
            runtime.submit({"name": f"t{index}", "data": index}, task_id=f"t-{index}").result(timeout=10)
        runtime.submit({"name": ""}, task_id="t-bad").result(timeout=10)
    return path


def test_inspect_json_holds_the_counts_and_the_records_and_leaves_no_file_behind(
    journal: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(os.listdir(journal.parent))
    bytes_before = journal.read_bytes()
    assert main(["inspect", str(journal), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["counts"]["COMPLETED"] == 3
    assert document["counts"]["FAILED"] == 1
    assert [task["task_id"] for task in document["tasks"]] == ["t-0", "t-1", "t-2", "t-bad"]
    assert document["tasks"][0]["history"][-1]["to_state"] == "COMPLETED"
    assert main(["inspect", str(journal), "--task", "t-bad"]) == 0
    assert "FAILED" in capsys.readouterr().out
    assert sorted(os.listdir(journal.parent)) == before, "no -wal, -shm or .lock file may be left behind"
    assert journal.read_bytes() == bytes_before


def test_inspect_reads_a_journal_that_a_runtime_is_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "live.db"
    with Runtime(RuntimeConfig(journal_path=str(path))) as runtime:
        runtime.submit({"name": "live", "data": 1}, task_id="live-1").result(timeout=10)
        assert main(["inspect", str(path), "--task", "live-1", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["tasks"][0]["state"] == "COMPLETED"
        runtime.submit({"name": "after", "data": 2}).result(timeout=10)  # the runtime still writes


def test_inspect_of_an_unknown_task_exits_1_naming_it(journal: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(journal), "--task", "nope", "--json"]) == 1
    assert "no task 'nope'" in capsys.readouterr().err


def test_trace_json_is_one_document_with_the_tasks_the_summary_and_no_violations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "run.jsonl"
    assert main(["demo", "--tasks", "8", "--log-file", str(log)]) == 0
    capsys.readouterr()
    assert main(["trace", str(log), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["summary"]["tasks"] == 8
    assert document["summary"]["final_states"] == {"COMPLETED": 7, "FAILED": 1}
    assert document["summary"]["transitions_checked"] == 7 * 4 + 1 * 2
    assert document["violations"] == []
    assert len(document["tasks"]) == 8
    kinds = {entry["kind"] for entry in document["tasks"][0]["entries"]}
    assert {"TransitionEntry", "StageRun"} <= kinds


# --- serve --app -------------------------------------------------------------------------------

APP = """
from actorflow import Runtime, RuntimeConfig, ServiceSet

def shout(task):
    return {"shout": str(task.payload["data"]).upper()}

def make_runtime():
    return Runtime(RuntimeConfig(), services=ServiceSet(process=shout))

not_a_runtime = 42

def makes_a_string():
    return "nope"
"""


@pytest.fixture
def app_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    package = tmp_path / "myapp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tasks.py").write_text(textwrap.dedent(APP))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [name for name in sys.modules if name == "myapp" or name.startswith("myapp.")]:
        del sys.modules[name]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("myapp.tasks", "must look like 'module:attribute'"),
        ("myapp.tasks:", "must look like 'module:attribute'"),
        ("nosuchapp.tasks:runtime", "no module named 'nosuchapp.tasks'"),
        ("myapp.nosuch:runtime", "no module named 'myapp.nosuch'"),
        ("myapp.tasks:nosuch", "module 'myapp.tasks' has no attribute 'nosuch'"),
        ("myapp.tasks:not_a_runtime", "myapp.tasks.not_a_runtime is a int, not a Runtime or a function"),
        ("myapp.tasks:makes_a_string", "myapp.tasks.makes_a_string() returned str, not a Runtime"),
    ],
)
def test_a_bad_app_spec_names_the_module_the_attribute_and_what_was_found(
    app_dir: Path, spec: str, message: str
) -> None:
    with pytest.raises(AppSpecError, match=r"^--app ") as caught:
        load_runtime(spec)
    assert message in str(caught.value)


def test_an_app_spec_naming_a_factory_gives_its_runtime(app_dir: Path) -> None:
    runtime = load_runtime("myapp.tasks:make_runtime")
    try:
        record = runtime.submit({"name": "a", "data": "hi"}).result(timeout=10)
        assert record.result == {"shout": "HI"}
    finally:
        runtime.close()


def test_serve_app_serves_the_apps_own_runtime_over_http(app_dir: Path, tmp_path: Path) -> None:
    served = Served(
        ["--app", "myapp.tasks:make_runtime"],
        tmp_path / "serve.log",
        env={"PYTHONPATH": f"{ROOT}{os.pathsep}{app_dir}"},
    )
    try:
        with httpx.stream("GET", f"{served.url}/events", timeout=30) as events:
            lines = events.iter_lines()
            created = httpx.post(f"{served.url}/tasks", json={"name": "a", "data": "quiet"}, timeout=30)
            assert created.status_code == 201, created.text
            task_id = created.json()["task_id"]
            for line in lines:
                if line.startswith("data:"):
                    event = json.loads(line[5:])
                    if event["task_id"] == task_id and event["to_state"] == "COMPLETED":
                        break
        record = httpx.get(f"{served.url}/tasks/{task_id}", timeout=30).json()
        assert record["result"] == {"shout": "QUIET"}
        assert served.stop() == 0
    finally:
        served.close()


def test_serve_app_imports_the_apps_module_from_the_current_directory(app_dir: Path, tmp_path: Path) -> None:
    # As uvicorn does: `cd myproject && actorflow serve --app myapp.tasks:make_runtime`, nothing on PYTHONPATH.
    served = Served(
        ["--app", "myapp.tasks:make_runtime"], tmp_path / "serve.log", env={"PYTHONPATH": str(ROOT)}, cwd=app_dir
    )
    try:
        created = httpx.post(f"{served.url}/tasks", json={"name": "a", "data": "here"}, timeout=30)
        assert created.status_code == 201, created.text
        record = httpx.get(f"{served.url}/tasks/{created.json()['task_id']}", params={"wait": 20}, timeout=30).json()
        assert record["result"] == {"shout": "HERE"}
        assert served.stop() == 0
    finally:
        served.close()


def test_serve_refuses_app_and_journal_together(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--app", "x:y", "--journal", "j.db"]) == 2
    assert "--journal and --app exclude each other" in capsys.readouterr().err


def test_serve_with_a_bad_app_exits_2_with_the_reason(app_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--app", "myapp.tasks:nosuch", "--port", "0"]) == 2
    assert "module 'myapp.tasks' has no attribute 'nosuch'" in capsys.readouterr().err


# --- process-wide settings ---------------------------------------------------------------------


def test_the_process_backend_leaves_multiprocessings_own_fork_server_and_preload_list_alone() -> None:
    server = multiprocessing.forkserver._forkserver
    preload_before = list(server._preload_modules)
    pid_before = server._forkserver_pid
    config = RuntimeConfig(service_backend="process")
    with Runtime(config, services=ServiceSet(workers={"processor": 1})) as runtime:
        assert runtime.submit({"name": "a", "data": 1}).result(timeout=60).state.value == "COMPLETED"
    assert server._preload_modules == preload_before == ["__main__"]
    assert server._forkserver_pid == pid_before


# --- the demo ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "width", "clipped"),
    [
        ("short", 10, "short"),
        ("processor: ValueError: cannot compute the thing", 24, "processor: ValueError:…"),
        ("a" * 30, 10, "a" * 9 + "…"),
        ("two\nlines  of   text", 40, "two lines of text"),
        ("exactly ten", 11, "exactly ten"),
        ("word boundary here", 13, "word…"),
    ],
)
def test_clip_never_cuts_mid_word_without_an_ellipsis(text: str, width: int, clipped: str) -> None:
    from actorflow.cli.demo import clip  # noqa: PLC0415

    assert clip(text, width) == clipped
    assert len(clip(text, width)) <= width


def test_the_demo_is_quiet_but_for_its_report_and_says_which_counts_come_from_earlier_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    journal = str(tmp_path / "demo.db")
    assert main(["demo", "--tasks", "8", "--journal", journal]) == 0
    first = capsys.readouterr()
    assert "this run      8 tasks: 7 COMPLETED, 1 FAILED" in first.out
    assert "earlier runs" not in first.out
    assert "task.completed" not in first.out + first.err  # per-task INFO lines only with -v
    assert main(["demo", "--tasks", "8", "--journal", journal]) == 0
    second = capsys.readouterr().out
    assert "this run      8 tasks: 7 COMPLETED, 1 FAILED" in second
    assert "8 tasks from earlier runs; all runs together: 14 COMPLETED, 2 FAILED" in second
    for line in ("throughput", "end to end    p50", "in PROCESSING p50"):
        assert line in second
