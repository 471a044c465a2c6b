"""Adding contacts to a continuous sequence (SPEC §4) and reading runs back.

Everything happens in the caller's single transaction; on any error nothing is written.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from opensequence.clock import minutes_after
from opensequence.contacts.service import resolve_contacts
from opensequence.errors import Conflict, NotFound
from opensequence.filters import (
    ContactFacts,
    explain,
    prepare,
    referenced_sequence_ids,
    stored_filter,
)
from opensequence.models import Run, Sequence
from opensequence.models.run import OUTCOMES
from opensequence.pagination import decode_cursor, encode_cursor, position_int
from opensequence.runs import repository as repo
from opensequence.runs.intake import Item
from opensequence.runs.pages import StoredItem
from opensequence.sequences.lookup import get_sequence, parse_uuid


def empty_counts() -> dict[str, int]:
    return dict.fromkeys(OUTCOMES, 0)


@dataclass
class RunProgress:
    """A run being filled, possibly over several transactions (the CSV import lands in
    batches). ``seen`` spans batches so a contact repeated later in the file is still a
    ``duplicate_in_request``."""

    run_id: uuid.UUID
    sequence_id: uuid.UUID
    sequence_ref: str
    total: int = 0
    counts: dict[str, int] = field(default_factory=lambda: empty_counts())
    seen: set[uuid.UUID] = field(default_factory=set)


async def _accepting_sequence(
    session: AsyncSession, org_id: uuid.UUID, sequence_ref: str
) -> Sequence:
    """The sequence, read with a shared lock on PostgreSQL: a concurrent cancel (exclusive
    lock) cannot interleave with an insert of enrollments, while concurrent add-contacts
    requests proceed side by side."""
    sequence = await get_sequence(session, org_id, sequence_ref, lock="share")
    if not sequence.is_continuous:
        raise Conflict(
            "contacts can only be added to a continuous sequence; start a one-off sequence "
            "with PUT /sequences/{id}/start"
        )
    if sequence.status in ("canceled", "complete"):
        raise Conflict(f"sequence is {sequence.status}; contacts can no longer be added")
    return sequence


async def _open_run(
    session: AsyncSession, org_id: uuid.UUID, sequence_ref: str, *, kind: str, now: datetime
) -> tuple[Sequence, RunProgress]:
    sequence = await _accepting_sequence(session, org_id, sequence_ref)
    run_id = await repo.insert_run(
        session, org_id=org_id, sequence_id=sequence.id, kind=kind, total=0, now=now
    )
    return sequence, RunProgress(run_id=run_id, sequence_id=sequence.id, sequence_ref=sequence_ref)


async def open_run(
    session: AsyncSession, org_id: uuid.UUID, sequence_ref: str, *, kind: str, now: datetime
) -> RunProgress:
    """Check the sequence takes contacts (404/409 otherwise) and create an empty run."""
    return (await _open_run(session, org_id, sequence_ref, kind=kind, now=now))[1]


async def add_contacts_to_sequence(
    session: AsyncSession,
    org_id: uuid.UUID,
    sequence_ref: str,
    items: list[Item],
    *,
    now: datetime,
) -> uuid.UUID:
    """SPEC §4 in one transaction: returns the run id; on any error nothing is written."""
    sequence, progress = await _open_run(
        session, org_id, sequence_ref, kind="add_contacts", now=now
    )
    await _process(session, org_id, sequence, progress, items, now=now)
    return progress.run_id


async def process_items(
    session: AsyncSession,
    org_id: uuid.UUID,
    progress: RunProgress,
    items: list[Item],
    *,
    now: datetime,
) -> None:
    """One batch of a run opened earlier, in its own transaction (the CSV import): the
    sequence is checked (and locked) again, since it may have been canceled in between."""
    sequence = await _accepting_sequence(session, org_id, str(progress.sequence_id))
    await _process(session, org_id, sequence, progress, items, now=now)


async def _process(
    session: AsyncSession,
    org_id: uuid.UUID,
    sequence: Sequence,
    progress: RunProgress,
    items: list[Item],
    *,
    now: datetime,
) -> None:
    """Resolve (creating missing contacts), filter, enroll; store the items' outcomes and the
    run's totals. A handful of statements whatever the number of items.

    ``already_enrolled`` is decided by the unique (sequence, contact) constraint at insert
    time, so two overlapping requests enroll each contact exactly once and each run reports
    what it actually did.
    """
    results = await _resolve(session, org_id, items, now)

    outcome: dict[int, tuple[str, str | None]] = {}
    first_seen: dict[uuid.UUID, int] = {}
    candidates: list[uuid.UUID] = []
    for item in items:
        contact_id = results[item.index][0]
        if contact_id is None:
            outcome[item.index] = ("not_found", None)
        elif contact_id in first_seen or contact_id in progress.seen:
            outcome[item.index] = ("duplicate_in_request", None)
        else:
            first_seen[contact_id] = item.index
            candidates.append(contact_id)
    progress.seen.update(candidates)

    composite = stored_filter(sequence.filter)
    eligible = candidates
    if composite is not None:
        facts = await repo.contact_facts(session, org_id, candidates)
        enrolled_in = await repo.enrolled_sequences(
            session, candidates, referenced_sequence_ids(composite)
        )
        eligible = []
        prepared = prepare(composite)
        for contact_id in candidates:
            email, created_at = facts[contact_id]
            why = explain(
                prepared,
                ContactFacts(
                    id=contact_id,
                    email=email,
                    created_at=created_at,
                    enrolled_sequence_ids=frozenset(enrolled_in.get(contact_id, ())),
                ),
            )
            if why is None:
                eligible.append(contact_id)
            else:
                outcome[first_seen[contact_id]] = ("filtered_out", why)

    delay = await repo.first_step_delay(session, sequence.id)
    enrolled = await repo.insert_enrollments(
        session,
        org_id=org_id,
        sequence_id=sequence.id,
        run_id=progress.run_id,
        contact_ids=eligible,
        due_at=minutes_after(now, delay),
        now=now,
    )
    for contact_id in eligible:
        index = first_seen[contact_id]
        if contact_id not in enrolled:
            outcome[index] = ("already_enrolled", None)
        elif results[index][1]:
            outcome[index] = ("created_and_added", None)
        else:
            outcome[index] = ("added", None)

    stored: list[StoredItem] = []
    for item in items:
        name, reason = outcome[item.index]
        progress.counts[name] += 1
        stored.append(StoredItem(item.index, item.raw, results[item.index][0], name, reason))
    progress.total += len(items)
    await repo.insert_run_items(session, progress.run_id, stored)
    await repo.set_run_totals(session, progress.run_id, progress.total, progress.counts)


async def _resolve(
    session: AsyncSession, org_id: uuid.UUID, items: list[Item], now: datetime
) -> dict[int, tuple[uuid.UUID | None, bool]]:
    """``item index → (contact id or None, created)``. The items go to the contacts service as
    they are, in one call (its bulk resolve is set-based); a blank phone number identifies
    nobody there."""
    resolved = await resolve_contacts(session, org_id, items, now=now)
    return {
        item.index: (found.contact_id, found.created)
        for item, found in zip(items, resolved, strict=True)
    }


async def get_run(session: AsyncSession, org_id: uuid.UUID, sequence_ref: str, run_ref: str) -> Run:
    sequence = await get_sequence(session, org_id, sequence_ref)
    run_id = parse_uuid(run_ref)
    run = None if run_id is None else await repo.get_run(session, org_id, sequence.id, run_id)
    if run is None:
        raise NotFound(f"run {run_ref!r} not found in sequence {sequence_ref!r}")
    return run


async def list_run_items(
    session: AsyncSession,
    org_id: uuid.UUID,
    sequence_ref: str,
    run_ref: str,
    *,
    outcome: str | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[StoredItem], str | None]:
    run = await get_run(session, org_id, sequence_ref, run_ref)
    position = decode_cursor(cursor)
    after = position_int(position, "i") if position is not None else -1
    views: list[StoredItem]
    if run.kind == "start":
        if outcome not in (None, "added"):
            return [], None
        pairs = await repo.list_start_run_items(session, run.id, after_index=after, limit=limit)
        views = [
            StoredItem(index, {"id": str(contact_id)}, contact_id, "added", None)
            for index, contact_id in pairs
        ]
    else:
        views = await repo.list_run_items(
            session, run.id, outcome=outcome, after_index=after, limit=limit
        )
    next_cursor = encode_cursor({"i": views[-1].index}) if len(views) == limit else None
    return views, next_cursor
