"""The HTTP face of a `Runtime`: a Starlette app, and a hardened uvicorn server to run it.

Routes (the OpenAPI document at `/openapi.json` has every status code)::

    GET    /                 the live dashboard (HTML)
    GET    /healthz          liveness, never behind the token
    GET    /openapi.json     the API described
    GET    /stats            the runtime's counters
    GET    /events           Server-Sent Events, one per transition
    POST   /tasks            submit (Idempotency-Key honoured)
    GET    /tasks            page through tasks (?state=&limit=&offset=)
    GET    /tasks/{id}       one record, history included
    DELETE /tasks/{id}       cancel

Handlers never block the event loop: submission goes through
`Runtime.submit_async`, and every other runtime call (each a round trip to the
state actor) runs in Starlette's thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.resources
import json
import logging
import re
import signal
import threading
from base64 import b64encode
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
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

from actorflow.actors import Runtime
from actorflow.api._auth import BearerTokenMiddleware
from actorflow.api._errors import (
    CatchAllMiddleware,
    echo,
    encode_json,
    error_response,
    http_exception_handler,
    json_response,
)
from actorflow.api._events import EventBroadcaster, TooManyStreamsError, event_stream
from actorflow.api._idempotency import IdempotencyKeyReusedError, IdempotencyKeys, StoredAnswer, check_key, fingerprint
from actorflow.api._openapi import DEFAULT_LIMIT, MAX_LIMIT, MAX_OFFSET, openapi_document
from actorflow.core import (
    ConfigError,
    InvalidPayload,
    Overloaded,
    RuntimeConfig,
    RuntimeStopped,
    TaskNotFound,
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
MAX_PAGE_BYTES = 16 * 1024 * 1024
"""A page of `GET /tasks` holds fewer than `limit` tasks rather than grow past this."""
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
) -> Starlette:
    """The API and dashboard over `runtime`, which the caller keeps owning (and closes).

    Args:
        runtime: the runtime to serve.
        token: if given, every route but `/healthz` needs `Authorization: Bearer <token>`.
        heartbeat_s: how often an idle `/events` stream gets a comment line, to keep proxies from closing it.
        max_event_clients: how many `/events` streams may be open at once.
        idempotency_keys: where Idempotency-Keys are remembered (default: 10,000 keys for 24 h).
    """
    if token is not None and not token:
        raise ValueError("token must be a non-empty string, or None for no authentication")
    broadcaster = EventBroadcaster(runtime, max_clients=max_event_clients)
    handlers = _Handlers(
        runtime,
        broadcaster,
        idempotency_keys if idempotency_keys is not None else IdempotencyKeys(),
        openapi_document(token_required=token is not None, pipelines=runtime.pipelines),
        heartbeat_s,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        broadcaster.close()

    middleware = [Middleware(CatchAllMiddleware)]
    if token is not None:
        middleware.append(Middleware(BearerTokenMiddleware, token=token))
    app = Starlette(
        routes=[
            Route("/", handlers.dashboard, methods=["GET"]),
            Route("/healthz", handlers.health, methods=["GET"]),
            Route("/openapi.json", handlers.openapi, methods=["GET"]),
            Route("/stats", handlers.stats, methods=["GET"]),
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
            TimeoutError: _not_answering,  # the runtime did not answer a read in time
            NotImplementedError: _not_implemented,
        },
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False  # /tasks/ is an unknown route (404), not a redirect
    app.state.broadcaster = broadcaster
    app.state.idempotency_keys = handlers.keys
    return app


class _Handlers:
    """The endpoints. Runtime errors are left to the app's exception handlers below."""

    def __init__(
        self,
        runtime: Runtime,
        broadcaster: EventBroadcaster,
        keys: IdempotencyKeys,
        openapi: dict[str, Any],
        heartbeat_s: float,
    ) -> None:
        self.runtime = runtime
        self.broadcaster = broadcaster
        self.keys = keys
        self.openapi_doc = openapi
        self.heartbeat_s = heartbeat_s
        self.dashboard_html, self.dashboard_headers = _load_dashboard()

    async def dashboard(self, request: Request) -> Response:
        return Response(self.dashboard_html, media_type="text/html; charset=utf-8", headers=self.dashboard_headers)

    async def health(self, request: Request) -> Response:
        if self.runtime.closed:
            return json_response({"status": "stopped"}, 503)
        return json_response({"status": "ok"})

    async def openapi(self, request: Request) -> Response:
        return json_response(self.openapi_doc)

    async def stats(self, request: Request) -> Response:
        return json_response(await run_in_threadpool(self.runtime.stats))

    async def events(self, request: Request) -> ASGIApp:
        try:
            client = self.broadcaster.attach()
        except TooManyStreamsError as exc:
            return error_response(503, str(exc), headers={"Retry-After": "5"})
        except RuntimeError as exc:
            return error_response(503, str(exc))
        return event_stream(self.broadcaster, client, heartbeat_s=self.heartbeat_s)

    async def tasks(self, request: Request) -> Response:
        if request.method == "POST":
            return await self._submit(request)
        return await self._list(request)

    async def task(self, request: Request) -> Response:
        task_id: str = request.path_params["task_id"]
        if request.method == "DELETE":
            return await self._cancel(task_id)
        record = await run_in_threadpool(self.runtime.get, task_id)
        return json_response(record.to_dict())

    async def _submit(self, request: Request) -> Response:
        try:
            pipeline = _pipeline_param(request, self.runtime)
            payload = _parse_payload(await _read_body(request))
        except _RequestError as exc:
            return error_response(exc.status, str(exc))
        traceparent = request.headers.get("traceparent")
        if traceparent is not None:
            try:
                parse_traceparent(traceparent)
            except ValueError:
                traceparent = None  # W3C trace context: a malformed parent is ignored, and a new trace starts

        async def submit() -> StoredAnswer:
            handle = await self.runtime.submit_async(payload, traceparent=traceparent, pipeline=pipeline)
            try:
                state = (await run_in_threadpool(self.runtime.get, handle.task_id)).state.value
            except TaskNotFound:  # evicted already (retain_terminal): it surely was created
                state = TaskState.CREATED.value
            return StoredAnswer(201, {"task_id": handle.task_id, "state": state, "pipeline": pipeline})

        key = request.headers.get("idempotency-key")
        replayed = False
        if key is None:
            answer = await submit()
        else:
            problem = check_key(key)
            if problem is not None:
                return error_response(400, problem)
            answer, replayed = await self.keys.answer(
                key, fingerprint({"pipeline": pipeline, "payload": payload}), submit
            )
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
        # A page also stops before MAX_PAGE_BYTES: 1000 payloads of 1 MiB must not become one 1 GiB answer.
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
        return json_response(b'{"tasks":[' + b",".join(encoded) + b"]," + encode_json(tail)[1:])

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


