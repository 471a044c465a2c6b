"""Time behind a small protocol (DESIGN rule 8) so tests move time instead of sleeping."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol

# Step delays are at most this long (the API refuses longer ones): a century, which keeps every
# moment the engine computes far inside the range of a datetime.
MAX_DELAY_MINUTES = 100 * 36_525 * 24 * 60
LATEST = datetime.max.replace(tzinfo=UTC)


def minutes_after(moment: datetime, minutes: float) -> datetime:
    """``moment`` plus ``minutes``; the last representable moment when that is past it (a delay
    stored before delays were bounded: 1e308 minutes raised OverflowError, which in the worker
    came after the send and left it unrecorded, to go out again when its lease ran out)."""
    try:
        return moment + timedelta(minutes=minutes)
    except OverflowError:
        return LATEST


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class ManualClock:
    """A clock that only moves when told to (tests, drills)."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime.now(UTC)

    def now(self) -> datetime:
        return self._now

    def advance(self, **delta: float) -> datetime:
        self._now += timedelta(**delta)
        return self._now

    def set(self, moment: datetime) -> None:
        self._now = moment
