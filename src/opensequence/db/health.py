from __future__ import annotations

from sqlalchemy import text

from opensequence.db.engine import Database


async def ping(db: Database) -> None:
    """A round trip to the database. A read: on SQLite it does not wait for the writer, so a
    readiness probe keeps answering while a long write (a sequence start, a worker's batch)
    holds the lock."""
    async with db.reading() as session:
        await session.execute(text("SELECT 1"))
