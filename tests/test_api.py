"""The HTTP API over real HTTP on loopback: every route, every error, the token, idempotency, events.

Each test runs a real `Runtime` behind a real uvicorn server on a free port
(`serve_in_background`), and talks to it with httpx. Nothing is mocked. Waiting is
done on events or by polling with a deadline, never by sleeping a fixed time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from actorflow.actors import Runtime
from actorflow.api import ApiServer, create_app, serve_in_background
from actorflow.api._events import EventBroadcaster, _frames
from actorflow.api._idempotency import IdempotencyKeys, StoredAnswer
from actorflow.core import RuntimeConfig, Task, TaskState, TransitionEvent
from actorflow.services import ServiceSet
from actorflow.services import process as default_process

TOKEN = "s3cret-token"
JSON = {"Content-Type": "application/json"}
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED"}
WAIT_S = 10.0


# --- helpers -------------------------------------------------------------------------------------


def wait_for_terminal(client: httpx.Client, task_id: str) -> dict[str, Any]:
    """The task's record once it is terminal: the server holds the request until then (`?wait=`)."""
    record: dict[str, Any] = client.get(f"/tasks/{task_id}", params={"wait": WAIT_S}, timeout=WAIT_S + 5).json()
    assert record["state"] in TERMINAL, f"task {task_id} still {record['state']} after {WAIT_S} s"
    return record


def assert_json_error(response: httpx.Response, status: int) -> str:
    """The response has `status` and a JSON `{"error": "..."}` body with no traceback; returns the message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"], str)
    assert body["error"]
    assert "Traceback" not in response.text
    assert 'File "' not in response.text
    message: str = body["error"]
    return message


def sse_events(response: httpx.Response) -> Iterator[tuple[str, str]]:
    """(event, data) pairs of an SSE stream; comment lines come as ("comment", text)."""
    event, data = "message", []
    for line in response.iter_lines():
        if line.startswith(":"):
            yield "comment", line[1:].strip()
        elif line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data.append(line.split(":", 1)[1].strip())
        elif line == "" and data:
            yield event, "\n".join(data)
            event, data = "message", []


def payload(index: int = 0, **data: object) -> dict[str, object]:
    return {"name": f"task-{index}", "data": {"index": index, **data}}


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def gate() -> threading.Event:
    """Tasks whose payload has data.hold wait in the processor until this is set."""
    return threading.Event()


@pytest.fixture
def held() -> threading.Event:
    """Set once a `data.hold` task is in the processor, waiting for `gate`."""
    return threading.Event()


@pytest.fixture
def runtime_factory(gate: threading.Event, held: threading.Event) -> Iterator[Callable[..., Runtime]]:
    """Builds runtimes whose processor holds `data.hold` tasks until `gate` opens; closes them all."""
    made: list[Runtime] = []

    def process(task: Task) -> Mapping[str, Any]:
        data = task.payload.get("data")
        if isinstance(data, Mapping) and data.get("hold"):
            held.set()
            gate.wait(WAIT_S)
        return default_process(task)

    def make(**config: Any) -> Runtime:
        runtime = Runtime(RuntimeConfig(**config), services=ServiceSet(process=process))
        made.append(runtime)
        return runtime

    yield make
    gate.set()
    for runtime in made:
        runtime.close(drain=False)


@pytest.fixture
def rt(runtime_factory: Callable[..., Runtime]) -> Runtime:
    return runtime_factory()


@pytest.fixture
def server(rt: Runtime) -> Iterator[ApiServer]:
    # Payloads as big as the 1 MiB body limit: the tests of that limit and of big pages need them.
    with serve_in_background(create_app(rt, heartbeat_s=0.2, max_payload_bytes=1024 * 1024)) as running:
        yield running


@pytest.fixture
def client(server: ApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=WAIT_S) as http:
        yield http


@pytest.fixture
def secured_server(rt: Runtime) -> Iterator[ApiServer]:
    with serve_in_background(create_app(rt, token=TOKEN)) as running:
        yield running


@pytest.fixture
def anonymous(secured_server: ApiServer) -> Iterator[httpx.Client]:
    """A client of the token-protected server that sends no token."""
    with httpx.Client(base_url=secured_server.url, timeout=WAIT_S) as http:
        yield http


@pytest.fixture
def authorized(secured_server: ApiServer) -> Iterator[httpx.Client]:
    """A client of the token-protected server that sends the right token."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=secured_server.url, timeout=WAIT_S, headers=headers) as http:
        yield http


