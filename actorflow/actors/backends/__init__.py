"""The registry of service backends: where a stage's calls run, by name.

Four backends are built in, each in its own module, imported only when a
stage uses it (so multiprocessing and Ray are loaded only when asked for)::

    "thread"   backends/thread.py      pykka actors in this process (the default)
    "async"    backends/coroutines.py  ``async def`` stages, as coroutines on an event-loop thread
    "process"  backends/process.py     child processes, for CPU-bound stages
    "ray"      backends/ray.py         Ray actors, on a cluster

A host adds its own with one call, then names it in a `Stage` (or in
`RuntimeConfig.service_backend`)::

    from actorflow import register_backend

    register_backend("gpu", lambda request: GpuBackend(request.functions, request.sizes))
    Pipeline("render", [Stage("draw", draw, backend="gpu")])

A factory takes a `BackendRequest` and returns a `ServiceBackend`: see
`actorflow.actors.backends.base` for the Protocols, and `WorkerDefaults` and
`BackendDefaults` there for the answers of a backend that lacks a capability;
`actorflow.actors.backends.toolkit` holds what every backend does (`execute`
runs a call and makes its report). The built-ins' factories below are such
adapters, from a request to each backend's own constructor.

`actorflow.core` cannot see this registry, so a `Stage` and a `RuntimeConfig`
accept any well-formed name; the runtime checks each stage's backend here
when it is built (`stage_backend`), and makes one backend of each name its
stages use (`make_backend`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Final

from actorflow.actors.backends.base import BackendRequest, ServiceBackend
from actorflow.core.errors import ConfigError, quote
from actorflow.core.pipeline import Stage, check_backend_name

__all__ = [
    "BUILT_IN",
    "BackendFactory",
    "BackendRequest",
    "ServiceBackend",
    "backend_names",
    "make_backend",
    "register_backend",
    "stage_backend",
    "unregister_backend",
]

BackendFactory = Callable[[BackendRequest], ServiceBackend]
"""Builds a backend for a runtime: called once per runtime (and per orchestrator restart) that uses its name."""

# The built-ins import their module when first used: the process and Ray backends load
# multiprocessing's machinery and Ray only for a runtime that runs a stage on them.


def _thread(request: BackendRequest) -> ServiceBackend:
    """The runtime's own thread backend (`request.local`): one per runtime, shared by its thread stages and
    by the functions another backend sends back to the runtime's process (the Ray backend's `AtHome`)."""
    return request.local()


def _async(request: BackendRequest) -> ServiceBackend:
    from actorflow.actors.backends.coroutines import AsyncBackend  # noqa: PLC0415 - see above

    return AsyncBackend(request.threads)


def _process(request: BackendRequest) -> ServiceBackend:
    from actorflow.actors.backends.process import ProcessBackend  # noqa: PLC0415 - see above

    return ProcessBackend(request.functions, dead_letters=request.dead_letters, threads=request.threads)


def _ray(request: BackendRequest) -> ServiceBackend:
    from actorflow.actors.backends.ray import RayBackend  # noqa: PLC0415 - see above

    config = request.config
    if config.service_backend == request.name:
        wanted_by = f"RuntimeConfig.service_backend={request.name!r}"
    else:
        wanted_by = f"Stage {', '.join(map(repr, request.functions))} (backend={request.name!r})"
    return RayBackend(
        config.ray_address,
        functions=request.functions,
        pool_sizes=request.sizes,
        local=request.local(),
        connect_timeout_s=config.ray_connect_timeout_s,
        wanted_by=wanted_by,
    )


BUILT_IN: Final[Mapping[str, BackendFactory]] = MappingProxyType(
    {"thread": _thread, "async": _async, "process": _process, "ray": _ray}
)
"""The backends actorflow brings, by name."""

_lock = threading.Lock()
_factories: dict[str, BackendFactory] = dict(BUILT_IN)
"""Every registered backend, by name. Written under `_lock`; read without it (one dict lookup)."""


def register_backend(name: str, factory: BackendFactory, *, replace: bool = False) -> None:
    """Make a backend of your own available by `name`, for `Stage(backend=name)` and `RuntimeConfig.service_backend`.

    Register before building a `Runtime` that uses the name; runtimes built
    earlier keep the backends they made. Registration is process-wide.

    Args:
        name: 1 to 64 letters, digits, ``_`` or ``-``.
        factory: called with a `BackendRequest` (the functions and sizes of the
            pools on this backend, the config, the runtime's thread book...)
            once for each runtime that uses the name; returns a `ServiceBackend`.
        replace: a name already registered (a built-in's included) is refused
            unless this is True, so that two parts of a program cannot take the
            same name by accident; `unregister_backend` gives a built-in back.

    Raises:
        ConfigError: the name is malformed or taken, or the factory is not callable.
    """
    check_backend_name("register_backend: name", name)
    if not callable(factory):
        raise ConfigError(f"the factory of backend {name!r} must be callable, got {quote(factory)}")
    with _lock:
        if name in _factories and not replace:
            kind = "a built-in backend" if _factories[name] is BUILT_IN.get(name) else "registered already"
            raise ConfigError(
                f"backend {name!r} is {kind}; pass replace=True to replace it, or choose another name "
                f"(registered: {_listed()})"
            )
        _factories[name] = factory


def unregister_backend(name: str) -> None:
    """Forget a backend registered with `register_backend`; a built-in name gets the built-in back.

    Raises:
        ConfigError: no backend of that name was registered (or it is a built-in left as it was).
    """
    with _lock:
        if name not in _factories or _factories[name] is BUILT_IN.get(name):
            raise ConfigError(f"backend {quote(name)} was not registered by register_backend (registered: {_listed()})")
        built_in = BUILT_IN.get(name)
        if built_in is None:
            del _factories[name]
        else:
            _factories[name] = built_in


def backend_names() -> tuple[str, ...]:
    """The names a stage may use now: the built-ins, then the host's, in the order registered."""
    return tuple(_factories)


def stage_backend(stage: Stage, *, pipeline: str, default: str) -> str:
    """The name of the backend `stage` runs on, checked against the registry.

    A stage's own `backend`, else "async" for an ``async def`` function, else
    `default` (`RuntimeConfig.service_backend`).

    Raises:
        ConfigError: naming the stage and its pipeline, if that name is not
            registered, or if the config's default would send a function that
            is not ``async def`` to the "async" backend.
    """
    name = stage.backend or ("async" if stage.is_async else default)
    where = f"Stage {stage.name!r} of pipeline {pipeline!r}"
    source = "its backend" if stage.backend else "RuntimeConfig.service_backend"
    if name not in _factories:
        raise ConfigError(
            f"{where}: {source} {name!r} is not a registered backend; use one of {_listed()}, "
            "or register it first with actorflow.register_backend"
        )
    if name == "async" and not stage.is_async:
        raise ConfigError(
            f"{where}: {source} 'async' runs only async def functions, got {stage.fn!r}; give the stage a backend "
            "of its own (backend='thread'), or choose another service_backend"
        )
    return name


def make_backend(name: str, request: BackendRequest) -> ServiceBackend:
    """The backend called `name`, built for `request`. Raises ConfigError for a name not registered."""
    factory = _factories.get(name)
    if factory is None:
        raise ConfigError(f"backend {quote(name)} is not registered; use one of {_listed()}")
    return factory(request)


def _listed() -> str:
    return ", ".join(map(repr, _factories))
