"""All SQL of the engine. Every statement is set-based over a claimed batch (DESIGN rule 2):
a batch of N enrollments costs a fixed handful of round trips, not N.

Concurrency hazards and how each statement handles them:

- Two workers claiming the same row: PostgreSQL locks the candidates with ``FOR UPDATE SKIP
  LOCKED`` (a second worker skips them) and the lease is written in the same transaction;
  SQLite has one writer at a time (``BEGIN IMMEDIATE``) so the same two statements are atomic.
- A worker whose lease expired (it stalled or died) while another took over: every write to an
  enrollment is guarded by ``locked_by = me AND current_step = <claimed step>``, so the stale
  worker's advance matches no row and cannot move the enrollment twice.
- Cancellation or an unsubscribe racing a send: the claim only takes ``status = 'active'``
  rows, and :func:`still_live` (then :func:`recheck` for the missing ones) re-reads the
  enrollment, its sequence, its contact and the address's suppression right before the
  provider is called.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Integer,
    Table,
    Text,
    Uuid,
    any_,
    bindparam,
    case,
    exists,
    func,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from opensequence.db.bulk import sqlite_datetime, sqlite_executemany, sqlite_uuid
from opensequence.db.dialect import (
    dialect_name,
    execute_prebuilt,
    member_of,
    member_param,
    member_values,
)
from opensequence.engine.slices import Slices
from opensequence.models import (
    Contact,
    Enrollment,
    Message,
    Sequence,
    SequenceStep,
    Suppression,
)

ENROLLMENTS = cast(Table, Enrollment.__table__)
MESSAGES = cast(Table, Message.__table__)
SEQUENCES = cast(Table, Sequence.__table__)
STEPS = cast(Table, SequenceStep.__table__)
CONTACTS = cast(Table, Contact.__table__)
SUPPRESSIONS = cast(Table, Suppression.__table__)


@dataclass(frozen=True)
class Claimed:
    id: uuid.UUID
    org_id: uuid.UUID
    sequence_id: uuid.UUID
    contact_id: uuid.UUID
    current_step: int
    attempts: int
    # The send record this enrollment already has for its current step (a retry, or a resend
    # after a crash or a shutdown), if any.
    record: uuid.UUID | None = None


def _members(session: AsyncSession, table: Table, ids: Iterable[uuid.UUID]) -> Any:
    """The value of a ``member_param`` on ``table``'s id for these ``ids``."""
    return member_values(dialect_name(session), table.c.id, ids)


async def claim_due(
    session: AsyncSession, *, now: datetime, worker: str, lease: timedelta, limit: int
) -> list[Claimed]:
    """Lease up to ``limit`` due enrollments to ``worker``, oldest due first, in one
    ``UPDATE … RETURNING`` over a ``LIMIT`` subquery (its rows locked with ``FOR UPDATE SKIP
    LOCKED`` on PostgreSQL; SQLite's single writer holds the lock already). Each comes with
    the id of its current step's send record if it has one (:attr:`Claimed.record`), looked
    up through the ``(enrollment_id, step_index)`` key: most have none, and
    :func:`load_messages` then reads nothing."""
    postgresql = dialect_name(session) == "postgresql"
    connection = await session.connection()
    if postgresql:
        # Walk the due index in order and stop at ``limit``. Without statistics (a table
        # just filled by an import, before autovacuum analyses it) the planner guesses that
        # few rows are due, reads every due row through a bitmap and sorts them all: a claim
        # of 200 took ~60 ms with 100,000 due, against ~9 ms walking the index
        # (bench/fresh_backlog.py).
        await connection.execute(_SORT_OFF)
    result = await execute_prebuilt(
        session,
        "claim_due",
        _claim_statement,
        {"now": now, "until": now + lease, "worker": worker, "limit": limit},
    )
    claimed = [Claimed(*row) for row in result.all()]
    if postgresql:
        await connection.execute(_SORT_DEFAULT)
    return claimed