# --- POST /tasks, GET /tasks/{id} -----------------------------------------------------------------


def test_posting_a_payload_answers_201_with_the_task_id_its_state_and_its_location(client: httpx.Client) -> None:
    response = client.post("/tasks", json=payload(1))

    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"task_id", "state", "pipeline"}
    assert body["state"] in {state.value for state in TaskState}
    assert response.headers["location"] == f"/tasks/{body['task_id']}"


def test_a_task_posted_the_way_the_readme_shows_runs_to_completed_with_its_full_history(
    client: httpx.Client,
) -> None:
    # curl --json '{"name":"a","data":1}' (or -H 'Content-Type: application/json' -d ...)
    response = client.post(
        "/tasks",
        content=b'{"name":"a","data":1}',
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 201

    record = wait_for_terminal(client, response.json()["task_id"])

    assert record["state"] == "COMPLETED"
    assert [entry["to_state"] for entry in record["history"]] == ["CREATED", "VALIDATED", "PROCESSING", "COMPLETED"]
    assert record["payload"] == {"name": "a", "data": 1}
    assert record["result"]["name"] == "a"


def test_a_record_on_the_wire_counts_calls_and_retries_and_has_no_attempts_field(client: httpx.Client) -> None:
    task_id = client.post("/tasks", json=payload()).json()["task_id"]
    record = wait_for_terminal(client, task_id)
    assert (record["calls"], record["retries"]) == (3, 0)
    assert "attempts" not in record
    listed = client.get("/tasks").json()["tasks"]
    assert all("attempts" not in entry and "calls" in entry for entry in listed)
    schema = client.get("/openapi.json").json()["components"]["schemas"]["TaskRecord"]
    assert "attempts" not in schema["properties"]
    assert "attempts" not in schema["required"]
    assert {"calls", "retries"} <= set(schema["required"])


def test_a_payload_the_validator_rejects_is_accepted_and_its_task_fails_with_the_reason(
    client: httpx.Client,
) -> None:
    response = client.post("/tasks", json={"nope": 1})
    assert response.status_code == 201

    record = wait_for_terminal(client, response.json()["task_id"])

    assert record["state"] == "FAILED"
    assert "name" in record["error"]


def test_a_valid_traceparent_header_is_continued_and_a_malformed_one_ignored(client: httpx.Client) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    continued = client.post("/tasks", json=payload(), headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    ignored = client.post("/tasks", json=payload(), headers={"traceparent": "not-a-traceparent"})

    assert continued.status_code == 201
    assert ignored.status_code == 201
    assert client.get(continued.headers["location"]).json()["trace_id"] == trace_id
    assert len(client.get(ignored.headers["location"]).json()["trace_id"]) == 32


def test_getting_an_unknown_task_answers_404(client: httpx.Client) -> None:
    message = assert_json_error(client.get("/tasks/no-such-task"), 404)
    assert "no-such-task" in message


# --- GET /tasks -----------------------------------------------------------------------------------


def test_listing_tasks_pages_through_them_oldest_first(client: httpx.Client) -> None:
    ids = [client.post("/tasks", json=payload(i)).json()["task_id"] for i in range(5)]

    first = client.get("/tasks", params={"limit": 2}).json()
    second = client.get("/tasks", params={"limit": 2, "offset": first["next_offset"]}).json()
    last = client.get("/tasks", params={"limit": 2, "offset": second["next_offset"]}).json()

    assert [t["task_id"] for t in first["tasks"] + second["tasks"] + last["tasks"]] == ids
    assert (first["limit"], first["offset"], first["next_offset"]) == (2, 0, 2)
    assert second["next_offset"] == 4
    assert last["next_offset"] is None
    assert all("history" in t for t in first["tasks"])


def test_a_page_of_big_tasks_stops_short_of_16_mib_and_says_where_to_go_on(client: httpx.Client) -> None:
    big = "x" * (900 * 1024)
    ids = [client.post("/tasks", json={"name": f"big-{i}", "data": big}).json()["task_id"] for i in range(20)]

    pages, offset = [], 0
    while offset is not None:
        response = client.get("/tasks", params={"limit": 1000, "offset": offset})
        assert len(response.content) <= 16 * 1024 * 1024
        pages.append(response.json()["tasks"])
        offset = response.json()["next_offset"]

    assert len(pages) == 2
    assert [task["task_id"] for page in pages for task in page] == ids


def test_listing_tasks_filters_by_state(client: httpx.Client) -> None:
    good = client.post("/tasks", json=payload(1)).json()["task_id"]
    bad = client.post("/tasks", json={"nope": 1}).json()["task_id"]
    wait_for_terminal(client, good)
    wait_for_terminal(client, bad)

    failed = client.get("/tasks", params={"state": "FAILED"}).json()["tasks"]
    completed = client.get("/tasks", params={"state": "COMPLETED"}).json()["tasks"]

    assert [t["task_id"] for t in failed] == [bad]
    assert [t["task_id"] for t in completed] == [good]


@pytest.mark.parametrize(
    ("query", "mentions"),
    [
        ("state=DONE", "CREATED, VALIDATED, PROCESSING, COMPLETED, FAILED, CANCELLED"),
        ("state=completed", "COMPLETED"),
        ("limit=0", "from 1 to 1000"),
        ("limit=1001", "from 1 to 1000"),
        ("limit=ten", "from 1 to 1000"),
        ("limit=-1", "from 1 to 1000"),
        ("limit=1.5", "from 1 to 1000"),
        ("offset=-1", "offset"),
        ("offset=99999999999", "offset"),
        ("status=FAILED", "allowed: state, limit, offset"),
        ("limit=1&limit=2", "at most once"),
    ],
)
def test_listing_tasks_with_a_bad_parameter_answers_400_saying_what_is_allowed(
    client: httpx.Client, query: str, mentions: str
) -> None:
    message = assert_json_error(client.get(f"/tasks?{query}"), 400)
    assert mentions in message


# --- DELETE /tasks/{id} ---------------------------------------------------------------------------


def test_cancelling_a_task_in_flight_answers_with_its_record_and_it_ends_cancelled(
    client: httpx.Client, rt: Runtime, held: threading.Event
) -> None:
    task_id = client.post("/tasks", json=payload(hold=True)).json()["task_id"]
    assert held.wait(WAIT_S), "the task never reached the processor"
    assert rt.get(task_id).state is TaskState.PROCESSING

    response = client.delete(f"/tasks/{task_id}")

    assert response.status_code in {200, 202}
    assert response.json()["task_id"] == task_id
    assert response.json()["state"] == ("CANCELLED" if response.status_code == 200 else "PROCESSING")
    assert wait_for_terminal(client, task_id)["state"] == "CANCELLED"


def test_cancelling_a_finished_task_answers_409_naming_its_state(client: httpx.Client) -> None:
    task_id = client.post("/tasks", json=payload()).json()["task_id"]
    wait_for_terminal(client, task_id)

    message = assert_json_error(client.delete(f"/tasks/{task_id}"), 409)

    assert "COMPLETED" in message


def test_cancelling_an_unknown_task_answers_404(client: httpx.Client) -> None:
    assert_json_error(client.delete("/tasks/no-such-task"), 404)


# --- GET /stats, /healthz, /openapi.json, / -------------------------------------------------------


def test_stats_count_tasks_per_state(client: httpx.Client) -> None:
    ids = [client.post("/tasks", json=payload(i)).json()["task_id"] for i in range(3)]
    ids.append(client.post("/tasks", json={"nope": 1}).json()["task_id"])
    for task_id in ids:
        wait_for_terminal(client, task_id)

    stats = client.get("/stats").json()

    assert stats["COMPLETED"] == 3
    assert stats["FAILED"] == 1
    assert stats["submitted"] == 4
    assert {state.value for state in TaskState} <= set(stats)


def test_healthz_answers_ok(client: httpx.Client) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_the_openapi_document_describes_exactly_the_served_routes(client: httpx.Client, server: ApiServer) -> None:
    document = client.get("/openapi.json").json()

    assert document["openapi"].startswith("3.")
    served = {
        (route.path, method.lower())
        for route in server.config.app.routes  # type: ignore[attr-defined]
        for method in route.methods
        if method != "HEAD"
    }
    described = {
        (path, method) for path, item in document["paths"].items() for method in item if method != "parameters"
    }
    assert described == served
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method != "parameters":
                assert "401" not in operation["responses"], f"{method} {path} lists 401 without a token"


def test_the_dashboard_is_one_self_contained_html_page_under_a_strict_content_security_policy(
    client: httpx.Client,
) -> None:
    response = client.get("/")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert "EventSource" in html
    assert "<script src" not in html
    assert '<link rel="stylesheet"' not in html
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")  # the inline icon's namespace
    assert "https://" not in html
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "connect-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert response.headers["referrer-policy"] == "no-referrer"


# --- hardening ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "multipart/form-data", None],
)
def test_a_post_whose_body_is_not_declared_json_answers_415_and_creates_nothing(
    rt: Runtime, client: httpx.Client, content_type: str | None
) -> None:
    # What a web page on any other site can send without asking first (a CORS "simple request"):
    # were it taken, any page the user visits could submit tasks to a server on their loopback.
    headers = {} if content_type is None else {"Content-Type": content_type}

    message = assert_json_error(client.post("/tasks", content=b'{"name":"csrf","data":1}', headers=headers), 415)

    assert "application/json" in message
    assert repr(content_type) in message if content_type is not None else "no Content-Type" in message
    assert rt.stats()["submitted"] == 0


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON"])
def test_json_with_parameters_or_in_other_case_is_accepted(client: httpx.Client, content_type: str) -> None:
    response = client.post("/tasks", content=b'{"name":"a","data":1}', headers={"Content-Type": content_type})
    assert response.status_code == 201, response.text


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "localhost.evil.example:{port}", "127.0.0.1"])
def test_a_request_naming_another_host_answers_421_naming_it(
    server: ApiServer, client: httpx.Client, host: str
) -> None:
    # DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 reads this server as its own.
    named = host.format(port=server.port)

    message = assert_json_error(client.get("/tasks", headers={"Host": named}), 421)

    assert repr(named) in message
    assert f"127.0.0.1:{server.port}" in message  # and what it would answer to


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}", "[::1]:{port}"])
def test_a_request_naming_this_server_by_a_loopback_name_and_its_port_is_answered(
    server: ApiServer, client: httpx.Client, host: str
) -> None:
    assert client.get("/tasks", headers={"Host": host.format(port=server.port)}).status_code == 200


