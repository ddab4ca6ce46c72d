"""``actorflow serve``: the HTTP API and the live dashboard, over a runtime of the demo's or of your own app."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping, Sequence

__all__ = ["build_parser", "exposure_warning", "main", "resolve_token"]

# The API's defaults, repeated here because the CLI must not import Starlette before the arguments are
# checked (a missing extra is reported after them); tests/test_api_cli.py checks that they match.
SERVE_MAX_IN_FLIGHT = 1000
SERVE_RETAIN_TERMINAL = 1000
MAX_PAYLOAD_BYTES = 256 * 1024
MAX_PAYLOAD_NODES = 10_000

TOKEN_ENV = "ACTORFLOW_TOKEN"  # noqa: S105 - the name of a variable, not a secret
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def build_parser(prog: str = "actorflow serve") -> argparse.ArgumentParser:
    """The `serve` command's arguments."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve a Runtime over HTTP, with the live dashboard at / (open /?token=TOKEN with a token).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback only)")
    parser.add_argument("--port", type=int, default=8080, help="port to bind (default: %(default)s)")
    parser.add_argument(
        "--app",
        metavar="MODULE:ATTR",
        help="serve your own runtime: ATTR is a Runtime, or a function that returns one "
        "(e.g. myapp.tasks:runtime or myapp.tasks:make_runtime); MODULE is imported from the current directory "
        "or the installed packages",
    )
    parser.add_argument("--journal", metavar="PATH", help="SQLite journal, so that tasks survive a restart")
    parser.add_argument(
        "--token",
        help=f"require 'Authorization: Bearer TOKEN' on every route but /healthz (default: ${TOKEN_ENV})",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        type=_host_name,
        metavar="NAME[:PORT]",
        help="a name clients may use in the Host header besides localhost, 127.0.0.1, [::1] and --host "
        "(e.g. behind a reverse proxy); repeat for more, '*' for any. Other names answer 421, so that a web "
        "page cannot reach the API through DNS rebinding",
    )
    parser.add_argument(
        "--metrics-public",
        action="store_true",
        help="serve GET /metrics (Prometheus) without the token, for a scraper that has none",
    )
    parser.add_argument(
        "--max-in-flight",
        type=_positive_int,
        metavar="N",
        help=f"tasks in flight at once; more POSTs answer 503 with Retry-After (default: {SERVE_MAX_IN_FLIGHT})",
    )
    parser.add_argument(
        "--retain-terminal",
        type=_natural_int,
        metavar="N",
        help="finished tasks kept in memory; older ones are read back from the journal "
        f"(a temporary one without --journal) (default: {SERVE_RETAIN_TERMINAL})",
    )
    parser.add_argument(
        "--max-payload-bytes",
        type=_positive_int,
        default=MAX_PAYLOAD_BYTES,
        metavar="N",
        help="largest payload stored, in bytes of its canonical JSON; larger ones answer 413 (default: %(default)s)",
    )
    parser.add_argument(
        "--max-payload-nodes",
        type=_positive_int,
        default=MAX_PAYLOAD_NODES,
        metavar="N",
        help="most values (objects, arrays, keys, strings, numbers...) in a payload; more answer 413 "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="runtime events written to stderr (default: %(default)s)",
    )
    return parser


_HOST_NAME = re.compile(r"\*|(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:[0-9]{1,5})?")


def _host_name(text: str) -> str:
    if not _HOST_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"must be a host name, with or without :PORT (e.g. tasks.example.com), got {text!r}"
        )
    return text


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _natural_int(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, lowest: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = lowest - 1
    if value < lowest:
        raise argparse.ArgumentTypeError(f"must be an integer >= {lowest}, got {text!r}")
    return value


def resolve_token(flag: str | None, environ: Mapping[str, str]) -> str | None:
    """The token to require: `--token` if given, else $ACTORFLOW_TOKEN, else None (no auth).

    Raises:
        ValueError: the chosen token is blank, which would look like protection and be none.
    """
    token = flag if flag is not None else environ.get(TOKEN_ENV)
    if token is None:
        return None
    if not token.strip():
        source = "--token" if flag is not None else f"${TOKEN_ENV}"
        raise ValueError(f"{source} is blank; give a real token, or none for an open API")
    return token


def exposure_warning(host: str, token: str | None) -> str | None:
    """A warning when the API would be reachable beyond this machine with no token; None otherwise."""
    if token is not None or host in _LOOPBACK:
        return None
    return (
        f"warning: serving on {host} with no token: anyone who can reach it can submit and cancel tasks; "
        f"set --token or ${TOKEN_ENV}"
    )


def main(argv: Sequence[str] | None = None, *, prog: str = "actorflow serve") -> int:
    """Parse `argv` (the arguments after `serve`), serve until SIGINT or SIGTERM, and return the exit code."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be from 0 to 65535, got {args.port}")
    if args.app is not None and args.journal is not None:
        parser.error("--journal and --app exclude each other: the app's runtime has its own RuntimeConfig.journal_path")
    for flag, value in (("--max-in-flight", args.max_in_flight), ("--retain-terminal", args.retain_terminal)):
        if args.app is not None and value is not None:
            parser.error(f"{flag} and --app exclude each other: the app's runtime has its own RuntimeConfig")
    try:
        token = resolve_token(args.token, os.environ)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        from actorflow.api.server import serve  # noqa: PLC0415 - only here does a missing extra become an error
    except ModuleNotFoundError as exc:
        print(
            f"the HTTP API needs the http extra ({exc.name} is missing): pip install '.[http]' in a clone",
            file=sys.stderr,
        )
        return 2
    from actorflow.cli.apps import AppSpecError, load_runtime  # noqa: PLC0415 - only once the arguments are good
    from actorflow.core import ActorflowError  # noqa: PLC0415 - with serve: nothing to import before the checks above
    from actorflow.core.tracing import configure_logging  # noqa: PLC0415

    if (warning := exposure_warning(args.host, token)) is not None:
        print(warning, file=sys.stderr)
    close_log = configure_logging(level=args.log_level)
    try:
        runtime = load_runtime(args.app) if args.app is not None else None
        serve(
            host=args.host,
            port=args.port,
            journal=args.journal,
            token=token,
            runtime=runtime,
            metrics_public=args.metrics_public,
            allowed_hosts=args.allowed_host,
            max_in_flight=SERVE_MAX_IN_FLIGHT if args.max_in_flight is None else args.max_in_flight,
            retain_terminal=SERVE_RETAIN_TERMINAL if args.retain_terminal is None else args.retain_terminal,
            max_payload_bytes=args.max_payload_bytes,
            max_payload_nodes=args.max_payload_nodes,
        )
    except AppSpecError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except ActorflowError as exc:  # a bad journal, say: the message says what is wrong, a traceback would not help
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        close_log()
    return 0
