"""The HTTP face of a `Runtime`: a Starlette app, and a hardened uvicorn server to run it.

Routes (the OpenAPI document at `/openapi.json` has every status code)::

    GET    /                 the live dashboard (HTML)
    GET    /healthz          liveness, never behind the token
    GET    /openapi.json     the API described
    GET    /stats            the runtime's counters
    GET    /metrics          Prometheus text format (open without the token only if metrics_public)
    GET    /events           Server-Sent Events, one per transition (?task=; Last-Event-ID replays)
    POST   /tasks            submit (Idempotency-Key honoured)
    GET    /tasks            page through tasks (?state=&limit=&offset=)
    GET    /tasks/{id}       one record, history included (?wait=S: once terminal, or after S s)
    DELETE /tasks/{id}       cancel

Handlers never block the event loop: submission goes through
`Runtime.submit_async`, and every other runtime call (each a round trip to the
state actor) runs in Starlette's thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import importlib.resources
import json
import logging
import math
import os
import re
import signal
import tempfile
import threading
import time
from base64 import b64encode
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from actorflow.actors import Runtime, TaskHandle
from actorflow.api._auth import OPEN_PATHS, BearerTokenMiddleware
from actorflow.api._errors import (
    CatchAllMiddleware,
    echo,
    encode_json,
    error_response,
    http_exception_handler,
    json_response,
)
from actorflow.api._events import EventBroadcaster, TooManyStreamsError, event_stream
from actorflow.api._hosts import AllowedHosts, HostCheckMiddleware
from actorflow.api._idempotency import (
    KEY_REUSED as _KEY_REUSED,
)
from actorflow.api._idempotency import (
    IdempotencyKeyReusedError,
    IdempotencyKeys,
    StoredAnswer,
    check_key,
)
from actorflow.api._openapi import DEFAULT_LIMIT, MAX_LIMIT, MAX_OFFSET, openapi_document
from actorflow.api._protocol import (
    MAX_CONCURRENT_REQUESTS,
    MAX_IDLE_CONNECTIONS,
    REQUEST_START_TIMEOUT_S,
    ApiConfig,
    RequestLimitMiddleware,
    WaitingRequests,
)
from actorflow.core import (
    ActorflowError,
    ConfigError,
    InvalidPayload,
    JournalError,
    Overloaded,
    RuntimeConfig,
    RuntimeFailed,
    RuntimeNotAnswering,
    RuntimeStopped,
    TaskNotFound,
    TaskRecord,
    TaskState,
    UnknownPipeline,
)
from actorflow.core.tracing import parse_traceparent

__all__ = ["ApiServer", "create_app", "make_server", "serve", "serve_in_background"]

MAX_BODY_BYTES = 1024 * 1024
"""Largest accepted request body: 1 MiB."""
BODY_TIMEOUT_S = 10.0
"""A request body must arrive within this long, or the answer is 408."""
MAX_PAYLOAD_DEPTH = 64
"""Deepest nesting of objects and arrays accepted in a payload."""
MAX_PAYLOAD_BYTES = 256 * 1024
"""Default cap on a payload's stored size: the bytes of its canonical JSON (sorted keys, no spaces, UTF-8)."""
MAX_PAYLOAD_NODES = 10_000
"""Default cap on a payload's values (objects, arrays, keys, strings, numbers, ...): each costs memory once parsed.

A 1 MiB body of ``[{},{},...]`` is 260,000 nodes and about 20 MB in memory; 10,000 nodes stay near 1 MB.
"""
_PARSERS = 4
"""Bodies parsed and checked at once (each in a worker thread): bounds the transient memory of parsing."""
MAX_PAGE_BYTES = 16 * 1024 * 1024
"""A page of `GET /tasks` holds fewer than `limit` tasks rather than grow past this."""
SERVE_MAX_IN_FLIGHT = 1000
"""`serve`'s default bound on tasks in flight: with the payload caps, about 1.5 GB at worst."""
SERVE_RETAIN_TERMINAL = 1000
"""`serve`'s default number of finished tasks kept in memory; older ones are read back from the journal."""
GRACEFUL_SHUTDOWN_S = 10
"""How long shutdown waits for requests in progress before cancelling them."""

_COUNT = re.compile(r"[0-9]{1,10}")
_LIST_PARAMS = ("state", "limit", "offset")


