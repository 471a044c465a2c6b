"""The delivery engine end to end: real database (both), real SMTP server, manual clock."""

from __future__ import annotations

import asyncio
import contextvars
import mailbox
import threading
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, insert, select, text, update

from opensequence.clock import ManualClock
from opensequence.config import Settings
from opensequence.contacts import repository as contacts_repository
from opensequence.contacts.repository import delete_contact
from opensequence.db import Database
from opensequence.deliverability.service import suppress
from opensequence.engine import repository as repo
from opensequence.engine import worker as worker_module
from opensequence.engine.worker import Worker
from opensequence.mail.transports import transport_from_url
from opensequence.models import (
    Contact,
    Enrollment,
    Message,
    Sequence,
    SequenceStep,
    Suppression,
)
from opensequence.sequences.service import cancel
from opensequence.unsubscribe import load_secret, read_token
from tests.engine.factories import (
    call_step,
    completed,
    email_step,
    enroll,
    make_contacts,
    make_org,
    make_sequence,
    make_worker,
)
from tests.engine.sink import Sink, SinkServer


async def messages_of(db: Database, enrollment_id: uuid.UUID) -> list[Message]:
    async with db.transaction() as session:
        rows = await session.scalars(
            select(Message)
            .where(Message.enrollment_id == enrollment_id)
            .order_by(Message.step_index)
        )
        return list(rows)


async def enrollment(db: Database, enrollment_id: uuid.UUID) -> Enrollment:
    async with db.transaction() as session:
        found = await session.get(Enrollment, enrollment_id)
        assert found is not None
        return found


async def step_stamps(db: Database, sequence_id: uuid.UUID) -> list[Any]:
    """``(started_at, ended_at)`` of the sequence's steps, in order."""
    async with db.transaction() as session:
        return list(
            (
                await session.execute(
                    select(SequenceStep.started_at, SequenceStep.ended_at)
                    .where(SequenceStep.sequence_id == sequence_id)
                    .order_by(SequenceStep.step_index)
                )
            ).all()
        )


def send_record(
    org: uuid.UUID,
    sequence_id: uuid.UUID,
    enrollment_id: uuid.UUID,
    contact_id: uuid.UUID,
    now: Any,
    *,
    status: str = "sending",
    attempts: int = 0,
) -> dict[str, Any]:
    """A ``messages`` row for step 0 of the enrollment, as the worker writes it."""
    row_id = uuid.uuid4()
    return {
        "id": row_id,
        "org_id": org,
        "enrollment_id": enrollment_id,
        "sequence_id": sequence_id,
        "contact_id": contact_id,
        "step_index": 0,
        "from_email": "team@acme.test",
        "to_email": "p@x.org",
        "status": status,
        "reason": None,
        "message_id": f"<{row_id}@acme.test>",
        "attempts": attempts,
        "created_at": now,
        "updated_at": now,
    }


async def drain_changing_before_the_sends(
    db: Database,
    smtp_settings: Settings,
    clock: ManualClock,
    change: Callable[[], Awaitable[None]],
    *,
    batch: int,
) -> None:
    """Drain with a worker that runs ``change`` once its batch of ``batch`` is claimed and its
    send records are committed, right before the pre-send recheck."""

    class ChangedMeanwhile(Worker):
        async def _recheck(self, sends: list[Any]) -> list[Any]:
            assert len(sends) == batch
            await change()
            return await super()._recheck(sends)

    transport = transport_from_url(smtp_settings.mail_url, pool_size=4)
    worker = ChangedMeanwhile(db, transport, smtp_settings, clock=clock, concurrency=4)
    try:
        assert await worker.drain() == batch
    finally:
        await transport.aclose()


