"""``--app module:attr``: find an app's own `Runtime` by an import string.

The convention is uvicorn's (``uvicorn.importer.import_from_string``): the part
before the colon is a module to import, the part after it a dotted attribute
path in that module. The attribute is a `Runtime`, or a function (a factory)
that takes no arguments and returns one. Each way of getting it wrong has its
own message, naming the module, the attribute and what was found. As with
uvicorn's ``--app-dir``, the current directory is put first on ``sys.path``, so
that ``actorflow serve --app myapp.tasks:runtime`` finds ``./myapp/tasks.py``
whatever the command's own folder.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

from actorflow.actors import Runtime
from actorflow.core.errors import ActorflowError

__all__ = ["AppSpecError", "load_runtime"]


class AppSpecError(ActorflowError):
    """An ``--app`` import string that does not lead to a `Runtime`."""


def load_runtime(spec: str, *, app_dir: str | os.PathLike[str] | None = ".") -> Runtime:
    """The `Runtime` named by `spec` (``"module:attr"``), calling it first if it is a factory.

    Args:
        spec: ``"module:attr"``.
        app_dir: a folder to import the module from, put first on ``sys.path`` (if not on it
            already); the current directory by default, as uvicorn does. None leaves ``sys.path`` alone.

    Raises:
        AppSpecError: `spec` is malformed, its module or attribute is missing, or
            what it names is neither a Runtime nor a function returning one.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path or ":" in attr_path:
        raise AppSpecError(f"--app must look like 'module:attribute' (e.g. myapp.tasks:runtime), got {spec!r}")
    if app_dir is not None:
        folder = os.path.abspath(app_dir)
        if folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise AppSpecError(
                f"--app {spec!r}: no module named {module_name!r} (is it installed, or is its folder the current "
                "directory or on PYTHONPATH?)"
            ) from exc
        raise AppSpecError(f"--app {spec!r}: importing module {module_name!r} failed: {exc}") from exc
    found: object = module
    for part in attr_path.split("."):
        if not hasattr(found, part):
            raise AppSpecError(f"--app {spec!r}: module {module_name!r} has no attribute {attr_path!r}")
        found = getattr(found, part)
    if isinstance(found, Runtime):
        return found
    if callable(found):
        factory: Callable[[], object] = found
        made = factory()
        if isinstance(made, Runtime):
            return made
        raise AppSpecError(
            f"--app {spec!r}: the factory {module_name}.{attr_path}() returned {type(made).__name__}, not a Runtime"
        )
    raise AppSpecError(
        f"--app {spec!r}: {module_name}.{attr_path} is a {type(found).__name__}, not a Runtime or a function "
        "returning one"
    )