class _RequestError(Exception):
    """A client error found while reading a request; `status` is the answer's code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def create_app(
    runtime: Runtime,
    *,
    token: str | None = None,
    heartbeat_s: float = 15.0,
    max_event_clients: int = 100,
    idempotency_keys: IdempotencyKeys | None = None,
    max_concurrent_requests: int = MAX_CONCURRENT_REQUESTS,
    max_waiting_requests: int | None = None,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    max_payload_nodes: int = MAX_PAYLOAD_NODES,
    metrics_public: bool = False,
    allowed_hosts: Iterable[str] = (),
) -> Starlette:
    """The API and dashboard over `runtime`, which the caller keeps owning (and closes).

    Every request but `/healthz` must name this server in its `Host` header (localhost,
    127.0.0.1, [::1], the address it came in on or the host `make_server` bound, with the
    port), or it answers 421: a web page that a DNS rebinding points at this server cannot
    read it. A `POST /tasks` body must be declared `application/json`, or it answers 415: a
    web page cannot send that across origins without the browser asking this server first.

    Args:
        runtime: the runtime to serve.
        token: if given, every route but `/healthz` needs `Authorization: Bearer <token>`.
        heartbeat_s: how often an idle `/events` stream gets a comment line, to keep proxies from closing it.
        max_event_clients: how many `/events` streams may be open at once.
        idempotency_keys: where Idempotency-Keys are remembered (default: 10,000 keys for 24 h).
        max_concurrent_requests: requests in progress at once (event streams included); more answer
            503 with Retry-After, except `/healthz`, which is always answered.
        max_waiting_requests: how many of those may be requests that wait on the runtime (event
            streams and `?wait=` long polls); more answer 503 with Retry-After at once, so that
            submissions always find a slot. Default: half of `max_concurrent_requests`.
        max_payload_bytes: the largest payload stored, in bytes of its canonical JSON; larger ones answer 413.
        max_payload_nodes: the most values (nodes) in a payload; more answer 413.
        metrics_public: serve `GET /metrics` without the token (for a Prometheus that has none).
        allowed_hosts: more names requests may give as `Host`: ``name`` (any port; behind a
            reverse proxy, say) or ``name:port``; ``"*"`` answers every name.
    """
    if token is not None and not token:
        raise ValueError("token must be a non-empty string, or None for no authentication")
    for name, cap in (("max_payload_bytes", max_payload_bytes), ("max_payload_nodes", max_payload_nodes)):
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ValueError(f"{name} must be an int >= 1, got {cap!r}")
    if max_waiting_requests is None:
        max_waiting_requests = max(1, max_concurrent_requests // 2)
    if not 1 <= max_waiting_requests <= max_concurrent_requests:
        raise ValueError(
            f"max_waiting_requests must be from 1 to max_concurrent_requests ({max_concurrent_requests}), "
            f"got {max_waiting_requests!r}"
        )
    broadcaster = EventBroadcaster(runtime, max_clients=max_event_clients)
    handlers = _Handlers(
        runtime,
        broadcaster,
        idempotency_keys if idempotency_keys is not None else IdempotencyKeys(),
        openapi_document(token_required=token is not None, metrics_public=metrics_public, pipelines=runtime.pipelines),
        heartbeat_s,
        _PayloadCaps(max_payload_bytes, max_payload_nodes),
        WaitingRequests(max_waiting_requests),
        max_concurrent_requests,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        broadcaster.close()

    hosts = AllowedHosts(allowed_hosts)
    stopping = handlers.stopping
    middleware = [
        Middleware(CatchAllMiddleware, stopping),
        Middleware(HostCheckMiddleware, hosts=hosts),  # before the limit: a misdirected request takes no slot
        Middleware(RequestLimitMiddleware, max_requests=max_concurrent_requests),
    ]
    if token is not None:
        open_paths = OPEN_PATHS | {"/metrics"} if metrics_public else OPEN_PATHS
        middleware.append(Middleware(BearerTokenMiddleware, token=token, open_paths=open_paths))
    app = Starlette(
        routes=[
            Route("/", handlers.dashboard, methods=["GET"]),
            Route("/healthz", handlers.health, methods=["GET"]),
            Route("/openapi.json", handlers.openapi, methods=["GET"]),
            Route("/stats", handlers.stats, methods=["GET"]),
            Route("/metrics", handlers.metrics, methods=["GET"]),
            Route("/events", handlers.events, methods=["GET"]),
            Route("/tasks", handlers.tasks, methods=["GET", "POST"]),
            Route("/tasks/{task_id}", handlers.task, methods=["GET", "DELETE"]),
        ],
        middleware=middleware,
        exception_handlers={
            HTTPException: http_exception_handler,
            TaskNotFound: _not_found,
            IdempotencyKeyReusedError: _unprocessable,
            InvalidPayload: _unprocessable,
            Overloaded: _overloaded,
            RuntimeStopped: _stopped,
            RuntimeFailed: _failed,
            JournalError: _journal_refuses,
            RuntimeNotAnswering: _not_answering,  # the runtime did not answer a read in time
            NotImplementedError: _not_implemented,
        },
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False  # /tasks/ is an unknown route (404), not a redirect
    app.state.broadcaster = broadcaster
    app.state.idempotency_keys = handlers.keys
    app.state.waiting_requests = handlers.waiting
    app.state.allowed_hosts = hosts
    app.state.stopping = stopping
    return app


@dataclass(frozen=True, slots=True)
class _PayloadCaps:
    max_bytes: int
    max_nodes: int


@dataclass(frozen=True, slots=True)
class _Parsed:
    payload: dict[str, Any]
    fingerprint: str
    """The SHA-256 of the payload's canonical JSON, which Idempotency-Keys compare."""


