"""All SQL for contacts. Bulk helpers take whole collections, so a 10,000-item resolve is a
handful of statements on both databases (DESIGN rule 2): lookups bind one array (PostgreSQL)
or one JSON text (SQLite) whatever the number of values, inserts bind arrays (PostgreSQL) or
go through the driver's ``executemany`` (SQLite).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    DateTime,
    Select,
    Text,
    Uuid,
    and_,
    bindparam,
    case,
    delete,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession

from opensequence.db.bulk import sqlite_datetime, sqlite_executemany, sqlite_uuid
from opensequence.db.dialect import member_of
from opensequence.enrollments.repository import clear_leases, settle_released, unheld_send
from opensequence.models import Contact, Enrollment, Message

T = TypeVar("T")

# PostgreSQL's unnest insert binds arrays, not rows; chunks only bound the statement's memory.
UNNEST_CHUNK = 10_000


def chunked(values: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _is_postgresql(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


async def existing_ids(
    session: AsyncSession, org_id: uuid.UUID, ids: Iterable[uuid.UUID]
) -> set[uuid.UUID]:
    wanted = sorted(set(ids))
    if not wanted:
        return set()
    condition = member_of(session, Contact.id, wanted)
    return set(await session.scalars(select(Contact.id).where(Contact.org_id == org_id, condition)))


async def _ids_by(
    session: AsyncSession, org_id: uuid.UUID, column: Any, keys: Iterable[str]
) -> dict[str, uuid.UUID]:
    """``key → id`` for those of ``keys`` found in ``column`` within the organization."""
    wanted = sorted(set(keys))
    if not wanted:
        return {}
    rows = await session.execute(
        select(column, Contact.id).where(
            Contact.org_id == org_id, member_of(session, column, wanted)
        )
    )
    return {str(key): contact_id for key, contact_id in rows}


async def ids_by_email(
    session: AsyncSession, org_id: uuid.UUID, normalized: Iterable[str]
) -> dict[str, uuid.UUID]:
    """``email_normalized → id`` for those of ``normalized`` that exist in the organization."""
    return await _ids_by(session, org_id, Contact.email_normalized, normalized)


async def ids_by_phone(
    session: AsyncSession, org_id: uuid.UUID, phones: Iterable[str]
) -> dict[str, uuid.UUID]:
    """``phone_number → id`` for those of ``phones`` (already normalized) that exist."""
    return await _ids_by(session, org_id, Contact.phone_number, phones)


@dataclass(slots=True)
class NewContact:
    """A contact to insert, with its pre-generated id and already-normalized identifiers."""

    id: uuid.UUID
    email: str | None
    email_normalized: str | None
    phone_number: str | None
    name: str | None
    custom_data: dict[str, Any] = field(default_factory=dict)


_CONTACT_COLUMNS = (
    "id",
    "org_id",
    "email",
    "email_normalized",
    "phone_number",
    "name",
    "custom_data",
    "created_at",
    "updated_at",
)


async def insert_contacts_ignoring_conflicts(
    session: AsyncSession, org_id: uuid.UUID, rows: Sequence[NewContact], *, now: datetime
) -> set[uuid.UUID]:
    """Insert ``rows`` with ``ON CONFLICT DO NOTHING`` on any unique constraint; returns the
    ids that were actually inserted.

    Concurrency: on PostgreSQL a row whose email or phone another transaction inserted but has
    not committed yet makes this statement wait for that transaction; it is then skipped (the
    other committed) or inserted (the other rolled back). Either way a re-select afterwards (a
    new READ COMMITTED snapshot) finds exactly one contact. On SQLite writers are serialised by
    ``BEGIN IMMEDIATE``, so no conflict can appear between the caller's select and this insert;
    the driver's ``executemany`` writes the rows and, should the count fall short, the ids that
    made it are read back.
    """
    if not rows:
        return set()
    if _is_postgresql(session):
        return await _insert_contacts_unnest(session, org_id, rows, now)
    org, stamp = sqlite_uuid(org_id), sqlite_datetime(now)
    written = await sqlite_executemany(
        session,
        "contacts",
        _CONTACT_COLUMNS,
        [
            (
                row.id.hex,
                org,
                row.email,
                row.email_normalized,
                row.phone_number,
                row.name,
                json.dumps(row.custom_data),
                stamp,
                stamp,
            )
            for row in rows
        ],
    )
    if written == len(rows):
        return {row.id for row in rows}
    return await existing_ids(session, org_id, [row.id for row in rows])


_UNNEST_INSERT = (
    text(
        """
    INSERT INTO contacts (id, org_id, email, email_normalized, phone_number, name,
                          custom_data, created_at, updated_at)
    SELECT t.id, t.org_id, t.email, t.email_normalized, t.phone_number, t.name,
           t.custom_data, t.created_at, t.updated_at
    FROM unnest(:ids, :org_ids, :emails, :email_normalized, :phones, :names,
                CAST(:custom_data AS jsonb[]), :created_at, :updated_at)
         AS t(id, org_id, email, email_normalized, phone_number, name,
              custom_data, created_at, updated_at)
    ON CONFLICT DO NOTHING
    RETURNING id
    """
    )
    .bindparams(
        bindparam("ids", type_=postgresql.ARRAY(Uuid())),
        bindparam("org_ids", type_=postgresql.ARRAY(Uuid())),
        bindparam("emails", type_=postgresql.ARRAY(Text())),
        bindparam("email_normalized", type_=postgresql.ARRAY(Text())),
        bindparam("phones", type_=postgresql.ARRAY(Text())),
        bindparam("names", type_=postgresql.ARRAY(Text())),
        bindparam("custom_data", type_=postgresql.ARRAY(Text())),
        bindparam("created_at", type_=postgresql.ARRAY(DateTime(timezone=True))),
        bindparam("updated_at", type_=postgresql.ARRAY(DateTime(timezone=True))),
    )
    .columns(id=Uuid())
)


async def _insert_contacts_unnest(
    session: AsyncSession, org_id: uuid.UUID, rows: Sequence[NewContact], now: datetime
) -> set[uuid.UUID]:
    """PostgreSQL: one ``INSERT … SELECT FROM unnest(arrays)`` per chunk — nine array
    parameters instead of nine per row, so statement size no longer grows with the batch."""
    inserted: set[uuid.UUID] = set()
    for part in chunked(rows, UNNEST_CHUNK):
        result = await session.execute(
            _UNNEST_INSERT,
            {
                "ids": [row.id for row in part],
                "org_ids": [org_id] * len(part),
                "emails": [row.email for row in part],
                "email_normalized": [row.email_normalized for row in part],
                "phones": [row.phone_number for row in part],
                "names": [row.name for row in part],
                "custom_data": [json.dumps(row.custom_data) for row in part],
                "created_at": [now] * len(part),
                "updated_at": [now] * len(part),
            },
        )
        inserted.update(result.scalars())
    return inserted


def list_query(
    org_id: uuid.UUID,
    *,
    after_id: uuid.UUID | None,
    created_after: datetime | None,
    created_before: datetime | None,
    updated_after: datetime | None,
    updated_before: datetime | None,
    email_normalized: str | None,
    phone_number: str | None,
    limit: int,
) -> Select[Any]:
    """Contacts ordered by id (UUIDv7, time-ordered and unique): keyset pagination on the id
    never repeats or skips a row, whatever is inserted meanwhile."""
    conditions: list[ColumnElement[bool]] = [Contact.org_id == org_id]
    if after_id is not None:
        conditions.append(Contact.id > after_id)
    if created_after is not None:
        conditions.append(Contact.created_at >= created_after)
    if created_before is not None:
        conditions.append(Contact.created_at <= created_before)
    if updated_after is not None:
        conditions.append(Contact.updated_at >= updated_after)
    if updated_before is not None:
        conditions.append(Contact.updated_at <= updated_before)
    if email_normalized is not None:
        conditions.append(Contact.email_normalized == email_normalized)
    if phone_number is not None:
        conditions.append(Contact.phone_number == phone_number)
    return select(Contact).where(and_(*conditions)).order_by(Contact.id).limit(limit)


async def list_contacts(session: AsyncSession, query: Select[Any]) -> list[Contact]:
    return list(await session.scalars(query))


async def owners_of(
    session: AsyncSession,
    org_id: uuid.UUID,
    *,
    email_normalized: str | None,
    phone_number: str | None,
) -> list[Contact]:
    """Contacts holding this email or phone (0, 1 or 2 rows), locked on PostgreSQL so a
    concurrent PATCH/POST of the same contact waits instead of overwriting blindly."""
    matches: list[ColumnElement[bool]] = []
    if email_normalized is not None:
        matches.append(Contact.email_normalized == email_normalized)
    if phone_number is not None:
        matches.append(Contact.phone_number == phone_number)
    if not matches:
        return []
    query = (
        select(Contact)
        .where(Contact.org_id == org_id, or_(*matches))
        .order_by(Contact.id)
        .with_for_update()
    )
    return list(await session.scalars(query))


async def lock_contact(
    session: AsyncSession, org_id: uuid.UUID, contact_id: uuid.UUID
) -> Contact | None:
    return await session.scalar(
        select(Contact).where(Contact.org_id == org_id, Contact.id == contact_id).with_for_update()
    )


async def delete_contact(
    session: AsyncSession, org_id: uuid.UUID, contact_id: uuid.UUID, *, now: datetime
) -> None:
    """Cancel the contact's active enrollments, drop its address from delivery history, delete
    the row: a few statements in the caller's transaction, so a worker either sees the contact
    with its enrollments active or sees them canceled and the contact gone.

    A worker that already claimed one of these enrollments (lease in ``locked_until``) loses
    the lease here; its guarded completion must check ``status = 'active'``.
    """
    # Messages first, the order in which the worker writes (the other order deadlocked with a
    # worker recording outcomes: a 500), and while the leases still tell which send records a
    # worker holds: those no worker holds are settled here (see unheld_send).
    unheld = unheld_send(now)
    await session.execute(
        update(Message)
        .where(Message.org_id == org_id, Message.contact_id == contact_id)
        .values(
            to_email=None,
            status=case((unheld, "skipped"), else_=Message.status),
            reason=case((unheld, "canceled"), else_=Message.reason),
            updated_at=now,
        )
    )
    await session.execute(
        update(Enrollment)
        .where(
            Enrollment.org_id == org_id,
            Enrollment.contact_id == contact_id,
            Enrollment.status == "active",
        )
        .values(status="canceled", next_step_at=None, waiting_reason=None, updated_at=now)
    )
    theirs = select(Enrollment.id).where(
        Enrollment.org_id == org_id, Enrollment.contact_id == contact_id
    )
    await settle_released(session, theirs, now)
    # Records a worker committed since the first pass (a send being prepared) and those just
    # settled lose the address too: the first pass could not see them, and a send already
    # handed over is then recorded ``sent`` with it. Rows a worker holds locked are skipped (it
    # may wait for the enrollments this transaction holds); a worker that finds the contact
    # gone drops it itself.
    mine = (
        select(Message.id)
        .where(
            Message.org_id == org_id,
            Message.contact_id == contact_id,
            Message.to_email.is_not(None),
        )
        .with_for_update(skip_locked=True)
    )
    await session.execute(
        update(Message)
        .where(Message.id.in_(mine))
        .values(to_email=None)
        .execution_options(synchronize_session=False)
    )
    await clear_leases(session, theirs)
    await session.execute(delete(Contact).where(Contact.org_id == org_id, Contact.id == contact_id))
