"""SQLite: a process's transactions take the single write lock in turn, in the order they asked
for it, instead of polling for it in SQLite's busy handler (``Database.transaction``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from opensequence.db import Database
from opensequence.db import engine as db_engine
from tests.conftest import BACKENDS

pytestmark = pytest.mark.skipif("sqlite" not in BACKENDS, reason="SQLite only")


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'turns.db'}")
    async with database.transaction() as session:
        await session.execute(text("CREATE TABLE log (position INTEGER, who INTEGER)"))
    yield database
    await database.dispose()


async def test_transactions_take_the_write_lock_in_the_order_they_asked(db: Database) -> None:
    """Twelve writers start while a first one holds the lock. Each gets it as soon as the one
    before it commits, in the order they asked: with the busy handler's polling, waiters
    slept up to 100 ms at a time and newcomers could overtake them."""
    order: list[int] = []
    holding = asyncio.Event()

    async def writer(who: int, hold: float) -> None:
        async with db.transaction() as session:
            holding.set()
            count = (await session.execute(text("SELECT count(*) FROM log"))).scalar_one()
            await session.execute(
                text("INSERT INTO log VALUES (:position, :who)"), {"position": count, "who": who}
            )
            order.append(who)
            await asyncio.sleep(hold)

    first = asyncio.create_task(writer(0, 0.2))
    await holding.wait()
    started = time.monotonic()
    waiters = []
    for who in range(1, 13):
        waiters.append(asyncio.create_task(writer(who, 0.01)))
        await asyncio.sleep(0.001)  # each asks before the next
    await asyncio.gather(first, *waiters)
    elapsed = time.monotonic() - started

    assert order == list(range(13))
    async with db.transaction() as session:
        rows = (await session.execute(text("SELECT position, who FROM log"))).all()
    assert sorted(rows) == [(i, i) for i in range(13)], "each saw all earlier commits"
    # 0.2 s held by the first, then 12 x 10 ms: far below what a single 100 ms busy-handler
    # sleep per waiter would add; generous, the machine is shared.
    assert elapsed < 5.0


async def test_a_transaction_held_past_the_busy_timeout_fails_the_waiter(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The in-process queue keeps SQLite's bound: a writer that cannot get the lock within
    the busy timeout fails with ``database is locked``, as SQLite's own wait would."""
    monkeypatch.setattr(db_engine, "SQLITE_BUSY_SECONDS", 0.2)
    held = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with db.transaction() as session:
            await session.execute(text("INSERT INTO log VALUES (0, 0)"))
            held.set()
            await release.wait()

    task = asyncio.create_task(holder())
    await held.wait()
    with pytest.raises(OperationalError, match="database is locked"):
        async with db.transaction() as session:
            await session.execute(text("INSERT INTO log VALUES (1, 1)"))
    release.set()
    await task
    async with db.transaction() as session:
        assert (await session.execute(text("SELECT who FROM log"))).scalars().all() == [0]


async def test_a_transaction_inside_another_does_not_wait_on_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transaction opened inside another of the same database, in the same task, cannot
    have the lock its own outer transaction holds. It does not queue behind itself forever:
    it goes straight to SQLite and fails after the busy timeout, as before the queue."""
    monkeypatch.setattr(db_engine, "SQLITE_BUSY_SECONDS", 0.2)
    database = Database(f"sqlite:///{tmp_path / 'nested.db'}")
    try:
        async with database.transaction() as outer:
            await outer.execute(text("CREATE TABLE t (x INTEGER)"))
            started = time.monotonic()
            with pytest.raises(OperationalError, match="database is locked"):
                async with database.transaction() as inner:
                    await inner.execute(text("INSERT INTO t VALUES (1)"))
            assert time.monotonic() - started < 10.0
        async with database.transaction() as session:
            assert (await session.execute(text("SELECT count(*) FROM t"))).scalar_one() == 0
    finally:
        await database.dispose()
