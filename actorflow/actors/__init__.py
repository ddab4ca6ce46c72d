"""actorflow's actors and the Runtime that wires them together.

An embedding program needs only `Runtime` (and `TaskHandle`); `StateActor`
is exported for programs that want the state owner on its own.
"""

from actorflow.actors.health import Milestone
from actorflow.actors.orchestrator import OrchestratorActor
from actorflow.actors.runtime import Runtime, TaskHandle
from actorflow.actors.state import StateActor

__all__ = ["Milestone", "OrchestratorActor", "Runtime", "StateActor", "TaskHandle"]
