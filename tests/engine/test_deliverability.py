"""Deliverability end to end (SPEC §3.2, §5, §6): one-click unsubscribe from a delivered
message, hard bounces, per-sender throttles across workers, send windows across a DST change,
DKIM. Real database (both), real HTTP stack in-process, real SMTP server, manual clock."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dkim
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI
from sqlalchemy import delete, select, text, update

from opensequence.clock import ManualClock
from opensequence.config import Settings
from opensequence.db import Database
from opensequence.db.types import iso
from opensequence.deliverability.repository import lock_senders
from opensequence.engine import repository as engine_repo
from opensequence.engine import throttle
from opensequence.engine.worker import Worker
from opensequence.models import Message, SenderLimit, Sequence, SequenceStep
from tests.engine.factories import email_step, enroll, make_contacts, make_sequence, make_worker
from tests.engine.sink import Sink, SinkServer
from tests.helpers import Tenant, http_client


@pytest.fixture
async def anonymous_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with http_client(app) as client:
        yield client


async def messages_for(db: Database, **where: Any) -> list[Message]:
    async with db.transaction() as session:
        query = select(Message).order_by(Message.created_at, Message.step_index)
        for column, value in where.items():
            query = query.where(getattr(Message, column) == value)
        return list(await session.scalars(query))


async def suppressions(client: httpx.AsyncClient) -> dict[str, str]:
    body = (await client.get("/suppressions")).json()
    return {item["email"]: item["reason"] for item in body["items"]}


# ------------------------------------------------------------------------------ unsubscribe


async def test_one_click_unsubscribe_from_a_delivered_message(
    db: Database,
    worker: Worker,
    sink: SinkServer,
    clock: ManualClock,
    tenant: Tenant,
    anonymous_client: httpx.AsyncClient,
) -> None:
    org = tenant.org_id
    [contact] = await make_contacts(db, org, [{"email": "Reader@Example.org", "name": "Ria"}])
    steps = [
        email_step(subject="News 1"),
        email_step(subject="News 2", delay=1),
        email_step(subject="Your receipt", delay=1, transactional=True),
    ]
    sequence_id = await make_sequence(db, org, steps, started_at=clock.now())
    [enrollment_id] = await enroll(db, org, sequence_id, [contact], now=clock.now())

    assert await worker.drain() == 1
    [first] = sink.sink.received
    assert first["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    url = str(first["List-Unsubscribe"]).strip("<>")
    path = urlsplit(url).path
    assert path.startswith("/unsubscribe/")

    page = await anonymous_client.get(path)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<form method="post"' in page.text and "<button" in page.text
    assert await suppressions(tenant.client) == {}, "GET (a link scanner) changes nothing"

    # What a mail provider sends (RFC 8058): a form POST, no credentials, no cookies.
    clicked = await anonymous_client.post(path, data={"List-Unsubscribe": "One-Click"})
    assert clicked.status_code == 200, clicked.text
    assert clicked.json() == {"unsubscribed": True}
    assert await suppressions(tenant.client) == {"Reader@Example.org": "unsubscribed"}
    again = await anonymous_client.post(
        path, data={"List-Unsubscribe": "One-Click"}, headers={"Accept": "text/html"}
    )
    assert again.status_code == 200 and "unsubscribed" in again.text.lower()
    assert await suppressions(tenant.client) == {"Reader@Example.org": "unsubscribed"}

    clock.advance(minutes=1)
    assert await worker.drain() == 1
    assert len(sink.sink.received) == 1, "the marketing step is not sent"
    clock.advance(minutes=1)
    assert await worker.drain() == 1
    assert [str(m["Subject"]) for m in sink.sink.received] == ["News 1", "Your receipt"]
    assert sink.sink.received[1]["List-Unsubscribe"] is None

    rows = await messages_for(db, enrollment_id=enrollment_id)
    assert [(r.step_index, r.status, r.reason) for r in rows] == [
        (0, "sent", None),
        (1, "skipped", "unsubscribed"),
        (2, "sent", None),
    ]


# ------------------------------------------------------------------------------ bounces


class RcptSink(Sink):
    """Refuses ``gone@…`` at RCPT TO, as a receiving server does for an unknown mailbox."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = 0

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address.startswith("gone@"):
            self.refused += 1
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"


