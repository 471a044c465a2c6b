"""All SQL of the sequences package."""

from __future__ import annotations

import uuid
from collections.abc import Sequence as Seq
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Integer,
    Uuid,
    bindparam,
    case,
    cast,
    delete,
    exists,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from opensequence.clock import LATEST, minutes_after
from opensequence.db.types import UTCDateTime
from opensequence.enrollments.repository import clear_leases, settle_released, unheld_send
from opensequence.filters import CompositeFilter, compile_filter
from opensequence.models import Contact, Enrollment, Message, Run, Sequence, SequenceStep


async def custom_id_taken(
    session: AsyncSession, org_id: uuid.UUID, custom_id: str, exclude: uuid.UUID | None = None
) -> bool:
    query = select(Sequence.id).where(Sequence.org_id == org_id, Sequence.custom_id == custom_id)
    if exclude is not None:
        query = query.where(Sequence.id != exclude)
    return (await session.scalar(query.limit(1))) is not None


async def load_steps(
    session: AsyncSession, sequence_ids: Seq[uuid.UUID]
) -> dict[uuid.UUID, list[SequenceStep]]:
    """Steps of many sequences in one query, each list in step order."""
    found: dict[uuid.UUID, list[SequenceStep]] = {sid: [] for sid in sequence_ids}
    if not sequence_ids:
        return found
    rows = await session.scalars(
        select(SequenceStep)
        .where(SequenceStep.sequence_id.in_(list(sequence_ids)))
        .order_by(SequenceStep.sequence_id, SequenceStep.step_index)
    )
    for step in rows:
        found[step.sequence_id].append(step)
    return found


async def replace_steps(
    session: AsyncSession, sequence_id: uuid.UUID, steps: list[dict[str, Any]]
) -> dict[int, float]:
    """Give the sequence exactly ``steps`` (``action``, ``delay_in_minutes``); returns the
    delays it had, by position.

    Positions that still exist keep their ``started_at``/``ended_at`` (their history); rows past
    the new length are deleted. Enrollments keep their ``current_step`` untouched, so contacts
    keep their position and run the steps they have not reached yet as edited (for the waits
    already computed, see :func:`reschedule_waiting`).
    """
    existing = {
        row.step_index: row
        for row in await session.scalars(
            select(SequenceStep).where(SequenceStep.sequence_id == sequence_id)
        )
    }
    delays = {index: float(row.delay_in_minutes) for index, row in existing.items()}
    await session.execute(
        delete(SequenceStep).where(
            SequenceStep.sequence_id == sequence_id, SequenceStep.step_index >= len(steps)
        )
    )
    new_rows = []
    for index, step in enumerate(steps):
        row = existing.get(index)
        if row is None:
            new_rows.append({"sequence_id": sequence_id, "step_index": index, **step})
        else:
            row.action = step["action"]
            row.delay_in_minutes = step["delay_in_minutes"]
    if new_rows:
        await session.execute(insert(SequenceStep), new_rows)
    return delays


async def reschedule_waiting(
    session: AsyncSession,
    sequence_id: uuid.UUID,
    old: dict[int, float],
    new: list[float],
    now: datetime,
) -> int:
    """After an edit of the steps: an enrollment still waiting out the delay of a step it has
    not reached (no ``waiting_reason``, due later) waits as the edited step says, from the same
    start (``next_step_at`` moves by the change of that delay, and is due now at the earliest);
    one whose step is gone is due now, to complete. Waits for a retry, a throttle or a window
    are left as they are. Returns how many moved.

    PostgreSQL moves them in one ``UPDATE``. SQLite, whose date-times are text, reads them and
    writes each one back (its single writer is held meanwhile: ~1-2 s per 100,000 waiting)."""
    changed = {
        index: (None if index >= len(new) else new[index] - delay)
        for index, delay in old.items()
        if index >= len(new) or new[index] != delay
    }
    if not changed:
        return 0
    table: Any = Enrollment.__table__
    e = table.c
    waiting = (
        e.sequence_id == sequence_id,
        e.status == "active",
        e.current_step.in_(sorted(changed)),
        e.waiting_reason.is_(None),
        e.next_step_at > now,
    )
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        shifts = {index: minutes * 60 for index, minutes in changed.items() if minutes is not None}
        moved_to: Any = bindparam("now")  # a step removed: due now, to complete
        if shifts:
            seconds = case(shifts, value=e.current_step)
            shifted = e.next_step_at + func.make_interval(0, 0, 0, 0, 0, 0, seconds)
            moved_to = case(
                (
                    e.current_step.in_(sorted(shifts)),
                    func.least(func.greatest(shifted, bindparam("now")), bindparam("latest")),
                ),
                else_=bindparam("now"),
            )
        statement = update(table).where(*waiting)
        moved = await session.execute(
            statement.values(next_step_at=moved_to, updated_at=bindparam("now")),
            {"now": now, "latest": LATEST},
        )
        return int(moved.rowcount)  # type: ignore[attr-defined]
    query = select(e.id, e.current_step, e.next_step_at).where(*waiting)
    rows = (await session.execute(query)).all()
    changes = []
    for row in rows:
        minutes = changed[row.current_step]
        moved_to = now if minutes is None else max(now, minutes_after(row.next_step_at, minutes))
        changes.append({"b_id": row.id, "b_step": row.current_step, "b_next_at": moved_to})
    if changes:
        await session.execute(
            update(table)
            .where(
                e.id == bindparam("b_id"),
                e.status == "active",
                e.current_step == bindparam("b_step"),
                e.waiting_reason.is_(None),
            )
            .values(next_step_at=bindparam("b_next_at", type_=UTCDateTime()), updated_at=now),
            changes,
        )
    return len(changes)


