"""The dashboard in a real headless browser: Debian's chromium, driven by Playwright from pytest.

The tests open the page (with a token, as an operator would: `/?token=...`),
submit tasks through the HTTP API, and wait, without sleeping, on conditions of
the page's DOM: the counts per state, the throughput chart, latency per stage,
pool utilisation, the task list (names beside ids, search, state filter, a list
that holds still under the row being read) and a clicked task's timeline, with
its cancel and retry buttons. They also fail on any console error, which is
where a Content Security Policy violation would show.

Screenshot: always saved under the test's tmp_path; with ACTORFLOW_SCREENSHOT=path
(e.g. docs/dashboard.png) it is saved there too. The README's picture is refreshed
on purpose, with that variable, rather than rewritten by every run, so that a plain
test run never leaves the working tree dirty.

Needs `pip install playwright` (the Python package only: never `playwright install`)
and `apt-get install chromium`; without either the test is skipped, saying so, unless
ACTORFLOW_REQUIRE_BROWSER is set (as in CI), where it fails instead.
"""

from __future__ import annotations

import contextlib
import os
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


@contextlib.contextmanager
def running_server(gate: threading.Event, token: str | None) -> Iterator[ApiServer]:
    """A runtime behind the API whose processor holds any task with `data.hold` until `gate` is set."""

    def process(task: Task) -> Mapping[str, Any]:
        data = task.payload.get("data")
        if isinstance(data, Mapping) and data.get("hold"):
            gate.wait(30)
        return default_process(task)

    runtime = Runtime(RuntimeConfig(), services=ServiceSet(process=process))
    try:
        with serve_in_background(create_app(runtime, token=token)) as running:
            yield running
    finally:
        gate.set()
        runtime.close(drain=False)


@pytest.fixture
def server(gate: threading.Event) -> Iterator[ApiServer]:
    with running_server(gate, TOKEN) as running:
        yield running


@pytest.fixture
def open_server(gate: threading.Event) -> Iterator[ApiServer]:
    with running_server(gate, None) as running:
        yield running


@pytest.fixture
def page() -> Iterator[Page]:
    if (missing := _missing()) is not None:
        pytest.fail(f"ACTORFLOW_REQUIRE_BROWSER is set, but {missing}")
    assert sync_playwright is not None
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 900}, device_scale_factor=1)
            page = context.new_page()
            problems: list[str] = []
            page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(str(error)))
            yield page
            assert problems == [], f"the page logged errors: {problems}"
            context.close()
        finally:
            browser.close()


class Client:
    """The HTTP API, as a script beside the browser would use it."""

    def __init__(self, server: ApiServer, token: str | None = TOKEN) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=server.url, headers=headers)

    def submit(self, body: dict[str, Any]) -> str:
        response = self.http.post("/tasks", json=body)
        assert response.status_code == 201, response.text
        task_id: str = response.json()["task_id"]
        return task_id

    def get(self, task_id: str) -> dict[str, Any]:
        response = self.http.get(f"/tasks/{task_id}")
        assert response.status_code == 200, response.text
        record: dict[str, Any] = response.json()
        return record


@pytest.fixture
def api(server: ApiServer) -> Iterator[Client]:
    client = Client(server)
    yield client
    client.http.close()


def open_page(page: Page, server: ApiServer, token: str | None = TOKEN) -> None:
    page.goto(f"{server.url}/?token={token}" if token else server.url)
    page.wait_for_function("() => document.getElementById('status').dataset.status === 'live'", timeout=WAIT_MS)


def count_is(page: Page, state: str, expected: int) -> None:
    page.wait_for_function(
        "([state, expected]) => document.querySelector(`[data-count='${state}']`)?.textContent === String(expected)",
        arg=[state, expected],
        timeout=WAIT_MS,
    )


def rows_are(page: Page, expected: int) -> None:
    page.wait_for_function("n => document.querySelectorAll('#tasks .row').length === n", arg=expected, timeout=WAIT_MS)


def visible_rows(page: Page) -> list[str]:
    ids: list[str] = page.locator("#tasks .row").evaluate_all(
        "rows => rows.filter(r => !r.hidden).map(r => r.dataset.taskId)"
    )
    return ids


