"""The benchmark suite keeps working: its tiniest run completes and writes JSON of the documented shape.

Nothing here asserts a speed. Speed lives in the benchmark's report, not in timed tests.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from benchmarks import __main__ as bench_main
from benchmarks.__main__ import SCHEMA, main
from benchmarks.scenarios import SCENARIOS
from benchmarks.targets import TARGETS

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    capture = tmp_path_factory.mktemp("bench") / "report.md"
    with capture.open("w", encoding="utf-8") as report, contextlib.redirect_stdout(report):
        code = main(["--smoke", "--out", str(out)])
    assert code == 0, "a scenario broke; its traceback is in the captured stderr"
    return json.loads(out.read_text(encoding="utf-8")), capture.read_text(encoding="utf-8")


@pytest.mark.timeout(110)
def test_the_smoke_run_describes_the_machine_and_the_code(smoke_run: tuple[dict[str, Any], str]) -> None:
    results, _ = smoke_run
    assert results["schema"] == SCHEMA
    assert results["mode"] == "smoke"
    machine = results["machine"]
    for key in ("cpu_model", "cores", "python", "platform", "date", "libraries"):
        assert machine[key], key
    assert set(results["code"]) >= {"commit", "branch"}


def test_every_scenario_is_reported_as_ok_or_skipped_with_a_reason(smoke_run: tuple[dict[str, Any], str]) -> None:
    results, _ = smoke_run
    assert list(results["scenarios"]) == list(SCENARIOS)
    for key, section in results["scenarios"].items():
        assert section["status"] in {"ok", "skipped"}, (key, section.get("notes"))
        if section["status"] == "skipped":
            assert section["notes"], f"{key} is skipped without saying why"


def test_each_measured_system_has_throughput_cpu_and_latency_figures(smoke_run: tuple[dict[str, Any], str]) -> None:
    results, _ = smoke_run
    for key, section in results["scenarios"].items():
        if section["status"] != "ok" or key == "memory":
            continue
        assert section["systems"], key
        for name, system in section["systems"].items():
            assert system["role"] in {"runtime", "baseline", "reference"}
            assert len(system["throughput_tps"]["rounds"]) == results["rounds"], (key, name)
            assert system["throughput_tps"]["median"] > 0, (key, name)
            assert system["cpu_us_per_task"]["median"] is not None
            assert system["switches_per_task"]["median"] is not None
            assert set(system["latency_saturated_ms"]) >= {"p50", "p90", "p99", "max", "samples"}
        for pair, ratio in section["ratios"].items():
            numerator, _, denominator = pair.partition(" / ")
            assert {numerator, denominator} <= set(section["systems"]), pair
            assert len(ratio["rounds"]) == results["rounds"]


def test_the_no_op_scenario_runs_the_runtime_against_all_three_baselines(
    smoke_run: tuple[dict[str, Any], str],
) -> None:
    noop = smoke_run[0]["scenarios"]["noop"]
    assert set(noop["systems"]) == {"runtime", "bare-pykka", "naive-pykka", "threadpool"}
    assert noop["systems"]["runtime"]["latency_light_ms"]["samples"] > 0
    assert "runtime / bare-pykka" in noop["ratios"]


def test_memory_is_measured_per_system_in_a_subprocess(smoke_run: tuple[dict[str, Any], str]) -> None:
    memory = smoke_run[0]["scenarios"]["memory"]
    assert memory["status"] == "ok"
    for name in ("runtime", "bare-pykka", "threadpool"):
        figures = memory["systems"][name]
        assert figures["peak_rss_mb"] > 0
        assert figures["bytes_per_task"] is not None
        assert figures["rss_timeline_mb"], name


def test_every_target_of_the_issue_gets_a_verdict_or_says_why_not(smoke_run: tuple[dict[str, Any], str]) -> None:
    targets = smoke_run[0]["targets"]
    assert [t["key"] for t in targets] == [t.key for t in TARGETS]
    for target in targets:
        assert target["met"] in {True, False, None}
        if target["met"] is None:
            assert target["note"], target["key"]


def test_the_report_is_a_markdown_table(smoke_run: tuple[dict[str, Any], str]) -> None:
    _, report = smoke_run
    assert "| scenario | system | tasks/s (median) |" in report
    assert "| runtime |" in report
    assert "Targets:" in report


def test_an_ordinary_run_writes_an_ignored_file_and_never_the_published_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench_main, "_RESULTS", tmp_path)
    assert main(["--smoke", "--only", "noop"]) == 0
    capsys.readouterr()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last-run.json"]
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "benchmarks/results/last-run.json"], cwd=ROOT, check=False, timeout=30
    )
    assert ignored.returncode == 0, "benchmarks/results/last-run.json must be ignored by git"


def test_publish_takes_only_a_complete_full_run(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--publish", "--quick"])
    assert exited.value.code == 2
    assert "--publish takes a complete full run" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_two_versions_run_the_same_loads_in_turns_and_each_gets_its_ratio_to_the_first() -> None:
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    if head.returncode != 0:
        pytest.skip("not a git checkout (an sdist): there is no commit to compare with")
    from benchmarks.versions import compare  # noqa: PLC0415 - only where git is

    report = compare([head.stdout.strip(), "."], rounds=1, divide_by=100)
    assert set(report) == {"noop", "journal"}
    for section in report.values():
        assert set(section) == {head.stdout.strip(), "."}
        first = section[head.stdout.strip()]
        assert (first["throughput_ratio"], first["cpu_ratio"]) == (1.0, 1.0)
        assert all(figures["tasks_per_s"] > 0 and figures["cpu_us_per_task"] > 0 for figures in section.values())