def test_healthz_answers_whatever_host_it_is_asked_by(client: httpx.Client) -> None:
    assert client.get("/healthz", headers={"Host": "probe.internal"}).status_code == 200


def test_allowed_hosts_add_names_with_or_without_a_port(rt: Runtime) -> None:
    app = create_app(rt, allowed_hosts=["tasks.example.com", "proxy.local:8443"])
    with serve_in_background(app) as running, httpx.Client(base_url=running.url, timeout=WAIT_S) as http:
        assert http.get("/stats", headers={"Host": "tasks.example.com"}).status_code == 200
        assert http.get("/stats", headers={"Host": "Tasks.Example.Com:443"}).status_code == 200
        assert http.get("/stats", headers={"Host": "proxy.local:8443"}).status_code == 200
        assert http.get("/stats", headers={"Host": "proxy.local:8444"}).status_code == 421


def test_a_server_bound_to_a_name_answers_to_that_name(rt: Runtime) -> None:
    with serve_in_background(create_app(rt), host="localhost") as running:
        assert running.url.startswith("http://localhost:")
        with httpx.Client(base_url=running.url, timeout=WAIT_S) as http:
            assert http.get("/stats").status_code == 200


def test_a_body_declared_over_one_mib_answers_413(client: httpx.Client) -> None:
    body = b'{"name":"big","data":"' + b"x" * (1024 * 1024) + b'"}'
    assert_json_error(client.post("/tasks", content=body, headers=JSON), 413)


