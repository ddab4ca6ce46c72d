"""The default validator: a pure check of the payload's shape."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from actorflow.core.errors import ValidationError

__all__ = ["ALLOWED_FIELDS", "MAX_NAME_LENGTH", "validate"]

MAX_NAME_LENGTH = 200
ALLOWED_FIELDS = ("name", "data")


def validate(payload: Mapping[str, Any]) -> None:
    """Accept ``{"name": non-empty str of at most 200 chars, "data": any JSON value}``.

    Raises:
        ValidationError: naming the field that is missing, unexpected or wrong.
    """
    if not isinstance(payload, Mapping):
        raise ValidationError(f"payload must be a mapping with fields {ALLOWED_FIELDS}, got {type(payload).__name__}")
    unexpected = sorted(set(payload) - set(ALLOWED_FIELDS))
    if unexpected:
        raise ValidationError(f"unexpected field(s) {', '.join(map(repr, unexpected))}; allowed are 'name' and 'data'")
    if "name" not in payload:
        raise ValidationError("field 'name' is missing; it must be a non-empty str of at most 200 chars")
    name = payload["name"]
    if not isinstance(name, str) or not name.strip():
        raise ValidationError(f"field 'name' must be a non-empty str, got {name!r}")
    if len(name) > MAX_NAME_LENGTH:
        raise ValidationError(f"field 'name' has {len(name)} chars; at most {MAX_NAME_LENGTH} are allowed")
    if "data" not in payload:
        raise ValidationError("field 'data' is missing; it may be any JSON value, null included")
