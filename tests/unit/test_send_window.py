"""Send-window math, including daylight-saving changes in Europe/Amsterdam (2026: clocks spring
forward 29 March 02:00 CET → 03:00 CEST, fall back 25 October 03:00 CEST → 02:00 CET)."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from opensequence.engine.window import next_opening, resolve, zone_for

AMS = ZoneInfo("Europe/Amsterdam")
NY = ZoneInfo("America/New_York")
WEEKDAYS_9_TO_5 = {
    "days": ["mon", "tue", "wed", "thu", "fri"],
    "start": "09:00",
    "end": "17:00",
    "timezone": "Europe/Amsterdam",
}


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def test_inside_the_window_is_now() -> None:
    now = utc(2026, 3, 2, 9, 0)  # Monday 10:00 CET
    assert next_opening(WEEKDAYS_9_TO_5, AMS, now) == now


def test_start_inclusive_end_exclusive() -> None:
    assert next_opening(WEEKDAYS_9_TO_5, AMS, utc(2026, 3, 2, 8, 0)) == utc(2026, 3, 2, 8, 0)
    # Monday 17:00 CET is closed: next opening is Tuesday 09:00 CET.
    assert next_opening(WEEKDAYS_9_TO_5, AMS, utc(2026, 3, 2, 16, 0)) == utc(2026, 3, 3, 8, 0)


def test_before_opening_and_over_the_weekend() -> None:
    assert next_opening(WEEKDAYS_9_TO_5, AMS, utc(2026, 3, 2, 6, 0)) == utc(2026, 3, 2, 8, 0)
    friday_evening = utc(2026, 3, 6, 18, 0)
    assert next_opening(WEEKDAYS_9_TO_5, AMS, friday_evening) == utc(2026, 3, 9, 8, 0)


def test_window_crossing_midnight_belongs_to_the_day_it_opens() -> None:
    night = {"days": ["mon"], "start": "22:00", "end": "06:00", "timezone": "UTC"}
    tuesday_3am = utc(2026, 3, 3, 3, 0)
    assert next_opening(night, UTC, tuesday_3am) == tuesday_3am
    assert next_opening(night, UTC, utc(2026, 3, 3, 6, 0)) == utc(2026, 3, 9, 22, 0)
    assert next_opening(night, UTC, utc(2026, 3, 2, 21, 59)) == utc(2026, 3, 2, 22, 0)


def test_spring_forward_keeps_local_opening_time() -> None:
    # Friday 27 March 18:00 CET → Monday 30 March 09:00 CEST (07:00 UTC, not 08:00).
    assert next_opening(WEEKDAYS_9_TO_5, AMS, utc(2026, 3, 27, 17, 0)) == utc(2026, 3, 30, 7, 0)


def test_fall_back_keeps_local_opening_time() -> None:
    # Friday 23 October 18:00 CEST → Monday 26 October 09:00 CET (08:00 UTC).
    assert next_opening(WEEKDAYS_9_TO_5, AMS, utc(2026, 10, 23, 16, 0)) == utc(2026, 10, 26, 8, 0)


def test_window_starting_in_the_skipped_hour_opens_when_the_gap_ends() -> None:
    sunday_early = {"days": ["sun"], "start": "02:30", "end": "04:00", "timezone": "x"}
    # Sunday 29 March 00:30 UTC is 01:30 CET; 02:30 never happens, the gap ends at 03:00 CEST.
    assert next_opening(sunday_early, AMS, utc(2026, 3, 29, 0, 30)) == utc(2026, 3, 29, 1, 0)
    # Inside: 03:30 CEST (01:30 UTC).
    assert next_opening(sunday_early, AMS, utc(2026, 3, 29, 1, 30)) == utc(2026, 3, 29, 1, 30)


def test_window_entirely_in_the_skipped_hour_waits_a_week() -> None:
    lost = {"days": ["sun"], "start": "02:10", "end": "02:50", "timezone": "x"}
    # 29 March has no 02:10-02:50; next Sunday 5 April 02:10 CEST = 00:10 UTC.
    assert next_opening(lost, AMS, utc(2026, 3, 28, 23, 0)) == utc(2026, 4, 5, 0, 10)


def test_repeated_hour_resolves_to_its_first_occurrence() -> None:
    wall = datetime(2026, 10, 25, 2, 30)
    assert resolve(wall, AMS) == utc(2026, 10, 25, 0, 30)  # 02:30 CEST
    repeated = {"days": ["sun"], "start": "02:30", "end": "04:00", "timezone": "x"}
    assert next_opening(repeated, AMS, utc(2026, 10, 24, 23, 0)) == utc(2026, 10, 25, 0, 30)


def test_no_days_never_opens() -> None:
    assert next_opening({**WEEKDAYS_9_TO_5, "days": []}, AMS, utc(2026, 3, 2, 9, 0)) is None


@pytest.mark.parametrize(
    ("custom_data", "expected"),
    [
        ({"timezone": "America/New_York"}, NY),
        ({"timezone": "Not/AZone"}, AMS),
        ({"timezone": "../../etc/passwd"}, AMS),
        # The machine's zone, not one of the database: each worker would read its own.
        ({"timezone": "localtime"}, AMS),
        ({"timezone": "posixrules"}, AMS),
        ({"timezone": "right/America/New_York"}, AMS),
        ({"timezone": "Europe"}, AMS),
        ({"timezone": 5}, AMS),
        ({}, AMS),
        (None, AMS),
    ],
)
def test_zone_is_the_contacts_when_valid(custom_data: object, expected: ZoneInfo) -> None:
    assert zone_for(WEEKDAYS_9_TO_5, custom_data) == expected


def test_contact_zone_moves_the_opening() -> None:
    # Monday 2 March 12:00 UTC: open in Amsterdam (13:00) but 07:00 in New York → 14:00 UTC.
    now = utc(2026, 3, 2, 12, 0)
    zone = zone_for(WEEKDAYS_9_TO_5, {"timezone": "America/New_York"})
    assert next_opening(WEEKDAYS_9_TO_5, zone, now) == utc(2026, 3, 2, 14, 0)