def test_a_chunked_body_that_grows_over_one_mib_answers_413(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"name":"big","data":"'
        for _ in range(17):  # 17 x 64 KiB: over 1 MiB, with no Content-Length to tell
            yield b"x" * 65536
        yield b'"}'

    assert_json_error(client.post("/tasks", content=chunks(), headers=JSON), 413)


def test_a_body_of_exactly_one_mib_is_accepted(client: httpx.Client) -> None:
    head, tail = b'{"name":"big","data":"', b'"}'
    body = head + b"x" * (1024 * 1024 - len(head) - len(tail)) + tail
    assert client.post("/tasks", content=body, headers=JSON).status_code == 201


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b'{"name": "a",}',
        b"{'name': 'a'}",
        b'{"name": NaN}',
        b'{"data": Infinity}',
        b"\xff\xfe\x00garbage",
        b"",
        b"  ",
    ],
    ids=["truncated", "trailing-comma", "single-quotes", "nan", "infinity", "not-utf8", "empty", "blank"],
)
def test_a_malformed_json_body_answers_400(client: httpx.Client, body: bytes) -> None:
    assert_json_error(client.post("/tasks", content=body, headers=JSON), 400)


@pytest.mark.parametrize("body", [b"[1, 2]", b"1", b'"name"', b"null", b"true"])
def test_a_body_that_is_not_a_json_object_answers_422(client: httpx.Client, body: bytes) -> None:
    message = assert_json_error(client.post("/tasks", content=body, headers=JSON), 422)
    assert "JSON object" in message


