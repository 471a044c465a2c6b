"""All SQL of runs and add-contacts. Bulk statements only: a request of 10,000 items costs a
handful of statements (lists of values bound as one parameter, see ``db.dialect.member_of``),
never a round trip per item."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import Uuid, and_, bindparam, insert, select, text, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession

from opensequence.db.bulk import sqlite_datetime, sqlite_executemany, sqlite_uuid
from opensequence.db.dialect import member_of
from opensequence.db.types import UTCDateTime, new_ids
from opensequence.models import Contact, Enrollment, Run, RunItemPage, SequenceStep
from opensequence.runs.pages import OUTCOME_BITS, StoredItem, pack, select_items


async def first_step_delay(session: AsyncSession, sequence_id: uuid.UUID) -> float:
    delay = await session.scalar(
        select(SequenceStep.delay_in_minutes).where(
            SequenceStep.sequence_id == sequence_id, SequenceStep.step_index == 0
        )
    )
    return float(delay or 0.0)


async def contact_facts(
    session: AsyncSession, org_id: uuid.UUID, contact_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, tuple[str | None, datetime]]:
    """``id → (email, created_at)`` for the given contacts of the organization."""
    if not contact_ids:
        return {}
    rows = await session.execute(
        select(Contact.id, Contact.email, Contact.created_at).where(
            Contact.org_id == org_id, member_of(session, Contact.id, contact_ids)
        )
    )
    return {contact_id: (email, created_at) for contact_id, email, created_at in rows}


async def enrolled_sequences(
    session: AsyncSession,
    contact_ids: Sequence[uuid.UUID],
    sequence_ids: Iterable[uuid.UUID],
) -> dict[uuid.UUID, set[uuid.UUID]]:
    """For ``contacts_affected_by_sequence``: which of the given sequences each contact was ever
    enrolled in (any status)."""
    wanted = list(sequence_ids)
    found: dict[uuid.UUID, set[uuid.UUID]] = {}
    if not wanted or not contact_ids:
        return found
    rows = await session.execute(
        select(Enrollment.contact_id, Enrollment.sequence_id).where(
            member_of(session, Enrollment.contact_id, contact_ids),
            Enrollment.sequence_id.in_(wanted),
        )
    )
    for contact_id, sequence_id in rows:
        found.setdefault(contact_id, set()).add(sequence_id)
    return found


async def insert_run(
    session: AsyncSession,
    *,
    org_id: uuid.UUID,
    sequence_id: uuid.UUID,
    kind: str,
    total: int,
    now: datetime,
) -> uuid.UUID:
    run = Run(
        org_id=org_id, sequence_id=sequence_id, kind=kind, total=total, counts={}, created_at=now
    )
    session.add(run)
    await session.flush()
    return run.id


async def set_run_totals(
    session: AsyncSession, run_id: uuid.UUID, total: int, counts: dict[str, int]
) -> None:
    await session.execute(
        update(Run).where(Run.id == run_id).values(total=total, counts=dict(counts))
    )


async def insert_enrollments(
    session: AsyncSession,
    *,
    org_id: uuid.UUID,
    sequence_id: uuid.UUID,
    run_id: uuid.UUID,
    contact_ids: Sequence[uuid.UUID],
    due_at: datetime,
    now: datetime,
) -> set[uuid.UUID]:
    """Enroll the contacts; returns those actually enrolled. The unique (sequence, contact)
    constraint decides ``already_enrolled``, also against a concurrent request enrolling the
    same contact: ``ON CONFLICT DO NOTHING RETURNING`` reports only rows this statement wrote."""
    if not contact_ids:
        return set()
    if session.get_bind().dialect.name == "postgresql":
        ids = new_ids(len(contact_ids))
        result = await session.execute(
            _ENROLL_UNNEST,
            {
                "ids": ids,
                "contact_ids": list(contact_ids),
                "org_id": org_id,
                "sequence_id": sequence_id,
                "run_id": run_id,
                "due_at": due_at,
                "now": now,
            },
        )
        return set(result.scalars())
    # SQLite: the driver's executemany with values converted once per column. A contact
    # already in the sequence hits the unique (sequence, contact) constraint and is skipped;
    # when that happened the ids that did get written are read back.
    ids = new_ids(len(contact_ids))
    org, sequence, run = sqlite_uuid(org_id), sqlite_uuid(sequence_id), sqlite_uuid(run_id)
    due, stamp = sqlite_datetime(due_at), sqlite_datetime(now)
    written = await sqlite_executemany(
        session,
        "enrollments",
        _ENROLLMENT_COLUMNS,
        [
            (
                enrollment_id.hex,
                org,
                sequence,
                contact_id.hex,
                run,
                None,
                "active",
                0,
                due,
                None,
                0,
                None,
                None,
                stamp,
                stamp,
            )
            for enrollment_id, contact_id in zip(ids, contact_ids, strict=True)
        ],
    )
    if written == len(ids):
        return set(contact_ids)
    written_ids = select(Enrollment.contact_id).where(member_of(session, Enrollment.id, ids))
    return set(await session.scalars(written_ids))


_ENROLLMENT_COLUMNS = (
    "id",
    "org_id",
    "sequence_id",
    "contact_id",
    "run_id",
    "run_index",
    "status",
    "current_step",
    "next_step_at",
    "waiting_reason",
    "attempts",
    "locked_until",
    "locked_by",
    "created_at",
    "updated_at",
)


# PostgreSQL: one statement with two array parameters whatever the number of rows (psycopg
# spends more time rewriting thousands of placeholders than the server spends inserting).
_ENROLL_UNNEST = (
    text(
        """
    INSERT INTO enrollments (id, org_id, sequence_id, contact_id, run_id, run_index, status,
                             current_step, next_step_at, waiting_reason, attempts,
                             locked_until, locked_by, created_at, updated_at)
    SELECT t.id, :org_id, :sequence_id, t.contact_id, :run_id, NULL, 'active',
           0, :due_at, NULL, 0, NULL, NULL, :now, :now
    FROM unnest(:ids, :contact_ids) AS t(id, contact_id)
    ON CONFLICT (sequence_id, contact_id) DO NOTHING
    RETURNING contact_id
    """
    )
    .bindparams(
        bindparam("ids", type_=postgresql.ARRAY(Uuid())),
        bindparam("contact_ids", type_=postgresql.ARRAY(Uuid())),
        bindparam("org_id", type_=Uuid()),
        bindparam("sequence_id", type_=Uuid()),
        bindparam("run_id", type_=Uuid()),
        bindparam("due_at", type_=UTCDateTime()),
        bindparam("now", type_=UTCDateTime()),
    )
    .columns(contact_id=Uuid())
)


async def insert_run_items(
    session: AsyncSession, run_id: uuid.UUID, items: list[StoredItem]
) -> None:
    """The items (ascending indexes, all of one run) as pages: ten rows for 10,000 items."""
    if not items:
        return
    await session.execute(
        insert(RunItemPage),
        [
            {
                "run_id": run_id,
                "first_index": page.first_index,
                "last_index": page.last_index,
                "outcomes": page.outcomes,
                "items": page.items,
            }
            for page in pack(items)
        ],
    )


# Pages read per round trip while filling one listing page.
_PAGES_PER_READ = 4


async def get_run(
    session: AsyncSession, org_id: uuid.UUID, sequence_id: uuid.UUID, run_id: uuid.UUID
) -> Run | None:
    result: Run | None = await session.scalar(
        select(Run).where(Run.id == run_id, Run.org_id == org_id, Run.sequence_id == sequence_id)
    )
    return result


async def list_run_items(
    session: AsyncSession,
    run_id: uuid.UUID,
    *,
    outcome: str | None,
    after_index: int,
    limit: int,
) -> list[StoredItem]:
    """Up to ``limit`` items past ``after_index`` in request order; only pages past the cursor
    that hold ``outcome`` are read."""
    query = select(RunItemPage.first_index, RunItemPage.items).where(
        RunItemPage.run_id == run_id, RunItemPage.last_index > after_index
    )
    if outcome is not None:
        query = query.where(RunItemPage.outcomes.op("&")(OUTCOME_BITS[outcome]) != 0)
    found: list[StoredItem] = []
    after_page = -1
    while len(found) < limit:
        rows = (
            await session.execute(
                query.where(RunItemPage.first_index > after_page)
                .order_by(RunItemPage.first_index)
                .limit(_PAGES_PER_READ)
            )
        ).all()
        if not rows:
            break
        found += select_items(
            [text for _, text in rows],
            after_index=after_index,
            outcome=outcome,
            limit=limit - len(found),
        )
        after_page = rows[-1][0]
    return found


async def list_start_run_items(
    session: AsyncSession, run_id: uuid.UUID, *, after_index: int, limit: int
) -> list[tuple[int, uuid.UUID]]:
    """A start run's items are its enrollments, in ``run_index`` order."""
    rows = await session.execute(
        select(Enrollment.run_index, Enrollment.contact_id)
        .where(and_(Enrollment.run_id == run_id, Enrollment.run_index > after_index))
        .order_by(Enrollment.run_index)
        .limit(limit)
    )
    return [(index, contact_id) for index, contact_id in rows if index is not None]
