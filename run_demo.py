#!/usr/bin/env python3
"""actorflow's demo: create tasks, run them through the pipeline, inspect the final states.

python run_demo.py [--tasks N] [--workers K] [--log-file PATH] [--journal PATH]
python run_demo.py trace PATH [--task ID] [--json]   # read a --log-file back, check every transition
python run_demo.py inspect PATH [--state S] [--json] # read a journal (read-only, safe while running)
python run_demo.py serve [--port 8080] ...           # the HTTP API and dashboard

The same as the ``actorflow`` command (``actorflow demo ...``); runs from a checkout
with or without an install, since the checkout's ``actorflow/`` folder is the package.
"""

import sys

from actorflow.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="run_demo.py", default="demo"))
