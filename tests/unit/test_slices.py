"""Batch work hands the event loop back once per slice (opensequence.engine.slices), with a
clock the test moves."""

from __future__ import annotations

import asyncio

from opensequence.engine.slices import SLICE_SECONDS, Slices


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_loop_yields_to_other_tasks_only_when_its_slice_has_run_out() -> None:
    clock = FakeClock()
    slices = Slices(clock)
    ran: list[int] = []
    seen: list[int] = []

    async def other_task() -> None:
        while True:
            ran.append(1)
            await asyncio.sleep(0)

    other = asyncio.create_task(other_task())
    try:
        # Items cheaper than a slice: the loop keeps the event loop to itself.
        for _ in range(50):
            await slices.pause()
            clock.now += SLICE_SECONDS / 100
        assert ran == []
        # An item that uses up the slice: the next pause lets the other task run, once.
        clock.now += SLICE_SECONDS
        await slices.pause()
        seen.append(len(ran))
        await slices.pause()
        seen.append(len(ran))
    finally:
        other.cancel()
    assert seen == [1, 1]


async def test_every_item_longer_than_a_slice_is_followed_by_a_yield() -> None:
    clock = FakeClock()
    slices = Slices(clock)
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    other = asyncio.create_task(count_turns())
    await asyncio.sleep(0)  # let it start
    started = turns
    try:
        for _ in range(10):
            clock.now += 2 * SLICE_SECONDS
            await slices.pause()
    finally:
        other.cancel()
    assert turns - started == 10
