"""PostgreSQL: reads run in autocommit (``Database.reading``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text

from opensequence.db import Database


@pytest.fixture
async def pg(backend: str, database_url: str) -> AsyncIterator[Database]:
    if backend != "postgresql":
        pytest.skip("PostgreSQL only: SQLite has no server connection to lose")
    database = Database(database_url, pool_size=1)
    yield database
    await database.dispose()


async def test_reads_run_without_a_transaction_around_them(pg: Database) -> None:
    """No BEGIN/COMMIT round trips for a read: each statement is its own transaction, which
    under READ COMMITTED sees what a statement inside a transaction would."""
    async with pg.reading() as session:
        await session.execute(text("SELECT pg_sleep(0.01)"))
        own = (
            await session.execute(text("SELECT transaction_timestamp() = statement_timestamp()"))
        ).scalar_one()
    async with pg.transaction() as session:
        await session.execute(text("SELECT pg_sleep(0.01)"))
        shared = (
            await session.execute(text("SELECT transaction_timestamp() = statement_timestamp()"))
        ).scalar_one()
    assert own is True
    assert shared is False
