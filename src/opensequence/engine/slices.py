"""Long stretches of batch work hand the event loop back to the sends in flight.

A worker's batch work (deciding and rendering a batch's steps, building its send records) runs
on the same event loop as its SMTP connections. An SMTP reply that arrives meanwhile waits
until the loop is free, and so does the next command on that connection: the sink, having
nothing to do, sits idle. Measured with the raw aiosmtplib loop of ``bench/engine_send.py``
plus synthetic work of 100 us a message run on the same loop: done in 0.25 ms pieces it left
the loop's rate where it was (4,650-4,780 msg/s against 4,430-4,620 with no work), in 1 ms
pieces it cost ~13 %, in 4 ms pieces ~25-30 %. Deciding a batch of 200 took ~4 ms in one
piece.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

# How long batch work runs before it lets the loop serve the connections.
SLICE_SECONDS = 0.00025


class Slices:
    """Pauses for a long loop: ``await slices.pause()`` once per item, which yields to the
    event loop only when a slice has run out (a clock read otherwise)."""

    __slots__ = ("_clock", "_until")

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._until = clock() + SLICE_SECONDS

    async def pause(self) -> None:
        if self._clock() >= self._until:
            await asyncio.sleep(0)
            self._until = self._clock() + SLICE_SECONDS
