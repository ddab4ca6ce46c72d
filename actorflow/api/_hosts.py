"""The `Host` check: the API answers only requests that name this server.

A server on loopback is reachable from any web page the user opens, through the
browser. Reading its answers from another site is what the same-origin policy
forbids, and DNS rebinding gets around it: a page of ``evil.example`` whose name
is made to resolve to 127.0.0.1 talks to this server as if it were its own
origin, and reads every task. Such requests still say ``Host: evil.example``,
so they are refused (421 Misdirected Request) unless the name is one this
server answers to:

- ``localhost``, ``127.0.0.1``, ``[::1]``, the address the connection came in on,
  and the host the server was bound to, each with the server's port (or alone
  on port 80);
- any name added with ``allowed_hosts`` (``--allowed-host``): ``name`` for any
  port (behind a reverse proxy, say), or ``name:port`` for that port only; ``*``
  turns the check off.

``/healthz`` is answered whatever the host (a probe may use any name), and a
request with no `Host` at all (HTTP/1.0; never a browser) is let through.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from actorflow.api._errors import echo, error_response

__all__ = ["AllowedHosts", "HostCheckMiddleware"]

_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def _split(host: str) -> tuple[str, int | None] | None:
    """(name, port) of a `Host` value, lower-cased, IPv6 literals in brackets; None if malformed."""
    host = host.strip().lower()
    if host.startswith("["):
        name, bracket, rest = host.partition("]")
        name += bracket
        if not bracket:
            return None
    else:
        name, colon, rest = host.partition(":")
        rest = colon + rest
    if not rest:
        return name, None
    if not rest.startswith(":") or not rest[1:].isdigit() or len(rest) > 6:
        return None
    return name, int(rest[1:])


def _bracketed(address: str) -> str:
    address = address.lower()
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


class AllowedHosts:
    """The names an app answers to, besides the loopback ones and the address a request came in on.

    Args:
        extra: names a request may use, as ``name`` (any port) or ``name:port``; ``"*"`` allows any.
    """

    def __init__(self, extra: Iterable[str] = ()) -> None:
        self.any = False
        self._any_port: set[str] = set()
        self._with_port: set[tuple[str, int]] = set()
        self._bound: set[str] = set()
        for entry in extra:
            self.add(entry)

    def add(self, entry: str) -> None:
        """Allow one more name (``name`` or ``name:port``), or every name with ``"*"``.

        Raises:
            ValueError: `entry` is not a host name, with or without a port.
        """
        if not isinstance(entry, str):
            raise ValueError(
                f"an allowed host must be a string like 'api.example.com' or 'api.example.com:8443', got {entry!r}"
            )
        if entry.strip() == "*":
            self.any = True
            return
        parts = _split(entry)
        if parts is None or not parts[0] or any(c.isspace() or c in "/?#@" for c in parts[0]):
            raise ValueError(
                f"an allowed host must be a name like 'api.example.com' or 'api.example.com:8443', got {entry!r}"
            )
        name, port = parts
        if port is None:
            self._any_port.add(name)
        else:
            self._with_port.add((name, port))

    def bind(self, host: str) -> None:
        """Answer to the host the server was bound to (with the server's port), as to the loopback names."""
        if host:
            self._bound.add(_bracketed(host))

    def problem(self, host: str, server: tuple[str, int] | None) -> str | None:
        """Why a request with this `Host` is refused, or None if it names this server.

        Args:
            host: the request's `Host` header.
            server: the (address, port) the connection came in on (the ASGI scope's ``server``).
        """
        if self.any:
            return None
        parts = _split(host)
        if parts is not None:
            name, port = parts
            if name in self._any_port or (port is not None and (name, port) in self._with_port):
                return None
            local_port = server[1] if server else None
            same_port = port == local_port or (port is None and local_port == 80)
            if same_port and (
                name in _LOOPBACK_NAMES or name in self._bound or (server is not None and name == _bracketed(server[0]))
            ):
                return None
        names = list(dict.fromkeys([*_LOOPBACK_NAMES, *sorted(self._bound)]))
        if server is not None:
            names = [f"{name}:{server[1]}" for name in dict.fromkeys([*names, _bracketed(server[0])])]
        names += sorted(self._any_port) + sorted(f"{name}:{port}" for name, port in self._with_port)
        return (
            f"Host {echo(host)} is not a name this server answers to (a request meant for another site); "
            f"it answers to {', '.join(names)}; add more with --allowed-host (allowed_hosts=)"
        )


class HostCheckMiddleware:
    """Refuses, with a JSON 421, a request whose `Host` is not one `hosts` allows (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, hosts: AllowedHosts) -> None:
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") == "/healthz" or self.hosts.any:
            await self.app(scope, receive, send)
            return
        host = next((value for name, value in scope.get("headers", ()) if name == b"host"), None)
        problem = None if host is None else self.hosts.problem(host.decode("latin-1"), scope.get("server"))
        if problem is None:
            await self.app(scope, receive, send)
            return
        await error_response(421, problem)(scope, receive, send)