@pytest.mark.parametrize(
    "sink", [False, True], ids=["one command at a time", "pipelined"], indirect=True
)
async def test_three_steps_delivered_in_order_rendered_with_headers(
    db: Database, worker: Worker, sink: SinkServer, clock: ManualClock, smtp_settings: Settings
) -> None:
    org = await make_org(db)
    people = [
        {"email": "ada@example.org", "name": "Ada", "custom_data": {"plan": "pro"}},
        {"email": "bob@example.org", "name": "Bob <b>"},
    ]
    contacts = await make_contacts(db, org, people)
    steps = [
        email_step(subject="Welcome {{ contact.name }}", delay=0),
        email_step(
            subject="Step {{ step.index }} of {{ sequence.name }}",
            body="<p>{{ contact.custom_data.plan | default: 'free' }}</p>",
            delay=1,
            transactional=True,
        ),
        email_step(subject="Last one, {{ contact.name }}", delay=1),
    ]
    sequence_id = await make_sequence(db, org, steps, name="Onboarding", started_at=clock.now())
    enrollments = await enroll(db, org, sequence_id, contacts, now=clock.now())

    assert await worker.drain() == 2
    assert len(sink.sink.received) == 2
    assert await worker.drain() == 0, "step 1 is not due before its delay"
    clock.advance(seconds=59)
    assert await worker.drain() == 0
    clock.advance(seconds=1)
    assert await worker.drain() == 2
    clock.advance(minutes=1)
    assert await worker.drain() == 2
    assert await worker.drain() == 0

    received = sink.sink.received
    assert len(received) == 6
    by_recipient: dict[str, list[str]] = {}
    for message in received:
        by_recipient.setdefault(str(message["To"]), []).append(str(message["Subject"]))
    assert by_recipient == {
        "ada@example.org": ["Welcome Ada", "Step 1 of Onboarding", "Last one, Ada"],
        "bob@example.org": ["Welcome Bob <b>", "Step 1 of Onboarding", "Last one, Bob <b>"],
    }

    async with db.transaction() as session:
        secret = await load_secret(session, smtp_settings.secret_key)
    for enrollment_id, contact_id in zip(enrollments, contacts, strict=True):
        rows = await messages_of(db, enrollment_id)
        assert [(r.step_index, r.status, r.attempts) for r in rows] == [
            (0, "sent", 1),
            (1, "sent", 1),
            (2, "sent", 1),
        ]
        sent = [m for m in received if m["Message-ID"] in {r.message_id for r in rows}]
        assert len(sent) == 3
        for row in rows:
            assert row.message_id == f"<{row.id}@example.com>"
        first = next(m for m in sent if m["Message-ID"] == rows[0].message_id)
        assert first["From"].addresses[0].display_name == "Sales Team"
        raw = sink.sink.raw[received.index(first)]
        assert b'\nFrom: "Sales Team" <sales@example.com>\r\n' in b"\n" + raw
        assert first["Date"] is not None
        assert first["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        url = str(first["List-Unsubscribe"]).strip("<>")
        assert url.startswith(f"{smtp_settings.public_url}/unsubscribe/")
        assert read_token(secret, url.rsplit("/", 1)[1]) == (org, contact_id)
        html = first.get_body(("html",))
        text = first.get_body(("plain",))
        assert html is not None and text is not None
        assert url in html.get_content()
        transactional = next(m for m in sent if m["Message-ID"] == rows[1].message_id)
        assert transactional["List-Unsubscribe"] is None
        state = await enrollment(db, enrollment_id)
        assert (state.status, state.next_step_at, state.locked_by) == ("completed", None, None)

    ada_body = next(m for m in received if m["To"] == "ada@example.org").get_body(("html",))
    assert ada_body is not None and "Hi Ada, plan pro" in ada_body.get_content()
    bob_body = next(m for m in received if m["To"] == "bob@example.org").get_body(("html",))
    assert bob_body is not None and "Bob &lt;b&gt;" in bob_body.get_content()

    async with db.transaction() as session:
        sequence = await session.get(Sequence, sequence_id)
        assert sequence is not None
        assert (sequence.status, sequence.ended_at) == ("complete", clock.now())
    stamps = await step_stamps(db, sequence_id)
    start = clock.now() - timedelta(minutes=2)
    assert [s for s, _ in stamps] == [start, start + timedelta(minutes=1), clock.now()]
    assert all(e is not None for _, e in stamps)


async def test_transient_failure_is_retried_with_the_same_message(
    db: Database, settings: Settings, clock: ManualClock
) -> None:
    answers = {0: "451 4.3.0 try again later", 1: "451 4.3.0 still busy"}
    with SinkServer(Sink(answers.get)) as server:
        custom = settings.model_copy(
            update={
                "mail_url": server.url,
                "retry_base_seconds": 60.0,
                "retry_horizon_seconds": 3600.0,
            }
        )
        worker = make_worker(db, custom, clock)
        org = await make_org(db)
        contacts = await make_contacts(db, org, [{"email": "eve@example.org", "name": "Eve"}])
        sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
        [enrollment_id] = await enroll(db, org, sequence_id, contacts, now=clock.now())

        await worker.drain()
        state = await enrollment(db, enrollment_id)
        [row] = await messages_of(db, enrollment_id)
        assert (row.status, row.attempts, row.reason) == ("sending", 1, "451 4.3.0 try again later")
        assert (state.status, state.waiting_reason, state.attempts) == ("active", "retrying", 1)
        assert state.next_step_at is not None
        assert timedelta(seconds=30) <= state.next_step_at - clock.now() <= timedelta(seconds=60)

        clock.set(state.next_step_at)
        await worker.drain()
        state = await enrollment(db, enrollment_id)
        assert (state.waiting_reason, state.attempts) == ("retrying", 2)
        assert state.next_step_at is not None
        assert timedelta(seconds=60) <= state.next_step_at - clock.now() <= timedelta(seconds=120)

        clock.set(state.next_step_at)
        await worker.drain()
        await worker.transport.aclose()
        [after] = await messages_of(db, enrollment_id)
        assert (after.id, after.status, after.attempts) == (row.id, "sent", 3)
        assert server.sink.attempts == 3
        assert [m["Message-ID"] for m in server.sink.received] == [row.message_id]
        state = await enrollment(db, enrollment_id)
        assert (state.status, state.waiting_reason) == ("completed", None)


async def test_transient_failures_past_the_horizon_fail(
    db: Database, settings: Settings, clock: ManualClock
) -> None:
    with SinkServer(Sink(lambda _: "421 4.7.0 go away")) as server:
        custom = settings.model_copy(
            update={
                "mail_url": server.url,
                "retry_base_seconds": 60.0,
                "retry_horizon_seconds": 300.0,
            }
        )
        worker = make_worker(db, custom, clock)
        org = await make_org(db)
        contacts = await make_contacts(db, org, [{"email": "x@example.org"}])
        sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
        [enrollment_id] = await enroll(db, org, sequence_id, contacts, now=clock.now())
        for _ in range(20):
            await worker.drain()
            state = await enrollment(db, enrollment_id)
            if state.status != "active":
                break
            assert state.next_step_at is not None
            assert state.next_step_at <= clock.now() + timedelta(seconds=300)
            clock.set(state.next_step_at)
        await worker.transport.aclose()
        [row] = await messages_of(db, enrollment_id)
        assert state.status == "failed"
        assert row.status == "failed" and row.reason is not None
        assert row.reason.startswith("retries exhausted: 421")


async def test_permanent_failure_records_the_bounce_and_never_retries(
    db: Database, settings: Settings, clock: ManualClock
) -> None:
    with SinkServer(Sink(lambda _: "550 5.1.1 mailbox unavailable")) as server:
        worker = make_worker(db, settings.model_copy(update={"mail_url": server.url}), clock)
        org = await make_org(db)
        contacts = await make_contacts(db, org, [{"email": "gone@example.org"}])
        steps = [email_step(), email_step(delay=1)]
        sequence_id = await make_sequence(db, org, steps, started_at=clock.now())
        [enrollment_id] = await enroll(db, org, sequence_id, contacts, now=clock.now())
        await worker.drain()
        clock.advance(days=2)
        assert await worker.drain() == 0
        await worker.transport.aclose()
        assert server.sink.attempts == 1
    [row] = await messages_of(db, enrollment_id)
    assert (row.status, row.attempts) == ("failed", 1)
    assert row.reason == "bounced: 550 5.1.1 mailbox unavailable"
    state = await enrollment(db, enrollment_id)
    assert (state.status, state.next_step_at, state.current_step) == ("failed", None, 0)


class RefusingOneInLatin1(Sink):
    """Refuses gone@example.org at RCPT with a reply that is not UTF-8 (Latin-1 text)."""

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> bytes | str:
        if address == "gone@example.org":
            return b"550 5.1.1 caf\xe9 unknown\x00"
        envelope.rcpt_tos.append(address)
        return "250 OK"


async def test_a_refusal_in_bytes_that_are_not_utf8_is_recorded_and_the_batch_goes_once(
    db: Database, settings: Settings, clock: ManualClock
) -> None:
    """The reply's text is kept in the send record. Read with its invalid bytes as lone
    surrogates (and a NUL), neither database could store it: the batch was never recorded, its
    claims ran out, and its accepted message went out again at every claim."""
    with SinkServer(RefusingOneInLatin1()) as server:
        worker = make_worker(db, settings.model_copy(update={"mail_url": server.url}), clock)
        org = await make_org(db)
        emails = [{"email": "gone@example.org"}, {"email": "ok@example.org"}]
        contacts = await make_contacts(db, org, emails)
        sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
        gone, kept = await enroll(db, org, sequence_id, contacts, now=clock.now())
        await worker.drain()
        clock.advance(hours=2)  # past any lease
        assert await worker.drain() == 0
        await worker.transport.aclose()
    assert [to for _, to in server.sink.envelopes] == [["ok@example.org"]]
    [bounced] = await messages_of(db, gone)
    assert (bounced.status, bounced.reason) == ("failed", "bounced: 550 5.1.1 caf\ufffd unknown")
    [sent] = await messages_of(db, kept)
    assert sent.status == "sent"


async def cancel_and_delete(
    db: Database, sequence_id: uuid.UUID, contact_id: uuid.UUID, clock: ManualClock
) -> None:
    """Cancel one sequence and delete one contact, in one committed transaction."""
    async with db.transaction() as session:
        await session.execute(
            update(Sequence)
            .where(Sequence.id == sequence_id)
            .values(status="canceled", canceled_at=clock.now())
        )
        await session.execute(delete(Contact).where(Contact.id == contact_id))


async def test_cancel_and_contact_deletion_stop_further_sends(
    db: Database, worker: Worker, sink: SinkServer, clock: ManualClock
) -> None:
    org = await make_org(db)
    contacts = await make_contacts(db, org, [{"email": "a@example.org"}, {"email": "b@x.org"}])
    steps = [email_step(), email_step(delay=1), email_step(delay=1)]
    canceled_seq = await make_sequence(db, org, steps, started_at=clock.now())
    continuing = await make_sequence(
        db, org, steps, started_at=clock.now(), is_continuous=True, name="Nurture"
    )
    [in_canceled] = await enroll(db, org, canceled_seq, contacts[:1], now=clock.now())
    [deleted] = await enroll(db, org, continuing, contacts[1:], now=clock.now())
    await worker.drain()
    assert len(sink.sink.received) == 2

    await cancel_and_delete(db, canceled_seq, contacts[1], clock)
    clock.advance(minutes=5)
    assert await worker.drain() == 2
    assert len(sink.sink.received) == 2
    for enrollment_id in (in_canceled, deleted):
        state = await enrollment(db, enrollment_id)
        assert (state.status, state.current_step, state.next_step_at) == ("canceled", 1, None)
        assert [r.step_index for r in await messages_of(db, enrollment_id)] == [0]


@pytest.mark.parametrize("ended_by", ["cancel", "contact deletion"])
async def test_a_stop_during_a_batch_stops_the_rest_of_it(
    db: Database, smtp_settings: Settings, sink: SinkServer, clock: ManualClock, ended_by: str
) -> None:
    """The batch was checked once, before its first send: the rest of it went out after the
    cancel or the deletion had committed, for as long as the batch took (seconds, with a slow
    provider). Its rest is checked again once the last check is ``recheck_seconds`` old (here
    0, before every send)."""
    org = await make_org(db)
    contacts = await make_contacts(db, org, [{"email": f"p{i}@x.org"} for i in range(4)])
    sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
    enrollments = await enroll(db, org, sequence_id, contacts, now=clock.now())

    class StoppedAfterTheFirst(Worker):
        async def _send(self, item: Any, lease: Any) -> Any:
            outcome = await super()._send(item, lease)
            if len(sink.sink.received) == 1:
                await end_enrollment(db, ended_by, org, sequence_id, contacts[-1], clock.now())
            return outcome

    worker = make_worker(db, smtp_settings, clock, kind=StoppedAfterTheFirst, concurrency=1)
    worker.recheck_seconds = 0
    await worker.drain()
    await worker.transport.aclose()
    expected = ["p0@x.org"] if ended_by == "cancel" else ["p0@x.org", "p1@x.org", "p2@x.org"]
    assert [str(m["To"]) for m in sink.sink.received] == expected
    [stopped] = await messages_of(db, enrollments[-1])
    assert (stopped.status, stopped.reason) == ("skipped", "canceled")


async def test_a_canceled_one_off_sequence_ends_the_steps_no_one_can_reach(
    db: Database, worker: Worker, sink: SinkServer, clock: ManualClock
) -> None:
    """SPEC §3: a step's ended_at is set when no enrollment can still reach it. Canceled, none
    can reach any, yet the steps after the one reached never got it."""
    org = await make_org(db)
    contacts = await make_contacts(db, org, [{"email": "a@x.org"}])
    steps = [email_step(), email_step(delay=60)]
    sequence_id = await make_sequence(db, org, steps, started_at=clock.now())
    await enroll(db, org, sequence_id, contacts, now=clock.now())
    await worker.drain()
    first_ended = clock.now()  # no one is before step 1 any more
    async with db.transaction() as session:
        await cancel(session, org, str(sequence_id), clock.now())
    clock.advance(minutes=1)
    await worker.drain()
    stamps = await step_stamps(db, sequence_id)
    assert [started is not None for started, _ in stamps] == [True, False]
    assert [ended for _, ended in stamps] == [first_ended, clock.now()]


async def test_a_cancel_committed_while_the_batch_was_prepared_stops_its_sends(
    db: Database, smtp_settings: Settings, sink: SinkServer, clock: ManualClock
) -> None:
    org = await make_org(db)
    contacts = await make_contacts(
        db, org, [{"email": "a@example.org"}, {"email": "b@x.org"}, {"email": "c@x.org"}]
    )
    canceled_seq = await make_sequence(db, org, [email_step()], started_at=clock.now())
    other = await make_sequence(
        db, org, [email_step()], started_at=clock.now(), is_continuous=True, name="Nurture"
    )
    [in_canceled] = await enroll(db, org, canceled_seq, contacts[:1], now=clock.now())
    deleted, live = await enroll(db, org, other, contacts[1:], now=clock.now())

    async def cancels() -> None:
        await cancel_and_delete(db, canceled_seq, contacts[1], clock)

    await drain_changing_before_the_sends(db, smtp_settings, clock, cancels, batch=3)
    assert [m["To"] for m in sink.sink.received] == ["c@x.org"]
    for enrollment_id in (in_canceled, deleted):
        [skipped] = await messages_of(db, enrollment_id)
        assert (skipped.status, skipped.reason) == ("skipped", "canceled")
        assert (await enrollment(db, enrollment_id)).status == "canceled"
    assert (await enrollment(db, live)).status == "completed"


@pytest.mark.parametrize("retrying", [False, True])
async def test_a_contact_deleted_while_its_send_was_prepared_leaves_no_open_record(
    db: Database, settings: Settings, clock: ManualClock, retrying: bool
) -> None:
    """Deleted between the claim and the send record (which the deletion's lease release made
    the worker drop unsettled): the record stayed ``sending`` for good, with the deleted
    contact's address (SPEC §2: history keeps only ids). For a retry, the deletion settled the
    waiting record and reserving the claimed retry cleared its reason right after."""
    greylist_once = (lambda n: "451 4.3.0 try later" if n == 0 else None) if retrying else None
    with SinkServer(Sink(greylist_once)) as server:
        smtp = settings.model_copy(update={"mail_url": server.url})
        org = await make_org(db)
        [contact] = await make_contacts(db, org, [{"email": "secret@x.org", "name": "Secret"}])
        sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
        [enrollment_id] = await enroll(db, org, sequence_id, [contact], now=clock.now())
        if retrying:
            first = make_worker(db, smtp, clock)
            await first.drain()
            await first.transport.aclose()
            clock.advance(hours=1)

        class DeletedMeanwhile(Worker):
            async def _plan(self, claimed: Any, loaded: Any, now: Any) -> Any:
                async with db.transaction() as session:
                    await delete_contact(session, org, contact, now=clock.now())
                return await super()._plan(claimed, loaded, now)

        transport = transport_from_url(server.url)
        await DeletedMeanwhile(db, transport, smtp, clock=clock).drain()
        await transport.aclose()
        assert server.sink.received == []
    [row] = await messages_of(db, enrollment_id)
    assert (row.status, row.reason, row.to_email) == ("skipped", "canceled", None)
    assert (await enrollment(db, enrollment_id)).status == "canceled"


async def test_a_contact_deleted_while_its_skipped_step_was_decided_leaves_no_address(
    db: Database, settings: Settings, clock: ManualClock
) -> None:
    """A suppressed contact's step is settled ``skipped`` without a send. Deleted after the
    claim read it, the record written after the deletion kept its address (SPEC §2)."""
    org = await make_org(db)
    [contact] = await make_contacts(db, org, [{"email": "secret@x.org"}])
    async with db.transaction() as session:
        await suppress(session, org, "secret@x.org", "unsubscribed", clock.now())
    sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
    [enrollment_id] = await enroll(db, org, sequence_id, [contact], now=clock.now())

    class DeletedMeanwhile(Worker):
        async def _plan(self, claimed: Any, loaded: Any, now: Any) -> Any:
            planned = await super()._plan(claimed, loaded, now)
            async with db.transaction() as session:
                await delete_contact(session, org, contact, now=clock.now())
            return planned

    await make_worker(db, settings, clock, kind=DeletedMeanwhile).drain()
    [row] = await messages_of(db, enrollment_id)
    assert (row.status, row.reason, row.to_email) == ("skipped", "unsubscribed", None)


async def test_a_record_committed_during_a_contact_deletion_loses_the_address(
    backend: str, db: Database, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's send record committed after the deletion's first pass over the records (it
    could not see it): the send, already checked, went out and was recorded ``sent`` with
    the deleted contact's address (SPEC §2)."""
    if backend != "postgresql":
        pytest.skip("PostgreSQL only: SQLite runs one writing transaction at a time")
    org = await make_org(db)
    [contact] = await make_contacts(db, org, [{"email": "secret@x.org"}])
    sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
    [enrollment_id] = await enroll(db, org, sequence_id, [contact], now=clock.now())
    settle = contacts_repository.settle_released

    async def settle_then_a_worker_records(session: Any, theirs: Any, now: Any, **kw: Any) -> None:
        await settle(session, theirs, now, **kw)
        async with db.transaction() as other:
            row_id = uuid.uuid4()
            await other.execute(
                insert(Message).values(
                    id=row_id,
                    org_id=org,
                    enrollment_id=enrollment_id,
                    sequence_id=sequence_id,
                    contact_id=contact,
                    step_index=0,
                    from_email="sales@example.com",
                    to_email="secret@x.org",
                    status="sent",
                    message_id=f"<{row_id}@example.com>",
                    attempts=1,
                    created_at=now,
                    updated_at=now,
                    sent_at=now,
                )
            )

    monkeypatch.setattr(contacts_repository, "settle_released", settle_then_a_worker_records)
    async with db.transaction() as session:
        await delete_contact(session, org, contact, now=clock.now())
    [row] = await messages_of(db, enrollment_id)
    assert (row.status, row.to_email) == ("sent", None)


async def end_enrollment(
    db: Database, how: str, org: uuid.UUID, sequence_id: uuid.UUID, contact: uuid.UUID, now: Any
) -> None:
    async with db.transaction() as session:
        if how == "cancel":
            await cancel(session, org, str(sequence_id), now)
        else:
            await delete_contact(session, org, contact, now=now)


@pytest.mark.parametrize("ended_by", ["cancel", "contact deletion"])
async def test_a_send_ended_in_flight_then_refused_for_now_is_settled(
    db: Database, settings: Settings, clock: ManualClock, ended_by: str
) -> None:
    """Ended while its send was in flight, the send then answered 451: the worker recorded the
    retry on a record whose enrollment it could no longer move, and it stayed ``sending``."""
    with SinkServer(Sink(lambda n: "451 4.3.0 try later")) as server:
        smtp = settings.model_copy(update={"mail_url": server.url})
        org = await make_org(db)
        [contact] = await make_contacts(db, org, [{"email": "p@x.org"}])
        sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
        [enrollment_id] = await enroll(db, org, sequence_id, [contact], now=clock.now())

        class EndedInFlight(Worker):
            async def _send(self, item: Any, lease: Any) -> Any:
                outcome = await super()._send(item, lease)
                await end_enrollment(db, ended_by, org, sequence_id, contact, clock.now())
                return outcome

        transport = transport_from_url(server.url)
        await EndedInFlight(db, transport, smtp, clock=clock).drain()
        await transport.aclose()
    [row] = await messages_of(db, enrollment_id)
    assert (row.status, row.reason, row.attempts) == ("skipped", "canceled", 1)
    assert (await enrollment(db, enrollment_id)).status == "canceled"


@pytest.mark.parametrize("ended_by", ["cancel", "contact deletion"])
async def test_a_send_left_unsent_by_a_stopping_worker_is_settled_when_ended(
    db: Database, smtp_settings: Settings, sink: SinkServer, clock: ManualClock, ended_by: str
) -> None:
    """A worker stopping before a recorded send releases its claim and leaves the record
    ``sending`` for the next claim. Canceled (or the contact deleted) meanwhile, there is no
    next claim: the record stayed ``sending`` for good."""
    org = await make_org(db)
    [contact] = await make_contacts(db, org, [{"email": "p@x.org"}])
    sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
    [enrollment_id] = await enroll(db, org, sequence_id, [contact], now=clock.now())

    class StoppedBeforeSending(Worker):
        async def _recheck(self, sends: list[Any]) -> list[Any]:
            kept = await super()._recheck(sends)
            self.stop()
            return kept

    transport = transport_from_url(smtp_settings.mail_url)
    await StoppedBeforeSending(db, transport, smtp_settings, clock=clock).drain()
    await transport.aclose()
    [open_record] = await messages_of(db, enrollment_id)
    assert (open_record.status, open_record.reason) == ("sending", None)
    await end_enrollment(db, ended_by, org, sequence_id, contact, clock.now())
    assert sink.sink.received == []
    [row] = await messages_of(db, enrollment_id)
    assert (row.status, row.reason) == ("skipped", "canceled")


@pytest.mark.parametrize("ended_by", ["cancel", "contact deletion"])
async def test_a_cancel_settles_a_send_waiting_for_its_retry(
    db: Database, settings: Settings, clock: ManualClock, ended_by: str
) -> None:
    """No worker holds a send between its retries: after a cancel or the contact's deletion it
    stayed ``sending`` in the history for good."""
    with SinkServer(Sink(lambda n: "451 4.3.0 try later" if n == 0 else None)) as server:
        worker = make_worker(db, settings.model_copy(update={"mail_url": server.url}), clock)
        org = await make_org(db)
        contacts = await make_contacts(db, org, [{"email": "a@x.org"}])
        sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
        [enrollment_id] = await enroll(db, org, sequence_id, contacts, now=clock.now())
        await worker.drain()
        [waiting] = await messages_of(db, enrollment_id)
        assert (waiting.status, waiting.reason) == ("sending", "451 4.3.0 try later")
        await end_enrollment(db, ended_by, org, sequence_id, contacts[0], clock.now())
        clock.advance(hours=1)
        await worker.drain()
        await worker.transport.aclose()
        assert server.sink.received == []
    [row] = await messages_of(db, enrollment_id)
    assert (row.status, row.reason, row.attempts) == ("skipped", "canceled", 1)
    assert (await enrollment(db, enrollment_id)).status == "canceled"


async def test_a_suppression_committed_while_the_batch_was_prepared_skips_its_sends(
    db: Database, smtp_settings: Settings, sink: SinkServer, clock: ManualClock
) -> None:
    """An unsubscribe takes effect at once (SPEC §6): one that lands after the batch was
    prepared, before its sends, still stops marketing mail to that address, and a manual
    suppression stops transactional mail too; an unsubscribe does not stop transactional
    mail. A skipped step moves the enrollment on, as it does when skipped at prepare."""
    org = await make_org(db)
    people = [{"email": e} for e in ("u@x.org", "k@x.org", "t@x.org", "m@x.org")]
    unsubscribed, kept, transactional, manual = await make_contacts(db, org, people)
    marketing = await make_sequence(
        db, org, [email_step(), email_step(delay=10)], started_at=clock.now()
    )
    receipts = await make_sequence(
        db, org, [email_step(transactional=True)], started_at=clock.now(), name="Receipts"
    )
    in_marketing = await enroll(db, org, marketing, [unsubscribed, kept], now=clock.now())
    in_receipts = await enroll(db, org, receipts, [transactional, manual], now=clock.now())

    async def suppressions() -> None:
        async with db.transaction() as session:
            for email, reason in (
                ("u@x.org", "unsubscribed"),
                ("t@x.org", "unsubscribed"),
                ("M@x.org", "manual"),
            ):
                await suppress(session, org, email, reason, clock.now())

    await drain_changing_before_the_sends(db, smtp_settings, clock, suppressions, batch=4)
    assert sorted(m["To"] for m in sink.sink.received) == ["k@x.org", "t@x.org"]
    outcomes = {}
    for enrollment_id in (*in_marketing, *in_receipts):
        [row] = await messages_of(db, enrollment_id)
        state = await enrollment(db, enrollment_id)
        outcomes[row.to_email] = (row.status, row.reason, state.status, state.current_step)
    assert outcomes == {
        "u@x.org": ("skipped", "unsubscribed", "active", 1),
        "k@x.org": ("sent", None, "active", 1),
        "t@x.org": ("sent", None, "completed", 1),
        "m@x.org": ("skipped", "suppressed", "completed", 1),
    }


async def test_expired_lease_lets_another_worker_take_over(
    db: Database, smtp_settings: Settings, sink: SinkServer, clock: ManualClock
) -> None:
    """Worker A claims and records a send, then stalls inside the provider call; after its
    lease expires worker B sends the same message (same Message-ID) and advances; when A wakes
    up its late delivery is the one allowed duplicate and its advance is refused."""
    org = await make_org(db)
    contacts = await make_contacts(db, org, [{"email": "c@example.org"}])
    steps = [email_step(), email_step(delay=10)]
    sequence_id = await make_sequence(db, org, steps, started_at=clock.now())
    [enrollment_id] = await enroll(db, org, sequence_id, contacts, now=clock.now())

    class Stalled:
        def __init__(self, inner: object) -> None:
            self.inner = inner
            self.entered = __import__("asyncio").Event()
            self.gate = __import__("asyncio").Event()

        async def send(self, outgoing: object) -> None:
            self.entered.set()
            await self.gate.wait()
            await self.inner.send(outgoing)  # type: ignore[attr-defined]

        async def aclose(self) -> None:
            await self.inner.aclose()  # type: ignore[attr-defined]

    import asyncio

    stalled = Stalled(transport_from_url(smtp_settings.mail_url))
    worker_a = Worker(db, stalled, smtp_settings, clock=clock, worker_id="A")
    worker_b = make_worker(db, smtp_settings, clock, worker_id="B")
    task = asyncio.create_task(worker_a.run_once())
    await stalled.entered.wait()
    [row] = await messages_of(db, enrollment_id)
    assert row.status == "sending"

    assert await worker_b.drain() == 0, "A's lease still holds"
    clock.advance(seconds=smtp_settings.worker_lease_seconds + 1)
    assert await worker_b.drain() == 1
    state = await enrollment(db, enrollment_id)
    assert (state.current_step, state.locked_by) == (1, None)

    stalled.gate.set()
    assert await task == 1
    await stalled.aclose()
    await worker_b.transport.aclose()
    state = await enrollment(db, enrollment_id)
    assert state.current_step == 1, "A's stale advance must not move the enrollment again"
    [after] = await messages_of(db, enrollment_id)
    assert (after.id, after.status) == (row.id, "sent")
    assert [m["Message-ID"] for m in sink.sink.received] == [row.message_id, row.message_id]


async def test_when_recording_fails_the_rest_of_the_batch_is_not_sent(
    db: Database, smtp_settings: Settings, sink: SinkServer, clock: ManualClock
) -> None:
    """Outcomes cannot be written (the database went away): the worker stops handing the
    batch's remaining messages over, so only the failed chunk and the sends in flight are
    sent-but-unrecorded; the rest keep their claim and go out once it expires."""
    org = await make_org(db)
    contacts = await make_contacts(db, org, [{"email": f"p{i}@x.org"} for i in range(60)])
    sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
    await enroll(db, org, sequence_id, contacts, now=clock.now())

    class RecordingFails(Worker):
        async def _finish(self, results: Any) -> None:
            raise OSError("database connection lost")

    transport = transport_from_url(smtp_settings.mail_url, pool_size=2)
    worker = RecordingFails(db, transport, smtp_settings, clock=clock, concurrency=2, batch_size=60)
    assert worker.finish_chunk == 10
    try:
        with pytest.raises(OSError, match="database connection lost"):
            await worker.run_once()
    finally:
        await transport.aclose()
    # The chunk of 10 whose recording failed, plus at most the 2 in flight meanwhile.
    assert 10 <= len(sink.sink.received) <= 12
    async with db.transaction() as session:
        sending = await session.scalar(
            select(func.count())
            .select_from(Message)
            .where(Message.org_id == org, Message.status == "sending")
        )
    assert sending == 60

    clock.advance(seconds=smtp_settings.worker_lease_seconds + 1)
    later = make_worker(db, smtp_settings, clock)
    try:
        assert await later.drain() == 60
    finally:
        await later.transport.aclose()
    received = [m["Message-ID"] for m in sink.sink.received]
    assert len(set(received)) == 60  # every message, the resent ones with their Message-ID


async def test_when_the_send_records_cannot_be_written_the_claims_go_back_at_once(
    db: Database, smtp_settings: Settings, sink: SinkServer, clock: ManualClock
) -> None:
    """The batch is claimed and decided, then writing its send records fails: nothing of it
    is on record, so its claims are let go at once (not when their leases run out) and the
    next iteration, at the same instant, takes and sends the whole batch."""
    org = await make_org(db)
    contacts = await make_contacts(db, org, [{"email": f"p{i}@x.org"} for i in range(5)])
    sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
    enrolled = await enroll(db, org, sequence_id, contacts, now=clock.now())

    class RecordsFailOnce(Worker):
        failed = False

        async def _record(self, session: Any, plan: Any, loaded: Any, now: Any) -> Any:
            if not self.failed:
                self.failed = True
                raise OSError("database connection lost")
            return await super()._record(session, plan, loaded, now)

    transport = transport_from_url(smtp_settings.mail_url, pool_size=2)
    worker = RecordsFailOnce(db, transport, smtp_settings, clock=clock, concurrency=2)
    try:
        with pytest.raises(OSError, match="database connection lost"):
            await worker.run_once()
        async with db.transaction() as session:
            assert await session.scalar(select(func.count()).select_from(Message)) == 0
            leased = await session.scalars(
                select(Enrollment.locked_by).where(Enrollment.id.in_(enrolled))
            )
            assert list(leased) == [None] * 5
        assert await worker.drain() == 5
    finally:
        await transport.aclose()
    assert sorted(m["To"] for m in sink.sink.received) == [f"p{i}@x.org" for i in range(5)]


async def test_writes_go_ahead_while_a_claimed_batch_is_being_decided(
    db: Database, smtp_settings: Settings, sink: SinkServer, clock: ManualClock
) -> None:
    """Deciding and rendering a batch runs between the claim's transaction and the records':
    on SQLite, whose single writer would otherwise be held all along, a write (an API
    request) in the meantime goes ahead instead of waiting for the batch."""
    org = await make_org(db)
    contacts = await make_contacts(db, org, [{"email": "a@x.org"}, {"email": "b@x.org"}])
    sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
    await enroll(db, org, sequence_id, contacts, now=clock.now())
    deciding = asyncio.Event()
    written = asyncio.Event()

    class Observed(Worker):
        async def _plan(self, claimed: Any, loaded: Any, now: Any) -> Any:
            deciding.set()
            await written.wait()
            return await super()._plan(claimed, loaded, now)

    async def write_meanwhile() -> None:
        async with asyncio.timeout(10):
            await deciding.wait()
        async with asyncio.timeout(5), db.transaction() as session:
            await session.execute(update(Contact).where(Contact.id == contacts[0]).values(name="A"))
        written.set()

    transport = transport_from_url(smtp_settings.mail_url, pool_size=2)
    worker = Observed(db, transport, smtp_settings, clock=clock, concurrency=2)
    try:
        claimed, _ = await asyncio.gather(worker.run_once(), write_meanwhile())
    finally:
        await transport.aclose()
    assert claimed == 2
    assert sorted(m["To"] for m in sink.sink.received) == ["a@x.org", "b@x.org"]


async def test_no_send_starts_while_outcomes_cannot_be_recorded(
    db: Database,
    smtp_settings: Settings,
    sink: SinkServer,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Recording a chunk of sent messages fails twice (a database restart), then works: the
    worker waits and records them, so nothing is sent twice. While it fails no lane hands
    another message over (it could not be recorded either): only the sends already in flight
    complete. Then the rest of the batch goes out, each message once."""
    org = await make_org(db)
    contacts = await make_contacts(db, org, [{"email": f"p{i}@x.org"} for i in range(60)])
    sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
    await enroll(db, org, sequence_id, contacts, now=clock.now())
    original = repo.update_messages
    failures = [OSError("connection lost"), OSError("the database system is starting up")]
    delivered_at_failure: list[int] = []

    async def flaky(session: Any, changes: Any, now: Any) -> None:
        if failures and any(change["b_status"] == "sent" for change in changes):
            delivered_at_failure.append(len(sink.sink.received))
            raise failures.pop(0)
        await original(session, changes, now)

    monkeypatch.setattr(repo, "update_messages", flaky)
    transport = transport_from_url(smtp_settings.mail_url, pool_size=2)
    worker = Worker(db, transport, smtp_settings, clock=clock, concurrency=2, batch_size=60)
    assert worker.finish_chunk == 10
    try:
        assert await worker.drain() == 60
    finally:
        await transport.aclose()
    first, second = delivered_at_failure
    # Between the two failed attempts (0.1 s apart) at most the 2 sends in flight finished.
    assert second - first <= 2, delivered_at_failure
    received = [m["Message-ID"] for m in sink.sink.received]
    assert len(received) == len(set(received)) == 60
    async with db.transaction() as session:
        statuses = await session.scalars(select(Message.status).where(Message.org_id == org))
        assert list(statuses) == ["sent"] * 60


async def test_an_unsubscribe_committed_while_recording_is_paused_stops_the_rest_of_the_batch(
    db: Database,
    smtp_settings: Settings,
    sink: SinkServer,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The batch's recheck ran before its sends began. While recording outcomes fails the lanes
    wait, and an unsubscribe may commit meanwhile (the API reaching the database when this
    worker does not): once recording works again, the rest of the batch is checked again
    before anything more goes out."""
    org = await make_org(db)
    people = [{"email": f"p{i}@x.org"} for i in range(60)]
    contacts = await make_contacts(db, org, people)
    sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
    await enroll(db, org, sequence_id, contacts, now=clock.now())
    original = repo.update_messages
    failures = [OSError("connection lost")]
    delivered_at_failure: list[int] = []
    unsubscribed: list[str] = []

    async def unsubscribe_everyone_not_yet_sent() -> None:
        async with db.transaction() as session:
            received = {str(m["To"]) for m in sink.sink.received}
            for person in people:
                if person["email"] not in received:
                    await suppress(session, org, person["email"], "unsubscribed", clock.now())
                    unsubscribed.append(person["email"])

    unsubscribing: list[asyncio.Task[None]] = []

    async def flaky(session: Any, changes: Any, now: Any) -> None:
        if failures and any(change["b_status"] == "sent" for change in changes):
            delivered_at_failure.append(len(sink.sink.received))
            # Committed by a task of its own while the lanes wait (outside this transaction,
            # which on SQLite holds the write turn), and before the retry records anything.
            unsubscribing.append(
                asyncio.get_running_loop().create_task(
                    unsubscribe_everyone_not_yet_sent(), context=contextvars.Context()
                )
            )
            raise failures.pop(0)
        for task in unsubscribing:
            await task
        await original(session, changes, now)

    monkeypatch.setattr(repo, "update_messages", flaky)
    transport = transport_from_url(smtp_settings.mail_url, pool_size=2)
    worker = Worker(db, transport, smtp_settings, clock=clock, concurrency=2, batch_size=60)
    try:
        assert await worker.drain() == 60
    finally:
        await transport.aclose()
    [at_failure] = delivered_at_failure
    received = [str(m["To"]) for m in sink.sink.received]
    # Only the sends in flight when the unsubscribes committed (two lanes) still went out.
    assert len(received) <= at_failure + 2, (at_failure, len(received))
    assert len(received) + len(unsubscribed) >= 60
    async with db.transaction() as session:
        rows = (
            await session.execute(
                select(Message.to_email, Message.status, Message.reason).where(
                    Message.org_id == org
                )
            )
        ).all()
    by_status = {(status, reason) for _, status, reason in rows}
    assert by_status <= {("sent", None), ("skipped", "unsubscribed")}
    assert sorted(e for e, status, _ in rows if status == "sent") == sorted(received)


async def test_skips_and_template_errors(
    db: Database, worker: Worker, sink: SinkServer, clock: ManualClock
) -> None:
    org = await make_org(db)
    no_email, looping = await make_contacts(
        db, org, [{"phone_number": "+14155550100", "name": "No Mail"}, {"email": "l@x.org"}]
    )
    calls = await make_sequence(db, org, [call_step(), email_step()], started_at=clock.now())
    [skipped] = await enroll(db, org, calls, [no_email], now=clock.now())
    broken = await make_sequence(
        db,
        org,
        [email_step(body="{% for i in (1..100000000) %}x{% endfor %}")],
        started_at=clock.now(),
    )
    [failed] = await enroll(db, org, broken, [looping], now=clock.now())
    await worker.drain()
    assert sink.sink.received == []
    rows = await messages_of(db, skipped)
    assert [(r.step_index, r.status, r.reason) for r in rows] == [
        (0, "skipped", "no_call_provider"),
        (1, "skipped", "no_email"),
    ]
    assert (await enrollment(db, skipped)).status == "completed"
    [row] = await messages_of(db, failed)
    assert (row.status, row.reason) == ("failed", "template_error")
    assert (await enrollment(db, failed)).status == "failed"


async def test_a_render_failing_on_one_contacts_data_fails_only_that_send(
    db: Database, worker: Worker, sink: SinkServer, clock: ManualClock
) -> None:
    """``times`` takes the amount past the largest float and ``ceil`` of infinity raises
    OverflowError inside Liquid. It used to leave the planning of the whole batch: every claim
    was released, and the same batch, due first, was claimed and dropped again at every poll.
    (PostgreSQL returns 1e200 from JSON as an int, SQLite as a float: both overflow here.)"""
    org = await make_org(db)
    people = [
        {"email": "big@x.org", "custom_data": {"amount": 1.5, "rate": 1e200}},
        {"email": "ok@x.org", "custom_data": {"amount": 1.5, "rate": 2}},
    ]
    contacts = await make_contacts(db, org, people)
    due = "contact.custom_data.amount | times: contact.custom_data.rate"
    body = f"<p>Due: {{{{ {due} | times: contact.custom_data.rate | ceil }}}}</p>"
    sequence_id = await make_sequence(db, org, [email_step(body=body)], started_at=clock.now())
    poisoned, fine = await enroll(db, org, sequence_id, contacts, now=clock.now())
    await worker.drain()
    await worker.transport.aclose()
    assert [m["To"] for m in sink.sink.received] == ["ok@x.org"]
    [row] = await messages_of(db, poisoned)
    assert (row.status, row.reason) == ("failed", "template_error")
    assert (await enrollment(db, poisoned)).status == "failed"
    assert (await enrollment(db, fine)).status == "completed"


async def test_a_step_that_raises_while_decided_waits_alone_and_the_batch_goes_out(
    db: Database,
    worker: Worker,
    sink: SinkServer,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unexpected exception while one claimed step was decided (a bug this contact's data
    meets) released the whole batch: claimed again first at every poll, none of it went out.
    Now that enrollment alone waits, as a retry does, and goes out once deciding it works."""
    org = await make_org(db)
    people = [{"email": f"{name}@x.org"} for name in ("first", "poison", "last")]
    contacts = await make_contacts(db, org, people)
    sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
    first, poisoned, last = await enroll(db, org, sequence_id, contacts, now=clock.now())
    decide = Worker._decide

    def faulty(self: Worker, item: Any, sequence: Any, step: Any, contact: Any, *a: Any) -> Any:
        if contact.email == "poison@x.org":
            raise KeyError("a bug")
        return decide(self, item, sequence, step, contact, *a)

    monkeypatch.setattr(Worker, "_decide", faulty)
    started = clock.now()
    await worker.drain()
    assert sorted(m["To"] for m in sink.sink.received) == ["first@x.org", "last@x.org"]
    assert [(await enrollment(db, e)).status for e in (first, last)] == ["completed"] * 2
    waiting = await enrollment(db, poisoned)
    assert (waiting.status, waiting.current_step, waiting.waiting_reason) == (
        "active",
        0,
        "retrying",
    )
    assert waiting.attempts == 1 and waiting.locked_by is None
    assert waiting.next_step_at is not None
    assert timedelta(seconds=30) <= waiting.next_step_at - started <= timedelta(seconds=60)
    assert await messages_of(db, poisoned) == []
    assert f"enrollment {poisoned} raised" in caplog.text

    monkeypatch.setattr(Worker, "_decide", decide)  # the bug fixed
    clock.advance(seconds=61)
    await worker.drain()
    await worker.transport.aclose()
    assert sorted(m["To"] for m in sink.sink.received) == [
        "first@x.org",
        "last@x.org",
        "poison@x.org",
    ]
    assert (await enrollment(db, poisoned)).status == "completed"


async def test_a_render_slow_on_the_event_loop_sends_the_rest_of_its_step_off_it(
    db: Database,
    worker: Worker,
    sink: SinkServer,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A short template without a loop may still be slow (filters over long values, up to the
    render's CPU budget): once one render of a step takes longer than INLINE_RENDER_SECONDS on
    the event loop, the rest of the step's batch renders on the worker's thread."""
    org = await make_org(db)
    contacts = await make_contacts(db, org, [{"email": f"p{i}@x.org"} for i in range(3)])
    sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
    await enroll(db, org, sequence_id, contacts, now=clock.now())
    monkeypatch.setattr(worker_module, "INLINE_RENDER_SECONDS", 0.0)
    inline = 0
    decide = Worker._decide

    def counted(self: Worker, *args: Any) -> Any:
        nonlocal inline
        inline += threading.current_thread() is threading.main_thread()
        return decide(self, *args)

    monkeypatch.setattr(Worker, "_decide", counted)
    await worker.drain()
    await worker.transport.aclose()
    assert len(sink.sink.received) == 3
    assert inline == 1  # the first; the two others on the worker's thread


async def test_a_delay_beyond_the_last_datetime_waits_for_ever_and_sends_nothing_twice(
    db: Database, worker: Worker, sink: SinkServer, clock: ManualClock
) -> None:
    """A delay stored before delays were bounded (the API now refuses more than a century):
    computing the next step's time raised OverflowError after the send, which was never
    recorded and went out again each time its lease ran out."""
    org = await make_org(db)
    contacts = await make_contacts(db, org, [{"email": "far@x.org"}])
    steps = [email_step(), email_step(delay=1e308)]
    sequence_id = await make_sequence(db, org, steps, started_at=clock.now())
    [enrollment_id] = await enroll(db, org, sequence_id, contacts, now=clock.now())
    await worker.drain()
    clock.advance(seconds=worker.lease.total_seconds() + 1)
    await worker.drain()
    await worker.transport.aclose()
    assert [m["To"] for m in sink.sink.received] == ["far@x.org"]
    [row] = await messages_of(db, enrollment_id)
    assert row.status == "sent"
    waiting = await enrollment(db, enrollment_id)
    assert (waiting.status, waiting.current_step) == ("active", 1)
    assert waiting.next_step_at is not None and waiting.next_step_at.year == 9999


async def test_a_subject_with_a_run_longer_than_a_line_is_delivered(
    db: Database, worker: Worker, sink: SinkServer, clock: ManualClock
) -> None:
    """A subject whose unbroken run (here a long link rendered from the contact) is longer
    than a header line may be (998 bytes): written as is, the server refuses the message
    with a 5xx, which fails the send as a bounce and suppresses the recipient."""
    org = await make_org(db)
    link = "https://example.org/offer?" + "x" * 1200
    people = [{"email": "ada@example.org", "name": "Ada", "custom_data": {"link": link}}]
    contacts = await make_contacts(db, org, people)
    steps = [email_step(subject="Your link {{ contact.custom_data.link }} inside")]
    sequence_id = await make_sequence(db, org, steps, started_at=clock.now())
    [enrollment_id] = await enroll(db, org, sequence_id, contacts, now=clock.now())
    await worker.drain()
    [row] = await messages_of(db, enrollment_id)
    assert (row.status, row.reason) == ("sent", None)
    [message] = sink.sink.received
    assert message["Subject"] == f"Your link {link} inside"
    [raw] = sink.sink.raw
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    async with db.transaction() as session:
        assert await session.scalar(select(func.count()).select_from(Suppression)) == 0


async def test_a_batch_renders_up_to_its_budget_and_leaves_the_rest_to_the_next(
    db: Database, smtp_settings: Settings, sink: SinkServer, clock: ManualClock
) -> None:
    """A template that renders megabytes per contact must not have a whole batch's worth held
    at once: past ``render_budget`` characters the rest of the claimed batch goes back."""
    org = await make_org(db)
    contacts = await make_contacts(db, org, [{"email": f"p{i}@example.org"} for i in range(5)])
    body = "{% for i in (1..2000) %}x{% endfor %}"  # 2,000 characters per contact
    sequence_id = await make_sequence(db, org, [email_step(body=body)], started_at=clock.now())
    enrollments = await enroll(db, org, sequence_id, contacts, now=clock.now())
    worker = make_worker(db, smtp_settings, clock, render_budget=5_000)
    try:
        assert await worker.run_once() == 5
        assert len(sink.sink.received) == 3, "2,000 + 2,000 + 2,000 passes 5,000: three go"
        async with db.transaction() as session:
            left = (
                await session.execute(
                    select(Enrollment.status, Enrollment.locked_by, Enrollment.current_step)
                    .where(Enrollment.id.in_(enrollments))
                    .where(~Enrollment.id.in_(select(Message.enrollment_id)))
                )
            ).all()
        assert left == [("active", None, 0)] * 2, "released at once, untouched"
        assert await worker.drain() == 2
    finally:
        await worker.transport.aclose()
    assert sorted(str(m["To"]) for m in sink.sink.received) == [
        f"p{i}@example.org" for i in range(5)
    ]
    for enrollment_id in enrollments:
        assert [(r.status, r.attempts) for r in await messages_of(db, enrollment_id)] == [
            ("sent", 1)
        ]


async def test_slow_templates_and_long_bodies_are_prepared_off_the_event_loop(
    db: Database, smtp_settings: Settings, sink: SinkServer, clock: ManualClock
) -> None:
    """A looping template is rendered, and a long body's MIME built, on the worker's own
    thread; what goes out is the same as on the loop."""
    org = await make_org(db)
    contacts = await make_contacts(db, org, [{"email": "ada@example.org", "name": "Ada"}])
    short = await make_sequence(db, org, [email_step()], started_at=clock.now())
    looping = email_step(
        subject="{% for i in (1..3) %}{{ i }}{% endfor %} for {{ contact.name }}",
        body="{% for i in (1..2000) %}<p>{{ contact.name }} {{ i }}</p>{% endfor %}",
    )
    worker = make_worker(db, smtp_settings, clock)
    try:
        await enroll(db, org, short, contacts, now=clock.now())
        assert await worker.drain() == 1
        assert worker._off_loop_thread is None, "ordinary mail stays on the loop"
        # Made now: the drain above completes a started one-off sequence with no enrollments.
        long = await make_sequence(db, org, [looping], started_at=clock.now())
        await enroll(db, org, long, contacts, now=clock.now())
        assert await worker.drain() == 1
        assert worker._off_loop_thread is not None
    finally:
        await worker.transport.aclose()
    message = sink.sink.received[1]
    assert message["Subject"] == "123 for Ada"
    html = message.get_body(("html",))
    text = message.get_body(("plain",))
    assert html is not None and text is not None
    expected = "".join(f"<p>Ada {i}</p>" for i in range(1, 2001))
    assert html.get_content() == expected
    assert text.get_content().split() == [word for i in range(1, 2001) for word in ("Ada", str(i))]


async def test_a_long_subject_from_a_short_template_is_built_off_the_event_loop(
    db: Database, smtp_settings: Settings, sink: SinkServer, clock: ManualClock
) -> None:
    """No loop and a short template, but a contact field makes the subject 20,000 characters:
    its encoding is the slow part, and goes to the worker's thread too."""
    org = await make_org(db)
    field = "y" * 4000
    contacts = await make_contacts(
        db, org, [{"email": "a@example.org", "custom_data": {"f": field}}]
    )
    step = email_step(subject="{{ contact.custom_data.f }}" * 5)
    sequence_id = await make_sequence(db, org, [step], started_at=clock.now())
    await enroll(db, org, sequence_id, contacts, now=clock.now())
    worker = make_worker(db, smtp_settings, clock)
    try:
        assert await worker.drain() == 1
        assert worker._off_loop_thread is not None
    finally:
        await worker.transport.aclose()
    [message] = sink.sink.received
    assert message["Subject"] == field * 5


async def test_maildir_delivery_writes_a_readable_message(
    db: Database, settings: Settings, clock: ManualClock, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox"
    custom = settings.model_copy(update={"mail_url": f"maildir://{outbox}"})
    worker = make_worker(db, custom, clock)
    org = await make_org(db)
    contacts = await make_contacts(db, org, [{"email": "m@example.org", "name": "Mia"}])
    sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
    [enrollment_id] = await enroll(db, org, sequence_id, contacts, now=clock.now())
    await worker.drain()
    files = list((outbox / "new").iterdir())
    assert len(files) == 1
    raw = files[0].read_bytes()
    assert b"Subject: Hello Mia" in raw
    [message] = list(mailbox.Maildir(outbox, create=False))
    [row] = await messages_of(db, enrollment_id)
    assert message["Message-ID"] == row.message_id and row.status == "sent"


async def test_claims_are_disjoint_and_leases_guard_advances(
    db: Database, smtp_settings: Settings, clock: ManualClock
) -> None:
    org = await make_org(db)
    contacts = await make_contacts(db, org, [{"email": f"p{i}@x.org"} for i in range(6)])
    sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
    await enroll(db, org, sequence_id, contacts, now=clock.now())
    lease = timedelta(minutes=5)
    async with db.transaction() as session:
        first = await repo.claim_due(session, now=clock.now(), worker="A", lease=lease, limit=4)
    async with db.transaction() as session:
        second = await repo.claim_due(session, now=clock.now(), worker="B", lease=lease, limit=4)
    assert len(first) == 4 and len(second) == 2
    assert not {c.id for c in first} & {c.id for c in second}
    async with db.transaction() as session:
        await repo.update_enrollments(
            session, [completed(first[0].id)], worker="B", now=clock.now()
        )
    state = await enrollment(db, first[0].id)
    assert (state.status, state.locked_by) == ("active", "A")


async def test_a_step_keeps_its_first_send_record(db: Database, clock: ManualClock) -> None:
    org = await make_org(db)
    contacts = await make_contacts(db, org, [{"email": f"p{i}@x.org"} for i in range(2)])
    sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
    enrollments = await enroll(db, org, sequence_id, contacts, now=clock.now())

    def record(enrollment_id: uuid.UUID, contact_id: uuid.UUID) -> dict[str, Any]:
        return send_record(org, sequence_id, enrollment_id, contact_id, clock.now())

    first = record(enrollments[0], contacts[0])
    async with db.transaction() as session:
        assert await repo.insert_messages(session, [first]) == {first["id"]}
    again, other = record(enrollments[0], contacts[0]), record(enrollments[1], contacts[1])
    async with db.transaction() as session:
        # Only the row this call wrote is reported, the clashing one is left out.
        assert await repo.insert_messages(session, [again, other]) == {other["id"]}
    kept = await messages_of(db, enrollments[0])
    assert [(m.id, m.message_id, m.status) for m in kept] == [
        (first["id"], first["message_id"], "sending")
    ]
    assert kept[0].created_at == clock.now()


async def test_a_claimed_step_with_a_settled_record_moves_on_without_a_send(
    db: Database, worker: Worker, sink: SinkServer, clock: ManualClock
) -> None:
    """A worker that recorded a step's outcome but lost its lease before advancing leaves the
    enrollment on that step. The next claim reports the record it finds (and only that one),
    and the step is not sent again: sent → on to the next step, failed → the enrollment fails.
    A record of an earlier step does not count."""
    org = await make_org(db)
    contacts = await make_contacts(db, org, [{"email": f"s{i}@x.org"} for i in range(3)])
    sequence_id = await make_sequence(
        db, org, [email_step(), email_step(delay=10)], started_at=clock.now()
    )
    was_sent, was_failed, fresh = await enroll(db, org, sequence_id, contacts, now=clock.now())

    def record(enrollment_id: uuid.UUID, contact_id: uuid.UUID, status: str) -> dict[str, Any]:
        return send_record(
            org, sequence_id, enrollment_id, contact_id, clock.now(), status=status, attempts=1
        )

    sent = record(was_sent, contacts[0], "sent")
    failed = record(was_failed, contacts[1], "failed")
    # An earlier step's record (from a sequence whose steps were renumbered, say) is not this
    # step's: the enrollment on step 1 has none.
    earlier = record(fresh, contacts[2], "sent")
    async with db.transaction() as session:
        await repo.insert_messages(session, [sent, failed, earlier])
        await session.execute(
            update(Enrollment).where(Enrollment.id == fresh).values(current_step=1)
        )
    async with db.transaction() as session:
        claimed = await repo.claim_due(
            session, now=clock.now(), worker="probe", lease=timedelta(seconds=30), limit=10
        )
        await session.rollback()
    assert {c.id: c.record for c in claimed} == {
        was_sent: sent["id"],
        was_failed: failed["id"],
        fresh: None,
    }

    await worker.drain()
    await worker.transport.aclose()
    assert [m["To"] for m in sink.sink.received] == ["s2@x.org"], "only the fresh step is sent"
    moved = await enrollment(db, was_sent)
    assert (moved.status, moved.current_step) == ("active", 1)
    assert moved.next_step_at == clock.now() + timedelta(minutes=10)
    assert (await enrollment(db, was_failed)).status == "failed"
    assert [(m.id, m.status) for m in await messages_of(db, was_sent)] == [(sent["id"], "sent")]


async def _index_fetches(session: Any) -> int:
    """Enrollment rows this transaction fetched through an index (a bitmap heap scan counts
    too; a sequential scan, which the planner may choose for a table this small, does not)."""
    result = await session.execute(
        text("SELECT idx_tup_fetch FROM pg_stat_xact_user_tables WHERE relname = 'enrollments'")
    )
    return int(result.scalar_one())


async def test_claims_and_advances_read_little_of_a_fresh_backlog(
    backend: str, db: Database, clock: ManualClock
) -> None:
    """The oldest due go first, on both databases. On PostgreSQL, on a table just filled and
    never analysed: the claim walks the due index in order and stops at its limit (the
    planner's guess without statistics was to read every due row and sort them), and the
    recheck and the advance, by id, do not read the sequence's or all active enrollments."""
    org = await make_org(db)
    contacts = await make_contacts(db, org, [{"email": f"p{i}@x.org"} for i in range(1500)])
    sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
    groups = [contacts[i : i + 500] for i in range(0, 1500, 500)]
    oldest = []
    for minutes_ago, group in zip((1, 3, 2), groups, strict=True):
        ids = await enroll(
            db, org, sequence_id, group, now=clock.now() - timedelta(minutes=minutes_ago)
        )
        if minutes_ago == 3:
            oldest = ids
    postgresql = backend == "postgresql"
    async with db.transaction() as session:
        first = await repo.claim_due(
            session, now=clock.now(), worker="A", lease=timedelta(minutes=5), limit=50
        )
        if postgresql:
            fetched = await _index_fetches(session)
            assert fetched < 500, f"the claim fetched {fetched} enrollments to take 50"
    assert len(first) == 50 and {c.id for c in first} <= set(oldest)
    async with db.transaction() as session:
        live = await repo.still_live(session, (claim.id for claim in first), worker="A")
        if postgresql:
            fetched = await _index_fetches(session)
            assert fetched < 500, f"rechecking 50 by id fetched {fetched} enrollments"
    assert set(live) == {claim.id for claim in first}, "all live"
    assert {found.suppression for found in live.values()} == {None}, "none suppressed"
    async with db.transaction() as session:
        advanced = [completed(claim.id) for claim in first]
        await repo.update_enrollments(session, advanced, worker="A", now=clock.now())
        if postgresql:
            fetched = await _index_fetches(session)
            assert fetched < 500, f"advancing 50 by id fetched {fetched} enrollments"
    assert {(await enrollment(db, claim.id)).status for claim in first} == {"completed"}


async def test_a_claim_updates_most_enrollments_in_place(
    backend: str, db: Database, clock: ManualClock
) -> None:
    """A claim writes only the lease, which no index covers; on pages with room left free
    (migration 0011) PostgreSQL keeps most new versions on their page and writes no index entry
    for them. An index over a lease column, or pages filled to the brim, would make every claim
    write an entry into each of the table's indexes again."""
    if backend != "postgresql":
        pytest.skip("PostgreSQL only: heap-only updates are its storage's")
    org = await make_org(db)
    contacts = await make_contacts(db, org, [{"email": f"p{i}@x.org"} for i in range(600)])
    sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
    await enroll(db, org, sequence_id, contacts, now=clock.now())
    async with db.transaction() as session:
        claimed = await repo.claim_due(
            session, now=clock.now(), worker="A", lease=timedelta(minutes=5), limit=200
        )
        counts = await session.execute(
            text(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables"
                " WHERE relname = 'enrollments'"
            )
        )
        updated, in_place = counts.one()
    assert len(claimed) == updated == 200
    assert in_place >= 100, f"only {in_place} of 200 claims stayed on their page"