async def list_sequences(
    session: AsyncSession,
    org_id: uuid.UUID,
    *,
    status: str | None,
    after_id: uuid.UUID | None,
    limit: int,
) -> list[Sequence]:
    """A page ordered by id (UUIDv7, so creation order); ``limit + 1`` rows to detect a next."""
    query = select(Sequence).where(Sequence.org_id == org_id)
    if status is not None:
        query = query.where(Sequence.status == status)
    if after_id is not None:
        query = query.where(Sequence.id > after_id)
    return list(await session.scalars(query.order_by(Sequence.id).limit(limit + 1)))


async def get_run(session: AsyncSession, org_id: uuid.UUID, run_id: uuid.UUID) -> Run | None:
    return await session.scalar(
        select(Run).where(Run.org_id == org_id, Run.id == run_id).with_for_update()
    )


def _enrollment_id(prefix: str, index: ColumnElement[Any], dialect: str) -> ColumnElement[Any]:
    """A UUIDv7 per enrolled contact without a Python loop: the run id's first 80 bits
    (timestamp, version, variant and 26 random bits) followed by the 48-bit position in the run.

    Ids of one run are therefore unique and ordered; ids of two runs differ unless both runs got
    the same millisecond *and* the same 26 random bits (about 1 in 67 million per pair of runs
    created in the same millisecond), which would fail the start on the primary key and roll it
    back, never corrupt anything.
    """
    if dialect == "postgresql":
        hex_index = func.lpad(func.to_hex(index), 12, "0")
        return cast(literal(prefix) + hex_index, Uuid)
    return literal(prefix) + func.printf("%012x", index)


async def enroll_matching_contacts(
    session: AsyncSession,
    *,
    sequence: Sequence,
    run_id: uuid.UUID,
    contact_filter: CompositeFilter | None,
    now: datetime,
    next_step_at: datetime,
) -> int:
    """Enroll every contact of the organization matching the filter **now**, in one
    ``INSERT … SELECT`` (no row passes through Python). ``run_index`` is the position by contact
    id. Returns the number of enrollments created.

    Concurrency: a contact created or deleted while this statement runs is either seen or not as
    of the statement's snapshot; the caller holds the sequence row lock (PostgreSQL) or the write
    lock (SQLite), so two starts of one sequence cannot interleave.
    """
    dialect = session.get_bind().dialect.name
    ranked = (
        select(
            Contact.id.label("contact_id"),
            (func.row_number().over(order_by=Contact.id) - 1).label("idx"),
        )
        .where(
            Contact.org_id == sequence.org_id, compile_filter(contact_filter, Contact, Enrollment)
        )
        .subquery()
    )
    source = select(
        _enrollment_id(run_id.hex[:20], ranked.c.idx, dialect),
        literal(sequence.org_id, Uuid),
        literal(sequence.id, Uuid),
        ranked.c.contact_id,
        literal(run_id, Uuid),
        cast(ranked.c.idx, Integer),
        literal("active"),
        literal(0, Integer),
        literal(next_step_at, UTCDateTime()),
        literal(0, Integer),
        literal(now, UTCDateTime()),
        literal(now, UTCDateTime()),
    )
    await session.execute(
        insert(Enrollment).from_select(
            [
                "id",
                "org_id",
                "sequence_id",
                "contact_id",
                "run_id",
                "run_index",
                "status",
                "current_step",
                "next_step_at",
                "attempts",
                "created_at",
                "updated_at",
            ],
            source,
        )
    )
    # The driver's rowcount for INSERT … SELECT is not reliable (psycopg reports -1 when the
    # SELECT is constant-false), so read the highest position back through the run index.
    last = await session.scalar(
        select(func.max(Enrollment.run_index)).where(Enrollment.run_id == run_id)
    )
    return 0 if last is None else int(last) + 1


async def cancel_active_enrollments(
    session: AsyncSession,
    *,
    now: datetime,
    sequence_id: uuid.UUID | None = None,
    run_id: uuid.UUID | None = None,
) -> int:
    """Cancel the active enrollments of a sequence or of one run, in one UPDATE.

    A worker may hold a lease on one of these rows and be mid-send: it loses the lease here,
    and re-checks ``status`` before sending, so a send already handed over goes out but
    nothing after it.
    """
    query = update(Enrollment).where(Enrollment.status == "active")
    if sequence_id is not None:
        query = query.where(Enrollment.sequence_id == sequence_id)
    if run_id is not None:
        query = query.where(Enrollment.run_id == run_id)
    # Send records no worker holds are settled here (see unheld_send); messages before
    # enrollments, the order in which the worker writes them (no deadlock).
    theirs = select(Enrollment.id)
    if sequence_id is not None:
        theirs = theirs.where(Enrollment.sequence_id == sequence_id)
    if run_id is not None:
        theirs = theirs.where(Enrollment.run_id == run_id)
    await session.execute(
        update(Message)
        .where(unheld_send(now), Message.enrollment_id.in_(theirs))
        .values(status="skipped", reason="canceled", updated_at=now)
        .execution_options(synchronize_session=False)
    )
    result = await session.execute(
        query.values(
            status="canceled", next_step_at=None, waiting_reason=None, updated_at=now
        ).execution_options(synchronize_session=False)
    )
    await settle_released(session, theirs, now)
    # The worker holding one loses its lease, as on a contact deletion: a canceled enrollment
    # whose worker then found nothing to write kept it for good.
    await clear_leases(session, theirs)
    return int(result.rowcount)  # type: ignore[attr-defined]


async def has_active_enrollments(session: AsyncSession, sequence_id: uuid.UUID) -> bool:
    return bool(
        await session.scalar(
            select(
                exists().where(Enrollment.sequence_id == sequence_id, Enrollment.status == "active")
            )
        )
    )
