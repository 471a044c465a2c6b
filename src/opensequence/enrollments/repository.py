"""SQL of the delivery history: keyset pages over indexed orders, never OFFSET."""

from __future__ import annotations

import uuid
from collections.abc import Sequence as Seq
from datetime import datetime

from sqlalchemy import ColumnElement, and_, exists, or_, select, update
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
