"""The journal: every task's current state and its append-only transition log (see `sqlite`)."""

from actorflow.core.journal.sqlite import (
    APPLICATION_ID,
    KEY_RETENTION_S,
    MAX_KEYS,
    SCHEMA_VERSION,
    Durability,
    Journal,
    JournalReader,
)

__all__ = ["APPLICATION_ID", "KEY_RETENTION_S", "MAX_KEYS", "SCHEMA_VERSION", "Durability", "Journal", "JournalReader"]