async def test_hard_bounce_suppresses_in_every_sequence_of_that_organization_only(
    db: Database,
    settings: Settings,
    clock: ManualClock,
    tenant: Tenant,
    other_tenant: Tenant,
) -> None:
    with SinkServer(RcptSink()) as server:
        worker = make_worker(db, settings.model_copy(update={"mail_url": server.url}), clock)
        org, other = tenant.org_id, other_tenant.org_id
        [gone, fine] = await make_contacts(
            db, org, [{"email": "gone@example.org"}, {"email": "fine@example.org"}]
        )
        [gone_elsewhere] = await make_contacts(db, other, [{"email": "gone@example.org"}])
        first = await make_sequence(db, org, [email_step()], started_at=clock.now())
        receipts = await make_sequence(
            db, org, [email_step(transactional=True)], started_at=clock.now()
        )
        theirs = await make_sequence(db, other, [email_step()], started_at=clock.now())
        [bounced, _] = await enroll(db, org, first, [gone, fine], now=clock.now())
        [later] = await enroll(db, org, receipts, [gone], now=clock.now(), first_delay_minutes=5)
        [unrelated] = await enroll(
            db, other, theirs, [gone_elsewhere], now=clock.now(), first_delay_minutes=5
        )

        assert await worker.drain() == 2
        assert server.sink.refused == 1
        [row] = await messages_for(db, enrollment_id=bounced)
        assert (row.status, row.reason) == ("failed", "bounced: 550 5.1.1 no such user")
        assert await suppressions(tenant.client) == {"gone@example.org": "bounced"}
        assert await suppressions(other_tenant.client) == {}

        clock.advance(minutes=5)
        assert await worker.drain() == 2
        await worker.transport.aclose()
        assert server.sink.refused == 2, "the other organization still mails the address"

    [skipped] = await messages_for(db, enrollment_id=later)
    assert (skipped.status, skipped.reason) == ("skipped", "bounced"), "transactional too"
    [tried] = await messages_for(db, enrollment_id=unrelated)
    assert tried.status == "failed"
    assert await suppressions(other_tenant.client) == {"gone@example.org": "bounced"}
    listing = await tenant.client.get(f"/sequences/{first}/enrollments")
    assert {(e["contact_id"], e["status"]) for e in listing.json()["items"]} == {
        (str(gone), "failed"),
        (str(fine), "completed"),
    }


# ------------------------------------------------------------------------------ throttles


def assert_sliding_limit(times: list[datetime], span: timedelta, cap: int) -> None:
    ordered = sorted(times)
    for i, start in enumerate(ordered):
        inside = [t for t in ordered[i:] if t < start + span]
        assert len(inside) <= cap, f"{len(inside)} sends in the {span} from {start}"


async def test_throttle_of_ten_per_minute_across_two_workers(
    db: Database,
    smtp_settings: Settings,
    sink: SinkServer,
    clock: ManualClock,
    tenant: Tenant,
) -> None:
    org = tenant.org_id
    limit = await tenant.client.put("/sender-limits/Sales@Example.com", json={"per_minute": 10})
    assert limit.status_code == 200, limit.text
    people = [{"email": f"lead{i}@example.org"} for i in range(50)]
    contacts = await make_contacts(db, org, people)
    sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
    await enroll(db, org, sequence_id, contacts, now=clock.now())
    start = clock.now()
    workers = [make_worker(db, smtp_settings, clock, worker_id=name, batch_size=8) for name in "AB"]

    async def both() -> int:
        claimed = await asyncio.gather(*(w.run_once() for w in workers))
        return sum(claimed)

    while await both():
        pass
    assert len(sink.sink.received) == 10
    listing = (
        await tenant.client.get(f"/sequences/{sequence_id}/enrollments", params={"limit": 100})
    ).json()["items"]
    waiting = [e for e in listing if e["status"] == "active"]
    assert len(waiting) == 40
    assert {e["waiting_reason"] for e in waiting} == {"throttled"}
    assert {e["next_step_at"] for e in waiting} == {"2026-03-02T09:01:00.000Z"}

    for _ in range(60):
        clock.advance(seconds=15)
        while await both():
            pass
        if len(sink.sink.received) == 50:
            break
    for w in workers:
        await w.transport.aclose()

    sent = await messages_for(db, sequence_id=sequence_id)
    assert len(sent) == 50 and {m.status for m in sent} == {"sent"}
    times = [m.sent_at for m in sent if m.sent_at is not None]
    assert_sliding_limit(times, timedelta(minutes=1), 10)
    assert max(times) - start >= timedelta(minutes=4), "50 at 10/minute take 4 minutes at least"
    assert len(sink.sink.received) == 50


async def test_domain_and_address_limits_both_apply(
    db: Database,
    worker: Worker,
    sink: SinkServer,
    clock: ManualClock,
    tenant: Tenant,
    other_tenant: Tenant,
) -> None:
    await tenant.client.put("/sender-limits/example.com", json={"per_minute": 3})
    await tenant.client.put("/sender-limits/a@example.com", json={"per_second": 1})
    org = tenant.org_id
    contacts = await make_contacts(db, org, [{"email": f"p{i}@x.org"} for i in range(4)])
    from_a = await make_sequence(
        db, org, [email_step(from_email="A@example.com")], started_at=clock.now()
    )
    from_b = await make_sequence(
        db, org, [email_step(from_email="b@example.com")], started_at=clock.now()
    )
    await enroll(db, org, from_a, contacts[:2], now=clock.now())
    await enroll(db, org, from_b, contacts, now=clock.now())
    # Another organization's limits and sends never count here.
    [stranger] = await make_contacts(db, other_tenant.org_id, [{"email": "s@x.org"}])
    theirs = await make_sequence(
        db, other_tenant.org_id, [email_step(from_email="a@example.com")], started_at=clock.now()
    )
    await enroll(db, other_tenant.org_id, theirs, [stranger], now=clock.now())

    await worker.drain()
    senders = [str(m["From"]).rpartition("<")[2].strip(">") for m in sink.sink.received]
    assert len(senders) == 4, senders  # 3 for the domain of one org (a@ at most once) + 1
    assert sum(s.lower() == "a@example.com" for s in senders) == 2
    clock.advance(seconds=59)
    await worker.drain()
    assert len(sink.sink.received) == 4
    clock.advance(seconds=1)
    await worker.drain()
    assert len(sink.sink.received) == 7
    clock.advance(minutes=1)
    await worker.drain()
    assert len(sink.sink.received) == 7


