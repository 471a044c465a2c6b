"""All SQL of suppressions and sender limits."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import delete, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from opensequence.db.dialect import dialect_name, insert_for
from opensequence.models import SenderLimit, Suppression


async def get_suppression(
    session: AsyncSession, org_id: uuid.UUID, normalized: str
) -> Suppression | None:
    found: Suppression | None = await session.get(Suppression, (org_id, normalized))
    return found


async def upsert_suppression(
    session: AsyncSession,
    org_id: uuid.UUID,
    email: str,
    normalized: str,
    reason: str,
    now: datetime,
) -> None:
    statement = insert_for(session, Suppression).values(
        org_id=org_id, email_normalized=normalized, email=email, reason=reason, created_at=now
    )
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=["org_id", "email_normalized"], set_={"reason": reason}
        )
    )


async def delete_suppression(session: AsyncSession, org_id: uuid.UUID, normalized: str) -> bool:
    result = await session.execute(
        delete(Suppression).where(
            Suppression.org_id == org_id, Suppression.email_normalized == normalized
        )
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def list_suppressions(
    session: AsyncSession, org_id: uuid.UUID, *, after: str | None, limit: int
) -> list[Suppression]:
    query = select(Suppression).where(Suppression.org_id == org_id)
    if after is not None:
        query = query.where(Suppression.email_normalized > after)
    rows = await session.scalars(query.order_by(Suppression.email_normalized).limit(limit))
    return list(rows)


async def suppression_reasons(
    session: AsyncSession, org_id: uuid.UUID, normalized: Sequence[str]
) -> dict[str, str]:
    """``normalized email → reason`` for those of the addresses that are suppressed."""
    if not normalized:
        return {}
    rows = await session.execute(
        select(Suppression.email_normalized, Suppression.reason).where(
            Suppression.org_id == org_id, Suppression.email_normalized.in_(list(normalized))
        )
    )
    return {email: reason for email, reason in rows}


async def upsert_bounced(
    session: AsyncSession, rows: Sequence[tuple[uuid.UUID, str, str]], now: datetime
) -> None:
    """Suppress ``(org_id, email, normalized)`` as ``bounced`` in one statement. ``bounced`` is
    the strongest reason, so an existing entry simply takes it (keeping its ``created_at``)."""
    if not rows:
        return
    statement = insert_for(session, Suppression).values(
        [
            {
                "org_id": org_id,
                "email_normalized": normalized,
                "email": email,
                "reason": "bounced",
                "created_at": now,
            }
            for org_id, email, normalized in rows
        ]
    )
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=["org_id", "email_normalized"], set_={"reason": "bounced"}
        )
    )


def _sender_lock_id(org_id: uuid.UUID, sender: str) -> int:
    digest = hashlib.blake2b(f"{org_id}:{sender}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def lock_senders(session: AsyncSession, keys: Iterable[tuple[uuid.UUID, str]]) -> None:
    """Hold the (organization, sender) limits ``keys`` until the transaction ends, in a fixed
    order (no deadlock between two transactions locking overlapping sets).

    Whoever changes a limit and whoever counts sends against it take this lock (PostgreSQL:
    ``pg_advisory_xact_lock``; SQLite's single writer serialises them already). The worker's
    count, the waits it writes and its ``sending`` rows then commit wholly before or wholly
    after a limit changes: a ``DELETE`` that committed while a worker held sends back under
    the old limit woke nothing (its wake could not see the waits yet), and those sends waited
    out the old window, up to a day."""
    if dialect_name(session) != "postgresql":
        return
    for org_id, sender in sorted(set(keys), key=str):
        await session.execute(
            text("SELECT pg_advisory_xact_lock(:id)"), {"id": _sender_lock_id(org_id, sender)}
        )


async def upsert_sender_limit(
    session: AsyncSession,
    org_id: uuid.UUID,
    sender: str,
    limits: dict[str, int | None],
    now: datetime,
) -> None:
    statement = insert_for(session, SenderLimit).values(
        org_id=org_id, sender=sender, created_at=now, **limits
    )
    await session.execute(
        statement.on_conflict_do_update(index_elements=["org_id", "sender"], set_=limits)
    )


async def get_sender_limit(
    session: AsyncSession, org_id: uuid.UUID, sender: str
) -> SenderLimit | None:
    found: SenderLimit | None = await session.get(SenderLimit, (org_id, sender))
    return found


async def delete_sender_limit(session: AsyncSession, org_id: uuid.UUID, sender: str) -> bool:
    result = await session.execute(
        delete(SenderLimit).where(SenderLimit.org_id == org_id, SenderLimit.sender == sender)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def list_sender_limits(
    session: AsyncSession, org_id: uuid.UUID, *, after: str | None, limit: int
) -> list[SenderLimit]:
    query = select(SenderLimit).where(SenderLimit.org_id == org_id)
    if after is not None:
        query = query.where(SenderLimit.sender > after)
    rows = await session.scalars(query.order_by(SenderLimit.sender).limit(limit))
    return list(rows)
