"""``member_of`` and ``member_param`` select exactly the given ids on both databases, whatever
their number; on PostgreSQL UUIDs travel as one binary ``uuid[]`` parameter."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from psycopg.adapt import PyFormat
from psycopg.pq import Format
from sqlalchemy import insert, select

from opensequence.db import Database
from opensequence.db.dialect import (
    UuidArray,
    dialect_name,
    member_of,
    member_param,
    member_values,
    prebuilt,
)
from opensequence.models import Organization

ORGS = Organization.__table__


@pytest.mark.parametrize("count", [0, 1, 3, 500])
async def test_member_of_selects_exactly_the_given_ids(db: Database, count: int) -> None:
    now = datetime.now(UTC)
    ids = [uuid.uuid4() for _ in range(600)]
    async with db.transaction() as session:
        await session.execute(
            insert(ORGS), [{"id": i, "name": f"org {i}", "created_at": now} for i in ids]
        )
    wanted = ids[:count]
    # An id twice and an id that does not exist change nothing.
    given = wanted + wanted[:1] + [uuid.uuid4()]
    async with db.transaction() as session:
        direct = await session.execute(
            select(ORGS.c.id).where(member_of(session, ORGS.c.id, given))
        )
        statement = prebuilt(
            session,
            "test_member_of",
            lambda dialect: select(ORGS.c.id).where(member_param(dialect, ORGS.c.id, "ids")),
        )
        value = member_values(dialect_name(session), ORGS.c.id, given)
        if dialect_name(session) == "postgresql":
            assert isinstance(value, UuidArray)
            raw = await (await session.connection()).get_raw_connection()
            dumper = raw.driver_connection.adapters.get_dumper(UuidArray, PyFormat.AUTO)
            assert dumper.format == Format.BINARY  # registered on every engine connection
        bound = await session.execute(statement, {"ids": value})
        assert set(direct.scalars()) == set(wanted)
        assert set(bound.scalars()) == set(wanted)
