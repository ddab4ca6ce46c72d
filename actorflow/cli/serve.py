"""``actorflow serve``: the HTTP API and the live dashboard, over a runtime of the demo's or of your own app."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

__all__ = ["build_parser", "exposure_warning", "main", "resolve_token"]

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
        "(e.g. myapp.tasks:runtime or myapp.tasks:make_runtime); MODULE must be importable",
    )
    parser.add_argument("--journal", metavar="PATH", help="SQLite journal, so that tasks survive a restart")
    parser.add_argument(
        "--token",
        help=f"require 'Authorization: Bearer TOKEN' on every route but /healthz (default: ${TOKEN_ENV})",
    )
    parser.add_argument(
        "--metrics-public",
        action="store_true",
        help="serve GET /metrics (Prometheus) without the token, for a scraper that has none",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="runtime events written to stderr (default: %(default)s)",
    )
    return parser


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