async def _not_found(request: Request, exc: Exception) -> Response:
    return error_response(404, f"no task with id {echo(request.path_params.get('task_id', ''))}")


async def _unprocessable(request: Request, exc: Exception) -> Response:
    return error_response(422, str(exc))


async def _overloaded(request: Request, exc: Exception) -> Response:
    return error_response(503, f"the runtime is overloaded: {exc}", headers={"Retry-After": "1"})


async def _stopped(request: Request, exc: Exception) -> Response:
    return error_response(503, "the runtime is stopped; it accepts no more work")


async def _not_answering(request: Request, exc: Exception) -> Response:
    return error_response(503, "the runtime did not answer in time; try again", headers={"Retry-After": "1"})


async def _not_implemented(request: Request, exc: Exception) -> Response:
    return error_response(501, f"not supported by this runtime: {exc}")


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if _COUNT.fullmatch(declared) is None:
            raise _RequestError(400, f"Content-Length must be a byte count, got {echo(declared)}")
        if int(declared) > MAX_BODY_BYTES:
            raise _RequestError(413, f"the body is {declared} bytes; at most {MAX_BODY_BYTES} (1 MiB) are accepted")
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


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_payload(body: bytes) -> dict[str, Any]:
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
    problem = _payload_problem(payload, MAX_PAYLOAD_DEPTH)
    if problem is not None:
        raise _RequestError(422, problem)
    return payload


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _payload_problem(payload: dict[str, Any], depth_limit: int) -> str | None:
    """What makes a parsed payload unacceptable, or None: too deep, or text that is not Unicode.

    JSON's \\uXXXX escapes can spell a lone surrogate, which Python decodes but no
    UTF-8 encoder (this API's answers, the journal) can write back.
    """
    # Iterative, so that the check itself cannot hit the recursion limit it guards.
    stack: list[tuple[Any, int]] = [(payload, 1)]
    while stack:
        item, depth = stack.pop()
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
    html = importlib.resources.files("api").joinpath("static/dashboard.html").read_bytes()
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
    """uvicorn's server, plus a readiness event and event streams that end at shutdown.

    `ready` is set once startup has finished, whether or not it succeeded: check
    `started`. uvicorn waits at shutdown for open responses to finish, and an
    event stream never would, so `shutdown` ends them first.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

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
        broadcaster = getattr(getattr(self.config.app, "state", None), "broadcaster", None)
        if isinstance(broadcaster, EventBroadcaster):
            broadcaster.close()
        await super().shutdown(sockets=sockets)


def make_server(
    app: Starlette, *, host: str = "127.0.0.1", port: int = 8080, configure_logging: bool = True
) -> ApiServer:
    """A uvicorn server for `app`, with limits so that slow or abandoned clients cannot exhaust it.

    Args:
        app: from `create_app`.
        host: the address to bind; loopback unless told otherwise.
        port: the port to bind; 0 picks a free one (see `ApiServer.port`).
        configure_logging: let uvicorn set up its console logging (off in tests and embedders).
    """
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http="h11",  # h11_max_incomplete_event_size only applies to the h11 implementation
        ws="none",
        lifespan="on",
        loop="asyncio",
        timeout_keep_alive=5,  # idle keep-alive connections are closed after 5 s
        h11_max_incomplete_event_size=16 * 1024,  # request line + headers: 16 KiB at most
        limit_concurrency=200,  # more connections or tasks than this get 503
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
    app: Starlette, *, host: str = "127.0.0.1", port: int = 0, ready_timeout_s: float = 10.0
) -> Iterator[ApiServer]:
    """Serve `app` from a background thread for the duration of a `with` block.

    For programs (and tests) that are not themselves asyncio: the block starts once the
    server listens, and leaving it shuts the server down gracefully (event streams included)
    and joins the thread. The caller owns the runtime behind `app`.

    Raises:
        RuntimeError: the server did not start within `ready_timeout_s` (port taken, ...).
    """
    server = make_server(app, host=host, port=port, configure_logging=False)
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
) -> None:
    """Run a `Runtime` behind the API until SIGINT (Ctrl-C) or SIGTERM.

    Then, in order: stop accepting connections, end the event streams, finish the
    requests in progress, let the tasks in flight finish (up to the runtime's
    `drain_timeout_s`; they were promised with a 201) and close the runtime.

    Args:
        host: the address to bind, loopback by default.
        port: the port to bind.
        journal: a SQLite journal path, so that tasks survive a restart; None keeps them in memory.
        token: if given, every route but `/healthz` needs `Authorization: Bearer <token>`.
        runtime: serve this runtime (an app's own) instead of a new default one; `journal` must then be
            None. It is closed, with draining, when the server stops.
    """
    if runtime is not None and journal is not None:
        raise ConfigError("serve() takes a runtime or a journal path, not both: the runtime has its own journal")
    if runtime is None:
        runtime = Runtime(RuntimeConfig(journal_path=journal))
    try:
        server = make_server(create_app(runtime, token=token), host=host, port=port)
        with _stop_signals_absorbed():
            server.run()
    finally:
        runtime.close(drain=True)


@contextlib.contextmanager
def _stop_signals_absorbed() -> Iterator[None]:
    # uvicorn handles SIGINT/SIGTERM itself, then, once shut down, restores the previous
    # handlers and raises the signal again. With Python's defaults that would be a
    # KeyboardInterrupt (or, for SIGTERM, death) before the runtime drains; handlers
    # that ignore the signal for the length of the server's run let serve() finish.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in stop_signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