def _claim_statement(dialect: str) -> Any:
    e = ENROLLMENTS.c
    now = bindparam("now", type_=e.next_step_at.type)
    due = (
        select(e.id)
        .where(
            e.status == "active",
            e.next_step_at <= now,
            or_(e.locked_until.is_(None), e.locked_until < now),
        )
        .order_by(e.next_step_at)
        .limit(bindparam("limit", type_=Integer()))
    )
    # The candidates are locked by the subquery (SKIP LOCKED) or by SQLite's single writer, and
    # were active when locked: the outer statement matches on ``id`` alone. (A second
    # ``status`` condition there let PostgreSQL intersect the primary key with the whole due
    # index.)
    if dialect == "postgresql":
        # ``= ANY(ARRAY(subquery))``: the candidates are selected (and locked) once, as an
        # init plan. Under ``IN (subquery)`` the planner may rescan the subquery per row, and
        # with SKIP LOCKED each rescan can find other rows: more than ``limit`` get claimed.
        due = due.with_for_update(skip_locked=True)
        wanted = e.id == any_(func.array(due.scalar_subquery()))
    else:
        wanted = e.id.in_(due.scalar_subquery())
    # The enrollment's columns are named with their table: SQLAlchemy writes RETURNING columns
    # bare on SQLite, where a bare ``id`` inside the subquery would be the message's own.
    m = MESSAGES.c
    record = (
        select(m.id)
        .where(
            m.enrollment_id == literal_column(f"{ENROLLMENTS.name}.id"),
            m.step_index == literal_column(f"{ENROLLMENTS.name}.current_step"),
        )
        .scalar_subquery()
    )
    return (
        update(ENROLLMENTS)
        .where(wanted)
        .values(
            locked_until=bindparam("until", type_=e.locked_until.type),
            locked_by=bindparam("worker", type_=e.locked_by.type),
        )
        .returning(
            e.id,
            e.org_id,
            e.sequence_id,
            e.contact_id,
            e.current_step,
            e.attempts,
            record.label("record"),
        )
    )


_SORT_OFF = text("SET LOCAL enable_sort = off")
_SORT_DEFAULT = text("SET LOCAL enable_sort TO DEFAULT")


async def load_sequences(session: AsyncSession, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, Any]:
    members = _members(session, SEQUENCES, set(ids))
    rows = await execute_prebuilt(session, "load_sequences", _sequences_statement, {"ids": members})
    return {row.id: row for row in rows}


def _sequences_statement(dialect: str) -> Any:
    s = SEQUENCES.c
    return select(
        s.id, s.org_id, s.name, s.custom_id, s.status, s.is_continuous, s.send_window, s.updated_at
    ).where(member_param(dialect, s.id, "ids"))


async def edited_sequences(
    session: AsyncSession, read: Mapping[uuid.UUID, datetime]
) -> set[uuid.UUID]:
    """Those of the sequences ``read`` (id → the ``updated_at`` a batch read; every edit moves
    it) that were edited or deleted since; PostgreSQL holds them ``FOR SHARE`` until the
    transaction ends.

    An edit locks its sequence ``FOR UPDATE`` before it changes anything, then wakes or moves
    the enrollments that the change concerns. A worker's transaction that writes what follows
    from a sequence's settings (a wait for its window, the next step's delay) takes this first:
    it commits before the edit begins, which then sees (and moves) what it wrote, or it waits
    for the edit and finds the sequence changed. Without it, an edit committing while a batch
    was decided or sent missed that batch's enrollments: they kept the old window's opening
    (days) or the old delay."""
    members = _members(session, SEQUENCES, read)
    rows = await execute_prebuilt(
        session, "sequence_versions", _versions_statement, {"ids": members}
    )
    now = {row.id: row.updated_at for row in rows}
    return {sequence_id for sequence_id, version in read.items() if now.get(sequence_id) != version}


def _versions_statement(dialect: str) -> Any:
    s = SEQUENCES.c
    statement = select(s.id, s.updated_at).where(member_param(dialect, s.id, "ids"))
    return statement.with_for_update(read=True)  # SQLite: nothing (one writer already)


