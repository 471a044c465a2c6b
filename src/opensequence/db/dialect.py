"""Dialect helpers: one spelling of ``INSERT … ON CONFLICT`` and of "column is one of these
values" for SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    Text,
    Uuid,
    any_,
    bindparam,
    func,
    literal_column,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession


def dialect_name(session: AsyncSession) -> str:
    return session.get_bind().dialect.name


def insert_for(session: AsyncSession, table: Any) -> Any:
    """``insert(table)`` of the session's dialect, which has ``on_conflict_do_nothing`` and
    ``on_conflict_do_update`` on both databases."""
    if dialect_name(session) == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def member_of(session: AsyncSession, column: Any, values: Sequence[Any]) -> ColumnElement[bool]:
    """The condition "``column`` is one of ``values``" with a single bound parameter whatever
    the number of values, so neither the driver nor SQLAlchemy handles thousands of
    placeholders (measured: that, not the database, dominated a 10,000-row resolve), and no
    statement runs into SQLite's parameter limit.

    PostgreSQL: ``column = ANY(:array)``. SQLite: ``column IN (SELECT value FROM
    json_each(:json))``, the values in their stored form (a ``Uuid`` as 32 hex digits).
    """
    if dialect_name(session) == "postgresql":
        return column == any_(bindparam(None, list(values), type_=postgresql.ARRAY(column.type)))
    stored = [value.hex for value in values] if isinstance(column.type, Uuid) else list(values)
    members: Select[Any] = select(literal_column("value")).select_from(
        func.json_each(bindparam(None, json.dumps(stored), type_=Text()))
    )
    return column.in_(members.scalar_subquery())
