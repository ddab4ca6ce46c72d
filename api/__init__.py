"""actorflow's HTTP API and live dashboard, over a `Runtime` (needs the `actorflow[http]` extra).

Embed it::

    from actors import Runtime
    from api import create_app, make_server

    with Runtime() as runtime:
        make_server(create_app(runtime, token="s3cret"), port=8080).run()

or run it: ``python run_demo.py serve [--host 127.0.0.1] [--port 8080] [--journal PATH] [--token TOKEN]``.
"""

from api.server import ApiServer, create_app, make_server, serve, serve_in_background

__all__ = ["ApiServer", "create_app", "make_server", "serve", "serve_in_background"]
