"""``python -m actorflow``: the same as the ``actorflow`` command."""

import sys

from actorflow.cli import main

if __name__ == "__main__":
    sys.exit(main())
