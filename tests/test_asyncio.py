"""asyncio embedding: awaiting handles never blocks the event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from typing import Any

import pytest

from actorflow.actors import Runtime
from actorflow.core import Overloaded, RuntimeConfig, Task, TaskState
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

        with Runtime(RuntimeConfig(processor_workers=16), services=ServiceSet(process=held)) as runtime:
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
