"""The dashboard in a real headless browser: Debian's chromium, driven by Playwright from pytest.

The test opens the page (with a token, as an operator would: `/?token=...`),
submits tasks through the HTTP API, and waits, without sleeping, for the page to
show them: the counts per state, the transitions feed, and a clicked task's
timeline. It also fails on any console error, which is where a Content Security
Policy violation would show.

Screenshot: always saved under the test's tmp_path; with ACTORFLOW_SCREENSHOT=path
(e.g. docs/dashboard.png) it is saved there too. The README's picture is refreshed
on purpose, with that variable, rather than rewritten by every run, so that a plain
test run never leaves the working tree dirty.

Needs `pip install playwright` (the Python package only: never `playwright install`)
and `apt-get install chromium`; without either the test is skipped, saying so, unless
ACTORFLOW_REQUIRE_BROWSER is set (as in CI), where it fails instead.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from actorflow.actors import Runtime
from actorflow.api import ApiServer, create_app, serve_in_background
from actorflow.core import Pipeline, RuntimeConfig, Stage, Task
from actorflow.services import ServiceSet
from actorflow.services import process as default_process

try:
    from playwright.sync_api import Page, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

CHROMIUM = os.environ.get("ACTORFLOW_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "dashboard-token"
WAIT_MS = 15_000


def _missing() -> str | None:
    if sync_playwright is None:
        return "playwright is not installed: pip install playwright (the package only, no browser download)"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no chromium at {CHROMIUM}: apt-get install -y chromium (or set ACTORFLOW_CHROMIUM)"
    return None


pytestmark = [
    pytest.mark.browser,
    # CI sets ACTORFLOW_REQUIRE_BROWSER=1, so that a missing browser fails the run instead of skipping quietly.
    pytest.mark.skipif(
        _missing() is not None and not os.environ.get("ACTORFLOW_REQUIRE_BROWSER"), reason=str(_missing())
    ),
]


@pytest.fixture
def gate() -> threading.Event:
    return threading.Event()


@pytest.fixture
def server(gate: threading.Event) -> Iterator[ApiServer]:
    def process(task: Task) -> Mapping[str, Any]:
        data = task.payload.get("data")
        if isinstance(data, Mapping) and data.get("hold"):
            gate.wait(30)
        return default_process(task)

    runtime = Runtime(RuntimeConfig(), services=ServiceSet(process=process))
    try:
        with serve_in_background(create_app(runtime, token=TOKEN)) as running:
            yield running
    finally:
        gate.set()
        runtime.close(drain=False)


@pytest.fixture
def page() -> Iterator[Page]:
    if (missing := _missing()) is not None:
        pytest.fail(f"ACTORFLOW_REQUIRE_BROWSER is set, but {missing}")
    assert sync_playwright is not None
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 900}, device_scale_factor=1)
            yield context.new_page()
            context.close()
        finally:
            browser.close()


def count_is(page: Page, state: str, expected: int) -> None:
    page.wait_for_function(
        "([state, expected]) => document.querySelector(`[data-count='${state}']`).textContent === String(expected)",
        arg=[state, expected],
        timeout=WAIT_MS,
    )


def test_the_dashboard_shows_live_counts_transitions_and_a_clicked_tasks_timeline(
    server: ApiServer, page: Page, gate: threading.Event, tmp_path: Path
) -> None:
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))

    page.goto(f"{server.url}/?token={TOKEN}")
    page.wait_for_function("document.getElementById('status').dataset.status === 'live'", timeout=WAIT_MS)
    count_is(page, "COMPLETED", 0)

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}) as api:

        def submit(body: dict[str, Any]) -> str:
            response = api.post("/tasks", json=body)
            assert response.status_code == 201
            task_id: str = response.json()["task_id"]
            return task_id

        completed = [submit({"name": f"resize-image-{i}", "data": {"width": 640 + i}}) for i in range(7)]
        for i in range(2):
            submit({"title": f"no name {i}"})  # the validator wants "name": these fail
        for i in range(2):
            submit({"name": f"transcode-{i}", "data": {"hold": True}})  # held in the processor
        doomed = submit({"name": "nightly-report", "data": {"hold": True}})

        count_is(page, "COMPLETED", 7)
        count_is(page, "FAILED", 2)
        count_is(page, "PROCESSING", 3)

        assert api.delete(f"/tasks/{doomed}").status_code in {200, 202}
        count_is(page, "CANCELLED", 1)
        count_is(page, "PROCESSING", 2)

    assert page.locator("#total").inner_text() == "12"
    assert page.locator("#in-flight").inner_text() == "2"
    assert page.locator(f"#feed .row[data-task-id='{completed[0]}']").count() == 4

    page.locator(f"#feed .row[data-task-id='{completed[-1]}']").first.click()
    page.wait_for_selector(f"#detail [data-task-id='{completed[-1]}'] #timeline", timeout=WAIT_MS)
    steps = page.locator("#timeline .step").evaluate_all("steps => steps.map(s => s.dataset.state)")
    assert steps == ["CREATED", "VALIDATED", "PROCESSING", "COMPLETED"]
    assert "resize-image-6" in page.locator("#detail").inner_text()

    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if target := os.environ.get("ACTORFLOW_SCREENSHOT"):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)
    assert problems == [], f"the page logged errors: {problems}"


def test_a_click_on_a_state_card_filters_the_feed_to_that_state(server: ApiServer, page: Page) -> None:
    page.goto(f"{server.url}/?token={TOKEN}")
    page.wait_for_function("document.getElementById('status').dataset.status === 'live'", timeout=WAIT_MS)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        api.post("/tasks", json={"name": "ok", "data": 1})
        api.post("/tasks", json={"nope": 1})
    count_is(page, "FAILED", 1)
    count_is(page, "COMPLETED", 1)

    page.locator(".card[data-state='FAILED']").click()

    visible = page.locator("#feed .row:visible")
    assert visible.count() == 1
    assert visible.first.get_attribute("data-to") == "FAILED"
    page.locator(".card[data-state='FAILED']").click()
    assert page.locator("#feed .row:visible").count() == 6  # 4 transitions + 2


def test_the_dashboard_shows_a_card_per_state_of_the_runtimes_own_pipelines(page: Page) -> None:
    held = threading.Event()

    def check(task: Task, value: Any) -> None:
        return None

    def fetch(task: Task, value: Any) -> None:
        held.wait(30)

    ingest = Pipeline("ingest", [Stage("check", check), Stage("fetch", fetch)])
    runtime = Runtime(RuntimeConfig(), pipelines=[ingest])
    try:
        with serve_in_background(create_app(runtime, token=TOKEN)) as running:
            page.goto(f"{running.url}/?token={TOKEN}")
            page.wait_for_function("document.getElementById('status').dataset.status === 'live'", timeout=WAIT_MS)
            cards = page.locator(".card").evaluate_all("cards => cards.map(c => c.dataset.state)")
            assert cards == ["CREATED", "CHECK", "FETCH", "COMPLETED", "FAILED", "CANCELLED"]
            with httpx.Client(base_url=running.url, headers={"Authorization": f"Bearer {TOKEN}"}) as api:
                for i in range(2):
                    assert api.post("/tasks?pipeline=ingest", json={"name": f"page-{i}"}).status_code == 201
            count_is(page, "FETCH", 2)
            assert page.locator("#in-flight").inner_text() == "2"
            page.locator(".card[data-state='FETCH']").click()
            assert page.locator("#feed .row:visible").count() == 2
            held.set()
            count_is(page, "COMPLETED", 2)
    finally:
        held.set()
        runtime.close(drain=False)
