"""The registry of service backends: where a stage's calls run, by name.

Each backend lives in its own module, which exposes ``make_backend(request)``;
the registry maps a backend's name to that module, imported only when a stage
uses it (so multiprocessing and Ray are loaded only when asked for)::

    "thread"   actorflow.actors.service          pykka actors in this process (the default)
    "process"  actorflow.actors.process_backend  child processes, for CPU-bound stages
    "ray"      actorflow.actors.ray_backend      Ray actors, on a cluster
    "async"    actorflow.actors.async_backend    coroutines on a few event-loop threads

A runtime makes one backend of each kind its stages use, and hands each
pool the one of its stage.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from actorflow.actors.deadletters import DeadLetterOffice
from actorflow.actors.service import ServiceBackend
from actorflow.actors.threads import ThreadBook
from actorflow.core.config import RuntimeConfig
from actorflow.core.errors import ConfigError

__all__ = ["BACKEND_MODULES", "BackendRequest", "make_backend"]

BACKEND_MODULES: Final[Mapping[str, str]] = {
    "thread": "actorflow.actors.service",
    "process": "actorflow.actors.process_backend",
    "ray": "actorflow.actors.ray_backend",
    "async": "actorflow.actors.async_backend",
}
"""Backend name -> the module whose ``make_backend(request)`` builds it."""


@dataclass(frozen=True, slots=True)
class BackendRequest:
    """Everything a backend may need to start: its pools' functions and sizes, and the runtime's parts."""

    functions: Mapping[str, Callable[..., Any]]
    """The function of each pool that will run on this backend, by pool name."""
    sizes: Mapping[str, int]
    """The number of workers of each of those pools."""
    config: RuntimeConfig
    dead_letters: DeadLetterOffice
    threads: ThreadBook
    local: Callable[[], ServiceBackend]
    """The thread backend, for functions that must run in this process (see `runs_at_home`)."""


def make_backend(name: str, request: BackendRequest) -> ServiceBackend:
    """The backend called `name`, started for `request`. Raises ConfigError for an unknown name."""
    module_name = BACKEND_MODULES.get(name)
    if module_name is None:
        raise ConfigError(f"backend {name!r} is not available; use one of {', '.join(map(repr, BACKEND_MODULES))}")
    module = importlib.import_module(module_name)
    backend: ServiceBackend = module.make_backend(request)
    return backend
