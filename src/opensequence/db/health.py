from __future__ import annotations

from sqlalchemy import text

from opensequence.db.engine import Database


async def ping(db: Database) -> None:
    async with db.engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
