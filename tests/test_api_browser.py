"""The API against hostile web pages, in a real browser: Debian's chromium, driven by Playwright.

A server on loopback is reachable from every page the user opens. These tests
play the page of another site (served by Playwright's router, under a name of
its own) and check, in the browser itself, that it can neither submit a task
(a cross-origin POST that needs no CORS preflight) nor read the API through DNS
rebinding (the other site's name made to resolve to 127.0.0.1, which chromium's
``--host-resolver-rules`` does here). Chromium's own guard against public pages
reaching loopback (Private Network Access) is switched off, to play a browser
that has none (Firefox, Safari, older ones): the server must hold on its own.
Skipped, or failed with ACTORFLOW_REQUIRE_BROWSER, as tests/test_dashboard.py is
when chromium is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from actorflow.actors import Runtime
from actorflow.api import ApiServer, create_app, serve_in_background
from tests.test_dashboard import CHROMIUM, CHROMIUM_ARGS, _missing, pytestmark, sync_playwright

if sync_playwright is not None:
    from playwright.sync_api import Page

__all__ = ["pytestmark"]  # the browser marker and the skip when chromium is missing, as test_dashboard's

EVIL = "evil.example"
NO_PRIVATE_NETWORK_GUARD = (
    "--disable-features=BlockInsecurePrivateNetworkRequests,PrivateNetworkAccessSendPreflights,"
    "PrivateNetworkAccessRespectPreflightResults,LocalNetworkAccessChecks"
)
EVIL_PAGE = "<!doctype html><title>another site</title><p>nothing to see</p>"


@pytest.fixture
def runtime() -> Iterator[Runtime]:
    rt = Runtime()
    try:
        yield rt
    finally:
        rt.close(drain=False)


@pytest.fixture
def server(runtime: Runtime) -> Iterator[ApiServer]:
    with serve_in_background(create_app(runtime)) as running:
        yield running


@pytest.fixture
def page() -> Iterator[Page]:
    """A page of a browser in which evil.example resolves to 127.0.0.1, as after a DNS rebinding."""
    if (missing := _missing()) is not None:
        pytest.fail(f"ACTORFLOW_REQUIRE_BROWSER is set, but {missing}")
    assert sync_playwright is not None
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[*CHROMIUM_ARGS, f"--host-resolver-rules=MAP {EVIL} 127.0.0.1", NO_PRIVATE_NETWORK_GUARD],
        )
        try:
            yield browser.new_page()
        finally:
            browser.close()


def open_evil_page(page: Page, origin: str) -> None:
    """Load the other site's page at `origin`: its document comes from that site (here, the router)."""
    page.route(f"{origin}/", lambda route: route.fulfill(status=200, content_type="text/html", body=EVIL_PAGE))
    page.goto(f"{origin}/")


def test_a_page_of_another_site_cannot_submit_a_task_to_the_server_on_loopback(
    runtime: Runtime, server: ApiServer, page: Page
) -> None:
    open_evil_page(page, f"http://{EVIL}")
    # Bodies a page may POST to any site without the browser asking that site first: a string goes as
    # text/plain, a Blob of no type with no Content-Type at all. The answers are opaque to the page.
    kinds: list[Any] = page.evaluate(
        """async (url) => {
            const text = JSON.stringify({name: "csrf-text", data: 1});
            const bodies = [text, new Blob(['{"name": "csrf-blob", "data": 1}'])];
            const kinds = [];
            for (const body of bodies) kinds.push((await fetch(url, {method: "POST", mode: "no-cors", body})).type);
            return kinds;
        }""",
        f"{server.url}/tasks",
    )

    assert kinds == ["opaque", "opaque"]  # both were sent, and answered
    assert runtime.stats()["submitted"] == 0


def test_a_page_whose_name_was_rebound_to_loopback_cannot_read_the_api(
    runtime: Runtime, server: ApiServer, page: Page
) -> None:
    secret = runtime.submit({"name": "secret-report", "data": 1}).task_id
    # First the page comes from the other site; then its name resolves to 127.0.0.1, and the same
    # origin, port included, is this server: the page may read whatever it answers.
    open_evil_page(page, f"http://{EVIL}:{server.port}")
    answer: dict[str, Any] = page.evaluate(
        """async () => {
            const response = await fetch("/tasks");
            return {status: response.status, text: await response.text()};
        }"""
    )

    assert answer["status"] == 421
    assert secret not in answer["text"]
    assert f"'{EVIL}:{server.port}'" in answer["text"]
