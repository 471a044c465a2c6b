"""All SQL of runs and add-contacts. Bulk statements only: a request of 10,000 items costs a
handful of statements (chunked where a single statement would exceed the drivers' parameter
limits), never a round trip per item."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Integer, Text, Uuid, and_, bindparam, select, text, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession

from opensequence.db.bulk import sqlite_datetime, sqlite_executemany, sqlite_uuid
from opensequence.db.dialect import insert_for
from opensequence.db.types import UTCDateTime
from opensequence.models import Contact, Enrollment, Run, RunItem, SequenceStep

CHUNK = 2000


def chunks(values: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


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
    facts: dict[uuid.UUID, tuple[str | None, datetime]] = {}
    for part in chunks(contact_ids):
        rows = await session.execute(
            select(Contact.id, Contact.email, Contact.created_at).where(
                Contact.org_id == org_id, Contact.id.in_(part)
            )
        )
        for contact_id, email, created_at in rows:
            facts[contact_id] = (email, created_at)
    return facts


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
    for part in chunks(contact_ids):
        rows = await session.execute(
            select(Enrollment.contact_id, Enrollment.sequence_id).where(
                Enrollment.contact_id.in_(part), Enrollment.sequence_id.in_(wanted)
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
    new_id: Any,
) -> set[uuid.UUID]:
    """Enroll the contacts; returns those actually enrolled. The unique (sequence, contact)
    constraint decides ``already_enrolled``, also against a concurrent request enrolling the
    same contact: ``ON CONFLICT DO NOTHING RETURNING`` reports only rows this statement wrote."""
    if not contact_ids:
        return set()
    if session.get_bind().dialect.name == "postgresql":
        ids = [new_id() for _ in contact_ids]
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
    ids = [new_id() for _ in contact_ids]
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
    enrolled: set[uuid.UUID] = set()
    for part in chunks(ids):
        enrolled.update(
            await session.scalars(select(Enrollment.contact_id).where(Enrollment.id.in_(part)))
        )
    return enrolled


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

_RUN_ITEMS_UNNEST = text(
    """
    INSERT INTO run_items (run_id, item_index, input, contact_id, outcome, reason)
    SELECT :run_id, t.item_index, t.input, t.contact_id, t.outcome, t.reason
    FROM unnest(:indexes, CAST(:inputs AS jsonb[]), :contact_ids, :outcomes, :reasons)
         AS t(item_index, input, contact_id, outcome, reason)
    """
).bindparams(
    bindparam("run_id", type_=Uuid()),
    bindparam("indexes", type_=postgresql.ARRAY(Integer())),
    bindparam("inputs", type_=postgresql.ARRAY(Text())),
    bindparam("contact_ids", type_=postgresql.ARRAY(Uuid())),
    bindparam("outcomes", type_=postgresql.ARRAY(Text())),
    bindparam("reasons", type_=postgresql.ARRAY(Text())),
)


async def insert_run_items(session: AsyncSession, items: Sequence[dict[str, Any]]) -> None:
    """One row per request item (all of the same run)."""
    if not items:
        return
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(
            _RUN_ITEMS_UNNEST,
            {
                "run_id": items[0]["run_id"],
                "indexes": [item["item_index"] for item in items],
                "inputs": [json.dumps(item["input"]) for item in items],
                "contact_ids": [item["contact_id"] for item in items],
                "outcomes": [item["outcome"] for item in items],
                "reasons": [item["reason"] for item in items],
            },
        )
        return
    await session.execute(insert_for(session, RunItem.__table__), list(items))


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
) -> list[RunItem]:
    query = select(RunItem).where(RunItem.run_id == run_id, RunItem.item_index > after_index)
    if outcome is not None:
        query = query.where(RunItem.outcome == outcome)
    rows = await session.scalars(query.order_by(RunItem.item_index).limit(limit))
    return list(rows)


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
