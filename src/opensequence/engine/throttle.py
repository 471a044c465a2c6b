"""Per-sender throttles (SPEC §5): never more than N sends of one sender in any window of a
second, a minute or a day, counted across every worker.

A send's time is its ``sent_at`` once sent, and while it is ``sending`` (reserved or in
flight) the ``updated_at`` of its record, which the claim transaction sets when it reserves the
send. A record waiting for a retry (``sending`` with the failed attempt's ``reason``) does not
count: nothing went out, and reserving the retry clears its reason. Counting ``sending`` rows
is what lets concurrent workers see each other: a reservation is visible the moment the claim
transaction commits, before the provider call.

Atomicity (the hazard is two workers both counting 9 of 10 and both sending): on PostgreSQL the
claim transaction takes ``pg_advisory_xact_lock`` on every limited (organization, sender) it is
about to send from, in a fixed order (no deadlocks between workers locking overlapping sets),
and holds it while it counts and inserts its ``sending`` rows, until COMMIT. A second worker
blocks on the lock and, under READ COMMITTED, counts with a fresh snapshot that includes the
first worker's rows. SQLite runs every transaction ``BEGIN IMMEDIATE``: one writer at a time,
so the same count-then-insert is already serialised. A change of a limit takes the same lock
(:func:`opensequence.deliverability.repository.lock_senders`), so that the sends a worker holds
back under the old limit are committed before the change wakes the waiting ones, or are counted
under the new limit.

A limit applies to an email address (``from_email`` lower-cased) or to a whole domain; when
both exist, both apply. Sends that would exceed a limit are not reserved: the caller defers
them to the instant the fullest window frees a slot (they contend again then).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, and_, case, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from opensequence.db.dialect import (
    dialect_name,
    execute_prebuilt,
    member_of,
    member_param,
    member_values,
)
from opensequence.deliverability.repository import lock_senders
from opensequence.models import Message, SenderLimit

MESSAGES = cast(Table, Message.__table__)
LIMITS = cast(Table, SenderLimit.__table__)

# How long after its claim a reserved send may still be handed to the provider (see
# Worker._send): one that could not go out by then is put back and reserved again. Until it is
# recorded, a reservation counts in every window that ends less than this past the window's
# span after it: whenever it goes out, it is counted in each window it goes out in.
RESERVATION_SECONDS = 2.0
RESERVATION = timedelta(seconds=RESERVATION_SECONDS)

WINDOWS: tuple[tuple[str, timedelta], ...] = (
    ("per_second", timedelta(seconds=1)),
    ("per_minute", timedelta(minutes=1)),
    ("per_day", timedelta(days=1)),
)


@dataclass(frozen=True)
class Admission:
    """What :func:`admit` decided: ``token → instant`` for the requests that must wait, and
    the tokens of the admitted requests that a limit counted (they must go out within
    :data:`RESERVATION` of the claim)."""

    waits: dict[Any, datetime]
    limited: set[Any]


@dataclass(frozen=True)
class Request:
    """One send that wants a slot; ``token`` is the caller's handle for it."""

    token: Any
    org_id: uuid.UUID
    from_email: str


def sender_keys(from_email: str) -> tuple[str, str]:
    address = from_email.strip().lower()
    return address, address.rpartition("@")[2]


def _sent_time() -> Any:
    m = MESSAGES.c
    return case((m.status == "sent", m.sent_at), else_=m.updated_at)


def _in_window(span: timedelta, now: datetime) -> Any:
    """Counted in the window of ``span`` ending ``now``: sent inside it, or reserved and not
    yet recorded, for as long as it may still go out inside it (see :data:`RESERVATION`).
    Counted at the claim alone, a send queued for more than a window behind others (a loaded
    machine, a slow provider) dropped out of other workers' counts before it went out: a
    chaos run saw 4 hand-overs within 0.6 s under ``per_second: 2``."""
    m = MESSAGES.c
    return or_(
        and_(m.status == "sent", m.sent_at > now - span),
        and_(m.status == "sending", m.updated_at > now - span - RESERVATION),
    )


def _counted() -> Any:
    """The records that count: sent, or reserved and not yet answered. A ``sending`` record
    with a ``reason`` waits for a retry after a failed attempt: nothing went out, and counting
    it held its own retry back (and the others') for a whole window."""
    m = MESSAGES.c
    return or_(m.status == "sent", and_(m.status == "sending", m.reason.is_(None)))


def _from_sender(sender: str) -> Any:
    m = MESSAGES.c
    if "@" in sender:
        return func.lower(m.from_email) == sender
    return func.lower(m.from_email).like(f"%@{sender}")