class _Handlers:
    """The endpoints. Runtime errors are left to the app's exception handlers below."""

    def __init__(
        self,
        runtime: Runtime,
        broadcaster: EventBroadcaster,
        keys: IdempotencyKeys,
        openapi: dict[str, Any],
        heartbeat_s: float,
        caps: _PayloadCaps,
        waiting: WaitingRequests,
        max_requests: int,
    ) -> None:
        self.runtime = runtime
        self.caps = caps
        self.waiting = waiting
        self.max_requests = max_requests
        self.stopping = asyncio.Event()
        """Set when the server begins to shut down: requests that wait answer 503 then (see ApiServer)."""
        self.parsers = asyncio.Semaphore(_PARSERS)
        self.broadcaster = broadcaster
        self.keys = keys
        self.openapi_doc = openapi
        self.heartbeat_s = heartbeat_s
        self.dashboard_html, self.dashboard_headers = _load_dashboard()
        self.metrics_registry: Any = None
        """A CollectorRegistry of the runtime's collector, made on the first scrape."""

    async def dashboard(self, request: Request) -> Response:
        return Response(self.dashboard_html, media_type="text/html; charset=utf-8", headers=self.dashboard_headers)

    async def health(self, request: Request) -> Response:
        # "degraded" (the journal refuses writes) answers 200: the process is alive and heals by itself
        # when the disk frees, so a liveness probe must not restart it; "failed" and "stopped" are 503.
        health = self.runtime.health()
        return json_response(health, 503 if health["status"] in ("failed", "stopped") else 200)

    async def openapi(self, request: Request) -> Response:
        return json_response(self.openapi_doc)

    async def stats(self, request: Request) -> Response:
        return json_response(await run_in_threadpool(self.runtime.stats))

    async def metrics(self, request: Request) -> Response:
        try:
            from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest  # noqa: PLC0415
        except ModuleNotFoundError:
            return error_response(501, "GET /metrics needs prometheus-client (the metrics extra), which is missing")
        if self.metrics_registry is None:
            try:
                collector = self.runtime.metrics_collector()
            except ConfigError as exc:
                return error_response(501, str(exc))
            registry = CollectorRegistry(auto_describe=False)  # this app's own: nothing global is touched
            registry.register(collector)
            self.metrics_registry = registry
        body = await run_in_threadpool(generate_latest, self.metrics_registry)
        return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"})

    async def events(self, request: Request) -> ASGIApp:
        try:
            last_event_id, task = _event_params(request)
        except _RequestError as exc:
            return error_response(exc.status, str(exc))
        if not self.waiting.try_hold():
            return self._too_many_waiting()
        try:
            client = self.broadcaster.attach(last_event_id=last_event_id, task=task)
        except TooManyStreamsError as exc:
            self.waiting.release()
            return error_response(503, str(exc), headers={"Retry-After": "5"})
        except RuntimeError as exc:
            self.waiting.release()
            return error_response(503, str(exc))
        if task is not None:
            # Read after attaching: a transition to a terminal state either reaches the client or is in
            # the record, so that the stream ends after it, whenever the task got there.
            try:
                record = await run_in_threadpool(self.runtime.get, task)
            except BaseException:
                self.broadcaster.detach(client)
                self.waiting.release()
                raise
            if not self.broadcaster.finish_if_terminal(client, record):
                self.broadcaster.detach(client)
                self.waiting.release()
                return Response(status_code=204, headers={"Cache-Control": "no-store"})
        return event_stream(self.broadcaster, client, heartbeat_s=self.heartbeat_s, on_end=self.waiting.release)

    def _too_many_waiting(self) -> Response:
        return error_response(
            503,
            f"event streams and long polls hold {self.waiting.limit} of the {self.max_requests} request slots, "
            "the most they may (the rest are kept for other requests); try again",
            headers={"Retry-After": "1"},
        )

    async def tasks(self, request: Request) -> Response:
        if request.method == "POST":
            return await self._submit(request)
        return await self._list(request)

    async def task(self, request: Request) -> Response:
        task_id: str = request.path_params["task_id"]
        if request.method == "DELETE":
            return await self._cancel(task_id)
        try:
            wait = _wait_param(request)
        except _RequestError as exc:
            return error_response(exc.status, str(exc))
        if wait:
            handle = await run_in_threadpool(self.runtime.handle, task_id)
            if not handle.done():
                if self.stopping.is_set():
                    return _shutting_down()
                if not self.waiting.try_hold():
                    return self._too_many_waiting()
                try:
                    outcome = await _wait_for_task(handle, request, self.stopping, wait)
                finally:
                    self.waiting.release()
                if outcome is _Outcome.GONE:
                    return Response(status_code=204)  # nobody to answer: the slot is free now, not in a minute
                if outcome is _Outcome.STOPPING:
                    return _shutting_down()
        record = await run_in_threadpool(self.runtime.get, task_id)
        return json_response(record.to_dict())

    async def _submit(self, request: Request) -> Response:
        try:
            pipeline = _pipeline_param(request, self.runtime)
            _check_declared_size(request)
            _check_json_media_type(request)
            body = await _read_body(request)
            async with self.parsers:  # parsing a 1 MiB body takes tens of ms: off the event loop
                parsed = await run_in_threadpool(_parse_payload, body, self.caps)
        except _RequestError as exc:
            return error_response(exc.status, str(exc))
        payload = parsed.payload
        traceparent = request.headers.get("traceparent")
        if traceparent is not None:
            try:
                parse_traceparent(traceparent)
            except ValueError:
                traceparent = None  # W3C trace context: a malformed parent is ignored, and a new trace starts

        key = request.headers.get("idempotency-key")
        # The pipeline is part of what a key stands for: the same payload sent to another pipeline is another request.
        default = self.runtime.pipelines[0].name
        key_fingerprint = parsed.fingerprint if pipeline == default else f"{pipeline}:{parsed.fingerprint}"

        async def created(task_id: str) -> dict[str, str]:
            try:
                record = await run_in_threadpool(self.runtime.get, task_id)
            except TaskNotFound:  # evicted already (retain_terminal): it surely was created
                return {"task_id": task_id, "state": TaskState.CREATED.value, "pipeline": pipeline}
            return {"task_id": task_id, "state": record.state.value, "pipeline": record.pipeline}

        async def submit() -> StoredAnswer:
            if key is not None:
                # Committed with its task before a crash, the key is in the journal: the first task is the answer.
                stored = await run_in_threadpool(self.runtime.find_idempotency_key, key)
                if stored is not None:
                    task_id, stored_fingerprint = stored
                    if stored_fingerprint != key_fingerprint:
                        raise IdempotencyKeyReusedError(_KEY_REUSED)
                    return StoredAnswer(201, await created(task_id), replayed=True)
            handle = await self.runtime.submit_async(
                payload,
                traceparent=traceparent,
                pipeline=pipeline,
                idempotency_key=None if key is None else (key, key_fingerprint),
            )
            return StoredAnswer(201, await created(handle.task_id))

        replayed = False
        if key is None:
            answer = await submit()
        else:
            problem = check_key(key)
            if problem is not None:
                return error_response(400, problem)
            answer, replayed = await self.keys.answer(key, key_fingerprint, submit)
        headers = {"Location": f"/tasks/{answer.body['task_id']}"}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        return json_response(answer.body, answer.status, headers=headers)

    async def _list(self, request: Request) -> Response:
        try:
            state, limit, offset = _list_params(request, self.runtime)
        except _RequestError as exc:
            return error_response(exc.status, str(exc))
        records = await run_in_threadpool(self.runtime.tasks, state, limit=limit, offset=offset)
        # Encoding a page of big payloads takes seconds: off the event loop, so that /healthz stays prompt.
        return json_response(await run_in_threadpool(_encode_page, records, limit, offset))

    async def _cancel(self, task_id: str) -> Response:
        cancelled = await run_in_threadpool(self.runtime.cancel, task_id)
        record = await run_in_threadpool(self.runtime.get, task_id)
        if not cancelled:
            return error_response(
                409,
                f"task {echo(task_id)} is already {record.state.value}; "
                "only CREATED, VALIDATED or PROCESSING tasks can be cancelled",
            )
        status = 200 if record.state is TaskState.CANCELLED else 202
        return json_response(record.to_dict(), status)