def select(page: Page, task_id: str) -> None:
    page.locator(f"#tasks .row[data-task-id='{task_id}']").click()
    page.wait_for_selector(f"#detail [data-task-id='{task_id}'] #timeline", timeout=WAIT_MS)


def detail_is(page: Page, task_id: str, state: str) -> None:
    page.wait_for_selector(f"#detail [data-task-id='{task_id}'][data-state='{state}']", timeout=WAIT_MS)


def test_the_dashboard_shows_counts_throughput_latency_pools_and_a_clicked_tasks_timeline(
    server: ApiServer, page: Page, api: Client, gate: threading.Event, tmp_path: Path
) -> None:
    open_page(page, server)
    count_is(page, "COMPLETED", 0)

    names = ["resize-image", "send-invoice", "index-document", "thumbnail", "ocr-scan", "sync-crm", "geocode"]
    completed = [api.submit({"name": f"{name}-{i}", "data": {"size": 640 + i}}) for i, name in enumerate(names)]
    count_is(page, "COMPLETED", 7)
    failed = [api.submit({"title": f"no name {i}"}) for i in range(2)]  # the validator wants "name": these fail
    count_is(page, "FAILED", 2)
    for i in range(2):
        api.submit({"name": f"transcode-video-{i}", "data": {"hold": True}})  # held in the processor
    doomed = api.submit({"name": "nightly-report", "data": {"hold": True}})
    count_is(page, "PROCESSING", 3)
    page.wait_for_function(
        "() => document.querySelector(\"#pools [data-pool='processor'] [data-busy]\")?.textContent === '3/4'",
        timeout=WAIT_MS,
    )

    assert api.http.delete(f"/tasks/{doomed}").status_code in {200, 202}
    count_is(page, "CANCELLED", 1)
    count_is(page, "PROCESSING", 2)
    assert page.locator("#total").inner_text() == "12"

    # One row per task, newest first, with the payload's name beside the id.
    rows_are(page, 12)
    first = page.locator(f"#tasks .row[data-task-id='{completed[0]}']")
    assert first.locator(".tid").inner_text() == completed[0][:11] or completed[0].startswith(
        first.locator(".tid").inner_text().rstrip("…")
    )
    assert first.locator(".tname").inner_text() == "resize-image-0"
    # A payload with no name: the row says which task, of which pipeline, rather than a "no name" like all others.
    for task_id in failed:
        assert page.locator(f"#tasks .row[data-task-id='{task_id}'] .tname").inner_text() == f"default · {task_id}"
    assert visible_rows(page)[0] == doomed

    # The chart's bars add up, per final state, to the tasks that reached it; "created" is a line over them.
    page.wait_for_function(
        """() => {
            const sum = s => [...document.querySelectorAll(`#throughput rect[data-state='${s}']`)]
                .reduce((n, r) => n + Number(r.dataset.n), 0);
            return sum('COMPLETED') === 7 && sum('FAILED') === 2 && sum('CANCELLED') === 1;
        }""",
        timeout=WAIT_MS,
    )
    assert page.locator("#throughput polyline.created").count() == 1
    assert page.locator("#throughput rect[data-state='PROCESSING']").count() == 0  # not final: not throughput

    # Latency per stage: the stages are the states that tasks have left, plus end to end.
    stages = page.locator("#latency .bar-row").evaluate_all("rows => rows.map(r => r.dataset.stage)")
    assert stages == ["CREATED", "VALIDATED", "PROCESSING", "end to end"]
    assert "ms" in page.locator("#latency [data-stage='PROCESSING'] .nums").inner_text()

    select(page, completed[-1])
    steps = page.locator("#timeline .step").evaluate_all("steps => steps.map(s => s.dataset.state)")
    assert steps == ["CREATED", "VALIDATED", "PROCESSING", "COMPLETED"]
    assert "geocode-6" in page.locator("#detail .head").inner_text()
    assert page.locator("#cancel").is_disabled()  # COMPLETED is final
    assert page.locator("#retry").is_enabled()

    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_a_search_by_name_or_id_and_the_state_filter_narrow_the_task_list(
    server: ApiServer, page: Page, api: Client
) -> None:
    open_page(page, server)
    alphas = [api.submit({"name": f"alpha-{i}", "data": i}) for i in range(2)]
    beta = api.submit({"name": "beta", "data": 1})
    broken = api.submit({"nope": 1})
    count_is(page, "COMPLETED", 3)
    count_is(page, "FAILED", 1)
    rows_are(page, 4)
    page.wait_for_function("() => !document.querySelector('#tasks .tname').textContent.includes('…')", timeout=WAIT_MS)

    page.locator("#search").fill("ALPHA")
    assert sorted(visible_rows(page)) == sorted(alphas)
    page.locator("#search").fill(beta[:8])
    assert visible_rows(page) == [beta]
    page.locator("#search").fill("")
    assert len(visible_rows(page)) == 4

    page.locator("#state-filter").select_option("FAILED")
    assert visible_rows(page) == [broken]
    assert page.locator(".card[data-state='FAILED']").get_attribute("aria-pressed") == "true"
    page.locator(".card[data-state='COMPLETED']").click()  # a card sets the same filter
    assert page.locator("#state-filter").input_value() == "COMPLETED"
    assert sorted(visible_rows(page)) == sorted([*alphas, beta])
    page.locator("#search").fill("alpha-1")  # both at once
    assert visible_rows(page) == [alphas[1]]
    page.locator(".card[data-state='COMPLETED']").click()
    page.locator("#search").fill("")
    assert len(visible_rows(page)) == 4
    # The state filter offers the states the API reported, not a list built into the page.
    options = page.locator("#state-filter option").evaluate_all("options => options.map(o => o.value)")
    assert options == ["", "CREATED", "VALIDATED", "PROCESSING", "COMPLETED", "FAILED", "CANCELLED"]