@pytest.mark.parametrize("depth", [65, 5000, 200_000])
def test_a_payload_nested_too_deep_answers_422_at_any_depth(client: httpx.Client, depth: int) -> None:
    body = b'{"name":"deep","data":' + b"[" * depth + b"]" * depth + b"}"
    message = assert_json_error(client.post("/tasks", content=body, headers=JSON), 422)
    assert "deeper than 64" in message


@pytest.mark.parametrize(
    "body", [rb'{"name": "\ud800", "data": 1}', rb'{"name": "a", "data": {"\udfff": 1}}'], ids=["value", "key"]
)
def test_a_payload_with_a_lone_surrogate_answers_422_instead_of_breaking_later_answers(
    client: httpx.Client, body: bytes
) -> None:
    message = assert_json_error(client.post("/tasks", content=body, headers=JSON), 422)
    assert "not valid Unicode" in message


def test_an_unknown_route_answers_404(client: httpx.Client) -> None:
    assert_json_error(client.get("/no/such/route"), 404)
    assert_json_error(client.get("/tasks/"), 404)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("PUT", "/tasks", "GET, POST"), ("PATCH", "/tasks/x", "DELETE, GET"), ("POST", "/stats", "GET")],
)
def test_a_wrong_method_answers_405_with_the_allowed_ones(
    client: httpx.Client, method: str, path: str, allowed: str
) -> None:
    response = client.request(method, path)
    message = assert_json_error(response, 405)
    for name in allowed.split(", "):
        assert name in response.headers["allow"]
        assert name in message


