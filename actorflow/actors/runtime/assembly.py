"""Assembly: the runtime's pipelines, and the actors and backends that run them.

`assemble_pipelines` turns the Runtime's arguments into its pipelines (the
seed pipeline from `services`, then the caller's). `Assembly` starts the parts
from the plans (`actors.plan`): the StateActor (on the journal, if any), the
backends each stage's plan names (one of each, from the registry), the
OrchestratorActor with a pool per stage, and hands the orchestrator every task
left unfinished. The supervisor (`supervision`) starts the central actors
through it, at first and again after a crash.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import pykka

from actorflow.actors.backends import BackendRequest, ServiceBackend, make_backend
from actorflow.actors.backends.thread import ThreadBackend
from actorflow.actors.messages import ResumeTasks
from actorflow.actors.orchestrator import OrchestratorActor
from actorflow.actors.plan import plan_pipelines, stage_plans
from actorflow.actors.runtime.callers import ASK_TIMEOUT_S, answer, ask
from actorflow.actors.runtime.parts import RuntimeParts
from actorflow.actors.state import StateActor
from actorflow.actors.timer import Timer
from actorflow.core.config import RuntimeConfig
from actorflow.core.errors import ConfigError
from actorflow.core.events import TIMER_CALLBACK_FAILED
from actorflow.core.pipeline import Pipeline
from actorflow.core.types import TaskRecord
from actorflow.services import ResultStore, ServiceSet

__all__ = ["Assembly", "assemble_pipelines", "check_pipelines"]

OnExit = Callable[[str], None]
"""Told why a central actor stopped (see `Supervisor.watch`)."""


def check_pipelines(pipelines: object, *, with_services: bool) -> None:
    """Raise ConfigError unless `pipelines` is a non-empty list of Pipeline (it may be empty with services)."""
    if isinstance(pipelines, Pipeline) or not isinstance(pipelines, Sequence):
        raise ConfigError(f"pipelines must be a list of Pipeline, got {type(pipelines).__name__}")
    for index, pipeline in enumerate(pipelines):
        if not isinstance(pipeline, Pipeline):
            raise ConfigError(f"pipelines[{index}] must be a Pipeline, got {type(pipeline).__name__}")
    if not pipelines and not with_services:
        raise ConfigError("pipelines is empty; pass at least one Pipeline (or None for the seed pipeline)")


def assemble_pipelines(
    config: RuntimeConfig, services: ServiceSet | None, extra: Sequence[Pipeline]
) -> tuple[tuple[Pipeline, ...], ResultStore | None]:
    """The runtime's pipelines: the seed pipeline built from `services` (if given) first, then `extra`.

    The seed's stages are sized by `services.workers`, else by the config's deprecated
    ``<stage>_workers`` fields, else by the seed's defaults. Returns the pipelines with the
    result store of the seed's default persistence (None when `services` is None or plugs
    in its own `persist`).

    Raises:
        ConfigError: two pipelines have the same name, or a seed stage's size is not an int >= 1.
    """
    results: ResultStore | None = None
    pipelines: list[Pipeline] = []
    if services is not None:
        if services.persist is None:
            results = ResultStore(config.result_store)
        try:
            pipelines.append(services.pipeline(result_store=results, workers=config.seed_workers()))
        except BaseException:
            if results is not None:
                results.close()
            raise
    pipelines.extend(extra)
    names: set[str] = set()
    for pipeline in pipelines:
        if pipeline.name in names:
            if results is not None:
                results.close()
            raise ConfigError(
                f"two pipelines are called {pipeline.name!r}; pipeline names are unique in a runtime"
                + (" (the seed pipeline, from services=, is called 'default')" if services is not None else "")
            )
        names.add(pipeline.name)
    return tuple(pipelines), results


class Assembly:
    """The parts of one runtime: its pipelines and their plans, its timer, central actors and backends.

    `state` and `orchestrator` are the current central actors (None before the
    first start); the supervisor replaces them through `start_state` and
    `start_orchestrator`, under its lock.
    """

    def __init__(self, parts: RuntimeParts, *, services: ServiceSet | None, extra: Sequence[Pipeline]) -> None:
        """Build the pipelines (see `assemble_pipelines`) and their plans; nothing is started yet.

        Raises:
            ConfigError: two pipelines have the same name, or a stage's workers exceed their bound.
        """
        self._parts = parts
        self.config = config = parts.config
        self.pipelines, self.results = assemble_pipelines(config, services, extra)
        try:
            self.plans = plan_pipelines(self.pipelines, config)
        except BaseException:
            if self.results is not None:
                self.results.close()
            raise
        self.timer: Timer | None = None
        self.state: pykka.ActorRef[StateActor] | None = None
        self.orchestrator: pykka.ActorRef[OrchestratorActor] | None = None
        self._backends: list[ServiceBackend] = []
        """The current orchestrator's backends: made here, so closed here (off the central threads)."""

    def pool_sizes(self) -> dict[str, int]:
        """Each stage's pool name -> its workers."""
        return {stage.pool: stage.workers for stage in stage_plans(self.plans)}

    def start_timer(self) -> None:
        """Start the timer that retries, deadlines and cool-downs run on."""
        log = self._parts.log
        self.timer = Timer(on_error=lambda exc: log.error(TIMER_CALLBACK_FAILED, error=repr(exc)))

    def stop_timer(self) -> None:
        """Stop the timer: what is not due yet never runs."""
        if self.timer is not None:
            self.timer.stop()

    def _on_terminal(self, record: TaskRecord) -> None:
        """The state actor's terminal hook: the task's latency and span, then settle its waiter.

        In that order, so that a caller woken by `result()` or `join()` finds them counted.
        """
        try:
            self._parts.telemetry.on_terminal(record)
        finally:  # whatever telemetry does, the waiter is settled
            self._parts.admission.on_terminal(record)

    def start_state(self, on_exit: OnExit) -> None:
        """Start a StateActor (loading the journal, if any) and make it current."""
        config, parts = self.config, self._parts
        journal = None
        if config.journal_path is not None:
            from actorflow.core.journal import open_store  # noqa: PLC0415 - the journal only when asked for

            journal = open_store(
                config.journal_path,
                durability=config.durability,
                pipelines={p.name: [state.value for state in p.states] for p in self.pipelines},
            )
        try:
            self.state = StateActor.start(
                journal=journal,
                retain_terminal=config.retain_terminal,
                dead_letters=parts.dead_letters,
                threads=parts.threads,
                on_terminal=self._on_terminal,
                on_transition=parts.telemetry.on_transition if parts.telemetry.metrics else None,
                pipelines=self.pipelines,
                health=parts.health,
                milestones=parts.milestones,
                on_exit=on_exit,
            )
        except BaseException:
            if journal is not None:
                journal.close()
            raise

    def start_orchestrator(self, on_exit: OnExit) -> None:
        """Start an OrchestratorActor with fresh pools on the current StateActor, and make it current."""
        assert self.state is not None
        assert self.timer is not None
        parts = self._parts
        backends = self._make_backends()
        old, self._backends = self._backends, list({id(b): b for b in backends.values()}.values())
        try:
            self.orchestrator = OrchestratorActor.start(
                state=self.state,
                plans=self.plans,
                backends=backends,
                max_value_bytes=self.config.max_value_bytes,
                timer=self.timer,
                dead_letters=parts.dead_letters,
                threads=parts.threads,
                milestones=parts.milestones,
                on_exit=on_exit,
                telemetry=parts.telemetry,
                health=parts.health,
            )
        except BaseException:
            self.close_backends()
            raise
        finally:
            # A replaced orchestrator's backends are closed here, after the new ones exist: a Ray session
            # they share stays up. Closing can take seconds (Ray), so it never runs on a central thread.
            for backend in old:
                with contextlib.suppress(Exception):
                    backend.close()

    def resume(self) -> int:
        """Hand the current orchestrator every non-terminal task (one message: no creation falls between)."""
        assert self.orchestrator is not None
        assert self.state is not None
        records = tuple(answer(ask(self.state, "adopt", self.orchestrator), self.state))
        for record in records:
            self._parts.admission.track(record.task_id, reserved=False)
            self._parts.telemetry.task_resumed(record)
        if records:
            self.orchestrator.tell(ResumeTasks(records))
        return len(records)

    def stop_orchestrator(self) -> None:
        """Stop the current orchestrator, if any, and wait (bounded) until it has."""
        if self.orchestrator is not None:
            with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
                self.orchestrator.stop(block=True, timeout=ASK_TIMEOUT_S)

    def stop_actors(self) -> None:
        """Stop the central actors, orchestrator first (it sends to the state actor), then close the backends."""
        for ref in (self.orchestrator, self.state):
            if ref is not None:
                with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
                    ref.stop(block=True, timeout=ASK_TIMEOUT_S)
        self.close_backends()  # its workers are retired: release what the backends hold (Ray: shut down)

    def close_backends(self) -> None:
        """Close the current backends (their pools' workers are retired first, by the orchestrator)."""
        backends, self._backends = self._backends, []
        for backend in backends:
            with contextlib.suppress(Exception):
                backend.close()

    def _make_backends(self) -> dict[str, ServiceBackend]:
        """One backend of each kind the plans name (from the registry), by backend name."""
        plans = list(stage_plans(self.plans))
        dead_letters, threads = self._parts.dead_letters, self._parts.threads
        local: list[ServiceBackend] = []

        def local_backend() -> ServiceBackend:
            if not local:
                local.append(ThreadBackend(dead_letters, threads))
            return local[0]

        made: dict[str, ServiceBackend] = {}
        for kind in dict.fromkeys(plan.backend for plan in plans):
            request = BackendRequest(
                name=kind,
                functions={plan.pool: plan.fn for plan in plans if plan.backend == kind},
                sizes={plan.pool: plan.workers for plan in plans if plan.backend == kind},
                config=self.config,
                dead_letters=dead_letters,
                threads=threads,
                local=local_backend,
            )
            try:
                made[kind] = make_backend(kind, request)
            except BaseException:
                for backend in made.values():
                    with contextlib.suppress(Exception):
                        backend.close()
                raise
        return made