def test_the_list_holds_still_under_a_selected_row_while_new_tasks_arrive(
    server: ApiServer, page: Page, api: Client
) -> None:
    open_page(page, server)
    ids = [api.submit({"name": f"first-{i}", "data": i}) for i in range(10)]
    count_is(page, "COMPLETED", 10)
    rows_are(page, 10)
    reading = ids[4]
    select(page, reading)
    where = f"document.querySelector(\"#tasks .row[data-task-id='{reading}']\").getBoundingClientRect().top"
    top_before = page.evaluate(where)

    later = [api.submit({"name": f"later-{i}", "data": i}) for i in range(5)]
    count_is(page, "COMPLETED", 15)
    page.wait_for_function(
        "() => !document.getElementById('new-pill').hidden"
        " && document.getElementById('new-pill').textContent === '5 new ↑'",
        timeout=WAIT_MS,
    )
    assert page.evaluate(where) == top_before
    assert visible_rows(page) == ids[::-1]

    page.locator("#new-pill").click()
    rows_are(page, 15)
    assert visible_rows(page) == [*later[::-1], *ids[::-1]]
    assert page.locator("#new-pill").is_hidden()


def test_cancel_and_retry_send_the_token_and_retry_submits_the_same_payload(
    server: ApiServer, page: Page, api: Client
) -> None:
    sent: list[tuple[str, str | None]] = []
    page.on(
        "request",
        lambda request: (
            sent.append((request.method, request.headers.get("authorization")))
            if request.method in {"POST", "DELETE"}
            else None
        ),
    )
    open_page(page, server)
    held = api.submit({"name": "transcode-video", "data": {"hold": True, "codec": "av1"}})
    count_is(page, "PROCESSING", 1)
    select(page, held)
    assert page.locator("#cancel").is_enabled()

    page.locator("#cancel").click()
    page.wait_for_selector("#said[data-outcome='cancelled']", timeout=WAIT_MS)
    detail_is(page, held, "CANCELLED")
    assert api.get(held)["state"] == "CANCELLED"

    page.locator("#retry").click()
    page.wait_for_selector("#said[data-outcome='retried'] button", timeout=WAIT_MS)
    count_is(page, "PROCESSING", 1)
    new_id = page.locator("#said button").get_attribute("title").removeprefix("Show ")
    assert new_id != held
    assert api.get(new_id)["payload"] == {"name": "transcode-video", "data": {"hold": True, "codec": "av1"}}

    page.locator("#said button").click()  # the answer links to the new task
    detail_is(page, new_id, "PROCESSING")
    assert sent == [("DELETE", f"Bearer {TOKEN}"), ("POST", f"Bearer {TOKEN}")]


