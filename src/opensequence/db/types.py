"""Column types that behave the same on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Dialect
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator

JSONType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both databases.

    SQLite has no time zones: values are stored as naive UTC text and made aware again on read,
    so comparisons in SQL stay lexicographically correct.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def new_id() -> uuid.UUID:
    """A time-ordered UUIDv7: index-friendly and accepted by the seed's id pattern."""
    return uuid.UUID(int=_uuid7_int())


def new_ids(count: int) -> list[uuid.UUID]:
    """``count`` UUIDv7s sharing one timestamp, from a single read of the random source (the
    bulk paths need 10,000 at a time; one ``os.urandom`` call per id was half their cost)."""
    prefix = ((time.time_ns() // 1_000_000) & ((1 << 48) - 1)) << 80 | 0x7 << 76 | 0b10 << 62
    random = os.urandom(10 * count)
    ids: list[uuid.UUID] = []
    for offset in range(0, 10 * count, 10):
        rand = int.from_bytes(random[offset : offset + 10], "big")
        ids.append(uuid.UUID(int=prefix | ((rand >> 62) & 0xFFF) << 64 | (rand & ((1 << 62) - 1))))
    return ids


def _uuid7_int() -> int:
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return value


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(value: datetime | None) -> str | None:
    """ISO 8601 UTC with a ``Z``, the wire format for every timestamp."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
