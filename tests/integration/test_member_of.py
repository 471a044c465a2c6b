"""``member_of`` against both databases: whatever the values hold, the condition matches
exactly the rows whose column is one of them."""

from __future__ import annotations

import uuid

from sqlalchemy import Column, Integer, MetaData, Table, Text, Uuid, insert, select

from opensequence.db import Database
from opensequence.db.dialect import member_of

VALUES = [
    "plain",
    "",
    "NULL",
    "with space",
    'double "quote"',
    "back\\slash",
    "trailing\\",
    "comma,brace{}",
    "it's",
    "ünïcödé ✓",
    "+1 (555) 010-0000",
]


async def test_member_of_matches_exactly_the_given_values(db: Database) -> None:
    table = Table(
        f"member_probe_{uuid.uuid4().hex[:8]}",
        MetaData(),
        Column("id", Uuid, primary_key=True),
        Column("label", Text, nullable=False),
        Column("rank", Integer, nullable=False),
    )
    ids = [uuid.uuid4() for _ in VALUES]
    async with db.engine.begin() as connection:
        await connection.run_sync(table.create)
    try:
        async with db.transaction() as session:
            await session.execute(
                insert(table),
                [
                    {"id": i, "label": label, "rank": rank}
                    for rank, (i, label) in enumerate(zip(ids, VALUES, strict=True))
                ],
            )
            # Each value alone, then every other one, then none of them.
            for wanted in [[value] for value in VALUES] + [VALUES[::2], ["missing", "plain "]]:
                found = await session.scalars(
                    select(table.c.label).where(member_of(session, table.c.label, wanted))
                )
                assert sorted(found) == sorted(v for v in VALUES if v in wanted)
            found = await session.scalars(
                select(table.c.rank).where(member_of(session, table.c.id, ids[1::3]))
            )
            assert sorted(found) == list(range(1, len(VALUES), 3))
            found = await session.scalars(
                select(table.c.label).where(member_of(session, table.c.rank, [0, 2, 99]))
            )
            assert sorted(found) == sorted([VALUES[0], VALUES[2]])
    finally:
        async with db.engine.begin() as connection:
            await connection.run_sync(table.drop)