def test_without_a_token_on_an_open_server_retry_submits_a_new_task(open_server: ApiServer, page: Page) -> None:
    open_page(page, open_server, token=None)
    client = Client(open_server, token=None)
    failed = client.submit({"title": "no name"})
    count_is(page, "FAILED", 1)
    select(page, failed)

    sent: list[str | None] = []
    page.on(
        "request",
        lambda request: sent.append(request.headers.get("authorization")) if request.method == "POST" else None,
    )
    page.locator("#retry").click()
    page.wait_for_selector("#said[data-outcome='retried']", timeout=WAIT_MS)
    count_is(page, "FAILED", 2)
    assert sent == [None]
    assert client.http.get("/stats").json()["submitted"] == 2
    # The list is being read (a row is selected), so the new task waits behind the pill.
    page.wait_for_function("() => document.getElementById('new-pill').textContent === '1 new ↑'", timeout=WAIT_MS)
    rows_are(page, 1)
    client.http.close()


@pytest.mark.skipif(not os.environ.get("ACTORFLOW_SCREENSHOT"), reason="only with ACTORFLOW_SCREENSHOT=path")
@pytest.mark.timeout(90)
def test_a_realistic_run_is_photographed_for_the_readme(
    server: ApiServer, page: Page, api: Client, gate: threading.Event
) -> None:
    """Eight seconds of traffic (so that the chart has history), some of it failing, some held in flight."""
    open_page(page, server)
    kinds = ["resize-image", "send-invoice", "index-document", "thumbnail", "ocr-scan", "sync-crm", "geocode"]
    completed = failed = 0
    for second, (ok, bad) in enumerate([(4, 0), (6, 1), (5, 0), (8, 2), (7, 0), (9, 1), (6, 0), (10, 1)]):
        start = page.evaluate("() => Math.floor(Date.now() / 1000)")
        for i in range(ok):
            api.submit({"name": f"{kinds[(second + i) % len(kinds)]}-{completed + i}", "data": {"n": i}})
        for i in range(bad):
            api.submit({"title": f"untitled-{failed + i}"})
        completed, failed = completed + ok, failed + bad
        count_is(page, "COMPLETED", completed)
        count_is(page, "FAILED", failed)
        # Traffic spread over wall-clock seconds is the point of this picture: wait for the next one.
        page.wait_for_function("t => Date.now() >= (t + 1) * 1000", arg=start, timeout=WAIT_MS)
    for name in ["transcode-video-0", "transcode-video-1", "nightly-report"]:
        api.submit({"name": name, "data": {"hold": True}})
    doomed = api.submit({"name": "backfill-archive", "data": {"hold": True}})
    count_is(page, "PROCESSING", 4)
    assert api.http.delete(f"/tasks/{doomed}").status_code in {200, 202}
    count_is(page, "CANCELLED", 1)
    page.wait_for_function(
        "() => document.querySelectorAll('#throughput rect').length >= 8"
        " && !document.querySelector('.tname').textContent.includes('…')",
        timeout=WAIT_MS,
    )
    page.locator("#tasks .row[data-state='COMPLETED']").nth(2).click()
    page.wait_for_selector("#detail #timeline", timeout=WAIT_MS)
    page.mouse.move(0, 0)

    target = Path(os.environ["ACTORFLOW_SCREENSHOT"])
    target.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 10_000


