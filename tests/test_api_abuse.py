"""The HTTP server under abuse: idle and half-sent connections, floods of requests, huge payloads, huge pages.

A real `Runtime` behind a real uvicorn server on loopback, with raw sockets for
the clients that misbehave below HTTP. Waiting is done on the server's own
actions (a socket read returns when the server answers or closes), never on sleeps.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from actorflow.actors import Runtime
from actorflow.api import ApiServer, create_app, serve_in_background
from actorflow.api import server as api_server
from actorflow.core import RuntimeConfig, Task
from actorflow.services import ServiceSet
from actorflow.services import process as default_process

WAIT_S = 10.0


def payload(index: int = 0, **data: object) -> dict[str, object]:
    return {"name": f"task-{index}", "data": {"index": index, **data}}


def connect(server: ApiServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket's timeout bounds the wait)."""
    received = bytearray()
    while chunk := sock.recv(65536):
        received += chunk
    return bytes(received)


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """Tasks whose payload has data.hold wait in the processor until this is set."""
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def rt(gate: threading.Event) -> Iterator[Runtime]:
    def process(task: Task) -> Mapping[str, Any]:
        data = task.payload.get("data")
        if isinstance(data, Mapping) and data.get("hold"):
            gate.wait(WAIT_S)
        return default_process(task)

    runtime = Runtime(RuntimeConfig(), services=ServiceSet(process=process))
    try:
        yield runtime
    finally:
        gate.set()
        runtime.close(drain=False)


@pytest.fixture
def server(rt: Runtime) -> Iterator[ApiServer]:
    with serve_in_background(create_app(rt)) as running:
        yield running


@pytest.fixture
def client(server: ApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=WAIT_S) as http:
        yield http


# --- idle and slow connections -------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_three_hundred_idle_connections_leave_healthz_and_posting_answered(
    server: ApiServer, client: httpx.Client
) -> None:
    with ExitStack() as held:
        idle = [held.enter_context(connect(server)) for _ in range(300)]

        health = client.get("/healthz")
        created = client.post("/tasks", json=payload())

        assert health.status_code == 200, health.text
        assert health.json() == {"status": "ok"}
        assert created.status_code == 201, created.text
        assert len(idle) == 300


def test_a_connection_that_never_sends_a_request_is_closed_after_the_request_start_timeout(rt: Runtime) -> None:
    with serve_in_background(create_app(rt), request_start_timeout_s=0.3) as running, connect(running) as sock:
        assert read_until_closed(sock) == b""  # closed without a word: it asked nothing


def test_a_request_head_that_trickles_in_too_slowly_gets_a_json_408_and_is_closed(rt: Runtime) -> None:
    with serve_in_background(create_app(rt), request_start_timeout_s=0.3) as running, connect(running) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # the blank line that ends the head never comes

        status, headers, body = parse_response(read_until_closed(sock))

    assert status == 408
    assert headers["content-type"] == "application/json"
    assert "did not arrive in time" in json.loads(body)["error"]


def test_a_kept_alive_connection_that_then_trickles_a_second_request_is_timed_out_too(rt: Runtime) -> None:
    with serve_in_background(create_app(rt), request_start_timeout_s=0.5) as running, connect(running) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\n")

        raw = read_until_closed(sock)

    first, _, rest = raw.partition(b'{"status":"ok"}')
    assert parse_response(first)[0] == 200
    status, headers, _ = parse_response(rest)
    assert status == 408
    assert headers["content-type"] == "application/json"


def test_past_the_idle_connection_cap_the_longest_waiting_connection_is_closed_first(rt: Runtime) -> None:
    with serve_in_background(create_app(rt), max_idle_connections=3) as running, ExitStack() as held:
        oldest = held.enter_context(connect(running))
        oldest.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # half a head, so that closing it says 408
        # Answered only once the server has accepted `oldest` (one listening socket, accepted in order).
        assert httpx.get(f"{running.url}/healthz", timeout=WAIT_S).status_code == 200
        for _ in range(3):
            held.enter_context(connect(running))

        status, _, body = parse_response(read_until_closed(oldest))

        assert status == 408
        assert "error" in json.loads(body)
        assert httpx.get(f"{running.url}/healthz", timeout=WAIT_S).status_code == 200