async def test_a_limit_with_every_window_null_limits_nothing(
    db: Database, worker: Worker, sink: SinkServer, clock: ManualClock, tenant: Tenant
) -> None:
    """SPEC §5 allows all three null. Such a limit left the throttle with no window to count:
    the batch raised at every poll, holding back every organization's sends claimed with it."""
    put = await tenant.client.put(
        "/sender-limits/example.com",
        json={"per_second": None, "per_minute": None, "per_day": None},
    )
    assert put.status_code == 200, put.text
    org = tenant.org_id
    contacts = await make_contacts(db, org, [{"email": f"p{i}@x.org"} for i in range(3)])
    sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
    await enroll(db, org, sequence_id, contacts, now=clock.now())
    await worker.drain()
    assert len(sink.sink.received) == 3


async def limited_sends(
    db: Database, tenant: Tenant, clock: ManualClock, *, per_day: int, sends: int
) -> uuid.UUID:
    """``sends`` contacts due now in a one-step sequence from example.com, limited per day."""
    await tenant.client.put("/sender-limits/example.com", json={"per_day": per_day})
    org = tenant.org_id
    contacts = await make_contacts(db, org, [{"email": f"p{i}@x.org"} for i in range(sends)])
    sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
    await enroll(db, org, sequence_id, contacts, now=clock.now())
    return sequence_id


async def test_a_limited_send_not_handed_over_in_time_is_reserved_again(
    db: Database, smtp_settings: Settings, sink: SinkServer, clock: ManualClock, tenant: Tenant
) -> None:
    """``per_second: 2``. Worker A reserves two sends, then (a loaded machine) reaches the
    provider 3 s later, after worker B, no longer counting A's old reservations, sent two of
    its own: four hand-overs in one second. A send counted by a limit now goes out within 2 s
    of its claim or is put back and reserved again."""
    limit = await tenant.client.put("/sender-limits/example.com", json={"per_second": 2})
    assert limit.status_code == 200, limit.text
    org = tenant.org_id
    contacts = await make_contacts(db, org, [{"email": f"p{i}@x.org"} for i in range(4)])
    sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
    await enroll(db, org, sequence_id, contacts, now=clock.now())
    other = make_worker(db, smtp_settings, clock, worker_id="B")
    late: list[bool] = []

    class Late(Worker):
        async def _recheck(self, sends: list[Any]) -> list[Any]:
            kept = await super()._recheck(sends)
            if not late:
                late.append(True)
                clock.advance(seconds=3)
                await other.drain()
            return kept

    worker = make_worker(db, smtp_settings, clock, kind=Late, worker_id="A")
    await worker.drain()
    assert len(sink.sink.received) == 2
    for _ in range(5):
        clock.advance(seconds=1)
        await worker.drain()
    await worker.transport.aclose()
    await other.transport.aclose()
    sent = await messages_for(db, sequence_id=sequence_id)
    assert [m.status for m in sent] == ["sent"] * 4
    assert_sliding_limit([m.sent_at for m in sent if m.sent_at], timedelta(seconds=1), 2)


async def test_a_failed_attempt_does_not_count_against_a_limit(
    db: Database, settings: Settings, clock: ManualClock, tenant: Tenant
) -> None:
    """per_day 3, three sends greylisted once each (451): nothing went out, yet each record
    waiting for its retry counted as a send, so the retries, held back by themselves, waited a
    whole day (past the default retry horizon)."""
    with SinkServer(Sink(lambda n: "451 4.7.1 greylisted" if n < 3 else None)) as server:
        worker = make_worker(db, settings.model_copy(update={"mail_url": server.url}), clock)
        sequence_id = await limited_sends(db, tenant, clock, per_day=3, sends=3)
        await worker.drain()
        assert server.sink.received == []
        clock.advance(minutes=5)  # past every retry's backoff (at most 60 s for a first one)
        await worker.drain()
        await worker.transport.aclose()
        assert len(server.sink.received) == 3
        sent = await messages_for(db, sequence_id=sequence_id)
        assert [(m.status, m.attempts, m.reason) for m in sent] == [("sent", 2, None)] * 3