def test_a_page_opened_on_a_server_with_more_tasks_than_it_keeps_in_memory_shows_the_newest_history(
    page: Page, tmp_path: Path
) -> None:
    # Finished tasks past retain_terminal are read back from the journal: the page must still start from the newest.
    runtime = Runtime(RuntimeConfig(journal_path=str(tmp_path / "tasks.db"), retain_terminal=10))
    try:
        ids = [handle.task_id for handle in runtime.submit_many([{"name": f"job-{i}", "data": i} for i in range(250)])]
        assert runtime.join(30)
        with serve_in_background(create_app(runtime, token=TOKEN)) as running:
            open_page(page, running)
            rows_are(page, 200)  # the list's length

            assert visible_rows(page) == ids[::-1][:200]
            # The chart and the latencies come from those tasks' histories, before any live event.
            page.wait_for_function(
                """() => [...document.querySelectorAll("#throughput rect[data-state='COMPLETED']")]
                    .reduce((n, r) => n + Number(r.dataset.n), 0) === 200""",
                timeout=WAIT_MS,
            )
            stages = page.locator("#latency .bar-row").evaluate_all("rows => rows.map(r => r.dataset.stage)")
            assert stages == ["CREATED", "VALIDATED", "PROCESSING", "end to end"]
    finally:
        runtime.close(drain=False)


def test_the_state_cards_follow_the_pipelines_order_with_terminal_states_last_whatever_arrives_first(
    page: Page,
) -> None:
    held = threading.Event()

    def fetch(task: Task, value: Any) -> None:
        held.wait(30)

    ingest = Pipeline("ingest", [Stage("check", lambda task, value: None), Stage("fetch", fetch)])
    other = Pipeline("other", [Stage("zap", lambda task, value: None)])
    runtime = Runtime(RuntimeConfig(), pipelines=[ingest, other])
    expected = ["CREATED", "CHECK", "FETCH", "ZAP", "COMPLETED", "FAILED", "CANCELLED"]
    stats_requests: list[Any] = []

    def hold(route: Any) -> None:  # Playwright wants a function of its own here, not a bound list method
        stats_requests.append(route)

    try:
        with serve_in_background(create_app(runtime)) as running:
            task_id = runtime.submit({"name": "slow"}, pipeline="ingest").task_id
            # /stats is held until a transition has come in over the stream: the events name states first.
            page.route("**/stats", hold)
            open_page(page, running, token=None)
            held.set()
            page.wait_for_function(
                "id => document.querySelector(`#tasks .row[data-task-id='${id}']`)?.dataset.state === 'COMPLETED'",
                arg=task_id,
                timeout=WAIT_MS,
            )
            for request in stats_requests:  # (grows while this runs, if /stats is asked for again meanwhile)
                request.continue_()
            page.unroute("**/stats")
            count_is(page, "COMPLETED", 1)
            cards = page.locator(".card").evaluate_all("cards => cards.map(c => c.dataset.state)")
            options = page.locator("#state-filter option").evaluate_all("options => options.map(o => o.value)")
    finally:
        held.set()
        runtime.close(drain=False)

    assert cards == expected
    assert options == ["", *expected]


def test_a_runtime_with_its_own_pipeline_shows_that_pipelines_states_and_names_it(page: Page) -> None:
    held = threading.Event()

    def fetch(task: Task, value: Any) -> None:
        held.wait(30)

    ingest = Pipeline("ingest", [Stage("check", lambda task, value: None), Stage("fetch", fetch)])
    runtime = Runtime(RuntimeConfig(), services=ServiceSet(), pipelines=[ingest])
    try:
        with serve_in_background(create_app(runtime, token=TOKEN)) as running:
            open_page(page, running)
            with httpx.Client(base_url=running.url, headers={"Authorization": f"Bearer {TOKEN}"}) as api:
                ids = [
                    api.post("/tasks?pipeline=ingest", json={"name": f"page-{i}"}).json()["task_id"] for i in range(2)
                ]
                api.post("/tasks", json={"name": "seed", "data": 1})
            count_is(page, "FETCH", 2)
            count_is(page, "COMPLETED", 1)
            select(page, ids[0])
            steps = page.locator("#timeline .step").evaluate_all("steps => steps.map(s => s.dataset.state)")
            assert steps == ["CREATED", "CHECK", "FETCH"]
            assert "ingest" in page.locator("#detail").inner_text()
            held.set()
            count_is(page, "COMPLETED", 3)
    finally:
        held.set()
        runtime.close(drain=False)
