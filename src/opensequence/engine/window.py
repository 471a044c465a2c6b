"""Send windows (SPEC §5): when may a due send go out? Pure functions, no I/O, no clock.

A window ``{"days": [...], "start": "HH:MM", "end": "HH:MM", "timezone": "IANA"}`` is read in
the contact's time zone (``custom_data.timezone`` when it names a real IANA zone) or else the
window's own. ``start`` is inclusive, ``end`` exclusive; ``start > end`` crosses midnight and
then belongs to the day it opens on (a ``mon`` 22:00-06:00 window runs into Tuesday morning).

Local wall times are turned into instants with these rules, so daylight-saving changes never
make a window open twice or not at all by accident:

- a wall time that does not exist (the hour skipped when clocks spring forward) resolves to the
  instant the gap ends: a window starting at 02:30 on the night Europe/Amsterdam jumps from
  02:00 to 03:00 opens at 03:00 local;
- a wall time that exists twice (the hour repeated when clocks fall back) resolves to its first
  occurrence.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Any

from opensequence.validation import zone_named

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def zone_for(window: dict[str, Any], custom_data: Any) -> tzinfo:
    """The contact's zone when ``custom_data.timezone`` is valid, else the window's, else UTC."""
    if isinstance(custom_data, dict):
        found = zone_named(custom_data.get("timezone"))
        if found is not None:
            return found
    return zone_named(window.get("timezone")) or UTC


def _hhmm(value: str) -> time:
    hours, minutes = value.split(":")
    return time(int(hours), int(minutes))


def resolve(wall: datetime, tz: tzinfo) -> datetime:
    """The UTC instant of a naive local wall time (skipped → end of the gap, repeated → first)."""
    first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if first.astimezone(tz).replace(tzinfo=None) == wall:
        return first
    # ``wall`` is in a gap. fold=0 reads it with the offset before the change, fold=1 with the
    # one after; the change itself lies between the two readings. Bisect to the second.
    second = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    low, high = min(first, second), max(first, second)
    after = high.astimezone(tz).utcoffset()
    while (high - low) > timedelta(seconds=1):
        middle = low + (high - low) / 2
        if middle.astimezone(tz).utcoffset() == after:
            high = middle
        else:
            low = middle
    return high.replace(microsecond=0)


def next_opening(window: dict[str, Any], tz: tzinfo, now: datetime) -> datetime | None:
    """``now`` when the window is open at ``now``, else the UTC instant it next opens; None
    when it never opens (no days)."""
    days = {WEEKDAYS.index(day) for day in window.get("days") or () if day in WEEKDAYS}
    if not days:
        return None
    start, end = _hhmm(window["start"]), _hhmm(window["end"])
    crosses_midnight = end <= start
    today = now.astimezone(tz).date()
    # Yesterday's window may still be open (midnight crossing); then at most a week ahead,
    # plus one day for a window that never opens on a day whose whole span was skipped.
    for offset in range(-1, 9):
        day: date = today + timedelta(days=offset)
        if day.weekday() not in days:
            continue
        opens = resolve(datetime.combine(day, start), tz)
        end_day = day + timedelta(days=1) if crosses_midnight else day
        closes = resolve(datetime.combine(end_day, end), tz)
        if opens < closes and now < closes:
            return max(now, opens)
    return None
