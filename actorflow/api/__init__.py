"""actorflow's HTTP API and live dashboard, over a `Runtime` (needs the `actorflow[http]` extra).

Embed it::

    from actorflow.actors import Runtime
    from actorflow.api import create_app, make_server

    with Runtime() as runtime:
        make_server(create_app(runtime, token="s3cret"), port=8080).run()

or run it: ``python run_demo.py serve [--host 127.0.0.1] [--port 8080] [--journal PATH] [--token TOKEN]``.

The names below are imported on first use, so that `api.cli` can say which extra
is missing instead of failing on `import api` when Starlette is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from actorflow.api.server import ApiServer, create_app, make_server, serve, serve_in_background

__all__ = ["ApiServer", "create_app", "make_server", "serve", "serve_in_background"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("actorflow.api.server"), name)
    raise AttributeError(f"module 'api' has no attribute {name!r}")
