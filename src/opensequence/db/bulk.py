"""Bulk inserts on SQLite through the driver's ``executemany``, bypassing per-row type processing.

SQLAlchemy runs every bound value of every row through its type's bind processor; for the
10,000-row inserts of add-contacts that Python work cost more than SQLite's own. Here values
are converted once per *column* where they are constant (organization, sequence, run, now) and
with plain attribute reads where they vary, into exactly the storage forms SQLAlchemy itself
writes on SQLite (so ORM reads are unaffected):

- ``Uuid``: 32 lower-case hex digits;
- ``UTCDateTime``: naive UTC text ``YYYY-MM-DD HH:MM:SS.ffffff``;
- ``JSON``: ``json.dumps`` text.

Only for SQLite: writers are serialised there (``BEGIN IMMEDIATE``), so a caller that has read
what exists can insert without racing anyone. PostgreSQL has its own array-bound statements.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession


def sqlite_uuid(value: uuid.UUID | None) -> str | None:
    return None if value is None else value.hex


def sqlite_datetime(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column")
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


async def sqlite_executemany(
    session: AsyncSession, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]
) -> int:
    """``INSERT INTO table (columns) VALUES (?, …) ON CONFLICT DO NOTHING`` for every row, in
    the session's transaction; returns the number of rows written (a row hitting a unique
    constraint is skipped; any other constraint still fails the statement)."""
    if not rows:
        return 0
    sql = (
        f"INSERT INTO {table} ({', '.join(columns)}) "
        f"VALUES ({', '.join('?' * len(columns))}) ON CONFLICT DO NOTHING"
    )
    connection = await session.connection()
    result = await connection.exec_driver_sql(sql, rows)
    return int(result.rowcount)
