"""The connection layer under the API: uvicorn's h11 protocol, guarded against idle and slow clients.

uvicorn applies no timeout to a connection before its first request (its
``timeout_keep_alive`` starts only after a response, and any byte received
cancels it), and its ``limit_concurrency`` counts idle connections: a few hundred
sockets that never send a request would make it refuse every request, ``/healthz``
included. This module replaces both mechanisms:

- every connection that is waiting for a request (just opened, or between two
  requests) must deliver the request's whole head within `request_start_timeout_s`;
  one that sent nothing is closed silently, one that sent part of a head gets a
  JSON 408 first;
- at most `max_idle_connections` connections may wait at once: past that, the one
  that has waited longest is closed, so that idle sockets can never crowd out
  clients with a request to make;
- uvicorn's own error answers (400 for a request h11 cannot parse) are JSON like
  every other error of the API;
- an answer given before the request's body has all arrived (413 for a body too
  big, 415, 421, 401...) is followed by a lingering close: the rest of the body is
  read and thrown away (up to `LINGER_BYTES`, for `LINGER_S` at most) before the
  connection closes. Closing with unread data makes the kernel reset the
  connection, and a client still writing its body then gets a broken pipe instead
  of the answer (``urllib`` did, one time in three). A kept-alive connection is
  reused once the body has been read, within the same bounds.

Concurrency of requests in progress is limited by `RequestLimitMiddleware`, which
answers JSON 503 with ``Retry-After`` and never refuses ``/healthz``. Requests that
wait on the runtime (event streams, ``?wait=`` long polls) may hold only a share of
those slots (`WaitingRequests`), so that submissions always find room.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from typing import Any

import h11
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from actorflow.api._errors import encode_json, error_response

__all__ = ["ApiConfig", "GuardedH11Protocol", "RequestLimitMiddleware", "WaitingRequests"]

REQUEST_START_TIMEOUT_S = 10.0
"""A waiting connection must send a whole request head within this long."""
MAX_IDLE_CONNECTIONS = 512
"""Connections waiting for a request at once; past this the longest-waiting one is closed."""
MAX_CONCURRENT_REQUESTS = 256
"""Requests in progress at once (event streams included, `/healthz` exempt); more answer 503."""
LINGER_BYTES = 16 * 1024 * 1024
"""The most of a refused body read and thrown away after the answer, so that the client can read it."""
LINGER_S = 5.0
"""How long a connection is kept open after its answer for the rest of a refused body to arrive."""


class ApiConfig(uvicorn.Config):
    """uvicorn's config plus the connection guards `GuardedH11Protocol` reads.

    Args:
        app: the ASGI app.
        request_start_timeout_s: how long a waiting connection may take to send a request head.
        max_idle_connections: how many connections may wait for a request at once.
        **kwargs: uvicorn.Config's own arguments.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        request_start_timeout_s: float = REQUEST_START_TIMEOUT_S,
        max_idle_connections: int = MAX_IDLE_CONNECTIONS,
        **kwargs: Any,
    ) -> None:
        if not request_start_timeout_s > 0:
            raise ValueError(f"request_start_timeout_s must be > 0, got {request_start_timeout_s!r}")
        if max_idle_connections < 1:
            raise ValueError(f"max_idle_connections must be >= 1, got {max_idle_connections!r}")
        super().__init__(app, http=GuardedH11Protocol, **kwargs)
        self.request_start_timeout_s = request_start_timeout_s
        self.max_idle_connections = max_idle_connections


# Per server (its ServerState is shared by all its connections): the connections waiting for a
# request, oldest first (a dict is an insertion-ordered set).
_waiting_by_server: weakref.WeakKeyDictionary[ServerState, dict[GuardedH11Protocol, None]] = weakref.WeakKeyDictionary()

_TIMEOUT_BODY = encode_json(
    {"error": "the request's line and headers did not arrive in time; the connection is closed"}
)
_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncache-control: no-store\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)
_INVALID_BODY = encode_json(
    {"error": "invalid HTTP/1.1 request: a malformed request line or header, or a head over 16 KiB"}
)
_INVALID_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncache-control: no-store\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_INVALID_BODY), _INVALID_BODY)
)


