"""Find a sequence of an organization by id or custom_id (every ``{sequence_id}`` path)."""

from __future__ import annotations

import uuid

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession

from opensequence.errors import NotFound
from opensequence.models import Sequence


def parse_uuid(value: str) -> uuid.UUID | None:
    """A UUID in any case (SPEC §1), or None."""
    try:
        return uuid.UUID(value) if len(value) == 36 else None
    except ValueError:
        return None


async def get_sequence(
    session: AsyncSession,
    org_id: uuid.UUID,
    ref: str,
    *,
    lock: str | None = None,
    for_update: bool = False,
) -> Sequence:
    """The sequence whose id or custom_id is ``ref``; another organization's → NotFound.

    An id wins over a custom_id that happens to spell the same UUID. ``lock`` ("update" or
    "share") locks the row on PostgreSQL: writers that change a sequence's state take
    "update", writers that only add to it take "share" (SQLite already serialises writers).
    """
    if for_update:
        lock = "update"
    as_id = parse_uuid(ref)
    found: Sequence | None = None
    if as_id is not None:
        found = await session.scalar(
            _locked(select(Sequence).where(Sequence.org_id == org_id, Sequence.id == as_id), lock)
        )
    if found is None:
        found = await session.scalar(
            _locked(
                select(Sequence).where(Sequence.org_id == org_id, Sequence.custom_id == ref), lock
            )
        )
    if found is None:
        raise NotFound(f"sequence {ref!r} not found")
    return found


def _locked(query: Select[Sequence], lock: str | None) -> Select[Sequence]:
    if lock == "update":
        return query.with_for_update()
    if lock == "share":
        return query.with_for_update(read=True)
    return query
