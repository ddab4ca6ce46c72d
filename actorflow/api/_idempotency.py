"""Idempotency keys for `POST /tasks`: a retried request gets the first one's answer.

Race-free without a lock: every request runs on the server's one event loop, and
the first request with a key stores a future under it *before* its first
`await`. A concurrent retry with the same key therefore always finds that future
and waits on it instead of submitting a second task.

Memory is bounded twice: at most `max_keys` keys are kept (the oldest is
forgotten first) and each is forgotten `ttl_s` after it was first used. A
forgotten key is a new key, so a retry that comes later than that creates a new
task: keep the TTL longer than any client's retry window.

This memory is the server's. With a journal the server also keeps each key in
the journal: the key travels with its task to the StateActor, which writes both
in one transaction (`Runtime.submit(idempotency_key=...)`), and the server looks
a key up there before submitting (`Runtime.find_idempotency_key`): a retry after
a crash and restart gets the first task back.

A key reused with a different payload is refused (`IdempotencyKeyReusedError`), as in
the IETF draft "The Idempotency-Key HTTP Header Field". A request that failed
(422, 503, ...) does not hold its key: the retry runs afresh.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["IdempotencyKeyReusedError", "IdempotencyKeys", "StoredAnswer", "check_key", "fingerprint"]

MAX_KEY_LENGTH = 255
KEY_REUSED = "this Idempotency-Key was already used with a different payload; use a new key for a new task"
_KEY_PATTERN = re.compile(rf"[\x20-\x7e]{{1,{MAX_KEY_LENGTH}}}")


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    """The answer given to the first request with a key, replayed to its retries."""

    status: int
    body: dict[str, Any]
    replayed: bool = False
    """True when `create` found the key already used (in the journal, before a restart)."""


class IdempotencyKeyReusedError(Exception):
    """The key was already used with a different payload."""


@dataclass(slots=True)
class _Entry:
    fingerprint: str
    answer: asyncio.Future[StoredAnswer]
    expires_at: float


def check_key(key: str) -> str | None:
    """None if `key` is acceptable, else what is wrong with it."""
    if _KEY_PATTERN.fullmatch(key) is None:
        return f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters"
    return None


def fingerprint(payload: Any) -> str:
    """A digest of the payload's canonical JSON: equal payloads give equal fingerprints."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class IdempotencyKeys:
    """Remembers, per key, the answer of the first request that used it.

    Args:
        max_keys: how many keys to remember at most; the oldest goes first.
        ttl_s: how long a key is remembered after its first use.
        clock: a monotonic clock, injectable so that tests need not wait.
    """

    def __init__(
        self, *, max_keys: int = 10_000, ttl_s: float = 24 * 3600.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys!r}")
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
        self._max_keys = max_keys
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def answer(
        self, key: str, payload_fingerprint: str, create: Callable[[], Awaitable[StoredAnswer]]
    ) -> tuple[StoredAnswer, bool]:
        """The answer for `key`, calling `create` only if no request has used the key yet.

        Returns the answer and whether it is a replay (also when `create` says so). Raises `IdempotencyKeyReusedError`
        if the key was used with another payload, and whatever `create` raised
        (to every request waiting on the same key) if it failed.
        """
        self._forget_expired()
        entry = self._entries.get(key)
        if entry is not None:
            if entry.fingerprint != payload_fingerprint:
                raise IdempotencyKeyReusedError(KEY_REUSED)
            # shield: a waiter that goes away must not cancel the first request's work
            return await asyncio.shield(entry.answer), True

        future: asyncio.Future[StoredAnswer] = asyncio.get_running_loop().create_future()
        entry = _Entry(payload_fingerprint, future, self._clock() + self._ttl_s)
        self._entries[key] = entry
        while len(self._entries) > self._max_keys:
            self._entries.popitem(last=False)
        try:
            result = await create()
        except BaseException as exc:
            if self._entries.get(key) is entry:
                del self._entries[key]
            future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("the first request was aborted"))
            future.exception()  # mark it retrieved: with no waiter, asyncio would log it as lost
            raise
        future.set_result(result)
        return result, result.replayed

    def _forget_expired(self) -> None:
        # Every entry lives ttl_s, so insertion order is expiry order.
        now = self._clock()
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if oldest.expires_at > now:
                break
            self._entries.popitem(last=False)
