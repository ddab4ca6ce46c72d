"""What every part of one runtime shares: its settings, its books, and where it reports."""

from __future__ import annotations

from dataclasses import dataclass

from actorflow.actors.deadletters import DeadLetterOffice
from actorflow.actors.health import Health, Milestones
from actorflow.actors.runtime.admission import Admission
from actorflow.actors.runtime.callers import Callers
from actorflow.actors.telemetry import Telemetry
from actorflow.actors.threads import ThreadBook
from actorflow.core.config import RuntimeConfig
from actorflow.core.tracing import EventLogger

__all__ = ["RuntimeParts"]


@dataclass(frozen=True, slots=True)
class RuntimeParts:
    """The objects one runtime's modules share, made once by the `Runtime`; none of them starts a thread."""

    config: RuntimeConfig
    callers: Callers
    """Who is calling, whether the runtime is closed or forked."""
    admission: Admission
    """The tasks in flight, with their waiters; the runtime's failure, once it has failed."""
    telemetry: Telemetry
    health: Health
    milestones: Milestones
    dead_letters: DeadLetterOffice
    threads: ThreadBook
    """The actors' threads, with their roles."""
    log: EventLogger
    """The runtime's ``runtime`` event logger."""