def test_an_unexpected_error_answers_a_generic_500_and_is_logged_with_its_traceback(
    rt: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(request: Request) -> Response:
        raise ZeroDivisionError("secret internals")

    app = create_app(rt)
    app.router.routes.append(Route("/broken", broken))
    with (
        caplog.at_level(logging.ERROR, logger="actorflow"),
        serve_in_background(app) as running,
        httpx.Client(base_url=running.url) as http,
    ):
        response = http.get("/broken")

    message = assert_json_error(response, 500)
    assert "secret internals" not in message
    assert "ZeroDivisionError" not in response.text
    logged = [getattr(r, "actorflow", {}) for r in caplog.records if r.name == "actorflow"]
    errors = [event for event in logged if event.get("event") == "http.unhandled_error"]
    assert len(errors) == 1
    assert errors[0]["path"] == "/broken"
    assert errors[0]["error_type"] == "ZeroDivisionError"
    assert "secret internals" in errors[0]["traceback"]


def test_a_runtime_at_its_in_flight_bound_answers_503_with_retry_after(
    runtime_factory: Callable[..., Runtime],
) -> None:
    rt = runtime_factory(max_in_flight=1, overload="reject")
    with serve_in_background(create_app(rt)) as running, httpx.Client(base_url=running.url) as http:
        assert http.post("/tasks", json=payload(hold=True)).status_code == 201

        response = http.post("/tasks", json=payload())

    assert_json_error(response, 503)
    assert response.headers["retry-after"] == "1"


def test_a_closed_runtime_answers_503(rt: Runtime, client: httpx.Client) -> None:
    rt.close(drain=False)

    assert_json_error(client.post("/tasks", json=payload()), 503)
    assert client.get("/healthz").status_code == 503


# --- the token ------------------------------------------------------------------------------------

PROTECTED = [
    ("GET", "/"),
    ("GET", "/openapi.json"),
    ("GET", "/stats"),
    ("GET", "/events"),
    ("POST", "/tasks"),
    ("GET", "/tasks"),
    ("GET", "/tasks/x"),
    ("DELETE", "/tasks/x"),
    ("GET", "/no/such/route"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_with_a_token_every_route_but_healthz_answers_401_without_it(
    anonymous: httpx.Client, method: str, path: str
) -> None:
    response = anonymous.request(method, path, json=payload() if method == "POST" else None)

    assert_json_error(response, 401)
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "authorization", [f"Bearer {TOKEN}x", "Bearer", f"Basic {TOKEN}", "Bearer s3cret-tokeN", TOKEN]
)
def test_with_a_token_a_wrong_one_answers_401_invalid_token(anonymous: httpx.Client, authorization: str) -> None:
    response = anonymous.get("/stats", headers={"Authorization": authorization})

    assert_json_error(response, 401)
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


def test_with_a_token_healthz_needs_none(anonymous: httpx.Client) -> None:
    assert anonymous.get("/healthz").status_code == 200


def test_with_a_token_the_right_bearer_opens_every_route(authorized: httpx.Client) -> None:
    created = authorized.post("/tasks", json=payload())
    assert created.status_code == 201
    task_id = created.json()["task_id"]

    for path in ("/", "/openapi.json", "/stats", "/tasks", f"/tasks/{task_id}"):
        assert authorized.get(path).status_code == 200, path
    assert authorized.get("/openapi.json").json()["paths"]["/stats"]["get"]["responses"]["401"]
    assert authorized.delete(f"/tasks/{task_id}").status_code in {200, 202, 409}
    with authorized.stream("GET", "/events") as stream:
        assert stream.status_code == 200


def test_with_a_token_only_the_dashboard_and_the_event_stream_take_it_as_a_query_parameter(
    anonymous: httpx.Client,
) -> None:
    assert anonymous.get("/", params={"token": TOKEN}).status_code == 200
    with anonymous.stream("GET", "/events", params={"token": TOKEN}) as stream:
        assert stream.status_code == 200
    assert anonymous.get("/", params={"token": "wrong"}).status_code == 401
    assert anonymous.get("/stats", params={"token": TOKEN}).status_code == 401
    assert anonymous.post("/tasks", params={"token": TOKEN}, json=payload()).status_code == 401


def test_without_a_token_no_route_needs_one(client: httpx.Client) -> None:
    assert client.get("/stats").status_code == 200
    assert client.post("/tasks", json=payload()).status_code == 201


def test_an_empty_token_is_refused_rather_than_silently_opening_the_api(rt: Runtime) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        create_app(rt, token="")


# --- Idempotency-Key ------------------------------------------------------------------------------


def test_a_retried_post_with_the_same_idempotency_key_answers_with_the_same_task(client: httpx.Client) -> None:
    headers = {"Idempotency-Key": "order-42"}

    first = client.post("/tasks", json=payload(42), headers=headers)
    retry = client.post("/tasks", json=payload(42), headers=headers)
    other = client.post("/tasks", json=payload(42), headers={"Idempotency-Key": "order-43"})

    assert first.status_code == retry.status_code == 201
    assert retry.json() == first.json()
    assert retry.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert other.json()["task_id"] != first.json()["task_id"]
    assert len(client.get("/tasks").json()["tasks"]) == 2


def test_concurrent_posts_with_the_same_idempotency_key_create_exactly_one_task(
    server: ApiServer, client: httpx.Client
) -> None:
    clients = 16
    barrier = threading.Barrier(clients)
    answers: list[httpx.Response] = []

    def post() -> None:
        with httpx.Client(base_url=server.url, timeout=WAIT_S) as http:
            barrier.wait(WAIT_S)
            answers.append(http.post("/tasks", json=payload(7), headers={"Idempotency-Key": "same"}))

    threads = [threading.Thread(target=post) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)

    assert len(answers) == clients
    assert {answer.status_code for answer in answers} == {201}
    assert len({answer.json()["task_id"] for answer in answers}) == 1
    assert len(client.get("/tasks").json()["tasks"]) == 1


def test_an_idempotency_key_reused_with_another_payload_answers_422(client: httpx.Client) -> None:
    headers = {"Idempotency-Key": "k1"}
    assert client.post("/tasks", json=payload(1), headers=headers).status_code == 201

    message = assert_json_error(client.post("/tasks", json=payload(2), headers=headers), 422)

    assert "different payload" in message


def test_the_same_payload_with_other_whitespace_or_key_order_counts_as_the_same(client: httpx.Client) -> None:
    headers = {"Idempotency-Key": "k2"}
    first = client.post("/tasks", content=b'{"name": "a", "data": 1}', headers={**headers, **JSON})
    retry = client.post("/tasks", content=b'{"data":1,"name":"a"}', headers={**headers, **JSON})

    assert retry.json()["task_id"] == first.json()["task_id"]


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there"])
def test_a_malformed_idempotency_key_answers_400(client: httpx.Client, key: str) -> None:
    message = assert_json_error(client.post("/tasks", json=payload(), headers={"Idempotency-Key": key}), 400)
    assert "Idempotency-Key" in message


def test_a_post_that_failed_does_not_hold_its_idempotency_key(client: httpx.Client) -> None:
    headers = {"Idempotency-Key": "k3"}
    assert client.post("/tasks", content=b"[1]", headers={**headers, **JSON}).status_code == 422

    assert client.post("/tasks", json=payload(), headers=headers).status_code == 201


def test_idempotency_keys_are_bounded_in_number_and_forgotten_after_their_ttl() -> None:
    now = [0.0]
    keys = IdempotencyKeys(max_keys=3, ttl_s=60, clock=lambda: now[0])
    made: list[str] = []

    async def answer(key: str) -> tuple[str, bool]:
        async def create() -> StoredAnswer:
            made.append(key)
            return StoredAnswer(201, {"task_id": f"t{len(made)}"})

        stored, replayed = await keys.answer(key, "fp", create)
        return stored.body["task_id"], replayed

    async def scenario() -> None:
        assert await answer("a") == ("t1", False)
        assert await answer("a") == ("t1", True)
        for key in "bcd":
            await answer(key)
        assert len(keys) == 3  # "a", the oldest, was forgotten to make room
        assert await answer("a") == ("t5", False)
        now[0] += 61
        assert await answer("d") == ("t6", False)  # expired
        assert len(keys) == 1

    asyncio.run(scenario())


# --- GET /events ----------------------------------------------------------------------------------


def test_the_event_stream_carries_every_transition_of_a_submitted_task(server: ApiServer, client: httpx.Client) -> None:
    with httpx.Client(base_url=server.url, timeout=WAIT_S) as listener, listener.stream("GET", "/events") as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = sse_events(stream)
        assert next(events) == ("comment", "connected")  # subscribed: what happens from now on is streamed
        task_id = client.post("/tasks", json=payload()).json()["task_id"]

        seen = []
        for kind, data in events:
            if kind == "transition" and json.loads(data)["task_id"] == task_id:
                seen.append(json.loads(data))
                if seen[-1]["to_state"] in TERMINAL:
                    break

    assert [(e["from_state"], e["to_state"]) for e in seen] == [
        (None, "CREATED"),
        ("CREATED", "VALIDATED"),
        ("VALIDATED", "PROCESSING"),
        ("PROCESSING", "COMPLETED"),
    ]
    assert set(seen[0]) == {"task_id", "from_state", "to_state", "at", "reason", "trace_id", "pipeline"}


def test_an_idle_event_stream_gets_heartbeat_comments(server: ApiServer) -> None:
    with httpx.Client(base_url=server.url, timeout=WAIT_S) as listener, listener.stream("GET", "/events") as stream:
        events = sse_events(stream)
        assert next(events) == ("comment", "connected")
        assert next(events) == ("comment", "heartbeat")  # server fixture: heartbeat_s=0.2


def test_a_client_that_disconnects_is_dropped_by_the_broadcaster(server: ApiServer) -> None:
    broadcaster: EventBroadcaster = server.config.app.state.broadcaster  # type: ignore[attr-defined]
    with httpx.Client(base_url=server.url, timeout=WAIT_S) as listener:
        with listener.stream("GET", "/events") as stream:
            events = sse_events(stream)  # kept: dropping the generator would close the response
            next(events)
            assert broadcaster.client_count == 1
        assert broadcaster.wait_for_clients(0, WAIT_S), "the disconnected client was never dropped"


def test_more_event_streams_than_allowed_answer_503(rt: Runtime) -> None:
    app = create_app(rt, max_event_clients=1)
    with serve_in_background(app) as running, httpx.Client(base_url=running.url, timeout=WAIT_S) as http:
        with http.stream("GET", "/events") as first:
            assert first.status_code == 200
            assert_json_error(http.get("/events"), 503)
        assert app.state.broadcaster.wait_for_clients(0, WAIT_S), "the stream never closed"
        with http.stream("GET", "/events") as again:
            assert again.status_code == 200


def test_stopping_the_server_ends_open_event_streams_so_that_it_exits_promptly(rt: Runtime) -> None:
    ended = threading.Event()
    connected = threading.Event()

    with serve_in_background(create_app(rt)) as running:

        def listen() -> None:
            with httpx.Client(base_url=running.url, timeout=WAIT_S) as http, http.stream("GET", "/events") as stream:
                for _ in sse_events(stream):
                    connected.set()
            ended.set()  # reached only if the server ended the stream cleanly

        listener = threading.Thread(target=listen)
        listener.start()
        assert connected.wait(WAIT_S)
        stopping = time.monotonic()
    took = time.monotonic() - stopping

    listener.join(WAIT_S)
    assert ended.is_set()
    assert took < 2.0, f"shutdown took {took:.1f} s; an open stream must not hold it to the graceful timeout"


def test_a_client_too_slow_for_the_stream_is_told_how_many_events_it_lost(rt: Runtime) -> None:
    async def scenario() -> list[bytes]:
        broadcaster = EventBroadcaster(rt, queue_size=2)
        client = broadcaster.attach()  # subscribes first: it sees each event before `count` below
        seen = 0
        all_seen = threading.Event()

        def count(event: TransitionEvent) -> None:
            nonlocal seen
            seen += 1
            if seen == 12:
                all_seen.set()

        unsubscribe = rt.subscribe(count)
        for index in range(3):  # 3 tasks x 4 transitions, for a queue of 2
            rt.submit(payload(index))
        # The broadcaster schedules its flush on this loop before `count` sees the last event, so
        # the flush runs before this wait's own wake-up (the loop runs callbacks in order).
        assert await asyncio.get_running_loop().run_in_executor(None, all_seen.wait, WAIT_S)
        unsubscribe()
        assert client.dropped == 10
        frames = []
        async for frame in _frames(client, heartbeat_s=0.05):
            frames.append(frame)
            if frame.startswith(b": heartbeat"):
                break
        broadcaster.close()
        return frames

    frames = asyncio.run(scenario())

    assert frames[0].startswith(b"retry:")
    assert [f.split(b"\n")[0] for f in frames[1:]] == [
        b"id: 1",  # transition frames carry their id, for Last-Event-ID
        b"id: 2",
        b"event: lagged",
        b": heartbeat",
    ]
    assert json.loads(frames[3].split(b"data: ")[1]) == {"dropped": 10}
