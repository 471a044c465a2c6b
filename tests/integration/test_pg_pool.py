"""PostgreSQL connections: the pool tests a connection only when it sat idle for a while
(``opensequence.db.engine._ping_if_idle``), and reads run in autocommit (``Database.reading``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from opensequence.db import Database
from opensequence.db import engine as db_engine
from tests.conftest import _pg_admin


@pytest.fixture
async def pg(backend: str, database_url: str) -> AsyncIterator[Database]:
    if backend != "postgresql":
        pytest.skip("PostgreSQL only: SQLite has no server connection to lose")
    database = Database(database_url, pool_size=1)
    yield database
    await database.dispose()


@pytest.fixture
def pings(pg: Database, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the connection tests of ``pg``'s pool."""
    dialect = pg.engine.sync_engine.dialect
    made: list[int] = []
    real = dialect.do_ping

    def counted(dbapi_connection: Any) -> bool:
        made.append(1)
        return bool(real(dbapi_connection))

    monkeypatch.setattr(dialect, "do_ping", counted)
    return made


async def backend_pid(db: Database) -> int:
    async with db.transaction() as session:
        return int((await session.execute(text("SELECT pg_backend_pid()"))).scalar_one())


async def test_a_connection_handed_back_moments_ago_is_not_tested_again(
    pg: Database, pings: list[int]
) -> None:
    first = await backend_pid(pg)
    for _ in range(5):
        assert await backend_pid(pg) == first  # the same pooled connection
        async with pg.reading() as session:
            await session.execute(text("SELECT 1"))
    assert pings == []


async def test_a_connection_that_died_while_idle_is_replaced_before_anyone_uses_it(
    pg: Database, pings: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = await backend_pid(pg)
    _pg_admin(f"SELECT pg_terminate_backend({dead})")
    monkeypatch.setattr(db_engine, "PING_AFTER_IDLE_SECONDS", 0.0)  # it has been idle long enough

    replacement = await backend_pid(pg)  # no error reaches the caller

    assert replacement != dead
    assert len(pings) == 1


async def test_a_connection_that_died_moments_after_use_fails_one_statement_then_recovers(
    pg: Database, pings: list[int]
) -> None:
    """The trade made for not testing every checkout: the first statement on a connection that
    broke since its last use fails (the worker retries it), and SQLAlchemy then replaces every
    connection opened before the failure."""
    dead = await backend_pid(pg)
    _pg_admin(f"SELECT pg_terminate_backend({dead})")

    with pytest.raises(DBAPIError):
        await backend_pid(pg)
    assert await backend_pid(pg) != dead
    assert pings == []


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
