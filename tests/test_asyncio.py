"""asyncio embedding: awaiting handles never blocks the event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from typing import Any

import pytest

from actorflow.actors import Runtime
from actorflow.core import Overloaded, Pipeline, RuntimeConfig, Stage, Task, TaskState
from actorflow.services import ServiceSet
from tests.conftest import payload


def test_the_loop_keeps_ticking_while_a_hundred_slow_tasks_are_awaited() -> None:
    release = threading.Event()

    def held(task: Task) -> Mapping[str, Any]:
        # The tasks can finish only once the loop has ticked while they were awaited.
        assert release.wait(10), "the event loop never ticked while the handles were awaited"
        return {"held": True}

    async def main() -> tuple[list[TaskState], int]:
        ticks = 0
        awaiting = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            await awaiting.wait()
            while ticks < 10:  # each tick is one pass of the loop while `main` awaits the handles
                ticks += 1
                await asyncio.sleep(0)
            release.set()

        with Runtime(services=ServiceSet(process=held, workers={"processor": 16})) as runtime:
            handles = [await runtime.submit_async(payload(i)) for i in range(100)]
            ticking = asyncio.create_task(ticker())
            awaiting.set()  # the ticker first runs when `main` yields: inside the gather below
            records = await asyncio.wait_for(asyncio.gather(*(h for h in handles)), timeout=30)
            await ticking
        return [r.state for r in records], ticks

    states, ticks = asyncio.run(main())
    assert states == [TaskState.COMPLETED] * 100
    assert ticks == 10  # a loop blocked by the awaits would never have ticked, and every task would fail


def test_awaiting_a_handle_that_is_already_done_returns_its_record() -> None:
    async def main() -> TaskState:
        with Runtime() as runtime:
            handle = runtime.submit(payload())
            handle.result(timeout=10)
            record = await handle
        return record.state

    assert asyncio.run(main()) is TaskState.COMPLETED


def test_submit_async_waits_for_room_without_blocking_the_loop_and_then_raises_overloaded() -> None:
    gate = threading.Event()

    def gated(task: Task) -> Mapping[str, Any]:
        gate.wait(10)
        return {}

    async def main() -> None:
        config = RuntimeConfig(max_in_flight=1, submit_timeout_s=0.2)
        with Runtime(config, services=ServiceSet(process=gated)) as runtime:
            first = await runtime.submit_async(payload(1))
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                for _ in range(1000):
                    ticks += 1
                    await asyncio.sleep(0.005)

            ticking = asyncio.create_task(ticker())
            with pytest.raises(Overloaded):
                await runtime.submit_async(payload(2))
            assert ticks >= 5  # the loop ran while submit_async waited 0.2 s
            ticking.cancel()
            gate.set()
            assert (await first).state is TaskState.COMPLETED
            assert (await (await runtime.submit_async(payload(3)))).state is TaskState.COMPLETED

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_async_with_drains_off_the_event_loop_which_keeps_ticking_meanwhile() -> None:
    release = threading.Event()

    def held(task: Task) -> Mapping[str, Any]:
        # The tasks can finish only once the loop has ticked while the runtime was draining.
        assert release.wait(10), "the event loop never ticked while the runtime drained"
        return {"held": True}

    async def main() -> tuple[list[TaskState], int, bool]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while ticks < 10:
                ticks += 1
                await asyncio.sleep(0)
            release.set()

        config = RuntimeConfig(drain_timeout_s=20)
        async with Runtime(config, services=ServiceSet(process=held)) as runtime:
            handles = [runtime.submit(payload(i)) for i in range(5)]
            ticking = asyncio.create_task(ticker())  # first runs when the block's exit awaits the drain
        await ticking
        return [h.result(timeout=0).state for h in handles], ticks, runtime.closed

    states, ticks, closed = asyncio.run(main())
    assert states == [TaskState.COMPLETED] * 5  # drained: a close blocking the loop would have abandoned them
    assert ticks == 10
    assert closed


@pytest.mark.timeout(60)
def test_aclose_without_drain_stops_at_once_and_a_second_aclose_returns() -> None:
    gate = threading.Event()

    def gated(task: Task) -> Mapping[str, Any]:
        gate.wait(30)
        return {}

    async def main() -> None:
        runtime = Runtime(services=ServiceSet(process=gated))
        try:
            handle = runtime.submit(payload())
            await runtime.aclose(drain=False)
            assert runtime.closed
            assert runtime.health()["status"] == "stopped"
            await runtime.aclose()  # idempotent
            assert not handle.done()
        finally:
            gate.set()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_aclose_inside_an_async_stage_hands_the_close_over_and_the_stage_finishes() -> None:
    runtimes: list[Runtime] = []
    closing = threading.Event()

    async def stage(task: Task, value: Any) -> Any:
        await runtimes[0].aclose()  # on the stage's own loop: it must not wait for the drain (of this very task)
        closing.set()
        return {"closed": runtimes[0].closed}

    runtime = Runtime(pipelines=[Pipeline("p", [Stage("close", stage)])])
    runtimes.append(runtime)
    handle = runtime.submit({"n": 1})
    assert closing.wait(10)
    runtime.close()  # waits for the close the stage began, which drained the stage's own task
    assert handle.result(timeout=0).state is TaskState.COMPLETED
    assert handle.result(timeout=0).result == {"closed": True}
