"""actorflow's version: kept here, in one place; the build reads it, and `actorflow.__version__` re-exports it."""

__version__ = "0.2.0"
