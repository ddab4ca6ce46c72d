"""The `GET /events` stream: runtime transitions fanned out to Server-Sent Events clients.

One `EventBroadcaster` per app holds one runtime subscription, however many
clients listen. Its callback runs on the state actor's thread, so it only appends
the event to a deque and, if no flush is pending, schedules one on the event loop
with `call_soon_threadsafe`: a burst of transitions costs one loop wake-up, not
one each. The flush serialises each event once and offers the bytes to every
client.

Every client has a bounded queue. A client too slow to keep up loses events
rather than growing the server's memory; it is then sent an `event: lagged` with
the number lost, so that it can re-read `/stats`. The same happens, for everyone,
if the loop itself falls behind the runtime by `max_pending` events.

Every frame has an ``id:``, a sequence number. The last `replay_size` frames are
kept while a stream is open and for `linger_s` after the last one ends, so that a
client that reconnects with ``Last-Event-ID`` is first sent what it missed; if some
of that is no longer kept (or the id is not one of this server's), it is sent an
`event: lagged` first. Once no stream has been open for `linger_s`, the runtime
subscription is dropped and the kept frames with it: a server nobody watches does
no work per transition. A client that reconnects after that is told it lagged
(``"dropped": null``, unknown). A client may follow one task only (``?task=ID``).

`close()` ends every stream, so that uvicorn's graceful shutdown does not wait on
clients that would otherwise listen forever.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import anyio
from starlette.types import Receive, Scope, Send

from actorflow.api._errors import logger
from actorflow.core import TERMINAL_STATES, TaskRecord, TransitionEvent
from actorflow.core.events import EVENTS_UNSUBSCRIBE_FAILED

__all__ = ["EventBroadcaster", "EventClient", "TooManyStreamsError", "event_stream"]

_CLOSE = b""
"""Queued to a client to end its stream (never a real frame: those are never empty)."""


class _Subscribable(Protocol):
    def subscribe(self, callback: Callable[[TransitionEvent], None]) -> Callable[[], None]: ...


class TooManyStreamsError(Exception):
    """The broadcaster already serves `max_clients` streams."""


class EventClient:
    """One listener: a bounded queue of ready-to-send SSE frames, of one task's events if `task` is set.

    A client following one task is ended after that task's terminal frame: nothing can follow it.
    """

    __slots__ = ("dropped", "ended", "lagged", "queue", "resumed", "task")

    def __init__(self, queue_size: int, task: str | None = None) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=queue_size)
        self.dropped = 0
        self.task = task
        self.ended = False
        """The end of the stream is queued: nothing more is offered."""
        self.lagged = False
        """Its reconnection could not be replayed in full (`event: lagged` was its first frame)."""
        self.resumed = False
        """It reconnected with a Last-Event-ID."""

    def offer(self, frame: bytes, *, terminal: bool = False) -> None:
        """Queue `frame`, or count it as dropped if the queue is full; `terminal` ends a one-task stream after it."""
        if self.ended:
            return
        if terminal and self.task is not None:
            # The last frame and the end must both fit: older frames make room (they are counted as dropped).
            while self._room() < 2 and not self.queue.empty():
                self.queue.get_nowait()
                self.dropped += 1
            if self._room() >= 2:
                self.queue.put_nowait(frame)
            else:
                self.dropped += 1
            self.end()
            return
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            self.dropped += 1

    def _room(self) -> float:
        return math.inf if self.queue.maxsize <= 0 else self.queue.maxsize - self.queue.qsize()

    def end(self) -> None:
        """Queue the end of the stream (once)."""
        if self.ended:
            return
        self.ended = True
        if self.queue.full():  # make room: the end matters more than one more event
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(_CLOSE)


class EventBroadcaster:
    """Fans the runtime's transitions out to SSE clients. Use it from the event loop only.

    Args:
        runtime: anything with `subscribe(callback) -> unsubscribe`.
        max_clients: streams served at once; one more gets `TooManyStreamsError`.
        queue_size: frames buffered per client before it starts losing events.
        max_pending: events buffered between the runtime's thread and the loop.
        replay_size: frames kept for clients that reconnect with ``Last-Event-ID``.
        linger_s: how long frames are still taken and kept after the last stream ends, for a
            client that reconnects; after that the runtime subscription is dropped until a stream opens.
    """

    def __init__(
        self,
        runtime: _Subscribable,
        *,
        max_clients: int = 100,
        queue_size: int = 1000,
        max_pending: int = 10_000,
        replay_size: int = 1000,
        linger_s: float = 60.0,
    ) -> None:
        if not linger_s >= 0:
            raise ValueError(f"linger_s must be a number of seconds >= 0, got {linger_s!r}")
        self._runtime = runtime
        self._linger_s = linger_s
        self._linger: asyncio.TimerHandle | None = None
        """Drops the subscription once no stream has been open for `linger_s`."""
        self._unheard_until = -1
        """Frames after this id were made while the runtime subscription was dropped: unknown to us."""
        self._max_clients = max_clients
        self._queue_size = queue_size
        self._max_pending = max_pending
        self._clients: set[EventClient] = set()
        self._clients_changed = threading.Condition()
        """Notified whenever a stream opens or ends (see `wait_for_clients`)."""
        self._pending: collections.deque[TransitionEvent] = collections.deque()
        self._overflow = 0
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._closed = False
        self._seq = 0
        """The id of the last frame made (events lost to overflow use up ids too, so gaps show)."""
        self._replay: collections.deque[tuple[int, str, bytes, bool]] = collections.deque(maxlen=replay_size)
        """(id, task id, frame, whether it is the task's terminal transition) of the newest frames."""

    @property
    def client_count(self) -> int:
        """How many streams are open."""
        return len(self._clients)

    def wait_for_clients(self, count: int, timeout: float) -> bool:
        """Block until exactly `count` streams are open; False if that did not happen within `timeout` s.

        For a host (or a test) on another thread than the server's event loop: e.g. to know that
        a client that disconnected has been dropped. Never call it on the event loop's thread.
        """
        with self._clients_changed:
            return self._clients_changed.wait_for(lambda: len(self._clients) == count, timeout)

    def _set_clients(self, change: Callable[[EventClient], None], client: EventClient) -> None:
        with self._clients_changed:
            change(client)
            self._clients_changed.notify_all()

    @property
    def closed(self) -> bool:
        """True once `close()` has run: no stream can be opened any more."""
        return self._closed

    def attach(self, *, last_event_id: int | None = None, task: str | None = None) -> EventClient:
        """A new client, subscribing to the runtime on first use.

        Args:
            last_event_id: the id of the last frame the client saw (a reconnection): it is first sent
                the frames after it, preceded by `event: lagged` if some are no longer kept.
            task: follow only this task's events.

        Raises:
            TooManyStreamsError: `max_clients` streams are already open.
            RuntimeError: the broadcaster is closed.
        """
        if self._closed:
            raise RuntimeError("the server is shutting down")
        if len(self._clients) >= self._max_clients:
            raise TooManyStreamsError(
                f"{self._max_clients} event streams are open already, the most this server allows"
            )
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._unsubscribe is None:
            self._loop = asyncio.get_running_loop()
            self._unsubscribe = self._runtime.subscribe(self._on_transition)
        client = EventClient(self._queue_size, task)
        if last_event_id is not None:
            client.resumed = True
            self._replay_to(client, last_event_id)
        self._set_clients(self._clients.add, client)
        return client

    def _replay_to(self, client: EventClient, last_event_id: int) -> None:
        oldest = self._replay[0][0] if self._replay else self._seq + 1
        if last_event_id > self._seq or last_event_id < 0 or last_event_id <= self._unheard_until:
            # Not an id of this server's (it restarted?), or older than a time nobody listened: unknown.
            missed: int | None = None
        else:
            missed = max(0, oldest - 1 - last_event_id)
        if missed is None or missed:
            client.lagged = True
            client.offer(_frame("lagged", {"dropped": missed}))
        for seq, task_id, frame, terminal in self._replay:
            if seq > last_event_id and (client.task is None or client.task == task_id):
                client.offer(frame, terminal=terminal)

    def finish_if_terminal(self, client: EventClient, record: TaskRecord) -> bool:
        """End a one-task stream whose task was already terminal when it opened; False if nothing is left to send.

        `record` must have been read after `client` was attached: then the task's terminal transition
        was either offered to the client (it has ended), or taken before it attached. In that case
        the client is sent that transition (with the id it had, or the latest id if it is no longer kept)
        and ended, unless it reconnected with a Last-Event-ID that already covers it: then there is
        nothing to send, and the caller answers 204 so that a browser's EventSource stops reconnecting.
        """
        if record.state not in TERMINAL_STATES or not record.history:
            return True
        self._flush()  # the terminal transition may still be waiting for its frame: it reaches the client then
        if client.ended:
            return True
        if client.resumed and not client.lagged:
            return False  # its Last-Event-ID is at or past the terminal transition: it has seen the end
        kept = next(
            (frame for _, task_id, frame, terminal in reversed(self._replay) if terminal and task_id == record.task_id),
            None,
        )
        if kept is None:
            last = record.history[-1]
            event = TransitionEvent(record.task_id, last.from_state, last.to_state, last.at, last.reason, record)
            kept = _frame("transition", event.to_dict(), event_id=self._seq)
        client.offer(kept, terminal=True)
        return True

    def detach(self, client: EventClient) -> None:
        """Forget a client whose stream has ended; the last one starts the linger time."""
        self._set_clients(self._clients.discard, client)
        if self._clients or self._closed or self._unsubscribe is None or self._linger is not None:
            return
        if self._linger_s == 0:
            self._stop_listening()
        else:
            self._linger = asyncio.get_running_loop().call_later(self._linger_s, self._stop_listening)

    def _stop_listening(self) -> None:
        """Drop the runtime subscription and the kept frames: no stream has been open for `linger_s`."""
        self._linger = None
        if self._clients or self._unsubscribe is None:
            return
        self._flush()  # what was taken before now is numbered and kept no longer, like the rest
        self._unheard_until = self._seq
        self._replay.clear()
        self._unsubscribe_runtime()

    def close(self) -> None:
        """End every stream and drop the runtime subscription. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        for client in self._clients:
            client.end()
        self._unsubscribe_runtime()

    def _unsubscribe_runtime(self) -> None:
        if self._unsubscribe is not None:
            unsubscribe, self._unsubscribe = self._unsubscribe, None
            try:
                unsubscribe()
            except Exception as exc:  # noqa: BLE001 - the runtime may be closed already; nothing is left to undo then
                logger.debug(EVENTS_UNSUBSCRIBE_FAILED, error_type=type(exc).__name__, error=str(exc))

    def _on_transition(self, event: TransitionEvent) -> None:
        # Runs on the state actor's thread: be quick, never block, never raise. Events are kept
        # while no client listens too (for the linger time), for the replay to a client that reconnects.
        if self._closed:
            return
        if len(self._pending) >= self._max_pending:
            self._overflow += 1
            return
        self._pending.append(event)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone
                self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        # Reset the flag before draining: an event appended from now on either is
        # drained below or finds the flag down and schedules another flush.
        self._flush_scheduled = False
        overflow, self._overflow = self._overflow, 0
        clients = list(self._clients)
        if overflow:
            self._seq += overflow
            for client in clients:
                client.dropped += overflow
        while self._pending:
            event = self._pending.popleft()
            self._seq += 1
            frame = _frame("transition", event.to_dict(), event_id=self._seq)
            terminal = event.to_state in TERMINAL_STATES
            self._replay.append((self._seq, event.task_id, frame, terminal))
            for client in clients:
                if client.task is None or client.task == event.task_id:
                    client.offer(frame, terminal=terminal)


def _frame(event: str, data: dict[str, Any], *, event_id: int | None = None) -> bytes:
    head = "" if event_id is None else f"id: {event_id}\n"
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _frames(client: EventClient, heartbeat_s: float) -> AsyncIterator[bytes]:
    # retry: how long a browser's EventSource waits before reconnecting
    yield b"retry: 2000\n: connected\n\n"
    while True:
        if client.dropped and client.queue.empty():
            dropped, client.dropped = client.dropped, 0
            yield _frame("lagged", {"dropped": dropped})
        try:
            frame = await asyncio.wait_for(client.queue.get(), timeout=heartbeat_s)
        except TimeoutError:
            yield b": heartbeat\n\n"
            continue
        if frame == _CLOSE:
            return
        yield frame


def event_stream(
    broadcaster: EventBroadcaster,
    client: EventClient,
    *,
    heartbeat_s: float,
    on_end: Callable[[], None] | None = None,
) -> _EventStream:
    """The ASGI response streaming `client`'s frames, with a heartbeat comment when idle.

    `on_end` is called once the stream is over, however it ended (to give back a slot, say).
    """
    return _EventStream(broadcaster, client, heartbeat_s, on_end)


class _EventStream:
    """An ASGI app rather than a StreamingResponse, to watch for the client going away.

    uvicorn's h11 server drops writes to a closed connection silently, so without
    listening for `http.disconnect` a dead client would be detected only when its
    stream ends. Here it is detached as soon as it leaves.
    """

    def __init__(
        self,
        broadcaster: EventBroadcaster,
        client: EventClient,
        heartbeat_s: float,
        on_end: Callable[[], None] | None,
    ) -> None:
        self._broadcaster = broadcaster
        self._client = client
        self._heartbeat_s = heartbeat_s
        self._on_end = on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-store"),
                        (b"x-content-type-options", b"nosniff"),
                        (b"x-accel-buffering", b"no"),  # tell proxies such as nginx not to buffer
                    ],
                }
            )
            async with anyio.create_task_group() as task_group:

                async def end_on_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    task_group.cancel_scope.cancel()

                task_group.start_soon(end_on_disconnect)
                async for frame in _frames(self._client, self._heartbeat_s):
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                task_group.cancel_scope.cancel()
        except OSError:  # the client went away mid-write
            pass
        finally:
            self._broadcaster.detach(self._client)
            if self._on_end is not None:
                self._on_end()
