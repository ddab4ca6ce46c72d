"""`run_demo.py serve`: the command line of the HTTP API."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

TOKEN_ENV = "ACTORFLOW_TOKEN"  # noqa: S105 - the name of a variable, not a secret


def build_parser() -> argparse.ArgumentParser:
    """The `serve` command's arguments."""
    parser = argparse.ArgumentParser(
        prog="run_demo.py serve",
        description="Serve a Runtime over HTTP, with the live dashboard at /.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback only)")
    parser.add_argument("--port", type=int, default=8080, help="port to bind (default: %(default)s)")
    parser.add_argument("--journal", metavar="PATH", help="SQLite journal, so that tasks survive a restart")
    parser.add_argument(
        "--token",
        help=f"require 'Authorization: Bearer TOKEN' on every route but /healthz (default: ${TOKEN_ENV})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (the arguments after `serve`), serve until interrupted, and return the exit code."""
    args = build_parser().parse_args(argv)
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    try:
        from api.server import serve  # noqa: PLC0415 - only here does the missing extra become an error
    except ModuleNotFoundError as exc:
        print(f"the HTTP API needs the http extra ({exc.name} is missing): pip install 'actorflow[http]'")
        return 2
    serve(host=args.host, port=args.port, journal=args.journal, token=token)
    return 0