@pytest.mark.parametrize("lift", ["delete", "raise"])
async def test_a_send_waiting_for_a_limit_goes_out_once_the_limit_is_lifted(
    app: FastAPI,
    db: Database,
    worker: Worker,
    sink: SinkServer,
    clock: ManualClock,
    tenant: Tenant,
    lift: str,
) -> None:
    """SPEC §5: a throttled send goes out "once the window allows or the limit is lifted". It
    kept the instant computed under the old limit: a whole day for ``per_day``."""
    app.state.clock = clock
    sequence_id = await limited_sends(db, tenant, clock, per_day=1, sends=2)
    await worker.drain()
    assert len(sink.sink.received) == 1
    path = f"/sequences/{sequence_id}/enrollments"
    [waiting] = (await tenant.client.get(path, params={"status": "active"})).json()["items"]
    assert waiting["waiting_reason"] == "throttled"

    clock.advance(seconds=5)
    if lift == "delete":
        response = await tenant.client.delete("/sender-limits/example.com")
    else:
        response = await tenant.client.put("/sender-limits/example.com", json={"per_day": 2})
    assert response.status_code == 200, response.text
    [due] = (await tenant.client.get(path, params={"status": "active"})).json()["items"]
    assert (due["waiting_reason"], due["next_step_at"]) == (None, iso(clock.now()))
    await worker.drain()
    assert len(sink.sink.received) == 2


async def lock_waiters(db: Database, event: str | None) -> int:
    """PostgreSQL backends waiting for a lock of kind ``event`` (``advisory``…; None: any)."""
    async with db.transaction() as session:
        return int(
            await session.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND wait_event = coalesce(:event, wait_event)"
                ),
                {"event": event},
            )
        )


async def until_blocked(db: Database, event: str | None, task: asyncio.Task[Any]) -> None:
    """Until ``task`` ends or some backend waits for a lock of kind ``event`` (a poll: what is
    awaited happens in the database, where no event can be set)."""
    while not task.done() and not await lock_waiters(db, event):  # noqa: ASYNC110
        await asyncio.sleep(0.01)