MAX_WAIT_S = 60.0
"""The longest `GET /tasks/{id}?wait=` may hold a request."""


class _Outcome(enum.Enum):
    SETTLED = "settled"
    TIMED_OUT = "timed out"
    GONE = "the client went away"
    STOPPING = "the server is shutting down"


def _shutting_down() -> Response:
    return error_response(503, "the server is shutting down; try again once it is back", headers={"Retry-After": "5"})


async def _wait_for_task(handle: TaskHandle, request: Request, stopping: asyncio.Event, timeout: float) -> _Outcome:
    """Wait until the task is terminal, `timeout` passes, the client disconnects or the server begins to
    shut down, whichever comes first.

    Raises what waiting on the handle raises (RuntimeStopped: the runtime closed first).
    """

    async def settled() -> None:
        await handle

    async def gone() -> None:
        # The request's body (none, for a GET) comes first; the next message is the disconnection.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    waiters = {
        asyncio.ensure_future(settled()): _Outcome.SETTLED,
        asyncio.ensure_future(gone()): _Outcome.GONE,
        asyncio.ensure_future(stopping.wait()): _Outcome.STOPPING,
    }
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        # Let the cancelled waits finish: awaiting the handle removes its callback on the way out.
        await asyncio.gather(*waiters, return_exceptions=True)
    for waiter in done:
        waiter.result()  # the runtime closed: raise it, for the app's handlers to answer
    return next((waiters[waiter] for waiter in done), _Outcome.TIMED_OUT)


def _wait_param(request: Request) -> float:
    values = request.query_params.getlist("wait")
    if not values:
        return 0.0
    if len(values) > 1:
        raise _RequestError(400, "wait is given more than once; give it once")
    try:
        wait = float(values[0])
    except ValueError:
        wait = math.nan
    if not 0 <= wait <= MAX_WAIT_S:  # NaN fails both comparisons
        raise _RequestError(400, f"wait must be a number of seconds from 0 to {MAX_WAIT_S:g}, got {echo(values[0])}")
    return wait


