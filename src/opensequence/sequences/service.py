"""Sequence rules (SPEC §3): create, read, update, start, cancel. Takes a session, never commits.

Every check that can fail runs before the first write, so a 400/409 leaves nothing behind;
the caller's transaction rolls back anything else.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from opensequence.clock import minutes_after
from opensequence.db.types import iso, new_id
from opensequence.enrollments.repository import wake_waiting
from opensequence.errors import Conflict, Invalid, NotFound
from opensequence.filters import CompositeFilter, all_contacts_output, stored_filter
from opensequence.mail.templates import TemplateSyntaxError, compile_template
from opensequence.models import Run, Sequence, SequenceStep
from opensequence.models.run import OUTCOMES
from opensequence.pagination import decode_cursor, encode_cursor, position_uuid
from opensequence.sequences import repository
from opensequence.sequences.lookup import get_sequence, parse_uuid
from opensequence.sequences.schemas import (
    CreateSequenceInput,
    SendEmailsAction,
    SequenceStepInput,
    UpdateSequenceInput,
)

TEMPLATE_FIELDS = ("email_subject", "email_body")


def check_templates(steps: list[SequenceStepInput]) -> None:
    """Every subject and body must parse; the error names step, field and template line."""
    for index, step in enumerate(steps):
        if not isinstance(step.action, SendEmailsAction):
            continue
        for field in TEMPLATE_FIELDS:
            try:
                compile_template(getattr(step.action.data, field))
            except TemplateSyntaxError as exc:
                raise Invalid(f"steps[{index}].action.data.{field}: {exc}") from exc


def _step_rows(steps: list[SequenceStepInput]) -> list[dict[str, Any]]:
    return [
        {"action": step.action.model_dump(mode="json"), "delay_in_minutes": step.delay_in_minutes}
        for step in steps
    ]


def _stored_filter(f: CompositeFilter | None) -> dict[str, Any] | None:
    return None if f is None else f.to_wire()


async def create_sequence(
    session: AsyncSession, org_id: uuid.UUID, body: CreateSequenceInput, now: datetime
) -> Sequence:
    check_templates(body.steps)
    if body.custom_id is not None and await repository.custom_id_taken(
        session, org_id, body.custom_id
    ):
        raise Conflict(f"custom_id {body.custom_id!r} is already used by another sequence")
    sequence = Sequence(
        id=new_id(),
        org_id=org_id,
        custom_id=body.custom_id,
        name=body.name,
        is_continuous=body.is_continuous,
        status="active" if body.is_continuous else "pending",
        filter=_stored_filter(body.filter),
        send_window=body.send_window.model_dump() if body.send_window else None,
        started_at=now if body.is_continuous else None,
        created_at=now,
        updated_at=now,
    )
    session.add(sequence)
    await _flush_translating_conflicts(session, body.custom_id)
    await repository.replace_steps(session, sequence.id, _step_rows(body.steps))
    return sequence


async def _flush_translating_conflicts(session: AsyncSession, custom_id: str | None) -> None:
    """A concurrent request may take the same custom_id between our check and our write; the
    unique constraint decides, and the loser gets the same 409 as a sequential duplicate."""
    try:
        await session.flush()
    except IntegrityError as exc:
        raise Conflict(f"custom_id {custom_id!r} is already used by another sequence") from exc


def _delay(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def sequence_output(sequence: Sequence, steps: list[SequenceStep]) -> dict[str, Any]:
    """The wire form: sequence-level nullable fields always present, a step's ``started_at`` /
    ``ended_at`` only once set, a null filter as the explicit all-contacts filter."""
    step_items: list[dict[str, Any]] = []
    for step in steps:
        item: dict[str, Any] = {
            "action": step.action,
            "delay_in_minutes": _delay(step.delay_in_minutes),
        }
        if step.started_at is not None:
            item["started_at"] = iso(step.started_at)
        if step.ended_at is not None:
            item["ended_at"] = iso(step.ended_at)
        step_items.append(item)
    return {
        "id": str(sequence.id),
        "org_id": str(sequence.org_id),
        "name": sequence.name,
        "custom_id": sequence.custom_id,
        "status": sequence.status,
        "filter": sequence.filter if sequence.filter is not None else all_contacts_output(),
        "steps": step_items,
        "is_continuous": sequence.is_continuous,
        "send_window": sequence.send_window,
        "started_at": iso(sequence.started_at),
        "canceled_at": iso(sequence.canceled_at),
        "ended_at": iso(sequence.ended_at),
        "created_at": iso(sequence.created_at),
        "updated_at": iso(sequence.updated_at),
    }


async def read_sequence(session: AsyncSession, org_id: uuid.UUID, ref: str) -> dict[str, Any]:
    sequence = await get_sequence(session, org_id, ref)
    steps = await repository.load_steps(session, [sequence.id])
    return sequence_output(sequence, steps[sequence.id])


async def list_sequences(
    session: AsyncSession,
    org_id: uuid.UUID,
    *,
    status: str | None,
    cursor: str | None,
    limit: int,
) -> dict[str, Any]:
    position = decode_cursor(cursor)
    after_id = position_uuid(position, "id") if position is not None else None
    rows = await repository.list_sequences(
        session, org_id, status=status, after_id=after_id, limit=limit
    )
    page = rows[:limit]
    steps = await repository.load_steps(session, [s.id for s in page])
    next_cursor = encode_cursor({"id": str(page[-1].id)}) if len(rows) > limit else None
    return {"items": [sequence_output(s, steps[s.id]) for s in page], "next": next_cursor}


_NOT_NULL = ("name", "is_continuous", "steps")


async def update_sequence(
    session: AsyncSession, org_id: uuid.UUID, ref: str, body: UpdateSequenceInput, now: datetime
) -> Sequence:
    """Apply only the fields present in the body (no defaults re-applied).

    Steps may change while active: contacts keep their step index, and steps they have not
    reached run as edited, their delays included: a contact waiting out the delay of the step
    it is at waits as the edited step says (:func:`repository.reschedule_waiting`).
    """
    given = body.model_fields_set
    for field in _NOT_NULL:
        if field in given and getattr(body, field) is None:
            raise Invalid(f"{field}: must not be null")
    if body.steps is not None:
        check_templates(body.steps)
    sequence = await get_sequence(session, org_id, ref, for_update=True)
    if sequence.status in ("complete", "canceled"):
        raise Conflict(f"sequence is {sequence.status} and can no longer be edited")
    becomes_continuous = False
    if body.is_continuous is not None and body.is_continuous != sequence.is_continuous:
        if sequence.status != "pending":
            raise Conflict("is_continuous can only change while the sequence is pending")
        becomes_continuous = body.is_continuous
    if (
        "custom_id" in given
        and body.custom_id is not None
        and body.custom_id != sequence.custom_id
        and await repository.custom_id_taken(session, org_id, body.custom_id, sequence.id)
    ):
        raise Conflict(f"custom_id {body.custom_id!r} is already used by another sequence")

    if body.name is not None:
        sequence.name = body.name
    if "custom_id" in given:
        sequence.custom_id = body.custom_id
    if "filter" in given:
        sequence.filter = _stored_filter(body.filter)
    if "send_window" in given:
        sequence.send_window = body.send_window.model_dump() if body.send_window else None
        # Sends waiting for the old window were given its next opening; null means any time.
        await wake_waiting(session, "outside_window", now, sequence_id=sequence.id)
    if body.is_continuous is not None:
        sequence.is_continuous = body.is_continuous
    if becomes_continuous:
        sequence.status = "active"
        sequence.started_at = now
    sequence.updated_at = now
    await _flush_translating_conflicts(session, body.custom_id)
    if body.steps is not None:
        old = await repository.replace_steps(session, sequence.id, _step_rows(body.steps))
        delays = [float(step.delay_in_minutes) for step in body.steps]
        await repository.reschedule_waiting(session, sequence.id, old, delays, now)
    return sequence


def empty_counts() -> dict[str, int]:
    return dict.fromkeys(OUTCOMES, 0)


async def start_sequence(session: AsyncSession, org_id: uuid.UUID, ref: str, now: datetime) -> Run:
    """Start a one-off sequence: one run enrolling every contact matching the filter now.

    A handful of statements whatever the number of contacts: lock the sequence, read step 0,
    insert the run, ``INSERT … SELECT`` the enrollments, stamp the run's counts and the
    sequence's status. Zero matches complete the sequence at once.
    """
    sequence = await get_sequence(session, org_id, ref, for_update=True)
    if sequence.is_continuous:
        raise Conflict("only one-off sequences can be started; add contacts to continuous ones")
    if sequence.status != "pending":
        state = "already started" if sequence.status == "active" else sequence.status
        raise Conflict(f"sequence is {state}")
    steps = (await repository.load_steps(session, [sequence.id]))[sequence.id]
    if not steps:
        raise Conflict("sequence has no steps")
    contact_filter = stored_filter(sequence.filter)
    run = Run(
        id=new_id(),
        org_id=org_id,
        sequence_id=sequence.id,
        kind="start",
        total=0,
        counts=empty_counts(),
        created_at=now,
    )
    session.add(run)
    await session.flush()
    added = await repository.enroll_matching_contacts(
        session,
        sequence=sequence,
        run_id=run.id,
        contact_filter=contact_filter,
        now=now,
        next_step_at=minutes_after(now, steps[0].delay_in_minutes),
    )
    run.total = added
    run.counts = {**empty_counts(), "added": added}
    sequence.status = "active" if added else "complete"
    sequence.started_at = now
    if not added:
        sequence.ended_at = now
    sequence.updated_at = now
    await session.flush()
    return run


@dataclass(frozen=True)
class Canceled:
    id: uuid.UUID
    kind: Literal["sequence", "run"]
    canceled_at: datetime

    def wire(self) -> dict[str, str]:
        return {"id": str(self.id), "kind": self.kind, "canceled_at": iso(self.canceled_at) or ""}


async def cancel(session: AsyncSession, org_id: uuid.UUID, ref: str, now: datetime) -> Canceled:
    """Cancel a sequence (by id or custom_id) or one run of it (by run id). Idempotent: a second
    cancel changes nothing and reports the first ``canceled_at``."""
    try:
        sequence = await get_sequence(session, org_id, ref, for_update=True)
    except NotFound:
        run_id = parse_uuid(ref)
        run = await repository.get_run(session, org_id, run_id) if run_id else None
        if run is None:
            raise
        return await _cancel_run(session, run, now)
    if sequence.status == "canceled" and sequence.canceled_at is not None:
        return Canceled(sequence.id, "sequence", sequence.canceled_at)
    if sequence.status == "complete":
        raise Conflict("sequence is complete and can no longer be canceled")
    await repository.cancel_active_enrollments(session, now=now, sequence_id=sequence.id)
    sequence.status = "canceled"
    sequence.canceled_at = now
    sequence.updated_at = now
    await session.flush()
    return Canceled(sequence.id, "sequence", now)


async def _cancel_run(session: AsyncSession, run: Run, now: datetime) -> Canceled:
    """Only this run's active enrollments stop. When that leaves a started one-off sequence with
    nothing active, it is complete (SPEC §3: complete when every enrollment has finished)."""
    if run.canceled_at is not None:
        return Canceled(run.id, "run", run.canceled_at)
    # Lock order sequence → enrollments, as a sequence cancel takes them (no deadlock).
    sequence = await session.get(Sequence, run.sequence_id, with_for_update=True)
    await repository.cancel_active_enrollments(session, now=now, run_id=run.id)
    run.canceled_at = now
    if (
        sequence is not None
        and not sequence.is_continuous
        and sequence.status == "active"
        and not await repository.has_active_enrollments(session, sequence.id)
    ):
        sequence.status = "complete"
        sequence.ended_at = now
        sequence.updated_at = now
    await session.flush()
    return Canceled(run.id, "run", now)
