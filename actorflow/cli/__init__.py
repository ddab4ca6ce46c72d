"""The ``actorflow`` command: a layer of its own, on top of the library.

::

    actorflow demo     [--tasks N] [--workers K] [--log-file F] [--journal DB]
    actorflow serve    [--app module:attr] [--host H] [--port P] [--journal DB] [--token T]
    actorflow trace    LOG [--task ID] [--summary] [--json]
    actorflow inspect  DB [--state S | --task ID] [--limit N] [--json]
    actorflow --version

The library never imports this package: argument parsing, printing and exit
codes live here, and only here. Each subcommand is a module with
``main(argv, *, prog) -> int``; its imports happen only when it runs, so that
``actorflow --help`` works without the optional extras.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "main"]

COMMANDS: dict[str, str] = {
    "demo": "create tasks, run them through the pipeline, and show their final states",
    "serve": "serve a runtime (the demo's, or your app's with --app) over HTTP, with a live dashboard",
    "trace": "read a JSON-lines log back: each task's timeline, and a check of every transition",
    "inspect": "show what a journal holds: tasks per state and their histories (read-only)",
}


def _top_parser(prog: str) -> argparse.ArgumentParser:
    from actorflow.core.version import __version__  # noqa: PLC0415 - only when help or --version is asked for

    listing = "\n".join(f"  {name:<9} {summary}" for name, summary in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=f"{prog} [--version] {{{','.join(COMMANDS)}}} ...",
        description="actorflow: run tasks through pipelines of stateless services, with state owned in one place.",
        epilog=f"commands:\n{listing}\n\n'{prog} COMMAND --help' describes one command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"actorflow {__version__}")
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = "actorflow", default: str | None = None) -> int:
    """Run one subcommand with `argv` (``sys.argv[1:]`` by default) and return its exit code.

    Args:
        argv: the arguments, the subcommand's name first.
        prog: the program name shown in usage and error messages.
        default: a subcommand to run when `argv` does not start with one (the demo script uses
            ``"demo"``); None means a subcommand is required.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        name, rest, shown = args[0], args[1:], f"{prog} {args[0]}"
    elif default is not None and not (args and args[0] in ("-h", "--help", "--version")):
        name, rest, shown = default, args, prog
    else:
        try:
            _top_parser(prog).parse_args(args[:1] if args else [])
        except SystemExit as exc:  # help, --version, or an unknown command: argparse has printed why
            return exc.code if isinstance(exc.code, int) else 2
        return 2  # unreachable: a known command was handled above
    module = importlib.import_module(f"actorflow.cli.{name}")
    try:
        status: int = module.main(rest, prog=shown)
    except SystemExit as exc:  # argparse's own exits on --help and bad arguments
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return status
