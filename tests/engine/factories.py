"""Rows for engine tests, written straight through the ORM so these tests depend on no other
domain's API (sequences and contacts are built on other branches)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from opensequence.clock import ManualClock
from opensequence.config import Settings
from opensequence.db import Database
from opensequence.engine.worker import Worker
from opensequence.mail.transports import transport_from_url
from opensequence.models import Contact, Enrollment, Organization, Run, Sequence, SequenceStep


def make_worker(
    db: Database,
    settings: Settings,
    clock: ManualClock,
    *,
    kind: type[Worker] = Worker,
    concurrency: int = 4,
    **kw: Any,
) -> Worker:
    """A worker (of ``kind``, a test's subclass) on the settings' transport, ``concurrency``
    sends at a time, moved by ``clock``."""
    transport = transport_from_url(settings.mail_url, pool_size=concurrency)
    return kind(db, transport, settings, clock=clock, concurrency=concurrency, **kw)


def email_step(
    subject: str = "Hello {{ contact.name }}",
    body: str = "<p>Hi {{ contact.name }}, plan {{ contact.custom_data.plan | default: 'free' }}"
    ' <a href="{{ unsubscribe_url }}">unsubscribe</a></p>',
    *,
    delay: float = 0.0,
    from_email: str = "sales@example.com",
    sender_name: str = "Sales Team",
    transactional: bool = False,
) -> dict[str, Any]:
    return {
        "action": {
            "type": "send_emails",
            "data": {
                "from_email": from_email,
                "email_subject": subject,
                "email_body": body,
                "email_sender_name": sender_name,
                "email_is_transactional": transactional,
            },
        },
        "delay_in_minutes": delay,
    }


def call_step(delay: float = 0.0) -> dict[str, Any]:
    return {"action": {"type": "make_phone_calls", "data": {}}, "delay_in_minutes": delay}


async def make_org(db: Database, name: str | None = None) -> uuid.UUID:
    async with db.transaction() as session:
        org = Organization(name=name or f"org-{uuid.uuid4().hex[:8]}")
        session.add(org)
        await session.flush()
        return org.id


async def make_contacts(
    db: Database, org_id: uuid.UUID, people: list[dict[str, Any]]
) -> list[uuid.UUID]:
    async with db.transaction() as session:
        rows = [
            Contact(
                org_id=org_id,
                email=p.get("email"),
                email_normalized=p["email"].lower() if p.get("email") else None,
                phone_number=p.get("phone_number"),
                name=p.get("name"),
                custom_data=p.get("custom_data", {}),
            )
            for p in people
        ]
        session.add_all(rows)
        await session.flush()
        return [row.id for row in rows]


async def make_sequence(
    db: Database,
    org_id: uuid.UUID,
    steps: list[dict[str, Any]],
    *,
    name: str = "Onboarding",
    custom_id: str | None = None,
    is_continuous: bool = False,
    started_at: datetime,
) -> uuid.UUID:
    """An active sequence (a started one-off, or a continuous one) with its steps."""
    async with db.transaction() as session:
        sequence = Sequence(
            org_id=org_id,
            name=name,
            custom_id=custom_id,
            is_continuous=is_continuous,
            status="active",
            started_at=started_at,
        )
        session.add(sequence)
        await session.flush()
        session.add_all(
            SequenceStep(
                sequence_id=sequence.id,
                step_index=index,
                action=step["action"],
                delay_in_minutes=step["delay_in_minutes"],
            )
            for index, step in enumerate(steps)
        )
        return sequence.id


async def enroll(
    db: Database,
    org_id: uuid.UUID,
    sequence_id: uuid.UUID,
    contact_ids: list[uuid.UUID],
    *,
    now: datetime,
    first_delay_minutes: float = 0.0,
) -> list[uuid.UUID]:
    """One start run enrolling ``contact_ids``; step 0 falls due after its delay."""
    from datetime import timedelta

    async with db.transaction() as session:
        run = Run(org_id=org_id, sequence_id=sequence_id, kind="start", total=len(contact_ids))
        session.add(run)
        await session.flush()
        rows = [
            Enrollment(
                org_id=org_id,
                sequence_id=sequence_id,
                contact_id=contact_id,
                run_id=run.id,
                run_index=index,
                status="active",
                current_step=0,
                next_step_at=now + timedelta(minutes=first_delay_minutes),
                created_at=now,
                updated_at=now,
            )
            for index, contact_id in enumerate(contact_ids)
        ]
        session.add_all(rows)
        await session.flush()
        return [row.id for row in rows]


def completed(enrollment_id: uuid.UUID, step: int = 0) -> dict[str, Any]:
    """The change :func:`repository.update_enrollments` takes to complete an enrollment claimed
    on ``step`` (its last)."""
    return {
        "b_id": enrollment_id,
        "b_claimed_step": step,
        "b_status": "completed",
        "b_step": step + 1,
        "b_next_at": None,
        "b_waiting": None,
        "b_attempts": 0,
    }
