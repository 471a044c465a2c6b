"""SQL of the delivery history: keyset pages over indexed orders, never OFFSET."""

from __future__ import annotations

import uuid
from collections.abc import Sequence as Seq
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, exists, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from opensequence.models import Enrollment, Message


def unheld_send(now: datetime) -> ColumnElement[bool]:
    """A send record still ``sending`` that no worker holds: waiting for its retry, or left
    unsent by a worker that stopped and released its claim. A cancel or a contact deletion
    settles these (nothing else would: the enrollment is never claimed again); a held one is
    settled by its worker, which finds the enrollment ended or records what it sent."""
    held = exists().where(
        Enrollment.id == Message.enrollment_id,
        Enrollment.locked_by.is_not(None),
        Enrollment.locked_until > now,
    )
    return and_(Message.status == "sending", ~held)


async def settle_released(session: AsyncSession, theirs: Select[Any], now: datetime) -> None:
    """The second pass of a stop (a cancel, a contact deletion) over the send records of the
    enrollments ``theirs``, once it has canceled them and before it clears their leases.

    The first pass ran before, while the leases still told which records a worker holds. A
    worker recording a retry at that moment still held its claim, and settled nothing itself
    (the enrollment was active in its snapshot); the stop's enrollment ``UPDATE`` then waited
    for that worker's commit, and the record stayed ``sending`` for good. Read again now, it is
    no longer held. Records a worker has locked now are skipped (``SKIP LOCKED``): that worker
    settles them once it finds the enrollment ended, and waiting for them could deadlock (it
    may be waiting for the enrollments this transaction holds)."""
    ids = (
        select(Message.id)
        .where(unheld_send(now), Message.enrollment_id.in_(theirs))
        .with_for_update(skip_locked=True)
    )
    await session.execute(
        update(Message)
        .where(Message.id.in_(ids))
        .values(status="skipped", reason="canceled", updated_at=now)
        .execution_options(synchronize_session=False)
    )


async def clear_leases(session: AsyncSession, theirs: Select[Any]) -> None:
    """The last step of a stop: the workers holding any of the enrollments ``theirs`` lose
    their leases (their writes are guarded by ``status = 'active'`` as well)."""
    await session.execute(
        update(Enrollment)
        .where(Enrollment.id.in_(theirs), Enrollment.locked_by.is_not(None))
        .values(locked_until=None, locked_by=None)
        .execution_options(synchronize_session=False)
    )


async def wake_waiting(
    session: AsyncSession,
    reason: str,
    now: datetime,
    *,
    org_id: uuid.UUID | None = None,
    sequence_id: uuid.UUID | None = None,
    due_by: datetime | None = None,
) -> int:
    """Make the active enrollments waiting for ``reason`` (``throttled``, ``outside_window``)
    of an organization or a sequence due now: what they wait for changed (a limit lifted, a
    window removed), and the instant they were given was computed from the old one. The
    worker decides again; those still held back wait again. ``due_by`` bounds how far ahead
    they can be due: the scan then reads that range of the due index, not the table."""
    query = update(Enrollment).where(
        Enrollment.status == "active",
        Enrollment.waiting_reason == reason,
        Enrollment.next_step_at > now,
    )
    if due_by is not None:
        query = query.where(Enrollment.next_step_at <= due_by)
    if org_id is not None:
        query = query.where(Enrollment.org_id == org_id)
    if sequence_id is not None:
        query = query.where(Enrollment.sequence_id == sequence_id)
    result = await session.execute(
        query.values(next_step_at=now, waiting_reason=None, updated_at=now).execution_options(
            synchronize_session=False
        )
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


async def list_enrollments(
    session: AsyncSession,
    sequence_id: uuid.UUID,
    *,
    status: str | None,
    contact_id: uuid.UUID | None,
    after_id: uuid.UUID | None,
    limit: int,
) -> Seq[Enrollment]:
    """Oldest first by id (UUIDv7: creation order, unique), so a cursor is just the last id."""
    query = select(Enrollment).where(Enrollment.sequence_id == sequence_id)
    if status is not None:
        query = query.where(Enrollment.status == status)
    if contact_id is not None:
        query = query.where(Enrollment.contact_id == contact_id)
    if after_id is not None:
        query = query.where(Enrollment.id > after_id)
    return (await session.scalars(query.order_by(Enrollment.id).limit(limit))).all()


async def list_messages(
    session: AsyncSession,
    org_id: uuid.UUID,
    contact_id: uuid.UUID,
    *,
    before: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> Seq[Message]:
    """Newest first by (created_at, id) — the ``ix_messages_contact_id_created_at`` order."""
    query = select(Message).where(Message.org_id == org_id, Message.contact_id == contact_id)
    if before is not None:
        created_at, row_id = before
        query = query.where(
            or_(
                Message.created_at < created_at,
                (Message.created_at == created_at) & (Message.id < row_id),
            )
        )
    query = query.order_by(Message.created_at.desc(), Message.id.desc()).limit(limit)
    return (await session.scalars(query)).all()
