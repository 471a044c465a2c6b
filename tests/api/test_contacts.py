"""Contacts API (SPEC §2) over the real HTTP stack, on both databases."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from opensequence.contacts.service import IdentifierInput, resolve_contacts
from opensequence.db import Database
from opensequence.models import Contact, Enrollment, Message, Run, Sequence
from tests.helpers import Tenant, assert_error, make_tenant


async def count_contacts(db: Database) -> int:
    async with db.transaction() as session:
        return int(await session.scalar(select(func.count()).select_from(Contact)) or 0)


async def create(tenant: Tenant, **contact: Any) -> str:
    response = await tenant.client.post("/contacts", json={"contact": contact})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def test_create_get_and_match_by_email_in_another_case(tenant: Tenant) -> None:
    contact_id = await create(
        tenant,
        email="Jane.Doe@Example.com",
        phone="+1 415-555-0123",
        name="Jane",
        custom_data={"plan": "pro", "seats": 5, "vip": True, "note": None},
    )
    response = await tenant.client.get(f"/contacts/{contact_id}")
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == contact_id
    assert body["email"] == "Jane.Doe@Example.com"
    assert body["phone_number"] == "+14155550123"
    assert body["name"] == "Jane"
    assert body["custom_data"] == {"plan": "pro", "seats": 5, "vip": True}
    assert body["created_at"].endswith("Z") and body["updated_at"].endswith("Z")

    again = await tenant.client.post(
        "/contacts",
        json={
            "contact": {"email": "jane.doe@EXAMPLE.com", "custom_data": {"plan": None, "x": "1"}}
        },
    )
    assert again.status_code == 200, again.text
    assert again.json() == {"id": contact_id}
    updated = (await tenant.client.get(f"/contacts/{contact_id}")).json()
    assert updated["email"] == "jane.doe@EXAMPLE.com"
    assert updated["name"] == "Jane"
    assert updated["custom_data"] == {"seats": 5, "vip": True, "x": "1"}

    by_phone = await tenant.client.post(
        "/contacts", json={"contact": {"phone_number": "+14155550123", "name": "J"}}
    )
    assert by_phone.status_code == 200 and by_phone.json() == {"id": contact_id}
    assert (await tenant.client.get(f"/contacts/{contact_id}")).json()["name"] == "J"


async def test_unparseable_phone_is_kept_raw_and_contact_without_identifiers(
    tenant: Tenant,
) -> None:
    raw_id = await create(tenant, phone="0612 345 678")
    assert (await tenant.client.get(f"/contacts/{raw_id}")).json()["phone_number"] == "0612 345 678"
    bare = await create(tenant, name="Nobody in particular")
    body = (await tenant.client.get(f"/contacts/{bare}")).json()
    assert body["email"] is None and body["phone_number"] is None and body["custom_data"] == {}
    # a second bare contact is a new contact, not a match
    assert await create(tenant, name="Nobody in particular") != bare


async def test_email_and_phone_of_two_contacts_is_409(tenant: Tenant, db: Database) -> None:
    await create(tenant, email="a@example.com")
    await create(tenant, phone="+447911123456")
    response = await tenant.client.post(
        "/contacts", json={"contact": {"email": "A@example.com", "phone": "+44 7911 123456"}}
    )
    assert_error(response, 409, "two different contacts")
    assert await count_contacts(db) == 2


async def test_list_pagination_and_filters(tenant: Tenant, other_tenant: Tenant) -> None:
    ids = [await create(tenant, email=f"p{i}@example.com") for i in range(7)]
    await create(other_tenant, email="p0@example.com")
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = (await tenant.client.get("/contacts", params=params)).json()
        assert set(page) == {"items", "next"}
        seen += [item["id"] for item in page["items"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == ids

    default = (await tenant.client.get("/contacts")).json()
    assert [i["id"] for i in default["items"]] == ids and default["next"] is None

    found = (await tenant.client.get("/contacts", params={"email": "P3@EXAMPLE.COM"})).json()
    assert [i["id"] for i in found["items"]] == [ids[3]]
    phone_id = await create(tenant, phone="+33 6 12 34 56 78")
    found = (await tenant.client.get("/contacts", params={"phone_number": "+33612345678"})).json()
    assert [i["id"] for i in found["items"]] == [phone_id]
    found = (
        await tenant.client.get("/contacts", params={"phone_number": "+33 6 1234 5678"})
    ).json()
    assert [i["id"] for i in found["items"]] == [phone_id]

    blank = (await tenant.client.get("/contacts", params={"phone_number": " "})).json()
    assert blank == {"items": [], "next": None}

    first = (await tenant.client.get(f"/contacts/{ids[0]}")).json()
    created = datetime.fromisoformat(first["created_at"].replace("Z", "+00:00"))
    later = (created + timedelta(days=1)).isoformat()
    earlier = (created - timedelta(days=1)).isoformat()
    assert (await tenant.client.get("/contacts", params={"created_after": later})).json()[
        "items"
    ] == []
    assert (
        len(
            (await tenant.client.get("/contacts", params={"created_after": earlier})).json()[
                "items"
            ]
        )
        == 8
    )
    assert (await tenant.client.get("/contacts", params={"updated_before": earlier})).json()[
        "items"
    ] == []
    naive = (created - timedelta(days=1)).replace(tzinfo=None).isoformat()
    assert (
        len((await tenant.client.get("/contacts", params={"updated_after": naive})).json()["items"])
        == 8
    )
    assert_error(await tenant.client.get("/contacts", params={"cursor": "garbage!"}), 400, "cursor")
    # Before year 1 once read in UTC: the conversion overflowed, a 500.
    for name in ("created_after", "created_before", "updated_after", "updated_before"):
        for moment in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"):
            response = await tenant.client.get("/contacts", params={name: moment})
            assert_error(response, 400, name)
    assert_error(await tenant.client.get("/contacts", params={"limit": 0}), 400, "limit")
    assert_error(await tenant.client.get("/contacts", params={"limit": 1001}), 400, "limit")
    assert_error(
        await tenant.client.get("/contacts", params={"created_after": "yesterday"}),
        400,
        "created_after",
    )


async def test_walk_is_stable_while_contacts_are_inserted(db: Database, tenant: Tenant) -> None:
    now = datetime.now(UTC)
    async with db.transaction() as session:
        initial = await resolve_contacts(
            session,
            tenant.org_id,
            [IdentifierInput(email=f"walk{i}@example.com") for i in range(2500)],
            now=now,
        )
    expected = {str(r.contact_id) for r in initial}
    walking = True

    async def insert_meanwhile() -> int:
        batch = 0
        while walking:
            async with db.transaction() as session:
                await resolve_contacts(
                    session,
                    tenant.org_id,
                    [IdentifierInput(email=f"new{batch}-{i}@example.com") for i in range(5)],
                    now=datetime.now(UTC),
                )
            batch += 1
            await asyncio.sleep(0)
        return batch

    async def walk() -> list[str]:
        nonlocal walking
        seen: list[str] = []
        cursor: str | None = None
        try:
            while True:
                params: dict[str, Any] = {"limit": 100}
                if cursor:
                    params["cursor"] = cursor
                response = await tenant.client.get("/contacts", params=params)
                assert response.status_code == 200, response.text
                page = response.json()
                seen += [item["id"] for item in page["items"]]
                cursor = page["next"]
                if cursor is None:
                    return seen
        finally:
            walking = False

    seen, batches = await asyncio.gather(walk(), insert_meanwhile())
    assert batches > 0
    assert len(seen) == len(set(seen)), "a contact appeared twice"
    assert expected <= set(seen), "a contact that existed before the walk was skipped"
    assert seen == sorted(seen, key=uuid.UUID)


async def test_merging_keeps_custom_data_within_its_limit(tenant: Tenant) -> None:
    """100 keys, then 100 new ones by PATCH or by a POST matching the contact, made a contact
    of 200. The limit holds for the merged result; removing keys in the same change counts."""
    full = {f"k{i}": i for i in range(100)}
    contact_id = await create(tenant, email="full@example.com", custom_data=full)
    more = {"contact": {"custom_data": {"extra": 1}}}
    message = "contact.custom_data: at most 100 keys; merged into the contact's 100 it would"
    assert_error(await tenant.client.patch(f"/contacts/{contact_id}", json=more), 400, message)
    again = {"contact": {"email": "FULL@example.com", "custom_data": {"extra": 1}}}
    assert_error(await tenant.client.post("/contacts", json=again), 400, message)
    assert (await tenant.client.get(f"/contacts/{contact_id}")).json()["custom_data"] == full
    swap = {"contact": {"custom_data": {"k0": None, "extra": 1}}}
    response = await tenant.client.patch(f"/contacts/{contact_id}", json=swap)
    assert response.status_code == 200, response.text
    assert len(response.json()["custom_data"]) == 100


async def test_patch_merges_and_conflicts(tenant: Tenant, db: Database) -> None:
    contact_id = await create(
        tenant, email="m@example.com", name="M", custom_data={"a": "1", "b": 2, "keep": True}
    )
    other = await create(tenant, email="other@example.com", phone="+14155550999")
    response = await tenant.client.patch(
        f"/contacts/{contact_id}",
        json={
            "contact": {"custom_data": {"a": None, "b": 3, "c": "new"}, "phone": "+1 415 555 0100"}
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == contact_id
    assert body["email"] == "m@example.com" and body["name"] == "M"
    assert body["phone_number"] == "+14155550100"
    assert body["custom_data"] == {"b": 3, "keep": True, "c": "new"}
    assert (await tenant.client.get(f"/contacts/{contact_id}")).json() == body

    assert_error(
        await tenant.client.patch(
            f"/contacts/{contact_id}", json={"contact": {"email": "OTHER@example.com"}}
        ),
        409,
        "contact.email",
    )
    assert_error(
        await tenant.client.patch(
            f"/contacts/{contact_id}",
            json={"contact": {"name": "changed", "phone_number": "+14155550999"}},
        ),
        409,
        "contact.phone",
    )
    after = (await tenant.client.get(f"/contacts/{contact_id}")).json()
    assert after == body, "a rejected PATCH wrote nothing"
    assert (await tenant.client.get(f"/contacts/{other}")).json()["email"] == "other@example.com"

    # its own email in another case is not a conflict; explicit null clears a field
    response = await tenant.client.patch(
        f"/contacts/{contact_id}", json={"contact": {"email": "M@Example.com", "name": None}}
    )
    assert response.status_code == 200, response.text
    assert response.json()["email"] == "M@Example.com" and response.json()["name"] is None
    assert_error(
        await tenant.client.patch(f"/contacts/{uuid.uuid4()}", json={"contact": {"name": "x"}}),
        404,
    )
    assert_error(
        await tenant.client.patch("/contacts/not-a-uuid", json={"contact": {"name": "x"}}), 404
    )


async def test_other_orgs_contact_is_404(tenant: Tenant, other_tenant: Tenant) -> None:
    theirs = await create(other_tenant, email="secret@example.com", name="Theirs")
    assert_error(await tenant.client.get(f"/contacts/{theirs}"), 404)
    assert_error(
        await tenant.client.patch(f"/contacts/{theirs}", json={"contact": {"name": "mine"}}), 404
    )
    assert_error(await tenant.client.delete(f"/contacts/{theirs}"), 404)
    assert (await tenant.client.get("/contacts")).json()["items"] == []
    still = (await other_tenant.client.get(f"/contacts/{theirs.upper()}")).json()
    assert still["name"] == "Theirs" and still["id"] == theirs


async def test_delete_cancels_enrollments_and_forgets_the_address(
    tenant: Tenant, db: Database
) -> None:
    contact_id = uuid.UUID(await create(tenant, email="gone@example.com", name="Gone"))
    keeper_id = uuid.UUID(await create(tenant, email="keep@example.com"))
    now = datetime.now(UTC)
    async with db.transaction() as session:
        sequence = Sequence(
            org_id=tenant.org_id, name="S", is_continuous=True, status="active", started_at=now
        )
        session.add(sequence)
        await session.flush()
        run = Run(org_id=tenant.org_id, sequence_id=sequence.id, kind="add_contacts", total=2)
        session.add(run)
        await session.flush()
        enrollments = [
            Enrollment(
                org_id=tenant.org_id,
                sequence_id=sequence.id,
                contact_id=cid,
                run_id=run.id,
                status="active",
                next_step_at=now,
                locked_until=now + timedelta(minutes=5),
                locked_by="worker-1",
            )
            for cid in (contact_id, keeper_id)
        ]
        session.add_all(enrollments)
        await session.flush()
        session.add_all(
            [
                Message(
                    org_id=tenant.org_id,
                    enrollment_id=e.id,
                    sequence_id=sequence.id,
                    contact_id=e.contact_id,
                    step_index=0,
                    to_email="gone@example.com"
                    if e.contact_id == contact_id
                    else "keep@example.com",
                    status="sent",
                    message_id=f"<{e.id}@test>",
                )
                for e in enrollments
            ]
        )

    response = await tenant.client.delete(f"/contacts/{contact_id}")
    assert response.status_code == 200, response.text
    assert response.json() == {"id": str(contact_id)}
    assert_error(await tenant.client.get(f"/contacts/{contact_id}"), 404)
    assert_error(await tenant.client.delete(f"/contacts/{contact_id}"), 404)

    async with db.transaction() as session:
        rows = {e.contact_id: e for e in await session.scalars(select(Enrollment))}
        messages = {m.contact_id: m for m in await session.scalars(select(Message))}
    gone = rows[contact_id]
    assert (gone.status, gone.next_step_at, gone.locked_until) == ("canceled", None, None)
    assert rows[keeper_id].status == "active" and rows[keeper_id].next_step_at is not None
    assert messages[contact_id].to_email is None
    assert messages[contact_id].message_id == f"<{gone.id}@test>"
    assert messages[keeper_id].to_email == "keep@example.com"


async def test_scopes(app: FastAPI, tenant: Tenant) -> None:
    contact_id = await create(tenant, email="s@example.com")
    reader = await make_tenant(app, "acme", ["contacts:read"])
    writer = await make_tenant(app, "acme", ["contacts:write"])
    async with reader.client, writer.client:
        assert (await reader.client.get(f"/contacts/{contact_id}")).status_code == 200
        assert (await reader.client.get("/contacts")).status_code == 200
        assert_error(
            await reader.client.post("/contacts", json={"contact": {"name": "x"}}), 403, "scope"
        )
        assert_error(
            await reader.client.patch(f"/contacts/{contact_id}", json={"contact": {}}), 403
        )
        assert_error(await reader.client.delete(f"/contacts/{contact_id}"), 403)
        assert_error(await writer.client.get("/contacts"), 403, "contacts:read")
        assert (
            await writer.client.patch(f"/contacts/{contact_id}", json={"contact": {"name": "w"}})
        ).status_code == 200


BAD_CONTACTS: list[tuple[Any, str]] = [
    ({"email": "not-an-email"}, "contact.email"),
    ({"email": ".starts-with-dot@example.com"}, "contact.email"),
    ({"email": "a@b.c"}, "contact.email"),
    ({"email": "x" * 310 + "@example.com"}, "contact.email"),
    ({"email": 12}, "contact.email"),
    ({"custom_data": {"nested": {"a": 1}}}, "contact.custom_data.nested"),
    ({"custom_data": {"list": [1, 2]}}, "contact.custom_data.list"),
    ({"custom_data": "flat"}, "contact.custom_data"),
    ({"custom_data": {f"k{i}": i for i in range(101)}}, "contact.custom_data"),
    ({"custom_data": {"k" * 129: "v"}}, "contact.custom_data"),
    ({"custom_data": {"k": "v" * 4097}}, "contact.custom_data"),
    ({"custom_data": {"k": "bell\x07"}}, "contact.custom_data"),
    ({"name": "n" * (1024 * 1024)}, "contact.name"),
    ({"name": "n" * 257}, "contact.name"),
    ({"name": 42}, "contact.name"),
    ({"name": ["a"]}, "contact.name"),
    ({"name": "nul\x00byte"}, "contact.name"),
    ({"name": "escape\x1b[31m"}, "contact.name"),
    ({"phone": "+1" + "5" * 70}, "contact.phone"),
    ({"phone": 4155550100}, "contact.phone"),
    ({"phone_number": "+1415\x00"}, "contact.phone_number"),
    ({"phone": "+14155550100", "phone_number": "+14155550101"}, "phone_number"),
    ("not an object", "contact"),
]


@pytest.mark.parametrize(("contact", "field"), BAD_CONTACTS)
async def test_bad_input_is_400_naming_the_field(
    tenant: Tenant, db: Database, contact: Any, field: str
) -> None:
    existing = await create(tenant, email="base@example.com", name="Base")
    before = (await tenant.client.get(f"/contacts/{existing}")).json()
    assert_error(await tenant.client.post("/contacts", json={"contact": contact}), 400, field)
    assert_error(
        await tenant.client.patch(f"/contacts/{existing}", json={"contact": contact}), 400, field
    )
    assert await count_contacts(db) == 1
    assert (await tenant.client.get(f"/contacts/{existing}")).json() == before


async def test_missing_contact_wrapper_is_400(tenant: Tenant) -> None:
    assert_error(
        await tenant.client.post("/contacts", json={"email": "a@example.com"}), 400, "contact"
    )
    assert_error(
        await tenant.client.post(
            "/contacts", content=b"{", headers={"content-type": "application/json"}
        ),
        400,
    )


async def test_concurrent_posts_of_one_new_email_make_one_contact(
    tenant: Tenant, db: Database
) -> None:
    responses = await asyncio.gather(
        *(
            tenant.client.post(
                "/contacts", json={"contact": {"email": "Race@Example.com", "name": f"n{i}"}}
            )
            for i in range(6)
        )
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 200, 200, 200, 201], [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert await count_contacts(db) == 1