def _event_params(request: Request) -> tuple[int | None, str | None]:
    raw = request.headers.get("last-event-id")
    last_event_id = None
    if raw is not None and raw.strip():
        if not raw.strip().isdigit() or len(raw.strip()) > 18:
            raise _RequestError(400, f"Last-Event-ID must be an id this server sent (a number), got {echo(raw)}")
        last_event_id = int(raw.strip())
    tasks = request.query_params.getlist("task")
    if len(tasks) > 1:
        raise _RequestError(400, "task is given more than once; an event stream follows one task or all")
    if tasks and not tasks[0]:
        raise _RequestError(400, "task must be a task id; leave it out to follow every task")
    return last_event_id, tasks[0] if tasks else None


async def _not_found(request: Request, exc: Exception) -> Response:
    task_id = request.path_params.get("task_id") or request.query_params.get("task", "")  # /tasks/{id}, /events?task=
    return error_response(404, f"no task with id {echo(task_id)}")


async def _unprocessable(request: Request, exc: Exception) -> Response:
    return error_response(422, str(exc))


async def _overloaded(request: Request, exc: Exception) -> Response:
    return error_response(503, f"the runtime is overloaded: {exc}", headers={"Retry-After": "1"})


async def _stopped(request: Request, exc: Exception) -> Response:
    return error_response(503, "the runtime is stopped; it accepts no more work")


async def _failed(request: Request, exc: Exception) -> Response:
    return error_response(503, f"the runtime has failed and accepts no more work: {exc}")


async def _journal_refuses(request: Request, exc: Exception) -> Response:
    return error_response(
        503, f"the journal refuses writes, nothing was created; try again later: {exc}", headers={"Retry-After": "1"}
    )


async def _not_answering(request: Request, exc: Exception) -> Response:
    return error_response(503, "the runtime did not answer in time; try again", headers={"Retry-After": "1"})


async def _not_implemented(request: Request, exc: Exception) -> Response:
    return error_response(501, f"not supported by this runtime: {exc}")


def _check_declared_size(request: Request) -> None:
    declared = request.headers.get("content-length")
    if declared is not None:
        if _COUNT.fullmatch(declared) is None:
            raise _RequestError(400, f"Content-Length must be a byte count, got {echo(declared)}")
        if int(declared) > MAX_BODY_BYTES:
            raise _RequestError(413, f"the body is {declared} bytes; at most {MAX_BODY_BYTES} (1 MiB) are accepted")


