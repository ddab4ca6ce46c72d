"""The Runtime, what an embedding program uses, and the parts it is made of (see `facade`)."""

from actorflow.actors.runtime.facade import Runtime
from actorflow.actors.runtime.handles import TaskHandle

__all__ = ["Runtime", "TaskHandle"]
