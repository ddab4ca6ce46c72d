"""actorflow: run tasks through pipelines of stateless functions, with state owned in one place.

Everything an embedding program needs is here. A pipeline of your own::

    from actorflow import Pipeline, Runtime, Stage

    def double(task, value):                  # every stage is fn(task, value) -> the next value
        return {"y": value["x"] * 2}

    with Runtime(pipelines=[Pipeline("double", [Stage("double", double)])]) as runtime:
        record = runtime.submit({"x": 21}).result(timeout=10)   # a TaskRecord
        assert record.result == {"y": 42}

Several stages, each with its settings, as data::

    ingest = Pipeline("ingest", [Stage("check", check), Stage("fetch", fetch, workers=200)])
    with Runtime(RuntimeConfig(journal_path="tasks.db"), pipelines=[ingest]) as runtime:
        record = runtime.submit({"url": "..."}).result(timeout=10)

`Runtime()` with no pipelines runs the seed pipeline (validate → process →
persist, whose default validator accepts ``{"name": str, "data": any}`` only):
the demo's. `ServiceSet` plugs functions of the seed's shapes into it.

The API, drawn::

    Runtime(config, pipelines=[...], services=..., on_milestone=..., name=...)
                                       the facade; a context manager (also ``async with``) that closes itself
      .submit(payload, pipeline=) -> TaskHandle   .result(timeout) -> TaskRecord (TaskTimeout), .cancel()
      .submit_many(payloads, pipeline=) -> [TaskHandle]   a batch in one commit, all or nothing
      .get(id) / .tasks() / .stats() / .subscribe(fn) / .join() / .close(drain=True)
      await .aclose(drain=True)        close() for asyncio: the drain waits off the event loop
      .metrics_collector(*others)      Prometheus metrics (labelled by runtime name), for the program's registry
      .health()                        ok, degraded (journal refuses writes), failed or stopped
    Runtime(tracer_provider=...)       OpenTelemetry spans of tasks and calls (default: the host's provider)
    Milestone                          an internal event (worker restarted, journal degraded...)
    RuntimeConfig                      default workers, retries, timeouts, journal, backpressure
    Pipeline(name, [Stage, ...])       your stages, in order; checked when built; derives the
                                       transition table the state actor enforces
    Stage(name, fn, workers=, backend=, timeout_s=, max_attempts=, retry_backoff_s=, ...)
                                       fn(task, value) -> next value (None: pass it on),
                                       a StageFunction, its arity checked when built;
                                       async def runs on an event loop; unset settings
                                       fall back to RuntimeConfig
    register_backend(name, factory)    where stages run, by name: "thread", "async", "process"
                                       and "ray" are built in; add your own, then name it in
                                       Stage(backend=name) (see actorflow.actors.backends)
    ServiceSet(validate, process, persist, workers=)
                                       the seed pipeline's functions and sizes (what Runtime()
                                       runs; actorflow.services.seed_pipeline builds it)
    TaskRecord, TaskState, Task        what a task is and where it stands: record.calls (stage
                                       calls made), record.retries (how many were retries),
                                       task.attempt (the attempt within the current stage)
    JSONValue, JSONInput               the JSON a task holds (frozen) and what a program hands in
    TransitionEvent                    what subscribers receive on every state change
    configure_logging(...)             opt in to actorflow's own log output (never done for you)
    StateActor, OrchestratorActor      the two central actors, for programs that wire their own

    ActorflowError                     every error actorflow raises derives from it
    ├── ConfigError                    a RuntimeConfig field, a Stage, a Pipeline or a ServiceSet entry is wrong
    ├── InvalidTransition              the transition table forbids the change
    ├── TaskNotFound                   no task has that id
    ├── SubmissionRefused              submit created nothing, because of the submission or the load
    │   ├── InvalidPayload             a payload is not a JSON mapping, or its id is taken
    │   │   ├── ValidationError        the seed's validator rejected the payload
    │   │   └── ValueTooLarge          a payload or a stage's value is over max_value_bytes
    │   ├── UnknownPipeline            no pipeline of the runtime has that name
    │   └── Overloaded                 backpressure: too many tasks in flight
    ├── RuntimeUnavailable             the runtime cannot serve the call
    │   ├── RuntimeStopped             the runtime was closed
    │   ├── RuntimeFailed              the runtime lost what it cannot rebuild; it takes no more work
    │   └── RuntimeNotAnswering        its actors did not answer in time (also a TimeoutError)
    ├── TaskTimeout                    result(timeout=) ran out first (also a TimeoutError)
    ├── WouldDeadlock                  a blocking call from a subscriber or a service, where
    │                                  it would hang: raised at once
    ├── JournalError                   the SQLite journal is unusable
    │   └── UnstorableValue            it refuses one task's change for good: that task alone fails
    └── TransientError                 raise it in a stage function to be retried (with backoff)

Internals (messages, pools, backends) stay importable from their modules
(``actorflow.actors.pool``...), but are not part of this front door. The
command line is ``actorflow`` (or ``python -m actorflow``), in `actorflow.cli`.
"""

from actorflow.actors import Milestone, OrchestratorActor, Runtime, StateActor, TaskHandle
from actorflow.actors.backends import register_backend
from actorflow.core.config import RuntimeConfig
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
from actorflow.core.pipeline import Pipeline, Stage, StageFunction
from actorflow.core.tracing import configure_logging
from actorflow.core.types import JSONInput, JSONValue, Task, TaskRecord, TaskState, TransitionEvent
from actorflow.core.version import __version__
from actorflow.services import ServiceSet

__all__ = [
    "ActorflowError",
    "ConfigError",
    "InvalidPayload",
    "InvalidTransition",
    "JSONInput",
    "JSONValue",
    "JournalError",
    "Milestone",
    "OrchestratorActor",
    "Overloaded",
    "Pipeline",
    "Runtime",
    "RuntimeConfig",
    "RuntimeFailed",
    "RuntimeNotAnswering",
    "RuntimeStopped",
    "RuntimeUnavailable",
    "ServiceSet",
    "Stage",
    "StageFunction",
    "StateActor",
    "SubmissionRefused",
    "Task",
    "TaskHandle",
    "TaskNotFound",
    "TaskRecord",
    "TaskState",
    "TaskTimeout",
    "TransientError",
    "TransitionEvent",
    "UnknownPipeline",
    "UnstorableValue",
    "ValidationError",
    "ValueTooLarge",
    "WouldDeadlock",
    "__version__",
    "configure_logging",
    "register_backend",
]
