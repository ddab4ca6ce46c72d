"""Following tasks over HTTP without polling: `?wait=` on a task, and `/events` ids, replay and task filter."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import httpx
import pytest

from actorflow.actors import Runtime
from actorflow.api import ApiServer, create_app, serve_in_background
from actorflow.api._events import EventBroadcaster, EventClient, _frames
from actorflow.core import RuntimeConfig, Task
from actorflow.services import ServiceSet
from actorflow.services import process as default_process
from tests.conftest import payload

WAIT_S = 10.0


@pytest.fixture
def gate() -> threading.Event:
    """Tasks whose payload has data.hold wait in the processor until this is set."""
    return threading.Event()


@pytest.fixture
def held(gate: threading.Event) -> Iterator[Runtime]:
    def process(task: Task) -> Mapping[str, Any]:
        data = task.payload.get("data")
        if isinstance(data, Mapping) and data.get("hold"):
            gate.wait(WAIT_S)
        return default_process(task)

    runtime = Runtime(RuntimeConfig(), services=ServiceSet(process=process))
    yield runtime
    gate.set()
    runtime.close(drain=False)


@pytest.fixture
def server(held: Runtime) -> Iterator[ApiServer]:
    with serve_in_background(create_app(held)) as served:
        yield served


def frames_of(response: httpx.Response) -> Iterator[dict[str, str]]:
    """The SSE frames of a stream, each as its fields (id, event, data); comments are skipped."""
    return frames_of_lines(response.iter_lines())


def frames_of_lines(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """The SSE frames in `lines`, each as its fields (id, event, data); comments are skipped."""
    fields: dict[str, str] = {}
    for line in lines:
        if line.startswith((":", "retry:")):
            continue
        if not line:
            if fields:
                yield fields
            fields = {}
            continue
        name, _, value = line.partition(":")
        fields[name] = value.strip()


def test_waiting_on_a_task_answers_once_it_is_terminal(held: Runtime, server: ApiServer, gate: threading.Event) -> None:
    task_id = held.submit(payload(hold=True)).task_id
    answers: list[httpx.Response] = []
    waiting = threading.Thread(
        target=lambda: answers.append(httpx.get(f"{server.url}/tasks/{task_id}?wait=30", timeout=40))
    )
    waiting.start()
    gate.set()  # whether the request is already waiting or not, it must come back with the end state
    waiting.join(WAIT_S)
    assert answers[0].status_code == 200
    assert answers[0].json()["state"] == "COMPLETED"


def test_waiting_on_a_task_that_stays_busy_answers_after_the_wait_with_its_state_then(
    held: Runtime, server: ApiServer
) -> None:
    task_id = held.submit(payload(hold=True)).task_id
    answer = httpx.get(f"{server.url}/tasks/{task_id}?wait=0.2", timeout=10)
    assert answer.status_code == 200
    assert answer.json()["state"] == "PROCESSING"


def test_long_polls_that_time_out_leave_no_callback_behind_on_the_task(held: Runtime, server: ApiServer) -> None:
    task_id = held.submit(payload(hold=True)).task_id
    with httpx.Client(base_url=server.url, timeout=WAIT_S) as client:
        states = {client.get(f"/tasks/{task_id}", params={"wait": 0.001}).json()["state"] for _ in range(50)}

    assert not states & {"COMPLETED", "FAILED", "CANCELLED"}  # every poll timed out on a task in flight
    # Each wait registers a completion callback on the task: one left behind per poll is a leak for as
    # long as the task runs (20,000 polls held 18.5 MB).
    waiter = held.handle(task_id)._waiter
    assert not waiter._callbacks


@pytest.mark.parametrize("wait", ["61", "-1", "soon", "nan", "inf"])
def test_a_wait_that_is_not_from_0_to_60_seconds_is_a_400_naming_the_range(
    held: Runtime, server: ApiServer, wait: str
) -> None:
    task_id = held.submit(payload()).task_id
    answer = httpx.get(f"{server.url}/tasks/{task_id}", params={"wait": wait}, timeout=10)
    assert answer.status_code == 400
    assert "from 0 to 60" in answer.json()["error"]


def test_waiting_on_an_unknown_task_is_a_404_at_once(server: ApiServer) -> None:
    answer = httpx.get(f"{server.url}/tasks/nope?wait=30", timeout=10)
    assert answer.status_code == 404


def test_a_client_reconnecting_with_last_event_id_gets_what_it_missed_and_can_follow_one_task(
    held: Runtime, server: ApiServer
) -> None:
    with httpx.Client(base_url=server.url, timeout=WAIT_S) as client:
        with client.stream("GET", "/events") as stream:
            first = held.submit(payload(1)).task_id
            frames = []
            for frame in frames_of(stream):
                frames.append(frame)
                if json.loads(frame["data"])["to_state"] == "COMPLETED":
                    break
        assert [int(f["id"]) for f in frames] == [1, 2, 3, 4]
        assert {json.loads(f["data"])["task_id"] for f in frames} == {first}

        # Disconnected: two more tasks run. A watcher that stays connected shows when they are published.
        with client.stream("GET", "/events") as watcher:
            second = held.submit(payload(2)).task_id
            third = held.submit(payload(3)).task_id
            done = set()
            for frame in frames_of(watcher):
                data = json.loads(frame["data"])
                if data["to_state"] == "COMPLETED":
                    done.add(data["task_id"])
                if done == {second, third}:
                    break

        headers = {"Last-Event-ID": frames[-1]["id"]}
        with client.stream("GET", "/events", headers=headers, params={"task": third}) as resumed:
            replayed = []
            for frame in frames_of(resumed):
                replayed.append(frame)
                if json.loads(frame["data"])["to_state"] == "COMPLETED":
                    break
    assert all(int(f["id"]) > 4 for f in replayed)
    assert [json.loads(f["data"])["task_id"] for f in replayed] == [third] * 4
    assert [json.loads(f["data"])["to_state"] for f in replayed] == ["CREATED", "VALIDATED", "PROCESSING", "COMPLETED"]


def test_a_stream_following_one_task_ends_after_that_tasks_terminal_event(
    held: Runtime, server: ApiServer, gate: threading.Event
) -> None:
    task_id = held.submit(payload(hold=True)).task_id
    with httpx.stream("GET", f"{server.url}/events", params={"task": task_id}, timeout=WAIT_S) as stream:
        lines = stream.iter_lines()
        assert next(lines) == "retry: 2000"  # the stream is attached: the task's end cannot be missed
        gate.set()
        frames = list(frames_of_lines(lines))  # ends when the server ends the stream

    transitions = [json.loads(frame["data"]) for frame in frames]
    assert transitions[-1]["to_state"] == "COMPLETED"
    assert {t["task_id"] for t in transitions} == {task_id}


def test_a_stream_opened_on_a_task_that_is_already_terminal_sends_its_last_transition_and_ends(
    held: Runtime, server: ApiServer
) -> None:
    task_id = held.submit(payload()).task_id
    held.handle(task_id).result(timeout=WAIT_S)
    with httpx.stream("GET", f"{server.url}/events", params={"task": task_id}, timeout=WAIT_S) as stream:
        assert stream.status_code == 200
        frames = list(frames_of(stream))

    assert len(frames) == 1
    assert frames[0]["event"] == "transition"
    last = json.loads(frames[0]["data"])
    assert (last["task_id"], last["from_state"], last["to_state"]) == (task_id, "PROCESSING", "COMPLETED")
    # A browser's EventSource reconnects when a stream ends: with the id it got, it is told there is nothing
    # more (204), which stops it.
    again = httpx.get(
        f"{server.url}/events", params={"task": task_id}, headers={"Last-Event-ID": frames[0]["id"]}, timeout=WAIT_S
    )
    assert again.status_code == 204
    assert again.content == b""


def test_a_stream_following_a_task_that_does_not_exist_is_a_404(server: ApiServer) -> None:
    answer = httpx.get(f"{server.url}/events", params={"task": "nope"}, timeout=WAIT_S)
    assert answer.status_code == 404
    assert "nope" in answer.json()["error"]


def test_a_malformed_last_event_id_is_a_400(server: ApiServer) -> None:
    answer = httpx.get(f"{server.url}/events", headers={"Last-Event-ID": "yesterday"}, timeout=10)
    assert answer.status_code == 400
    assert "Last-Event-ID" in answer.json()["error"]


def test_a_reconnection_past_the_replay_buffer_or_from_another_server_is_told_it_lagged(held: Runtime) -> None:
    async def scenario() -> tuple[list[bytes], list[bytes]]:
        broadcaster = EventBroadcaster(held, replay_size=2)
        listener = broadcaster.attach()  # subscribes: from here on, frames are kept for replay
        held.submit(payload()).result(timeout=WAIT_S)  # 4 transitions; the buffer keeps the last 2
        while listener.queue.qsize() < 4:  # the flush runs on this loop
            await asyncio.sleep(0.01)
        late = broadcaster.attach(last_event_id=1)
        stranger = broadcaster.attach(last_event_id=99)
        late_frames = [late.queue.get_nowait() for _ in range(late.queue.qsize())]
        stranger_frames = [stranger.queue.get_nowait() for _ in range(stranger.queue.qsize())]
        broadcaster.close()
        return late_frames, stranger_frames

    late, stranger = asyncio.run(scenario())
    assert late[0] == b'event: lagged\ndata: {"dropped":1}\n\n'  # frame 2 is gone; 3 and 4 are replayed
    assert [f.split(b"\n")[0] for f in late[1:]] == [b"id: 3", b"id: 4"]
    assert stranger == [b'event: lagged\ndata: {"dropped":null}\n\n']


async def _frames_now(client: EventClient, count: int) -> list[bytes]:
    """The next `count` frames offered to `client`, each awaited (the flush runs on this loop)."""
    return [await asyncio.wait_for(client.queue.get(), WAIT_S) for _ in range(count)]


def _queued(client: EventClient) -> list[bytes]:
    return [client.queue.get_nowait() for _ in range(client.queue.qsize())]


def test_once_no_stream_has_been_open_for_the_linger_time_frames_are_no_longer_kept(held: Runtime) -> None:
    async def scenario() -> list[bytes]:
        broadcaster = EventBroadcaster(held, linger_s=0)
        listener = broadcaster.attach()
        held.submit(payload(1)).result(timeout=WAIT_S)
        assert len(await _frames_now(listener, 4)) == 4
        broadcaster.detach(listener)  # the last stream ends; with linger_s=0 nothing is kept from now on
        held.submit(payload(2)).result(timeout=WAIT_S)  # runs while nobody listens
        await asyncio.sleep(0)  # one turn of the loop: a flush of its events, had any been taken, has run
        late = broadcaster.attach(last_event_id=4)
        broadcaster.close()
        return _queued(late)

    # What ran meanwhile is unknown to the server: the reconnecting client is told so, and nothing is replayed.
    assert asyncio.run(scenario()) == [b'event: lagged\ndata: {"dropped":null}\n\n', b""]


def test_a_client_that_reconnects_within_the_linger_time_gets_what_ran_while_no_stream_was_open(
    held: Runtime,
) -> None:
    async def scenario() -> list[bytes]:
        broadcaster = EventBroadcaster(held, linger_s=60)
        listener = broadcaster.attach()
        held.submit(payload(1)).result(timeout=WAIT_S)
        assert len(await _frames_now(listener, 4)) == 4
        broadcaster.detach(listener)
        held.submit(payload(2)).result(timeout=WAIT_S)
        await asyncio.sleep(0)  # one turn of the loop: the flush of its four events runs
        late = broadcaster.attach(last_event_id=4)
        broadcaster.close()
        return _queued(late)

    frames = asyncio.run(scenario())
    assert [f.split(b"\n")[0] for f in frames[:-1]] == [b"id: 5", b"id: 6", b"id: 7", b"id: 8"]
    assert frames[-1] == b""  # the end of the stream, from close()


def test_a_stream_following_one_task_gets_none_of_the_others(held: Runtime) -> None:
    async def scenario() -> list[bytes]:
        broadcaster = EventBroadcaster(held)
        everyone = broadcaster.attach()
        one = broadcaster.attach(task="task-b")
        handles = [held.submit(payload(i), task_id=name) for i, name in enumerate(("task-a", "task-b", "task-c"))]
        for handle in handles:
            handle.result(timeout=WAIT_S)
        while everyone.queue.qsize() < 12:
            await asyncio.sleep(0.01)
        broadcaster.close()
        return [frame async for frame in _frames(one, heartbeat_s=WAIT_S)]

    frames = asyncio.run(scenario())
    events = [json.loads(f.split(b"data: ")[1]) for f in frames if b"data: " in f]
    assert [(e["task_id"], e["to_state"]) for e in events] == [
        ("task-b", "CREATED"),
        ("task-b", "VALIDATED"),
        ("task-b", "PROCESSING"),
        ("task-b", "COMPLETED"),
    ]