class _CloseAfterBody(asyncio.Transport):
    """What a request's cycle writes to: the connection's transport, whose close lingers (see the module)."""

    def __init__(self, protocol: GuardedH11Protocol) -> None:
        super().__init__()
        self._protocol = protocol

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._protocol.transport.write(data)

    def is_closing(self) -> bool:
        return self._protocol.transport.is_closing()

    def close(self) -> None:
        self._protocol.close_after_body()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._protocol.transport.get_extra_info(name, default)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head, a cap on waiting connections,
    and a lingering close after an answer given before the request's body arrived."""

    _waiting: dict[GuardedH11Protocol, None]
    _request_timer: asyncio.TimerHandle | None = None
    _partial = False
    _lingering = False
    _server_stopping = False
    _linger_timer: asyncio.TimerHandle | None = None
    _discarded = 0
    """Bytes of a body read after its answer, and thrown away."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._waiting = _waiting_by_server.setdefault(self.server_state, {})
        self._await_request()
        limit = self._guards.max_idle_connections
        while len(self._waiting) > limit:
            next(iter(self._waiting))._close_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._discard(data)
            return
        if self.conn.their_state is h11.SEND_BODY and self.conn.our_state is h11.DONE:
            # Answered already, kept alive: the rest of the body is thrown away (by uvicorn), within bounds.
            self._discarded += len(data)
            if self._discarded > LINGER_BYTES:
                self.transport.close()
                return
        elif self._request_timer is not None and data.strip():
            self._partial = True
        super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request head was parsed: its handling has its own limits
            self._stop_waiting()
            self._discarded = 0
            if self.cycle is not None:
                self.cycle.transport = _CloseAfterBody(self)

    def on_response_complete(self) -> None:
        # Before super(): with a pipelined request already buffered, super() starts it at once.
        if not self.transport.is_closing() and not self._lingering:
            self._await_request()
        super().on_response_complete()

    def shutdown(self) -> None:
        self._server_stopping = True
        if self._lingering:
            self.transport.close()  # the server is going away: no more waiting for a body
            return
        super().shutdown()

    def close_after_body(self) -> None:
        """Close the connection, once the rest of the request's body has been read if the client is still
        sending it after its answer (within `LINGER_BYTES` and `LINGER_S`; not while the server stops)."""
        transport = self.transport
        cycle = self.cycle
        lingering = (
            cycle is not None
            and cycle.response_complete
            and self.conn.their_state is h11.SEND_BODY
            and not transport.is_closing()
            and not self._server_stopping
        )
        if not lingering:
            transport.close()
            return
        self._lingering = True
        self._stop_waiting()
        self._linger_timer = self.loop.call_later(LINGER_S, transport.close)
        self.flow.resume_reading()  # uvicorn pauses reading while a body is not taken: take it now

    def _discard(self, data: bytes) -> None:
        self._discarded += len(data)
        if self._discarded > LINGER_BYTES:
            self.transport.close()
            return
        try:
            self.conn.receive_data(data)
            while (event := self.conn.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
                if isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    self.transport.close()  # all read: the close is a clean one, and the answer is read
                    return
        except h11.RemoteProtocolError:
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        self._stop_waiting()
        self.transport.write(_INVALID_REQUEST)
        self.transport.close()

    @property
    def _guards(self) -> ApiConfig:
        config = self.config
        assert isinstance(config, ApiConfig), "GuardedH11Protocol needs an ApiConfig"
        return config

    def _await_request(self) -> None:
        self._stop_waiting()
        self._partial = bool(self.conn.trailing_data[0].strip())  # the start of a pipelined request
        self._waiting[self] = None
        self._request_timer = self.loop.call_later(self._guards.request_start_timeout_s, self._request_timed_out)

    def _stop_waiting(self) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None
        waiting = getattr(self, "_waiting", None)  # connection_lost may come before connection_made finished
        if waiting is not None:
            waiting.pop(self, None)

    def _request_timed_out(self) -> None:
        self._request_timer = None
        self._close_idle()

    def _close_idle(self) -> None:
        partial = self._partial
        self._stop_waiting()
        if self.transport.is_closing():
            return
        if partial:
            self.transport.write(_REQUEST_TIMEOUT)
        self.transport.close()


class RequestLimitMiddleware:
    """At most `max_requests` requests in progress; more answer JSON 503 with Retry-After.

    `/healthz` is never refused, so that a busy server is not mistaken for a dead one.
    """

    def __init__(self, app: ASGIApp, *, max_requests: int = MAX_CONCURRENT_REQUESTS) -> None:
        if max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {max_requests!r}")
        self.app = app
        self.max_requests = max_requests
        self.in_progress = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") == "/healthz":
            await self.app(scope, receive, send)
            return
        if self.in_progress >= self.max_requests:
            response = error_response(
                503,
                f"the server is handling {self.max_requests} requests, the most it takes at once; try again",
                headers={"Retry-After": "1"},
            )
            await response(scope, receive, send)
            return
        # One event loop: the check above and this increment are atomic (no await between them).
        self.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1


class WaitingRequests:
    """Requests that wait on the runtime (event streams, ``?wait=`` long polls): at most `limit` at once.

    They hold a request slot for as long as they wait, up to a minute or for good: capped at a share of
    `RequestLimitMiddleware`'s slots, they can never take the ones submissions need. Used from the
    event loop; `wait_for_count` is for another thread (a host, a test).
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the limit of waiting requests must be >= 1, got {limit!r}")
        self.limit = limit
        self.count = 0
        self._changed = threading.Condition()

    def try_hold(self) -> bool:
        """Take a slot for a request about to wait; False if `limit` are already waiting."""
        with self._changed:
            if self.count >= self.limit:
                return False
            self.count += 1
            self._changed.notify_all()
            return True

    def release(self) -> None:
        """Give back a slot `try_hold` gave."""
        with self._changed:
            self.count -= 1
            self._changed.notify_all()

    def wait_for_count(self, count: int, timeout: float) -> bool:
        """Block until exactly `count` requests wait; False if that did not happen within `timeout` s.

        Never call it on the event loop's thread.
        """
        with self._changed:
            return self._changed.wait_for(lambda: self.count == count, timeout)
