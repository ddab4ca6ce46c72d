"""Bearer-token authentication for every route but the health check.

The token travels in `Authorization: Bearer <token>`. A browser cannot set that
header on a page load or on an `EventSource`, so the dashboard (`GET /`) and the
event stream (`GET /events`), and only they, also take it as `?token=<token>`.
Tokens are compared with `hmac.compare_digest`, whose time does not depend on
where the first differing byte is.
"""

from __future__ import annotations

import hmac
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Receive, Scope, Send

from actorflow.api._errors import error_response

__all__ = ["OPEN_PATHS", "BearerTokenMiddleware"]

OPEN_PATHS = frozenset({"/healthz"})
QUERY_TOKEN_PATHS = frozenset({"/", "/events"})


class BearerTokenMiddleware:
    """Answers 401 (with `WWW-Authenticate`) unless the request carries the token."""

    def __init__(self, app: ASGIApp, *, token: str, open_paths: frozenset[str] = OPEN_PATHS) -> None:
        if not token:
            raise ValueError("the API token must be a non-empty string")
        self.app = app
        self._token = token.encode()
        self._open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._open_paths:
            await self.app(scope, receive, send)
            return
        given = self._token_from_header(scope)
        if given is None and scope["path"] in QUERY_TOKEN_PATHS and scope["method"] in ("GET", "HEAD"):
            given = self._token_from_query(scope)
        if given is not None and hmac.compare_digest(given, self._token):
            await self.app(scope, receive, send)
            return
        challenge = 'Bearer realm="actorflow"' if given is None else 'Bearer realm="actorflow", error="invalid_token"'
        message = (
            "missing bearer token: send 'Authorization: Bearer <token>' (GET / and GET /events also take ?token=)"
            if given is None
            else "invalid bearer token"
        )
        response = error_response(401, message, headers={"WWW-Authenticate": challenge})
        await response(scope, receive, send)

    @staticmethod
    def _token_from_header(scope: Scope) -> bytes | None:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = bytes(value).partition(b" ")
                if scheme.lower() == b"bearer":
                    return credentials.strip()
                return b""  # another scheme (Basic, ...) is a wrong token, not a missing one
        return None

    @staticmethod
    def _token_from_query(scope: Scope) -> bytes | None:
        query = bytes(scope.get("query_string", b"")).decode("latin-1")
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name == "token":
                return value.encode()
        return None
