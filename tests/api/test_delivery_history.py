"""``GET /sequences/{id}/enrollments`` and ``GET /contacts/{id}/messages`` (SPEC §6)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from fastapi import FastAPI
from sqlalchemy import update

from opensequence.clock import ManualClock
from opensequence.config import Settings
from opensequence.db import Database
from opensequence.engine.worker import Worker
from opensequence.mail.transports import transport_from_url
from opensequence.models import Enrollment
from opensequence.pagination import encode_cursor
from tests.engine.factories import email_step, enroll, make_contacts, make_sequence
from tests.helpers import Tenant, assert_error, make_tenant

ENROLLMENT_FIELDS = {
    "id",
    "sequence_id",
    "contact_id",
    "run_id",
    "status",
    "current_step",
    "next_step_at",
    "waiting_reason",
    "created_at",
    "updated_at",
}
MESSAGE_FIELDS = {
    "id",
    "enrollment_id",
    "sequence_id",
    "step_index",
    "to_email",
    "status",
    "reason",
    "message_id",
    "attempts",
    "created_at",
    "sent_at",
}


async def test_enrollments_pages_filters_and_tenancy(
    app: FastAPI, db: Database, tenant: Tenant, other_tenant: Tenant
) -> None:
    now = datetime(2026, 5, 1, 8, 0, tzinfo=UTC)
    contacts = await make_contacts(
        db, tenant.org_id, [{"email": f"u{i}@example.org"} for i in range(5)]
    )
    sequence_id = await make_sequence(
        db, tenant.org_id, [email_step()], custom_id="welcome", started_at=now
    )
    enrolled = sorted(await enroll(db, tenant.org_id, sequence_id, contacts, now=now))
    async with db.transaction() as session:
        await session.execute(
            update(Enrollment)
            .where(Enrollment.id == enrolled[1])
            .values(status="canceled", next_step_at=None)
        )

    first = await tenant.client.get("/sequences/welcome/enrollments", params={"limit": 2})
    assert first.status_code == 200, first.text
    body = first.json()
    assert [item["id"] for item in body["items"]] == [str(e) for e in enrolled[:2]]
    assert set(body["items"][0]) == ENROLLMENT_FIELDS
    assert body["items"][0]["status"] == "active"
    assert body["items"][0]["next_step_at"] == "2026-05-01T08:00:00.000Z"
    assert body["items"][0]["waiting_reason"] is None
    assert body["items"][0]["run_id"]
    by_id = {item["id"]: item for item in body["items"]}
    assert by_id[str(enrolled[1])]["next_step_at"] is None
    seen = [item["id"] for item in body["items"]]
    cursor = body["next"]
    while cursor:
        page = await tenant.client.get(
            f"/sequences/{sequence_id}/enrollments", params={"limit": 2, "cursor": cursor}
        )
        seen += [item["id"] for item in page.json()["items"]]
        cursor = page.json()["next"]
    assert seen == [str(e) for e in enrolled]

    canceled = await tenant.client.get(
        f"/sequences/{str(sequence_id).upper()}/enrollments", params={"status": "canceled"}
    )
    assert [i["id"] for i in canceled.json()["items"]] == [str(enrolled[1])]
    one = await tenant.client.get(
        "/sequences/welcome/enrollments", params={"contact_id": str(contacts[3])}
    )
    assert [i["contact_id"] for i in one.json()["items"]] == [str(contacts[3])]

    assert_error(
        await tenant.client.get("/sequences/welcome/enrollments", params={"status": "nope"}),
        400,
        "status",
    )
    assert_error(
        await tenant.client.get("/sequences/welcome/enrollments", params={"contact_id": "x"}),
        400,
        "contact_id",
    )
    assert_error(
        await tenant.client.get("/sequences/welcome/enrollments", params={"cursor": "garbage"}),
        400,
        "cursor",
    )
    assert_error(await other_tenant.client.get(f"/sequences/{sequence_id}/enrollments"), 404)
    assert_error(await tenant.client.get(f"/sequences/{uuid.uuid4()}/enrollments"), 404)
    contacts_only = await make_tenant(app, "acme", ["contacts:read"])
    async with contacts_only.client:
        assert_error(await contacts_only.client.get("/sequences/welcome/enrollments"), 403)


async def test_contact_messages_newest_first(
    app: FastAPI, db: Database, tenant: Tenant, other_tenant: Tenant, settings: Settings
) -> None:
    clock = ManualClock(datetime(2026, 5, 1, 8, 0, tzinfo=UTC))
    [contact] = await make_contacts(db, tenant.org_id, [{"email": "h@example.org"}])
    steps = [email_step(), email_step(delay=1), email_step(delay=1)]
    sequence_id = await make_sequence(db, tenant.org_id, steps, started_at=clock.now())
    [enrollment_id] = await enroll(db, tenant.org_id, sequence_id, [contact], now=clock.now())
    worker = Worker(db, transport_from_url(settings.mail_url), settings, clock=clock)
    for _ in steps:
        await worker.drain()
        clock.advance(minutes=1)

    listed = await tenant.client.get(f"/contacts/{contact}/messages", params={"limit": 2})
    assert listed.status_code == 200, listed.text
    page = listed.json()
    assert [m["step_index"] for m in page["items"]] == [2, 1]
    item = page["items"][0]
    assert set(item) == MESSAGE_FIELDS
    assert item["enrollment_id"] == str(enrollment_id)
    assert item["sequence_id"] == str(sequence_id)
    assert (item["status"], item["reason"], item["attempts"]) == ("sent", None, 1)
    assert item["to_email"] == "h@example.org"
    assert item["message_id"] == f"<{item['id']}@example.com>"
    assert item["created_at"] == "2026-05-01T08:02:00.000Z"
    assert item["sent_at"] == "2026-05-01T08:02:00.000Z"
    rest = await tenant.client.get(
        f"/contacts/{contact}/messages", params={"limit": 2, "cursor": page["next"]}
    )
    assert [m["step_index"] for m in rest.json()["items"]] == [0]
    assert rest.json()["next"] is None

    # Cursors we never issued: a moment before year 1 in UTC overflowed, a 500.
    for position in (
        {"c": "0001-01-01T00:00:00+14:00", "id": item["id"]},
        {"c": "2026-05-01T08:02:00", "id": item["id"]},
        {"c": "soon", "id": item["id"]},
    ):
        forged = encode_cursor(position)
        response = await tenant.client.get(
            f"/contacts/{contact}/messages", params={"cursor": forged}
        )
        assert_error(response, 400, "cursor")
    assert_error(await other_tenant.client.get(f"/contacts/{contact}/messages"), 404)
    assert_error(await tenant.client.get("/contacts/not-a-uuid/messages"), 404)
    sequences_only = await make_tenant(app, "acme", ["sequences:read"])
    async with sequences_only.client:
        assert_error(await sequences_only.client.get(f"/contacts/{contact}/messages"), 403)
