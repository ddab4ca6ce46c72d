"""JSON responses and error handling: every answer is JSON, and no error carries a stack trace.

Three layers make sure of it:

- handlers build errors with `error_response` (`{"error": "..."}`);
- `http_exception_handler` turns Starlette's own 404 and 405 into the same shape;
- `CatchAllMiddleware` answers anything unexpected with a generic 500 and logs the
  traceback server-side, where it belongs.
"""

from __future__ import annotations

import asyncio
import json
import traceback
from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actorflow.core.events import HTTP_UNHANDLED_ERROR
from actorflow.core.tracing import get_event_logger

__all__ = [
    "CatchAllMiddleware",
    "echo",
    "encode_json",
    "error_response",
    "http_exception_handler",
    "json_response",
    "logger",
]

# actorflow's event logger: quiet unless the host configures logging (see core.tracing).
logger = get_event_logger("api")

_COMMON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
_MAX_ECHO = 200
"""Longest piece of client input (a path, a value) echoed back in an error message."""


class _JSONResponse(Response):
    media_type = "application/json"


def encode_json(value: Any) -> bytes:
    """Compact UTF-8 JSON. A lone surrogate (which UTF-8 cannot carry) is written as a \\u escape instead."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    try:
        return text.encode()
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def json_response(body: Any, status: int = 200, *, headers: Mapping[str, str] | None = None) -> Response:
    """A JSON response with the API's common headers (no caching, no sniffing); `body` may be encoded already."""
    content = body if isinstance(body, bytes) else encode_json(body)
    return _JSONResponse(content, status_code=status, headers={**_COMMON_HEADERS, **(headers or {})})


def error_response(status: int, message: str, *, headers: Mapping[str, str] | None = None) -> Response:
    """`{"error": message}` with the given status."""
    return json_response({"error": message}, status, headers=headers)


def echo(value: str) -> str:
    """Client input made safe to quote in a message: repr'd and cut to a bounded length."""
    text = repr(value)
    return text if len(text) <= _MAX_ECHO else text[: _MAX_ECHO - 4] + "...'"


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    """Starlette's routing errors (404 unknown route, 405 wrong method) as JSON."""
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        message = f"no route for {request.method} {echo(request.url.path)}; see GET /openapi.json"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {echo(request.url.path)}; allowed: {headers.get('Allow')}"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, headers=headers)


class CatchAllMiddleware:
    """The last line: an unexpected exception becomes a logged, generic 500.

    A pure ASGI middleware rather than Starlette's `BaseHTTPMiddleware`, which would
    buffer the event stream. A request that the server cancels while it shuts down
    (one still running when the graceful shutdown's time is up) is answered with a
    JSON 503 if nothing was sent yet, and ends quietly: no plain-text 500, no traceback.

    Args:
        app: the app to guard.
        stopping: set once the server has begun to shut down.
    """

    def __init__(self, app: ASGIApp, stopping: asyncio.Event | None = None) -> None:
        self.app = app
        self.stopping = stopping

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response_started = False

        async def send_tracking_start(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking_start)
        except asyncio.CancelledError:
            if self.stopping is None or not self.stopping.is_set():
                raise
            # Cancelled by the server's shutdown: answer what can be answered and end this request normally.
            if not response_started:
                response = error_response(503, "the server is shutting down; try again once it is back")
                await response(scope, receive, send)
        except Exception as exc:  # noqa: BLE001 - the last line: anything unexpected becomes a logged 500
            logger.error(
                HTTP_UNHANDLED_ERROR,
                method=scope.get("method"),
                path=scope.get("path"),
                error_type=type(exc).__name__,
                error=str(exc),
                traceback=traceback.format_exc(),
            )
            if not response_started:
                response = error_response(500, "internal server error; the server log has the details")
                await response(scope, receive, send)
            # Once the response has started there is nothing useful to send: returning
            # lets uvicorn close the connection, and the client sees a truncated body.