async def admit(session: AsyncSession, requests: Sequence[Request], now: datetime) -> Admission:
    """Reserve slots for the ``requests`` that fit, in order. Those that must wait get the
    instant a slot frees (:attr:`Admission.waits`); the others are admitted and the caller must
    write their ``sending`` rows (or :func:`reserve` reused ones) in this same transaction, and
    hand the limited ones over within :data:`RESERVATION` of ``now``."""
    nothing = Admission({}, set())
    if not requests:
        return nothing
    limits = await _limits(session, requests)
    if not limits:
        return nothing
    wanted = _wanted(requests, limits)
    limited = sorted({key for keys in wanted.values() for key in keys}, key=str)
    if not limited:
        return nothing
    if dialect_name(session) == "postgresql":
        await lock_senders(session, limited)
        # A limit changed (or went) while this transaction waited for its lock: count against
        # the limits that hold now. One created meanwhile applies from the next batch.
        fresh = await _limits(session, requests)
        wanted = _wanted(requests, {key: fresh[key] for key in limited if key in fresh})
        limited = sorted({key for keys in wanted.values() for key in keys}, key=str)
        limits = fresh
        if not limited:
            return nothing

    # (org, sender, window) → [cap, counted in the database, reserved now]
    state: dict[tuple[uuid.UUID, str, str], list[int]] = {}
    for org_id in sorted({org for org, _ in limited}, key=str):
        limited_spans = [
            (sender, name, span, getattr(limits[(org, sender)], name))
            for org, sender in limited
            if org == org_id
            for name, span in WINDOWS
            if getattr(limits[(org, sender)], name) is not None
        ]
        counts = await _usage(
            session, org_id, [(s, n, span) for s, n, span, _ in limited_spans], now
        )
        for (sender, name, _, cap), counted in zip(limited_spans, counts, strict=True):
            state[(org_id, sender, name)] = [cap, counted, 0]

    waiting: dict[Any, list[tuple[uuid.UUID, str, str]]] = {}
    for request in requests:
        windows = [
            (org_id, sender, name)
            for org_id, sender in wanted[request.token]
            for name, _ in WINDOWS
            if (org_id, sender, name) in state
        ]
        full = [w for w in windows if state[w][1] + state[w][2] >= state[w][0]]
        if full:
            waiting[request.token] = full
            continue
        for w in windows:
            state[w][2] += 1

    frees: dict[tuple[uuid.UUID, str, str], datetime] = {}
    for window in {w for full in waiting.values() for w in full}:
        frees[window] = await _frees_at(session, window, state[window], now)
    return Admission(
        waits={token: max(frees[w] for w in full) for token, full in waiting.items()},
        limited={token for token, keys in wanted.items() if keys and token not in waiting},
    )


async def _limits(
    session: AsyncSession, requests: Sequence[Request]
) -> dict[tuple[uuid.UUID, str], Any]:
    """The requesting organizations' limits by (organization, sender). A limit with all three
    windows null limits nothing (SPEC §5 allows it); left in, its sends had no window to count
    and the batch failed (max() of nothing) at every poll."""
    orgs = member_values(dialect_name(session), LIMITS.c.org_id, {r.org_id for r in requests})
    rows = await execute_prebuilt(session, "sender_limits", _limits_statement, {"orgs": orgs})
    return {
        (row.org_id, row.sender): row
        for row in rows
        if any(getattr(row, name) is not None for name, _ in WINDOWS)
    }


def _wanted(
    requests: Sequence[Request], limits: dict[tuple[uuid.UUID, str], Any]
) -> dict[Any, list[tuple[uuid.UUID, str]]]:
    """Each request's limited (organization, sender) keys: its address's, its domain's."""
    return {
        request.token: [
            key
            for key in ((request.org_id, k) for k in sender_keys(request.from_email))
            if key in limits
        ]
        for request in requests
    }


def _limits_statement(dialect: str) -> Any:
    return select(LIMITS).where(member_param(dialect, LIMITS.c.org_id, "orgs"))


async def _usage(
    session: AsyncSession,
    org_id: uuid.UUID,
    windows: Sequence[tuple[str, str, timedelta]],
    now: datetime,
) -> list[int]:
    """Sends inside each ``(sender, window name, span)`` ending now: one statement (one pass
    over the organization's recent messages) for all of an organization's limited senders."""
    m = MESSAGES.c
    widest = max(span for _, _, span in windows)
    senders = sorted({sender for sender, _, _ in windows})
    columns = [
        func.coalesce(
            func.sum(case((and_(_from_sender(sender), _in_window(span, now)), 1), else_=0)), 0
        ).label(f"c{i}")
        for i, (sender, _, span) in enumerate(windows)
    ]
    result = (
        await session.execute(
            select(*columns).where(
                m.org_id == org_id,
                m.updated_at > now - widest - RESERVATION,
                _counted(),
                or_(*(_from_sender(sender) for sender in senders)),
                _in_window(widest, now),
            )
        )
    ).one()
    return [int(value) for value in result]


async def _frees_at(
    session: AsyncSession,
    window: tuple[uuid.UUID, str, str],
    usage: list[int],
    now: datetime,
) -> datetime:
    """When a full window next has room: the send that must age out first, plus the span.
    The ``reserved`` sends of this batch are the newest (at ``now``). A reservation not yet
    recorded is taken as gone out at its claim, as it almost always has: one still unrecorded
    then is counted again (see :func:`_in_window`) and the send waits again."""
    org_id, sender, name = window
    span = dict(WINDOWS)[name]
    cap, counted, reserved = usage
    position = counted + reserved - cap
    if position >= counted:
        return now + span
    m = MESSAGES.c
    at = _sent_time()
    oldest = await session.scalar(
        select(at)
        .where(
            m.org_id == org_id,
            _counted(),
            m.updated_at > now - span - RESERVATION,
            _from_sender(sender),
            _in_window(span, now),
        )
        .order_by(at)
        .offset(max(position, 0))
        .limit(1)
    )
    if oldest is None:
        return now + span
    if oldest + span <= now:
        # A reservation older than the span, still unrecorded: counted until its grace ends.
        return oldest + span + RESERVATION
    return oldest + span


async def reserve(session: AsyncSession, message_ids: Iterable[uuid.UUID], now: datetime) -> None:
    """Stamp reused ``sending`` records (a retry, a resend after a crash) with the time of this
    attempt and clear the last attempt's reason, so other workers count it in their windows.
    Only while still ``sending``: a cancel or a contact deletion may have settled one since the
    claim (``skipped``, ``canceled``), and its reason stays."""
    wanted = list(message_ids)
    if wanted:
        m = MESSAGES.c
        await session.execute(
            update(MESSAGES)
            .where(member_of(session, m.id, wanted), m.status == "sending")
            .values(updated_at=now, reason=None)
        )
