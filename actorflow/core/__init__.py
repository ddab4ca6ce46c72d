"""actorflow's foundation: types, the transition table, config, errors, tracing and storage.

This package imports nothing else of actorflow's.
"""

from actorflow.core.config import TERMINAL_STATES, TRANSITIONS, RuntimeConfig, is_allowed, is_terminal
from actorflow.core.errors import (
    ActorflowError,
    ConfigError,
    InvalidPayload,
    InvalidTransition,
    JournalError,
    Overloaded,
    RuntimeFailed,
    RuntimeNotAnswering,
    RuntimeStopped,
    RuntimeUnavailable,
    SubmissionRefused,
    TaskNotFound,
    TaskTimeout,
    TransientError,
    UnknownPipeline,
    UnstorableValue,
    ValidationError,
    ValueTooLarge,
    WouldDeadlock,
)
from actorflow.core.pipeline import Pipeline, Stage
from actorflow.core.types import FrozenDict, Task, TaskRecord, TaskState, Transition, TransitionEvent, freeze, thaw

__all__ = [
    "TERMINAL_STATES",
    "TRANSITIONS",
    "ActorflowError",
    "ConfigError",
    "FrozenDict",
    "InvalidPayload",
    "InvalidTransition",
    "JournalError",
    "Overloaded",
    "Pipeline",
    "RuntimeConfig",
    "RuntimeFailed",
    "RuntimeNotAnswering",
    "RuntimeStopped",
    "RuntimeUnavailable",
    "Stage",
    "SubmissionRefused",
    "Task",
    "TaskNotFound",
    "TaskRecord",
    "TaskState",
    "TaskTimeout",
    "TransientError",
    "Transition",
    "TransitionEvent",
    "UnknownPipeline",
    "UnstorableValue",
    "ValidationError",
    "ValueTooLarge",
    "WouldDeadlock",
    "freeze",
    "is_allowed",
    "is_terminal",
    "thaw",
]