def test_a_request_that_is_not_http_gets_a_json_400(server: ApiServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")

        status, headers, body = parse_response(read_until_closed(sock))

    assert status == 400
    assert headers["content-type"] == "application/json"
    assert "invalid HTTP/1.1 request" in json.loads(body)["error"]


def test_more_requests_in_progress_than_allowed_answer_json_503_while_healthz_still_answers(rt: Runtime) -> None:
    with (
        serve_in_background(create_app(rt, max_concurrent_requests=1)) as running,
        httpx.Client(base_url=running.url, timeout=WAIT_S) as http,
        http.stream("GET", "/events") as stream,  # an open event stream holds the one request slot
    ):
        assert stream.status_code == 200
        busy = http.get("/stats")

        assert busy.status_code == 503
        assert busy.headers["content-type"] == "application/json"
        assert busy.headers["retry-after"] == "1"
        assert "requests" in busy.json()["error"]
        assert http.get("/healthz").status_code == 200


def test_event_streams_and_long_polls_hold_at_most_half_the_request_slots_so_a_post_still_gets_in(
    rt: Runtime,
) -> None:
    task_id = rt.submit(payload(hold=True)).task_id
    with (
        serve_in_background(create_app(rt, max_concurrent_requests=4)) as running,
        httpx.Client(base_url=running.url, timeout=WAIT_S) as http,
        ExitStack() as streams,
    ):
        # Each open stream holds its slot (its head is sent at once); a third finds the waiting share full.
        opened = [streams.enter_context(http.stream("GET", "/events")) for _ in range(3)]
        poll = http.get(f"/tasks/{task_id}", params={"wait": 5})
        created = http.post("/tasks", json=payload(1))

    assert [stream.status_code for stream in opened] == [200, 200, 503]
    assert poll.status_code == 503  # refused at once, not held: the share is full
    assert poll.headers["retry-after"] == "1"
    assert "2 of the 4" in poll.json()["error"]
    assert created.status_code == 201, created.text


@pytest.mark.timeout(60)
def test_a_long_poll_whose_client_goes_away_frees_its_slot_at_once(rt: Runtime) -> None:
    task_id = rt.submit(payload(hold=True)).task_id
    app = create_app(rt, max_concurrent_requests=4)
    waiting = app.state.waiting_requests
    with serve_in_background(app) as running:
        for _ in range(8):  # four times the share: abandoned polls that kept their slot would lock the others out
            with connect(running) as sock:
                head = f"GET /tasks/{task_id}?wait=60 HTTP/1.1\r\nHost: 127.0.0.1:{running.port}\r\n\r\n"
                sock.sendall(head.encode())
                assert waiting.wait_for_count(1, WAIT_S), "the long poll never started waiting"
            assert waiting.wait_for_count(0, WAIT_S), "the slot of a client that went away was kept"
        with httpx.Client(base_url=running.url, timeout=WAIT_S) as http:
            assert http.get(f"/tasks/{task_id}", params={"wait": 0.01}).status_code == 200


def test_a_request_still_running_when_the_graceful_shutdown_is_over_gets_a_json_503_and_logs_no_traceback(
    rt: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    with serve_in_background(create_app(rt)) as running:
        running.config.timeout_graceful_shutdown = 1
        sock = connect(running)
        host = f"Host: 127.0.0.1:{running.port}\r\n"
        # A body that never ends keeps the POST running. Pipelined behind /healthz: once that is answered,
        # the POST is a request in progress, which the shutdown waits for, then cancels.
        sock.sendall(
            f"GET /healthz HTTP/1.1\r\n{host}\r\n"
            f"POST /tasks HTTP/1.1\r\n{host}Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{".encode()
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    # Leaving the block stopped the server: the POST was cancelled after the graceful second.
    with sock:
        status, headers, body = parse_response(read_until_closed(sock))

    assert status == 503
    assert headers["content-type"] == "application/json"
    assert "shutting down" in json.loads(body)["error"]
    assert "Exception in ASGI application" not in caplog.text
    assert "CancelledError" not in caplog.text


def urllib_post(url: str, body: bytes, headers: Mapping[str, str]) -> int | str:
    """POST with the standard library, which sends `Connection: close` and writes the whole body before it
    reads the answer: the status it read, or the error that kept it from reading one."""
    request = urllib.request.Request(url, data=body, method="POST", headers=dict(headers))
    try:
        with urllib.request.urlopen(request, timeout=WAIT_S) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as answer:
        return answer.code
    except (urllib.error.URLError, OSError) as exc:
        return f"{type(getattr(exc, 'reason', exc)).__name__}: {getattr(exc, 'reason', exc)}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("headers", "status"),
    [({"Content-Type": "application/json"}, 413), ({}, 413), ({"Host": "elsewhere.example"}, 421)],
    ids=["too-big", "too-big-not-json", "misdirected"],
)
def test_every_client_that_sends_a_body_the_server_refuses_unread_reads_the_refusal(
    server: ApiServer, headers: Mapping[str, str], status: int
) -> None:
    # The server answers before the 2 MiB have arrived; closing at once would reset the connection under a
    # client still writing (BrokenPipeError, one time in three). It reads the rest first, and throws it away.
    body = b'{"name": "big", "data": "' + b"x" * (2 * 1024 * 1024) + b'"}'

    outcomes = [urllib_post(f"{server.url}/tasks", body, headers) for _ in range(40)]

    assert outcomes == [status] * 40


def test_a_kept_alive_connection_whose_refused_body_was_read_is_closed_quietly_when_idle(rt: Runtime) -> None:
    body = b"x" * (2 * 1024 * 1024)
    with serve_in_background(create_app(rt), request_start_timeout_s=0.5) as running, connect(running) as sock:
        head = (
            f"POST /tasks HTTP/1.1\r\nHost: 127.0.0.1:{running.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)

        raw = read_until_closed(sock)  # the 413, then nothing until the idle connection is closed

    status, _, rest = parse_response(raw)
    assert status == 413
    assert b"HTTP/1.1 408" not in rest  # the body's bytes were not a request head that trickled in


# --- big pages -----------------------------------------------------------------------------------


def test_healthz_answers_while_a_big_page_is_being_encoded(
    server: ApiServer, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    for index in range(3):
        assert client.post("/tasks", json=payload(index)).status_code == 201
    encoding = threading.Event()
    healthz_answered = threading.Event()
    real_encode = api_server._encode_page

    def encode_page_slowly(*args: Any, **kwargs: Any) -> bytes:
        encoding.set()
        # Holds the encoder until /healthz has been answered: on the event loop, that would never happen.
        healthz_answered.wait(WAIT_S)
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(api_server, "_encode_page", encode_page_slowly)
    pages: list[httpx.Response] = []
    lister = threading.Thread(target=lambda: pages.append(client.get("/tasks", params={"limit": 1000})))
    lister.start()
    try:
        assert encoding.wait(WAIT_S)
        with httpx.Client(base_url=server.url, timeout=2.0) as other:
            health = other.get("/healthz")
        healthz_answered.set()
    finally:
        healthz_answered.set()
        lister.join(WAIT_S)

    assert health.status_code == 200
    assert pages[0].status_code == 200
    assert len(pages[0].json()["tasks"]) == 3


# --- payload caps --------------------------------------------------------------------------------


def test_a_one_mib_body_of_empty_objects_answers_413_naming_the_node_cap(client: httpx.Client) -> None:
    body = b'{"data":[' + b",".join([b"{}"] * 262_000) + b"]}"
    assert len(body) <= 1024 * 1024

    response = client.post("/tasks", content=body, headers={"Content-Type": "application/json"})

    assert response.status_code == 413, response.text
    assert response.headers["content-type"] == "application/json"
    assert "more than 10000 values" in response.json()["error"]


def test_a_payload_over_the_byte_cap_answers_413_with_its_canonical_size(rt: Runtime) -> None:
    with (
        serve_in_background(create_app(rt, max_payload_bytes=100)) as running,
        httpx.Client(base_url=running.url, timeout=WAIT_S) as http,
    ):
        # Spaces do not count: the canonical JSON of this one is 96 bytes.
        spaced = b'{"name":  "a",   "data": "' + b"x" * 74 + b'"}'
        fits = http.post("/tasks", content=spaced, headers={"Content-Type": "application/json"})
        too_big = http.post("/tasks", json={"name": "a", "data": "x" * 80})

    assert fits.status_code == 201, fits.text
    assert too_big.status_code == 413
    assert too_big.json()["error"] == (
        "the payload is 102 bytes as canonical JSON (sorted keys, no spaces); at most 100 are stored"
    )


def test_payload_caps_must_be_positive_ints(rt: Runtime) -> None:
    with pytest.raises(ValueError, match="max_payload_nodes must be an int >= 1, got 0"):
        create_app(rt, max_payload_nodes=0)
