"""Delivery history pages: tenancy (404 for other organizations) and cursors."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from opensequence.contacts.lookup import get_contact
from opensequence.db.types import iso
from opensequence.enrollments import repository
from opensequence.enrollments.schemas import EnrollmentOut, MessageOut
from opensequence.errors import Invalid
from opensequence.pagination import BAD_CURSOR, Page, decode_cursor, encode_cursor, position_uuid
from opensequence.sequences.lookup import get_sequence
from opensequence.validation import utc_moment


async def list_enrollments(
    session: AsyncSession,
    org_id: uuid.UUID,
    sequence_ref: str,
    *,
    status: str | None,
    contact_id: uuid.UUID | None,
    cursor: str | None,
    limit: int,
) -> Page[EnrollmentOut]:
    sequence = await get_sequence(session, org_id, sequence_ref)
    position = decode_cursor(cursor)
    after = position_uuid(position, "id") if position is not None else None
    rows = await repository.list_enrollments(
        session, sequence.id, status=status, contact_id=contact_id, after_id=after, limit=limit + 1
    )
    items = [
        EnrollmentOut(
            id=str(row.id),
            sequence_id=str(row.sequence_id),
            contact_id=str(row.contact_id),
            run_id=str(row.run_id),
            status=row.status,  # type: ignore[arg-type]
            current_step=row.current_step,
            next_step_at=iso(row.next_step_at) if row.status == "active" else None,
            waiting_reason=row.waiting_reason,  # type: ignore[arg-type]
            created_at=iso(row.created_at) or "",
            updated_at=iso(row.updated_at) or "",
        )
        for row in rows[:limit]
    ]
    following = encode_cursor({"id": items[-1].id}) if len(rows) > limit else None
    return Page[EnrollmentOut](items=items, next=following)


async def list_messages(
    session: AsyncSession, org_id: uuid.UUID, contact_ref: str, *, cursor: str | None, limit: int
) -> Page[MessageOut]:
    contact = await get_contact(session, org_id, contact_ref)
    position = decode_cursor(cursor)
    before = None
    if position is not None:
        try:
            created_at = datetime.fromisoformat(str(position["c"]).replace("Z", "+00:00"))
            if created_at.tzinfo is None:
                raise ValueError("no offset")
            created_at = utc_moment(created_at)
        except (KeyError, ValueError) as exc:
            raise Invalid(BAD_CURSOR) from exc
        before = (created_at, position_uuid(position, "id"))
    rows = await repository.list_messages(
        session, org_id, contact.id, before=before, limit=limit + 1
    )
    page = rows[:limit]
    items = [
        MessageOut(
            id=str(row.id),
            enrollment_id=str(row.enrollment_id),
            sequence_id=str(row.sequence_id),
            step_index=row.step_index,
            to_email=row.to_email,
            status=row.status,  # type: ignore[arg-type]
            reason=row.reason,
            message_id=row.message_id,
            attempts=row.attempts,
            created_at=iso(row.created_at) or "",
            sent_at=iso(row.sent_at),
        )
        for row in page
    ]
    following = None
    if len(rows) > limit:
        last = page[-1]
        following = encode_cursor(
            {"c": last.created_at.isoformat(timespec="microseconds"), "id": str(last.id)}
        )
    return Page[MessageOut](items=items, next=following)