def _check_json_media_type(request: Request) -> None:
    """415 unless the body is declared ``application/json`` (parameters such as a charset are fine).

    The types a web page may send to another site without the browser asking that site first
    (``text/plain``, forms, or none at all) are exactly the ones refused here.
    """
    declared = request.headers.get("content-type")
    media_type = (declared or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        got = "no Content-Type" if declared is None else f"Content-Type {echo(declared)}"
        raise _RequestError(
            415,
            f"the body must be declared as JSON: send Content-Type: application/json (got {got}); "
            'e.g. curl --json \'{"name": "a", "data": 1}\'',
        )


async def _read_body(request: Request) -> bytes:
    body = bytearray()
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            # Counted as it streams too: a chunked body declares no length.
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise _RequestError(413, f"the body is over {MAX_BODY_BYTES} bytes (1 MiB), the most accepted")
    except TimeoutError:
        raise _RequestError(408, f"the body did not arrive within {BODY_TIMEOUT_S:g} s") from None
    except ClientDisconnect:
        raise _RequestError(400, "the client went away before sending the whole body") from None
    return bytes(body)


def _encode_page(records: Sequence[TaskRecord], limit: int, offset: int) -> bytes:
    """The body of a `GET /tasks` page: `records` encoded, stopping before MAX_PAGE_BYTES."""
    # 1000 payloads of 1 MiB must not become one 1 GiB answer.
    encoded: list[bytes] = []
    size = 0
    for record in records:
        item = encode_json(record.to_dict())
        if encoded and size + len(item) > MAX_PAGE_BYTES:
            break
        encoded.append(item)
        size += len(item)
    full = len(encoded) == limit or len(encoded) < len(records)
    tail = {"limit": limit, "offset": offset, "next_offset": offset + len(encoded) if full else None}
    return b'{"tasks":[' + b",".join(encoded) + b"]," + encode_json(tail)[1:]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_payload(body: bytes, caps: _PayloadCaps) -> _Parsed:
    if not body.strip():
        raise _RequestError(
            400, 'the body is empty; send the task\'s payload as a JSON object, e.g. {"name": "a", "data": 1}'
        )
    try:
        payload = json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise _RequestError(
            422, f"the payload nests deeper than {MAX_PAYLOAD_DEPTH} levels, the most accepted"
        ) from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _RequestError(400, f"malformed JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise _RequestError(422, f"the payload must be a JSON object, got {_json_type(payload)}")
    problem = _payload_problem(payload, MAX_PAYLOAD_DEPTH, caps.max_nodes)
    if problem is not None:
        raise _RequestError(413 if problem.startswith("the payload has more than") else 422, problem)
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    if len(canonical) > caps.max_bytes:
        raise _RequestError(
            413,
            f"the payload is {len(canonical)} bytes as canonical JSON (sorted keys, no spaces); "
            f"at most {caps.max_bytes} are stored",
        )
    return _Parsed(payload, hashlib.sha256(canonical).hexdigest())


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _payload_problem(payload: dict[str, Any], depth_limit: int, node_limit: int) -> str | None:
    """What makes a parsed payload unacceptable, or None: too deep, too many nodes, or text that is not Unicode.

    JSON's \\uXXXX escapes can spell a lone surrogate, which Python decodes but no
    UTF-8 encoder (this API's answers, the journal) can write back.
    """
    # Iterative, so that the check itself cannot hit the recursion limit it guards.
    stack: list[tuple[Any, int]] = [(payload, 1)]
    nodes = 0
    while stack:
        item, depth = stack.pop()
        nodes += 1 + (len(item) if isinstance(item, dict) else 0)  # an object's keys are nodes too
        if nodes > node_limit:
            return (
                f"the payload has more than {node_limit} values (objects, arrays, keys, strings, numbers, ...), "
                "the most stored"
            )
        if isinstance(item, str):
            texts: Iterable[str] = (item,)
        elif isinstance(item, dict):
            texts = item.keys()
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            texts = ()
            stack.extend((child, depth + 1) for child in item)
        else:
            continue
        if depth > depth_limit and not isinstance(item, str):
            return f"the payload nests deeper than {depth_limit} levels, the most accepted"
        for text in texts:
            try:
                text.encode()
            except UnicodeEncodeError:
                return f"the payload has text that is not valid Unicode (a lone surrogate) in {echo(text)}"
    return None


def _pipeline_param(request: Request, runtime: Runtime) -> str:
    """The ``?pipeline=`` of a submission (the runtime's first pipeline when absent); 400 if unknown."""
    names = request.query_params.getlist("pipeline")
    if len(names) > 1:
        raise _RequestError(400, "give pipeline at most once")
    try:
        return runtime.pipeline(names[0] if names else None).name
    except UnknownPipeline:
        known = ", ".join(pipeline.name for pipeline in runtime.pipelines)
        raise _RequestError(400, f"no pipeline {echo(names[0])} in this runtime; its pipelines: {known}") from None


def _list_params(request: Request, runtime: Runtime) -> tuple[TaskState | None, int, int]:
    params = request.query_params
    unknown = sorted(set(params) - set(_LIST_PARAMS))
    if unknown:
        raise _RequestError(400, f"unknown query parameter {echo(unknown[0])}; allowed: {', '.join(_LIST_PARAMS)}")
    for name in _LIST_PARAMS:
        if len(params.getlist(name)) > 1:
            raise _RequestError(400, f"give {name} at most once")
    state: TaskState | None = None
    if "state" in params:
        states = runtime.states
        state = next((s for s in states if s.value == params["state"]), None)
        if state is None:
            allowed = ", ".join(s.value for s in states)
            raise _RequestError(400, f"state must be one of {allowed}; got {echo(params['state'])}") from None
    limit = _count_param(params, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    offset = _count_param(params, "offset", 0, 0, MAX_OFFSET)
    return state, limit, offset


def _count_param(params: Mapping[str, str], name: str, default: int, lowest: int, highest: int) -> int:
    text = params.get(name)
    if text is None:
        return default
    value = int(text) if _COUNT.fullmatch(text) else None
    if value is None or not lowest <= value <= highest:
        raise _RequestError(400, f"{name} must be an integer from {lowest} to {highest}; got {echo(text)}")
    return value


def _load_dashboard() -> tuple[bytes, dict[str, str]]:
    html = importlib.resources.files("actorflow.api").joinpath("static/dashboard.html").read_bytes()
    # The page is self-contained: allow exactly its own inline script and style (by
    # hash) and requests back to this server, nothing else.
    hashes = {
        kind: " ".join(
            f"'sha256-{b64encode(hashlib.sha256(block).digest()).decode()}'"
            for block in re.findall(rb"<%s>(.*?)</%s>" % (kind, kind), html, flags=re.DOTALL)
        )
        for kind in (b"script", b"style")
    }
    policy = (
        f"default-src 'none'; script-src {hashes[b'script']}; style-src {hashes[b'style']}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    headers = {
        "Content-Security-Policy": policy,
        # The token may be in the page's URL: never send it on as a Referer.
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
    }
    return html, headers


class ApiServer(uvicorn.Server):
    """uvicorn's server, plus a readiness event, and requests that wait which end at shutdown.

    `ready` is set once startup has finished, whether or not it succeeded: check
    `started`. uvicorn waits at shutdown for open responses to finish, for up to
    `timeout_graceful_shutdown`, then cancels them (a plain-text 500 and a logged
    traceback). An event stream would never finish, and a long poll only after up
    to a minute, so `shutdown` first ends the streams and answers the long polls
    with a JSON 503.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        self.stop_requested_at: float | None = None
        """`time.monotonic()` when the first stop signal (or `should_exit`) was seen; None while serving."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()
        super().handle_exit(sig, frame)

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        port: int = self.servers[0].sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """`http://host:port`, as bound."""
        host = self.config.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    async def startup(self, sockets: list[Any] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        finally:
            self.ready.set()

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()
        state = getattr(self.config.app, "state", None)
        stopping = getattr(state, "stopping", None)
        if isinstance(stopping, asyncio.Event):
            stopping.set()
        broadcaster = getattr(state, "broadcaster", None)
        if isinstance(broadcaster, EventBroadcaster):
            broadcaster.close()
        await super().shutdown(sockets=sockets)


def make_server(
    app: Starlette,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    configure_logging: bool = True,
    request_start_timeout_s: float = REQUEST_START_TIMEOUT_S,
    max_idle_connections: int = MAX_IDLE_CONNECTIONS,
    allowed_hosts: Iterable[str] = (),
) -> ApiServer:
    """A uvicorn server for `app`, with limits so that slow or abandoned clients cannot exhaust it.

    Args:
        app: from `create_app`.
        host: the address to bind; loopback unless told otherwise. The app answers requests that
            name it as their `Host` (with the port), as it does the loopback names.
        port: the port to bind; 0 picks a free one (see `ApiServer.port`).
        configure_logging: let uvicorn set up its console logging (off in tests and embedders).
        request_start_timeout_s: a connection waiting for a request (new, or between two requests)
            must send the request's line and headers within this long, or it is closed.
        max_idle_connections: connections waiting for a request at once; past this, the one that
            has waited longest is closed, so that idle sockets never crowd out real requests.
        allowed_hosts: more names the app answers to (see `create_app`).
    """
    hosts = getattr(app.state, "allowed_hosts", None)
    if isinstance(hosts, AllowedHosts):
        hosts.bind(host)
        for entry in allowed_hosts:
            hosts.add(entry)
    elif allowed_hosts:
        raise ValueError("allowed_hosts needs an app from create_app, which checks the Host header")
    config = ApiConfig(
        app,
        request_start_timeout_s=request_start_timeout_s,
        max_idle_connections=max_idle_connections,
        host=host,
        port=port,
        ws="none",
        lifespan="on",
        loop="asyncio",
        timeout_keep_alive=5,  # idle keep-alive connections are closed after 5 s
        h11_max_incomplete_event_size=16 * 1024,  # request line + headers: 16 KiB at most
        # No limit_concurrency: uvicorn counts idle connections against it and answers plain-text 503s.
        # GuardedH11Protocol bounds idle connections and RequestLimitMiddleware requests instead.
        backlog=128,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        proxy_headers=False,
        server_header=False,
        log_config=uvicorn.config.LOGGING_CONFIG if configure_logging else None,
        access_log=configure_logging,
    )
    if configure_logging:
        logging.getLogger("uvicorn.access").addFilter(_redact_token)
    return ApiServer(config)


@contextlib.contextmanager
def serve_in_background(
    app: Starlette,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ready_timeout_s: float = 10.0,
    request_start_timeout_s: float = REQUEST_START_TIMEOUT_S,
    max_idle_connections: int = MAX_IDLE_CONNECTIONS,
) -> Iterator[ApiServer]:
    """Serve `app` from a background thread for the duration of a `with` block.

    For programs (and tests) that are not themselves asyncio: the block starts once the
    server listens, and leaving it shuts the server down gracefully (event streams included)
    and joins the thread. The caller owns the runtime behind `app`.

    `request_start_timeout_s` and `max_idle_connections` are `make_server`'s.

    Raises:
        RuntimeError: the server did not start within `ready_timeout_s` (port taken, ...).
    """
    server = make_server(
        app,
        host=host,
        port=port,
        configure_logging=False,
        request_start_timeout_s=request_start_timeout_s,
        max_idle_connections=max_idle_connections,
    )
    thread = threading.Thread(target=server.run, name="actorflow-api", daemon=True)
    thread.start()
    try:
        if not server.ready.wait(ready_timeout_s) or not server.started:
            raise RuntimeError(f"the API server did not start on {host}:{port} within {ready_timeout_s:g} s")
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=ready_timeout_s + GRACEFUL_SHUTDOWN_S)


_TOKEN_IN_QUERY = re.compile(r"(?<=[?&]token=)[^&]*")


def _redact_token(record: logging.LogRecord) -> bool:
    """Keeps `?token=` values (dashboard and event stream URLs) out of the access log."""
    if isinstance(record.args, tuple):
        record.args = tuple(_TOKEN_IN_QUERY.sub("***", arg) if isinstance(arg, str) else arg for arg in record.args)
    return True


def serve(
    host: str = "127.0.0.1",
    port: int = 8080,
    journal: str | None = None,
    token: str | None = None,
    runtime: Runtime | None = None,
    *,
    max_in_flight: int = SERVE_MAX_IN_FLIGHT,
    retain_terminal: int = SERVE_RETAIN_TERMINAL,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    max_payload_nodes: int = MAX_PAYLOAD_NODES,
    metrics_public: bool = False,
    allowed_hosts: Iterable[str] = (),
) -> None:
    """Run a `Runtime` behind the API until SIGINT (Ctrl-C) or SIGTERM.

    Then, in order: stop accepting connections, end the event streams and answer the
    long polls (JSON 503), finish the requests in progress, let the tasks in flight
    finish (they were promised with a 201) and close the runtime. The whole stop
    takes at most the runtime's `drain_timeout_s`, counted from the signal, so that a
    supervisor's grace period set from it is not overrun; a second signal stops the
    wait for the tasks at once, saying what becomes of them.

    Memory stays bounded: at most `max_in_flight` tasks are in flight (more answer 503
    with Retry-After), at most `retain_terminal` finished ones are kept in memory (the
    rest are read back from the journal), and each payload is capped. Without `journal`
    the finished tasks go to a temporary journal, deleted when the server stops.

    Args:
        host: the address to bind, loopback by default.
        port: the port to bind.
        journal: a SQLite journal path, so that tasks survive a restart; None for a temporary one.
        token: if given, every route but `/healthz` needs `Authorization: Bearer <token>`.
        runtime: serve this runtime (an app's own) instead of a new default one; `journal`,
            `max_in_flight` and `retain_terminal` are then its config's. It is closed, with
            draining, when the server stops.
        max_in_flight: tasks in flight at once, for the runtime made here.
        retain_terminal: finished tasks kept in memory, for the runtime made here.
        max_payload_bytes: the largest payload accepted, in bytes of its canonical JSON.
        max_payload_nodes: the most values (nodes) in an accepted payload.
        metrics_public: serve `GET /metrics` without the token.
        allowed_hosts: more names requests may give as `Host` (see `create_app`).
    """
    if runtime is not None and journal is not None:
        raise ConfigError("serve() takes a runtime or a journal path, not both: the runtime has its own journal")
    temporary_journal = runtime is None and journal is None
    with contextlib.ExitStack() as cleanup:
        if runtime is None:
            if journal is None:
                journal = os.path.join(
                    cleanup.enter_context(tempfile.TemporaryDirectory(prefix="actorflow-")), "tasks.db"
                )
            runtime = Runtime(
                RuntimeConfig(
                    journal_path=journal,
                    max_in_flight=max_in_flight,
                    retain_terminal=retain_terminal,
                    overload="reject",  # an HTTP client is told 503 + Retry-After at once, not held
                )
            )
        signals = cleanup.enter_context(_StopSignals())
        server: ApiServer | None = None
        try:
            app = create_app(
                runtime,
                token=token,
                max_payload_bytes=max_payload_bytes,
                max_payload_nodes=max_payload_nodes,
                metrics_public=metrics_public,
                allowed_hosts=allowed_hosts,
            )
            server = make_server(app, host=host, port=port)
            drain_s = runtime.config.drain_timeout_s
            # The whole stop (requests, then tasks in flight) fits in the drain timeout: a supervisor's
            # grace period is set from it, and one that runs out kills the process mid-way.
            server.config.timeout_graceful_shutdown = max(1, min(GRACEFUL_SHUTDOWN_S, round(drain_s / 2)))
            server.run()
        finally:
            stop_at = server.stop_requested_at if server is not None else None
            if runtime.config.journal_path is None:
                fate = " and are lost (the runtime has no journal)"
            elif temporary_journal:
                fate = " and are lost (the journal is a temporary one; --journal keeps them)"
            else:
                fate = "; they resume when the server starts again on the same journal"
            _drain_and_close(runtime, signals, stop_at, unfinished=fate)


_log = logging.getLogger("uvicorn.error")
"""Where serve() says how its stop goes: uvicorn's own log, beside its "Shutting down"."""


class _StopNow(BaseException):
    """A second stop signal while draining: stop at once (a BaseException, like KeyboardInterrupt)."""


class _StopSignals(contextlib.AbstractContextManager["_StopSignals"]):
    """SIGINT and SIGTERM for the length of `serve()`, in the main thread.

    uvicorn handles them itself while it serves, then restores these handlers and
    raises each signal it caught again: here they are counted, not fatal, so that
    the runtime still drains. A second one (Ctrl-C pressed again) stops the drain.
    """

    _SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.count = 0
        self.draining = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self._SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.draining and self.count >= 2:
            self.draining = False
            raise _StopNow


def _drain_and_close(runtime: Runtime, signals: _StopSignals, stop_at: float | None, *, unfinished: str) -> None:
    """Let the tasks in flight finish within what is left of the drain timeout since the stop began, then close.

    A second stop signal (now, or while the requests were finishing) skips the rest of the wait;
    `unfinished` says what becomes of the tasks left then.
    """
    drain_s = runtime.config.drain_timeout_s
    left = drain_s - (time.monotonic() - stop_at) if stop_at is not None else drain_s
    try:
        if signals.count >= 2:
            raise _StopNow
        if runtime.join(0):
            return
        if left > 0:
            in_flight = runtime.stats()["in_flight"]
            _log.info(
                "Waiting up to %d s for %d task%s in flight to finish (press CTRL+C again to stop at once)",
                math.ceil(left),
                in_flight,
                "" if in_flight == 1 else "s",
            )
            signals.draining = True
            try:
                drained = runtime.join(left)
            finally:
                signals.draining = False
            if drained:
                return
        _log.warning(
            "Stopping with tasks still in flight, the drain timeout (%g s) being spent: they are left unfinished%s",
            drain_s,
            unfinished,
        )
    except _StopNow:
        _log.warning("Stopping without draining: the tasks in flight are left unfinished%s", unfinished)
    except ActorflowError as exc:  # the runtime failed, or does not answer: nothing to wait for
        _log.warning("Stopping without draining: the runtime cannot finish its tasks: %s", exc)
    finally:
        runtime.close(drain=False)
