"""``INSERT … ON CONFLICT DO NOTHING`` for whichever database the session talks to."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession


def insert_ignoring_conflicts(session: AsyncSession, table: Any, columns: Sequence[str]) -> Any:
    """An insert into ``table`` that skips rows clashing on the unique ``columns``."""
    target: Table = table
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    if dialect == "postgresql":
        return postgresql.insert(target).on_conflict_do_nothing(index_elements=list(columns))
    return sqlite.insert(target).on_conflict_do_nothing(index_elements=list(columns))