async def test_a_limit_lifted_while_a_worker_holds_sends_back_wakes_them(
    backend: str,
    app: FastAPI,
    db: Database,
    worker: Worker,
    sink: SinkServer,
    clock: ManualClock,
    tenant: Tenant,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ``DELETE`` commits after the worker counted (and held the second send back for a
    day) but before it committed that wait: the wake could not see the wait, and the send
    waited out the old limit. The change now waits for the worker's transaction."""
    if backend != "postgresql":
        pytest.skip("PostgreSQL only: SQLite runs one writing transaction at a time")
    app.state.clock = clock
    sequence_id = await limited_sends(db, tenant, clock, per_day=1, sends=2)
    lifted: list[asyncio.Task[httpx.Response]] = []
    admit = throttle.admit

    async def admit_then_lift(*args: Any) -> throttle.Admission:
        admission = await admit(*args)
        if admission.waits and not lifted:
            lifted.append(asyncio.create_task(tenant.client.delete("/sender-limits/example.com")))
            await until_blocked(db, "advisory", lifted[0])
        return admission

    monkeypatch.setattr(throttle, "admit", admit_then_lift)
    await worker.drain()
    assert (await lifted[0]).status_code == 200
    await worker.drain()  # the woken send, if the first drain ended before the wake
    assert len(sink.sink.received) == 2
    sent = await messages_for(db, sequence_id=sequence_id)
    assert [m.status for m in sent] == ["sent", "sent"]


async def test_a_limit_lifted_while_a_worker_waits_to_count_is_not_applied(
    backend: str, db: Database, worker: Worker, sink: SinkServer, clock: ManualClock, tenant: Tenant
) -> None:
    """The worker read the limit, then waited for its lock while the limit was deleted (and
    the deletion's wake found nothing waiting yet): it counted against the old limit."""
    if backend != "postgresql":
        pytest.skip("PostgreSQL only: SQLite runs one writing transaction at a time")
    await limited_sends(db, tenant, clock, per_day=1, sends=2)
    async with db.transaction() as session:
        await lock_senders(session, [(tenant.org_id, "example.com")])
        await session.execute(delete(SenderLimit).where(SenderLimit.org_id == tenant.org_id))
        draining = asyncio.create_task(worker.drain())
        await until_blocked(db, "advisory", draining)
    await draining
    assert len(sink.sink.received) == 2


async def due_outside_a_monday_window(app: FastAPI, clock: ManualClock, tenant: Tenant) -> str:
    """A sequence sending only on Mondays 09:00-17:00 UTC, one contact due on a Friday
    evening; the API on ``clock``."""
    app.state.clock = clock
    clock.set(datetime(2026, 3, 6, 18, 0, tzinfo=UTC))  # a Friday, after hours
    window = {"days": ["mon"], "start": "09:00", "end": "17:00", "timezone": "UTC"}
    created = await tenant.client.post(
        "/sequences", json={"name": "w", "steps": [email_step()], "send_window": window}
    )
    assert created.status_code == 201, created.text
    sequence_id: str = created.json()["id"]
    await tenant.client.post(
        f"/sequences/{sequence_id}/contacts", json={"contacts": [{"email": "a@x.org"}]}
    )
    return sequence_id


async def test_a_send_waiting_for_a_window_goes_out_once_the_window_is_removed(
    app: FastAPI, worker: Worker, sink: SinkServer, clock: ManualClock, tenant: Tenant
) -> None:
    """It waited for the old window's next opening (here the Monday), where null means any
    time."""
    sequence_id = await due_outside_a_monday_window(app, clock, tenant)
    await worker.drain()
    path = f"/sequences/{sequence_id}/enrollments"
    [waiting] = (await tenant.client.get(path)).json()["items"]
    assert (waiting["waiting_reason"], waiting["next_step_at"]) == (
        "outside_window",
        "2026-03-09T09:00:00.000Z",
    )
    patched = await tenant.client.patch(f"/sequences/{sequence_id}", json={"send_window": None})
    assert patched.status_code == 200, patched.text
    await worker.drain()
    assert [str(m["To"]) for m in sink.sink.received] == ["a@x.org"]


async def test_edited_delays_apply_to_contacts_waiting_for_their_step(
    app: FastAPI, worker: Worker, sink: SinkServer, clock: ManualClock, tenant: Tenant
) -> None:
    """SPEC §3: steps a contact has not reached run as edited. A contact waiting out a step's
    delay kept the wait computed from the old delay (7 days where the step now says 1), and
    one whose step was removed waited for it anyway."""
    app.state.clock = clock
    steps = [email_step(subject="A"), email_step(subject="B", delay=7 * 1440)]
    created = await tenant.client.post("/sequences", json={"name": "s", "steps": steps})
    sequence_id = created.json()["id"]
    await tenant.client.post(
        f"/sequences/{sequence_id}/contacts", json={"contacts": [{"email": "a@x.org"}]}
    )
    await worker.drain()
    sent_at = clock.now()
    path = f"/sequences/{sequence_id}/enrollments"
    clock.advance(hours=1)
    steps[1] = email_step(subject="B", delay=1440)
    steps.append(email_step(subject="C", delay=60))
    patched = await tenant.client.patch(f"/sequences/{sequence_id}", json={"steps": steps})
    assert patched.status_code == 200, patched.text
    [waiting] = (await tenant.client.get(path)).json()["items"]
    assert waiting["next_step_at"] == iso(sent_at + timedelta(days=1))

    clock.set(sent_at + timedelta(days=1))
    await worker.drain()
    assert [m["Subject"] for m in sink.sink.received] == ["A", "B"]
    patched = await tenant.client.patch(f"/sequences/{sequence_id}", json={"steps": steps[:2]})
    assert patched.status_code == 200, patched.text
    [due] = (await tenant.client.get(path)).json()["items"]
    assert (due["status"], due["next_step_at"]) == ("active", iso(clock.now()))
    await worker.drain()
    [done] = (await tenant.client.get(path)).json()["items"]
    assert done["status"] == "completed"
    assert [m["Subject"] for m in sink.sink.received] == ["A", "B"]


async def test_a_window_removed_while_a_worker_decides_a_step_lets_it_go_out(
    app: FastAPI,
    worker: Worker,
    sink: SinkServer,
    clock: ManualClock,
    tenant: Tenant,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ``PATCH`` commits after the worker read the window (and decided to wait for its
    opening, the Monday) but before it wrote that wait: the wake could not see it."""
    sequence_id = await due_outside_a_monday_window(app, clock, tenant)
    clock.advance(seconds=1)
    plan = worker._plan
    removed: list[httpx.Response] = []

    async def plan_then_remove(*args: Any) -> Any:
        decided = await plan(*args)
        if not removed:
            path = f"/sequences/{sequence_id}"
            removed.append(await tenant.client.patch(path, json={"send_window": None}))
        return decided

    monkeypatch.setattr(worker, "_plan", plan_then_remove)
    await worker.drain()
    assert removed[0].status_code == 200, removed[0].text
    assert [str(m["To"]) for m in sink.sink.received] == ["a@x.org"]


async def test_a_window_set_during_a_batch_holds_the_rest_of_it(
    app: FastAPI,
    db: Database,
    smtp_settings: Settings,
    sink: SinkServer,
    clock: ManualClock,
    tenant: Tenant,
) -> None:
    """The batch was decided before the ``PATCH`` set a window closed now; its sends went on
    going out after it had answered (the soak: 3 s of them). The rest of the batch, checked
    again, finds the sequence edited and is decided again."""
    app.state.clock = clock
    created = await tenant.client.post("/sequences", json={"name": "w", "steps": [email_step()]})
    sequence_id = created.json()["id"]
    people = [{"email": f"p{i}@x.org"} for i in range(4)]
    await tenant.client.post(f"/sequences/{sequence_id}/contacts", json={"contacts": people})
    closed = {"days": ["sun"], "start": "09:00", "end": "10:00", "timezone": "UTC"}  # a Monday
    patched: list[httpx.Response] = []

    class WindowSetMeanwhile(Worker):
        async def _send(self, item: Any, lease: Any) -> Any:
            outcome = await super()._send(item, lease)
            if not patched:
                clock.advance(seconds=1)
                path = f"/sequences/{sequence_id}"
                patched.append(await tenant.client.patch(path, json={"send_window": closed}))
            return outcome

    worker = make_worker(db, smtp_settings, clock, kind=WindowSetMeanwhile, concurrency=1)
    worker.recheck_seconds = 0
    await worker.drain()
    await worker.transport.aclose()
    assert patched[0].status_code == 200, patched[0].text
    assert len(sink.sink.received) == 1
    listing = (await tenant.client.get(f"/sequences/{sequence_id}/enrollments")).json()["items"]
    assert sorted(e["waiting_reason"] or e["status"] for e in listing) == [
        "completed",
        "outside_window",
        "outside_window",
        "outside_window",
    ]
    # Their records wait too, uncounted by any sender limit; the send reuses them.
    records = await messages_for(db, sequence_id=uuid.UUID(sequence_id))
    assert sorted((m.status, m.reason) for m in records) == [
        ("sending", "outside_window"),
        ("sending", "outside_window"),
        ("sending", "outside_window"),
        ("sent", None),
    ]


async def two_steps_a_week_apart(tenant: Tenant) -> tuple[str, list[dict[str, Any]]]:
    """A sequence whose second step waits 7 days, with one contact due for the first."""
    steps = [email_step(subject="A"), email_step(subject="B", delay=7 * 1440)]
    created = await tenant.client.post("/sequences", json={"name": "s", "steps": steps})
    sequence_id = created.json()["id"]
    await tenant.client.post(
        f"/sequences/{sequence_id}/contacts", json={"contacts": [{"email": "a@x.org"}]}
    )
    return sequence_id, steps


async def test_a_delay_edited_while_the_step_before_it_is_sent_applies(
    app: FastAPI,
    worker: Worker,
    clock: ManualClock,
    tenant: Tenant,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The edit cannot see an enrollment whose previous step is in flight; the worker then
    moved it on with the delay it read at the claim (7 days where the step now says 1)."""
    app.state.clock = clock
    sequence_id, steps = await two_steps_a_week_apart(tenant)
    send = worker.transport.send
    edited: list[httpx.Response] = []

    async def edit_then_send(outgoing: Any) -> None:
        if not edited:
            clock.advance(seconds=1)
            steps[1] = email_step(subject="B", delay=1440)
            path = f"/sequences/{sequence_id}"
            edited.append(await tenant.client.patch(path, json={"steps": steps}))
        await send(outgoing)

    monkeypatch.setattr(worker.transport, "send", edit_then_send)
    await worker.drain()
    assert edited[0].status_code == 200, edited[0].text
    [waiting] = (await tenant.client.get(f"/sequences/{sequence_id}/enrollments")).json()["items"]
    sent_at = clock.now()  # the edit moved it on a second
    assert (waiting["current_step"], waiting["next_step_at"]) == (
        1,
        iso(sent_at + timedelta(days=1)),
    )


async def test_a_worker_moving_a_contact_on_waits_for_an_edit_of_its_steps(
    backend: str, app: FastAPI, db: Database, worker: Worker, clock: ManualClock, tenant: Tenant
) -> None:
    """An edit of the steps holds its sequence (``FOR UPDATE``) until it commits: the worker,
    recording the first step's send meanwhile, waits for it and takes the edited delay."""
    if backend != "postgresql":
        pytest.skip("PostgreSQL only: SQLite runs one writing transaction at a time")
    app.state.clock = clock
    sequence_id, _ = await two_steps_a_week_apart(tenant)
    async with db.transaction() as session:
        sequence = await session.get(Sequence, uuid.UUID(sequence_id), with_for_update=True)
        assert sequence is not None
        await session.execute(
            update(SequenceStep)
            .where(SequenceStep.sequence_id == sequence.id, SequenceStep.step_index == 1)
            .values(delay_in_minutes=1440)
        )
        sequence.updated_at = clock.now() + timedelta(seconds=1)
        await session.flush()
        draining = asyncio.create_task(worker.drain())
        await until_blocked(db, None, draining)
    await draining
    [waiting] = (await tenant.client.get(f"/sequences/{sequence_id}/enrollments")).json()["items"]
    assert waiting["next_step_at"] == iso(clock.now() + timedelta(days=1))


async def greylisted_second_step(
    db: Database, settings: Settings, clock: ManualClock, tenant: Tenant, server: SinkServer
) -> tuple[Worker, str, list[dict[str, Any]]]:
    """Two zero-delay steps for one contact, drained once: the first sent, the second answered
    451 and waiting for its retry."""
    worker = make_worker(db, settings.model_copy(update={"mail_url": server.url}), clock)
    steps = [email_step(subject="A"), email_step(subject="B")]
    created = await tenant.client.post("/sequences", json={"name": "s", "steps": steps})
    sequence_id = created.json()["id"]
    await tenant.client.post(
        f"/sequences/{sequence_id}/contacts", json={"contacts": [{"email": "a@x.org"}]}
    )
    await worker.drain()
    return worker, sequence_id, steps


@pytest.mark.parametrize(
    "ended_by", ["removing the step", "a cancel while claimed", "its sequence found canceled"]
)
async def test_a_retry_nothing_will_send_is_settled(
    app: FastAPI,
    db: Database,
    settings: Settings,
    clock: ManualClock,
    tenant: Tenant,
    monkeypatch: pytest.MonkeyPatch,
    ended_by: str,
) -> None:
    """The second step's record waits for its retry (``sending``). Its step removed, the
    enrollment completed and the record stayed ``sending`` for good; so it did when a cancel
    committed while the worker held the claim and then decided to wait (here for a window):
    the cancel leaves held records to their worker, which only settled the ones it sent."""
    app.state.clock = clock
    with SinkServer(Sink(lambda n: "451 4.7.1 greylisted" if n == 1 else None)) as server:
        worker, sequence_id, steps = await greylisted_second_step(
            db, settings, clock, tenant, server
        )
        path = f"/sequences/{sequence_id}"
        if ended_by == "removing the step":
            assert (await tenant.client.patch(path, json={"steps": steps[:1]})).is_success
        elif ended_by == "its sequence found canceled":
            # As when a cancel commits between the claim and the worker's read of the
            # sequence: the worker ends the enrollment itself.
            load = worker._load

            async def cancel_then_load(session: Any, claimed: Any) -> Any:
                await session.execute(
                    update(Sequence)
                    .where(Sequence.id == uuid.UUID(sequence_id))
                    .values(status="canceled")
                )
                return await load(session, claimed)

            monkeypatch.setattr(worker, "_load", cancel_then_load)
        else:
            closed = {"days": ["sun"], "start": "09:00", "end": "10:00", "timezone": "UTC"}
            assert (await tenant.client.patch(path, json={"send_window": closed})).is_success
            plan = worker._plan

            async def cancel_then_plan(*args: Any) -> Any:
                assert (await tenant.client.put(f"{path}/cancel")).is_success
                return await plan(*args)

            monkeypatch.setattr(worker, "_plan", cancel_then_plan)
        clock.advance(minutes=5)  # past the retry's backoff
        await worker.drain()
        await worker.transport.aclose()
        assert len(server.sink.received) == 1
    rows = await messages_for(db, sequence_id=uuid.UUID(sequence_id))
    assert [(m.step_index, m.status, m.reason) for m in rows] == [
        (0, "sent", None),
        (1, "skipped", "canceled"),
    ]


@pytest.mark.parametrize("ended_by", ["cancel", "contact deletion"])
async def test_a_stop_racing_a_retrys_record_settles_it(
    backend: str,
    app: FastAPI,
    db: Database,
    settings: Settings,
    clock: ManualClock,
    tenant: Tenant,
    monkeypatch: pytest.MonkeyPatch,
    ended_by: str,
) -> None:
    """The stop begins while the worker records a 451 (the retry's record ``sending``, the
    lease released, not yet committed): the stop saw the record held and left it to the worker,
    which had seen the enrollment active and settled nothing. The stop now reads the records
    again once its enrollment ``UPDATE`` has waited for the worker."""
    if backend != "postgresql":
        pytest.skip("PostgreSQL only: SQLite runs one writing transaction at a time")
    app.state.clock = clock
    created = await tenant.client.post("/sequences", json={"name": "s", "steps": [email_step()]})
    sequence_id = created.json()["id"]
    await tenant.client.post(
        f"/sequences/{sequence_id}/contacts", json={"contacts": [{"email": "a@x.org"}]}
    )
    [contact] = (await tenant.client.get("/contacts")).json()["items"]
    contact_id = contact["id"]
    stops: list[asyncio.Task[httpx.Response]] = []
    settle = engine_repo.settle_abandoned

    async def settle_then_stop(session: Any, ids: Any, now: datetime) -> None:
        ids = list(ids)
        await settle(session, ids, now)
        if ids and not stops:  # the retry's record, in the transaction recording it
            if ended_by == "cancel":
                stop = tenant.client.put(f"/sequences/{sequence_id}/cancel")
            else:
                stop = tenant.client.delete(f"/contacts/{contact_id}")
            stops.append(asyncio.create_task(stop))
            await until_blocked(db, None, stops[0])

    monkeypatch.setattr(engine_repo, "settle_abandoned", settle_then_stop)
    with SinkServer(Sink(lambda n: "451 4.7.1 greylisted")) as server:
        worker = make_worker(db, settings.model_copy(update={"mail_url": server.url}), clock)
        await worker.drain()
        await worker.transport.aclose()
    assert (await stops[0]).status_code == 200
    [record] = await messages_for(db, sequence_id=uuid.UUID(sequence_id))
    assert (record.status, record.reason) == ("skipped", "canceled")


# ------------------------------------------------------------------------------ send windows


async def test_send_window_holds_until_it_opens_in_the_contacts_zone_across_dst(
    db: Database,
    worker: Worker,
    sink: SinkServer,
    clock: ManualClock,
    tenant: Tenant,
) -> None:
    """Friday 6 March 2026 22:00 UTC: closed everywhere. New York moves to EDT on Sunday
    8 March, Amsterdam stays on CET: Monday 09:00 is 08:00 UTC in Amsterdam, 13:00 UTC (not
    14:00) in New York."""
    clock.set(datetime(2026, 3, 6, 22, 0, tzinfo=UTC))
    org = tenant.org_id
    [amsterdam, new_york] = await make_contacts(
        db,
        org,
        [
            {"email": "ams@example.org"},
            {"email": "ny@example.org", "custom_data": {"timezone": "America/New_York"}},
        ],
    )
    sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
    window = {
        "days": ["mon", "tue", "wed", "thu", "fri"],
        "start": "09:00",
        "end": "17:00",
        "timezone": "Europe/Amsterdam",
    }
    async with db.transaction() as session:
        await session.execute(
            update(Sequence).where(Sequence.id == sequence_id).values(send_window=window)
        )
    await enroll(db, org, sequence_id, [amsterdam, new_york], now=clock.now())

    assert await worker.drain() == 2
    assert sink.sink.received == []
    listing = (await tenant.client.get(f"/sequences/{sequence_id}/enrollments")).json()["items"]
    due = {e["contact_id"]: (e["waiting_reason"], e["next_step_at"]) for e in listing}
    assert due == {
        str(amsterdam): ("outside_window", "2026-03-09T08:00:00.000Z"),
        str(new_york): ("outside_window", "2026-03-09T13:00:00.000Z"),
    }

    clock.set(datetime(2026, 3, 9, 7, 59, 59, tzinfo=UTC))
    assert await worker.drain() == 0
    clock.set(datetime(2026, 3, 9, 8, 0, tzinfo=UTC))
    assert await worker.drain() == 1
    assert [str(m["To"]) for m in sink.sink.received] == ["ams@example.org"]
    clock.set(datetime(2026, 3, 9, 12, 59, 59, tzinfo=UTC))
    assert await worker.drain() == 0
    clock.set(datetime(2026, 3, 9, 13, 0, tzinfo=UTC))
    assert await worker.drain() == 1
    assert [str(m["To"]) for m in sink.sink.received] == ["ams@example.org", "ny@example.org"]
    sent = await messages_for(db, sequence_id=sequence_id)
    assert sorted(m.sent_at for m in sent if m.sent_at) == [
        datetime(2026, 3, 9, 8, 0, tzinfo=UTC),
        datetime(2026, 3, 9, 13, 0, tzinfo=UTC),
    ]


# ------------------------------------------------------------------------------ DKIM


def dns_answer(selector: str, domain: str, public_der: bytes) -> Any:
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public_der)

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return record if name == f"{selector}._domainkey.{domain}.".encode() else None

    return lookup


async def test_dkim_signed_message_verifies_against_the_configured_key(
    db: Database,
    smtp_settings: Settings,
    sink: SinkServer,
    clock: ManualClock,
    tmp_path: Path,
    tenant: Tenant,
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keys = tmp_path / "dkim"
    keys.mkdir()
    (keys / "example.com.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    public_der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    settings = smtp_settings.model_copy(
        update={"dkim_selector": "mail2026", "dkim_key_dir": str(keys)}
    )
    worker = make_worker(db, settings, clock)
    org = tenant.org_id
    contacts = await make_contacts(db, org, [{"email": "x@example.org", "name": "Zoë"}])
    signed = await make_sequence(
        db,
        org,
        [email_step(subject="Grüße {{ contact.name }}", from_email="News@Example.com")],
        started_at=clock.now(),
    )
    unsigned = await make_sequence(
        db, org, [email_step(from_email="news@other.org")], started_at=clock.now()
    )
    await enroll(db, org, signed, contacts, now=clock.now())
    await enroll(db, org, unsigned, contacts, now=clock.now())
    assert await worker.drain() == 2
    await worker.transport.aclose()

    by_sender = {
        envelope[0].lower(): raw
        for envelope, raw in zip(sink.sink.envelopes, sink.sink.raw, strict=True)
    }
    lookup = dns_answer("mail2026", "example.com", public_der)
    raw = by_sender["news@example.com"]
    assert raw.startswith(b"DKIM-Signature:")
    assert dkim.verify(raw, dnsfunc=lookup)
    tampered = raw.replace(b"Subject:", b"Subject: Re:", 1)
    assert not dkim.verify(tampered, dnsfunc=lookup)
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    wrong = dns_answer(
        "mail2026",
        "example.com",
        other_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    assert not dkim.verify(raw, dnsfunc=wrong)
    assert b"DKIM-Signature" not in by_sender["news@other.org"]


# ------------------------------------------------------------------------------ tokens


async def test_forged_and_tampered_tokens_are_404_and_change_nothing(
    db: Database,
    worker: Worker,
    sink: SinkServer,
    clock: ManualClock,
    tenant: Tenant,
    anonymous_client: httpx.AsyncClient,
) -> None:
    from opensequence.unsubscribe import make_token

    org = tenant.org_id
    [contact] = await make_contacts(db, org, [{"email": "keep@example.org"}])
    sequence_id = await make_sequence(db, org, [email_step()], started_at=clock.now())
    await enroll(db, org, sequence_id, [contact], now=clock.now())
    await worker.drain()
    token = urlsplit(str(sink.sink.received[0]["List-Unsubscribe"]).strip("<>")).path.rsplit(
        "/", 1
    )[1]
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    candidates = [
        flipped,
        token[:-4],
        token + "AAAA",
        make_token("not-the-secret", org, contact),
        make_token("not-the-secret", org, uuid.uuid4()),
        "x" * 200,
        "%00",
    ]
    for bad in candidates:
        page = await anonymous_client.get(f"/unsubscribe/{bad}")
        assert page.status_code == 404, bad
        assert page.headers["content-type"].startswith("text/html")
        posted = await anonymous_client.post(
            f"/unsubscribe/{bad}", data={"List-Unsubscribe": "One-Click"}
        )
        assert posted.status_code == 404, bad
        assert posted.json()["statusCode"] == 404
    assert await suppressions(tenant.client) == {}