async def load_steps(
    session: AsyncSession, sequence_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, list[Any]]:
    members = _members(session, SEQUENCES, set(sequence_ids))
    rows = await execute_prebuilt(session, "load_steps", _steps_statement, {"ids": members})
    steps: dict[uuid.UUID, list[Any]] = {}
    for row in rows:
        steps.setdefault(row.sequence_id, []).append(row)
    return steps


def _steps_statement(dialect: str) -> Any:
    st = STEPS.c
    return (
        select(st.sequence_id, st.step_index, st.action, st.delay_in_minutes, st.started_at)
        .where(member_param(dialect, st.sequence_id, "ids"))
        .order_by(st.sequence_id, st.step_index)
    )


async def load_contacts(session: AsyncSession, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, Any]:
    """The batch's contacts, each with ``suppression``: the reason its address is on its
    organization's suppression list, or None (one statement for both: the list is keyed by
    the contact's own ``email_normalized``)."""
    members = _members(session, CONTACTS, set(ids))
    rows = await execute_prebuilt(session, "load_contacts", _contacts_statement, {"ids": members})
    return {row.id: row for row in rows}


async def present_contacts(session: AsyncSession, ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
    """Those of the contacts ``ids`` that still exist, held ``FOR SHARE`` on PostgreSQL until
    the transaction ends: a deletion (which locks its contact first, then drops the address
    from every send record) commits wholly before this reads, or waits for what this
    transaction writes."""
    members = _members(session, CONTACTS, set(ids))
    rows = await execute_prebuilt(
        session, "present_contacts", _present_contacts_statement, {"ids": members}
    )
    return set(rows.scalars().all())


def _present_contacts_statement(dialect: str) -> Any:
    c = CONTACTS.c
    statement = select(c.id).where(member_param(dialect, c.id, "ids"))
    return statement.with_for_update(read=True)  # SQLite: nothing (one writer already)


# Each contact with its address's suppression in its organization, if any (suppressions are
# keyed by organization and normalised address: at most one).
_CONTACTS_WITH_SUPPRESSION = CONTACTS.outerjoin(
    SUPPRESSIONS,
    (SUPPRESSIONS.c.org_id == CONTACTS.c.org_id)
    & (SUPPRESSIONS.c.email_normalized == CONTACTS.c.email_normalized),
)


def _contacts_statement(dialect: str) -> Any:
    c, sup = CONTACTS.c, SUPPRESSIONS.c
    return (
        select(
            c.id,
            c.org_id,
            c.email,
            c.phone_number,
            c.name,
            c.custom_data,
            sup.reason.label("suppression"),
        )
        .select_from(_CONTACTS_WITH_SUPPRESSION)
        .where(member_param(dialect, c.id, "ids"))
    )


_MESSAGE_COLUMNS = (
    ("id", "uuid"),
    ("org_id", "uuid"),
    ("enrollment_id", "uuid"),
    ("sequence_id", "uuid"),
    ("contact_id", "uuid"),
    ("step_index", "integer"),
    ("from_email", "text"),
    ("to_email", "text"),
    ("status", "text"),
    ("reason", "text"),
    ("message_id", "text"),
    ("attempts", "integer"),
    ("created_at", "timestamptz"),
    ("updated_at", "timestamptz"),
)
_JSON_ROWS_AT_A_TIME = 25
_NAMES = ", ".join(name for name, _ in _MESSAGE_COLUMNS)
_INSERT_MESSAGES_FROM_JSON = (
    text(
        f"INSERT INTO messages ({_NAMES}) SELECT {_NAMES} "
        "FROM json_to_recordset(CAST(:rows AS json)) AS t("
        + ", ".join(f"{name} {kind}" for name, kind in _MESSAGE_COLUMNS)
        + ") ON CONFLICT (enrollment_id, step_index) DO NOTHING RETURNING id"
    )
    .bindparams(bindparam("rows", type_=Text()))
    .columns(id=Uuid())
)


async def insert_messages(session: AsyncSession, rows: Seq[dict[str, Any]]) -> set[uuid.UUID]:
    """Insert send records; a (enrollment, step) that already has one keeps it (a resend after a
    crash or a retry reuses that row and its Message-ID). Returns the ids of the rows this call
    wrote.

    PostgreSQL: one ``INSERT … SELECT FROM json_to_recordset(:rows)`` (``RETURNING`` reports no
    row for a conflict). A multi-row VALUES with a placeholder per value cost ~130 us per row
    in the driver's query rewriting, and an array per column ~20 us per row in the driver's
    array dumping; one JSON text costs ~4. SQLite: the driver's ``executemany`` of values
    already in their stored form (:mod:`opensequence.db.bulk`); the row ids are new, so when
    fewer rows were written than given, the ones present are this call's."""
    if not rows:
        return set()
    if dialect_name(session) == "postgresql":
        forms = _stored_forms(lambda value: value.isoformat())
        # Written a few rows at a time, pausing for the sends in flight (~1 ms for 200 rows).
        slices = Slices()
        parts: list[str] = []
        for start in range(0, len(rows), _JSON_ROWS_AT_A_TIME):
            chunk = rows[start : start + _JSON_ROWS_AT_A_TIME]
            parts.append(json.dumps([{n: form(row[n]) for n, form in forms} for row in chunk]))
            await slices.pause()
        document = "[" + ",".join(part[1:-1] for part in parts) + "]"
        connection = await session.connection()
        result = await connection.execute(_INSERT_MESSAGES_FROM_JSON, {"rows": document})
        return set(result.scalars().all())
    forms = _stored_forms(sqlite_datetime)
    values = [tuple(form(row[name]) for name, form in forms) for row in rows]
    written = await sqlite_executemany(session, "messages", [name for name, _ in forms], values)
    ids = [row["id"] for row in rows]
    if written == len(rows):
        return set(ids)
    found = await session.execute(
        select(MESSAGES.c.id).where(member_of(session, MESSAGES.c.id, ids))
    )
    return set(found.scalars().all())


def _stored_forms(
    timestamp: Callable[[datetime], str | None],
) -> list[tuple[str, Callable[[Any], Any]]]:
    """Each message column with its conversion to a literal the database reads back as the
    same value: a UUID as 32 hex digits (what SQLAlchemy stores on SQLite, and valid
    ``uuid`` input on PostgreSQL), a timestamp through ``timestamp``. A batch's rows share
    their timestamps, so each distinct one is formatted once."""
    forms: list[tuple[str, Callable[[Any], Any]]] = []
    for name, kind in _MESSAGE_COLUMNS:
        if kind == "uuid":
            forms.append((name, sqlite_uuid))
        elif kind == "timestamptz":
            formatted: dict[datetime, str | None] = {}

            def stamp(
                value: datetime, formatted: dict[datetime, str | None] = formatted
            ) -> str | None:
                if value not in formatted:
                    formatted[value] = timestamp(value)
                return formatted[value]

            forms.append((name, stamp))
        else:
            forms.append((name, _same))
    return forms


def _same(value: Any) -> Any:
    return value


async def load_messages(
    session: AsyncSession, claimed: Iterable[Claimed]
) -> dict[tuple[uuid.UUID, int], Any]:
    """The send records the ``claimed`` enrollments already have for their current step, by
    ``(enrollment, step)``; read only for those the claim found one for."""
    wanted = [item.record for item in claimed if item.record is not None]
    if not wanted:
        return {}
    members = _members(session, MESSAGES, wanted)
    rows = await execute_prebuilt(session, "load_messages", _messages_statement, {"ids": members})
    return {(row.enrollment_id, row.step_index): row for row in rows}


def _messages_statement(dialect: str) -> Any:
    m = MESSAGES.c
    return select(
        m.id,
        m.enrollment_id,
        m.step_index,
        m.status,
        m.reason,
        m.message_id,
        m.attempts,
        m.created_at,
    ).where(member_param(dialect, m.id, "ids"))


async def stamp_steps_started(
    session: AsyncSession, pairs: Iterable[tuple[uuid.UUID, int]], now: datetime
) -> None:
    """A step's ``started_at`` is its first execution: only a NULL is ever overwritten."""
    params = [{"b_seq": seq, "b_step": step} for seq, step in set(pairs)]
    if not params:
        return
    st = STEPS.c
    connection = await session.connection()
    await connection.execute(
        update(STEPS)
        .where(
            st.sequence_id == bindparam("b_seq"),
            st.step_index == bindparam("b_step"),
            st.started_at.is_(None),
        )
        .values(started_at=now),
        params,
    )


async def _update_grouped(
    session: AsyncSession,
    changes: Seq[dict[str, Any]],
    table: Table,
    key: str,
    build: Callable[[str, bool], Any],
    shared: dict[str, Any],
) -> None:
    """Apply per-row ``changes`` (each with ``b_id``): changes that differ only in ``b_id`` go
    out as one set-based statement (its ids in the ``b_ids`` parameter), the rest as one
    executemany (``b_id`` per row). ``build(dialect, grouped)`` makes the UPDATE for either
    form from bound parameters named like the changes' fields plus ``shared``'s; each form is
    built once (:func:`prebuilt`)."""
    groups: dict[tuple[Any, ...], tuple[dict[str, Any], list[Any]]] = {}
    for change in changes:
        group = tuple(value for name, value in change.items() if name != "b_id")
        found = groups.get(group)
        if found is None:
            groups[group] = (change, [change["b_id"]])
        else:
            found[1].append(change["b_id"])
    singles: list[dict[str, Any]] = []
    for change, ids in groups.values():
        if len(ids) == 1:
            singles.append({**change, **shared})
            continue
        params = {name: value for name, value in change.items() if name != "b_id"}
        params["b_ids"] = _members(session, table, ids)
        await execute_prebuilt(
            session, f"{key}:grouped", lambda d: build(d, True), {**params, **shared}
        )
    if singles:
        await execute_prebuilt(session, f"{key}:single", lambda d: build(d, False), singles)


def _match(dialect: str, table: Table, grouped: bool) -> ColumnElement[bool]:
    if grouped:
        return member_param(dialect, table.c.id, "b_ids")
    return table.c.id == bindparam("b_id")


async def update_messages(
    session: AsyncSession, changes: Seq[dict[str, Any]], now: datetime
) -> None:
    """``changes``: ``{b_id, b_status, b_reason, b_attempted (0|1), b_sent_at}`` per row. Rows
    with the same outcome (a chunk of sends that all went out) take one statement together."""
    if changes:
        await _update_grouped(
            session, changes, MESSAGES, "update_messages", _messages_update, {"b_now": now}
        )


def _messages_update(dialect: str, grouped: bool) -> Any:
    m = MESSAGES.c
    return (
        update(MESSAGES)
        .where(_match(dialect, MESSAGES, grouped))
        .values(
            status=bindparam("b_status"),
            reason=bindparam("b_reason"),
            attempts=m.attempts + bindparam("b_attempted"),
            sent_at=bindparam("b_sent_at", type_=m.sent_at.type),
            updated_at=bindparam("b_now", type_=m.updated_at.type),
        )
    )


async def update_enrollments(
    session: AsyncSession, changes: Seq[dict[str, Any]], *, worker: str, now: datetime
) -> None:
    """Move claimed enrollments on and release their lease, each guarded by the claim it came
    from: ``{b_id, b_claimed_step, b_status, b_step, b_next_at, b_waiting, b_attempts}``.
    Enrollments moving the same way (a chunk advanced past the same step with the same delay)
    take one statement together; the guard is the same per row either way."""
    if changes:
        await _update_grouped(
            session,
            changes,
            ENROLLMENTS,
            "update_enrollments",
            _enrollments_update,
            {"b_now": now, "b_worker": worker},
        )


def _enrollments_update(dialect: str, grouped: bool) -> Any:
    e = ENROLLMENTS.c
    return (
        update(ENROLLMENTS)
        .where(
            _match(dialect, ENROLLMENTS, grouped),
            e.locked_by == bindparam("b_worker", type_=e.locked_by.type),
            e.current_step == bindparam("b_claimed_step"),
            e.status == "active",
        )
        .values(
            status=bindparam("b_status"),
            current_step=bindparam("b_step"),
            next_step_at=bindparam("b_next_at", type_=e.next_step_at.type),
            waiting_reason=bindparam("b_waiting"),
            attempts=bindparam("b_attempts"),
            locked_until=None,
            locked_by=None,
            updated_at=bindparam("b_now", type_=e.updated_at.type),
        )
    )


async def release(session: AsyncSession, ids: Iterable[uuid.UUID], *, worker: str) -> None:
    """Give leases back untouched (shutdown, or an enrollment that stopped being ours)."""
    wanted = list(ids)
    if wanted:
        e = ENROLLMENTS.c
        await session.execute(
            update(ENROLLMENTS)
            .where(member_of(session, e.id, wanted), e.locked_by == worker)
            .values(locked_until=None, locked_by=None)
        )


async def renew(
    session: AsyncSession, ids: Iterable[uuid.UUID], *, worker: str, until: datetime
) -> None:
    """Extend leases this worker still holds (a heartbeat while a batch is being sent)."""
    wanted = list(ids)
    if wanted:
        e = ENROLLMENTS.c
        await session.execute(
            update(ENROLLMENTS)
            .where(member_of(session, e.id, wanted), e.locked_by == worker, e.status == "active")
            .values(locked_until=until)
        )


@dataclass(frozen=True)
class Live:
    """A send that may still go: the reason its contact's address is on the organization's
    suppression list (or None), and its sequence's ``updated_at``."""

    suppression: str | None
    sequence_version: datetime


async def still_live(
    session: AsyncSession, ids: Iterable[uuid.UUID], *, worker: str
) -> dict[uuid.UUID, Live]:
    """Those of ``ids`` that may still be sent right now: the enrollment is active and leased
    to ``worker``, its sequence is active and its contact exists. Whether the suppression
    blocks the send depends on the mail (transactional or not), and whether the sequence was
    edited since the batch read it is the caller's to compare. One row per live send, so the
    common answer (all of them, none suppressed) costs little; :func:`recheck` explains the
    missing ones."""
    wanted = list(ids)
    if not wanted:
        return {}
    members = _members(session, ENROLLMENTS, wanted)
    rows = await execute_prebuilt(
        session, "still_live", _live_statement, {"ids": members, "worker": worker}
    )
    return {
        row.id: Live(row.contact or None, row.sequence_version)
        for row in rows
        if row.sequence_version is not None and row.contact is not None
    }


def _live_statement(dialect: str) -> Any:
    e, s, c, sup = ENROLLMENTS.c, SEQUENCES.c, CONTACTS.c, SUPPRESSIONS.c
    # The sequence and the contact are looked up per enrollment (correlated subqueries, which
    # the planner cannot turn into joins): as a join, PostgreSQL without statistics started
    # from the sequence and read all of its enrollments through (sequence_id, contact_id) to
    # find these, ~30 ms for 200 of 100,000 instead of ~4.
    sequence_version = (  # NULL unless the sequence is active
        select(s.updated_at)
        .where(s.id == e.sequence_id, s.status == "active")
        .correlate(ENROLLMENTS)
        .scalar_subquery()
    )
    # The contact and its address's suppression in one lookup: NULL when the contact is gone,
    # '' when it exists unsuppressed, else the suppression's reason.
    contact = (
        select(func.coalesce(sup.reason, ""))
        .select_from(_CONTACTS_WITH_SUPPRESSION)
        .where(c.id == e.contact_id)
        .correlate(ENROLLMENTS)
        .scalar_subquery()
    )
    return select(e.id, sequence_version.label("sequence_version"), contact.label("contact")).where(
        member_param(dialect, e.id, "ids"),
        e.locked_by == bindparam("worker", type_=e.locked_by.type),
        e.status == "active",
    )


@dataclass(frozen=True)
class Recheck:
    mine: bool
    enrollment_active: bool
    sequence_active: bool
    contact_exists: bool


async def recheck(
    session: AsyncSession, ids: Iterable[uuid.UUID], *, worker: str
) -> dict[uuid.UUID, Recheck]:
    """The state that decides, right before the provider call, whether a send may still go."""
    wanted = list(ids)
    if not wanted:
        return {}
    e, s, c = ENROLLMENTS.c, SEQUENCES.c, CONTACTS.c
    rows = await session.execute(
        select(e.id, e.locked_by, e.status, s.status.label("sequence_status"), c.id.label("cid"))
        .select_from(
            ENROLLMENTS.join(SEQUENCES, s.id == e.sequence_id).outerjoin(
                CONTACTS, c.id == e.contact_id
            )
        )
        .where(member_of(session, e.id, wanted))
    )
    return {
        row.id: Recheck(
            mine=row.locked_by == worker,
            enrollment_active=row.status == "active",
            sequence_active=row.sequence_status == "active",
            contact_exists=row.cid is not None,
        )
        for row in rows
    }


async def settle_abandoned(session: AsyncSession, ids: Iterable[uuid.UUID], now: datetime) -> None:
    """Send records a worker wrote for a claim it has since lost to a cancel (its contact
    deleted, its sequence or run canceled while the batch was prepared): ``skipped`` /
    ``canceled``, and without the address once the contact is gone (a record written after the
    deletion kept it). Only records still ``sending`` whose enrollment is no longer active: a
    resend by another worker is left alone.

    Records another transaction has locked are skipped (``SKIP LOCKED``), so this never waits
    and may follow the enrollment writes: the other is a stop (a cancel, a contact deletion)
    that settles them itself once it has read them again (see
    :func:`opensequence.enrollments.repository.settle_released`), or a worker recording them."""
    wanted = list(ids)
    if not wanted:
        return
    m, e, c = MESSAGES.c, ENROLLMENTS.c, CONTACTS.c
    contact_exists = exists().where(c.id == m.contact_id)
    abandoned = (
        select(m.id)
        .where(
            member_of(session, m.id, wanted),
            m.status == "sending",
            ~exists().where(e.id == m.enrollment_id, e.status == "active"),
        )
        .with_for_update(skip_locked=True)
    )
    await session.execute(
        update(MESSAGES)
        .where(m.id.in_(abandoned))
        .values(
            status="skipped",
            reason="canceled",
            to_email=case((contact_exists, m.to_email), else_=None),
            updated_at=now,
        )
    )


async def finish_one_off_sequences(session: AsyncSession, now: datetime) -> list[uuid.UUID]:
    """Mark started one-off sequences without active enrollments ``complete``, and stamp
    ``ended_at`` on steps no active enrollment can still reach.

    Run in its own transaction *after* the batch that finished enrollments committed: under READ
    COMMITTED two workers finishing the last two enrollments concurrently would each still see
    the other's as active inside their own transaction, and neither would complete the
    sequence. Checked after commit, the later of the two always sees both.
    """
    s, e, st = SEQUENCES.c, ENROLLMENTS.c, STEPS.c
    any_active = exists().where(e.sequence_id == s.id, e.status == "active")
    completed = await session.execute(
        update(SEQUENCES)
        .where(
            s.status == "active",
            s.is_continuous.is_(False),
            s.started_at.is_not(None),
            ~any_active,
        )
        .values(status="complete", ended_at=now, updated_at=now)
        .returning(s.id)
    )
    done = list(completed.scalars().all())
    reachable = exists().where(
        e.sequence_id == st.sequence_id, e.status == "active", e.current_step <= st.step_index
    )
    # A canceled one's steps too: once canceled, no enrollment can reach any of them.
    one_off = select(s.id).where(
        s.is_continuous.is_(False),
        s.status.in_(("active", "complete", "canceled")),
        s.started_at.is_not(None),
    )
    await session.execute(
        update(STEPS)
        .where(st.ended_at.is_(None), st.sequence_id.in_(one_off), ~reachable)
        .values(ended_at=now)
    )
    return done


async def due_backlog(session: AsyncSession, now: datetime) -> tuple[int, datetime | None]:
    """How many steps are due now and when the oldest of them fell due."""
    e = ENROLLMENTS.c
    row = (
        await session.execute(
            select(func.count(), func.min(e.next_step_at)).where(
                e.status == "active", e.next_step_at <= now
            )
        )
    ).one()
    return int(row[0]), row[1]
