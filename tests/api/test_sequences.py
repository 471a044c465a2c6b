"""Sequences API acceptance (both databases): OpenCX's examples verbatim, the GetSequenceOutput
schema, start/cancel semantics, tenancy, and every 400/409 path writing nothing."""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from fastapi import FastAPI
from sqlalchemy import func, insert, select, update

from opensequence.db import Database
from opensequence.db.types import new_id
from opensequence.models import Contact, Enrollment, Run, Sequence, SequenceStep
from tests.helpers import Tenant, assert_error, make_tenant

# OpenCX's published spec (SPEC.md's ground truth 2), kept beside the tests for CI.
REFERENCE = (
    Path(__file__).resolve().parents[1]
    / "reference"
    / "opencx-openapi-2024-sequences-contacts.json"
)
SPEC = json.loads(REFERENCE.read_text())
SCHEMAS = SPEC["components"]["schemas"]
CREATE_EXAMPLE = SCHEMAS["CreateSequenceInput"]["example"]
UPDATE_EXAMPLE = SCHEMAS["UpdateSequenceInput"]["example"]
EXAMPLE_INSTANT = datetime(2024, 9, 14, 15, 34, 49, 121000, tzinfo=UTC)


def _nullable_to_json_schema(node: Any) -> Any:
    """OpenAPI 3.0's ``nullable: true`` is ``type: [T, "null"]`` in JSON Schema."""
    if isinstance(node, dict):
        out = {k: _nullable_to_json_schema(v) for k, v in node.items() if k != "nullable"}
        if node.get("nullable") is True and "type" in node:
            out["type"] = [node["type"], "null"]
        return out
    if isinstance(node, list):
        return [_nullable_to_json_schema(v) for v in node]
    return node


GET_SEQUENCE_SCHEMA = {
    "$ref": "#/components/schemas/GetSequenceOutput",
    "components": _nullable_to_json_schema(SPEC["components"]),
}
# The 2024 reference's ContactsFilter lacks ``all_contacts``, which SPEC §3.1 lists and §3
# requires for a null filter's output; only that one addition is made, for null filters only.
WITH_ALL_CONTACTS = copy.deepcopy(GET_SEQUENCE_SCHEMA)
WITH_ALL_CONTACTS["components"]["schemas"]["ContactsFilter"]["anyOf"].append(
    {
        "type": "object",
        "properties": {"type": {"type": "string", "enum": ["all_contacts"]}},
        "required": ["type"],
    }
)


def assert_get_sequence_output(body: dict[str, Any]) -> None:
    null_filter = body["filter"] == {"or": [{"and": [{"type": "all_contacts"}]}]}
    jsonschema.validate(body, WITH_ALL_CONTACTS if null_filter else GET_SEQUENCE_SCHEMA)


def step(subject: str = "Hi {{ contact.name }}", body: str = "Hello", delay: float = 0) -> dict:
    return {
        "action": {
            "type": "send_emails",
            "data": {
                "from_email": "team@example.com",
                "email_subject": subject,
                "email_body": body,
                "email_sender_name": "Team",
                "email_is_transactional": False,
            },
        },
        "delay_in_minutes": delay,
    }


async def add_contacts(
    db: Database, org_id: uuid.UUID, rows: list[tuple[str | None, datetime]]
) -> list[uuid.UUID]:
    ids = [new_id() for _ in rows]
    async with db.transaction() as session:
        await session.execute(
            insert(Contact),
            [
                {
                    "id": cid,
                    "org_id": org_id,
                    "email": email,
                    "email_normalized": email.lower() if email else None,
                    "custom_data": {},
                    "created_at": created,
                    "updated_at": created,
                }
                for cid, (email, created) in zip(ids, rows, strict=True)
            ],
        )
    return ids


async def count(db: Database, model: Any) -> int:
    async with db.transaction() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def enrollments(db: Database, sequence_id: str) -> list[Enrollment]:
    async with db.transaction() as session:
        return list(
            await session.scalars(
                select(Enrollment)
                .where(Enrollment.sequence_id == uuid.UUID(sequence_id))
                .order_by(Enrollment.run_index)
            )
        )


async def create(tenant: Tenant, body: dict[str, Any]) -> str:
    response = await tenant.client.post("/sequences", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def get(tenant: Tenant, ref: str) -> dict[str, Any]:
    response = await tenant.client.get(f"/sequences/{ref}")
    assert response.status_code == 200, response.text
    return dict(response.json())


# --- OpenCX's examples, verbatim -----------------------------------------------------------


async def test_opencx_examples_create_get_update_cancel(tenant: Tenant, db: Database) -> None:
    sequence_id = await create(tenant, CREATE_EXAMPLE)
    body = await get(tenant, sequence_id)
    assert_get_sequence_output(body)
    assert body["name"] == "New Sequence" and body["is_continuous"] is True
    assert body["status"] == "active" and body["started_at"] is not None
    assert body["filter"] == CREATE_EXAMPLE["filter"]
    assert body["steps"] == CREATE_EXAMPLE["steps"]
    assert body["custom_id"] is None and body["canceled_at"] is None and body["ended_at"] is None
    assert body["org_id"] == str(tenant.org_id) and body["id"] == sequence_id

    response = await tenant.client.patch(f"/sequences/{sequence_id}", json=UPDATE_EXAMPLE)
    assert response.status_code == 200, response.text
    updated = await get(tenant, sequence_id)
    assert_get_sequence_output(updated)
    assert updated["name"] == "New name"
    assert {k: v for k, v in updated.items() if k not in ("name", "updated_at")} == {
        k: v for k, v in body.items() if k not in ("name", "updated_at")
    }

    response = await tenant.client.put(f"/sequences/{sequence_id}/cancel")
    assert response.status_code == 200, response.text
    canceled = await get(tenant, sequence_id)
    assert_get_sequence_output(canceled)
    assert canceled["status"] == "canceled" and canceled["canceled_at"] is not None


async def test_opencx_create_example_as_one_off_starts(tenant: Tenant, db: Database) -> None:
    """The example is continuous by default (start → 409); with ``is_continuous: false`` added
    it starts, and its created_at filter picks exactly the contact created at that instant."""
    sequence_id = await create(tenant, CREATE_EXAMPLE)
    assert_error(await tenant.client.put(f"/sequences/{sequence_id}/start"), 409, "one-off")

    one_off = {**copy.deepcopy(CREATE_EXAMPLE), "is_continuous": False}
    sequence_id = await create(tenant, one_off)
    body = await get(tenant, sequence_id)
    assert body["status"] == "pending" and body["started_at"] is None
    inside, _ = await add_contacts(
        db,
        tenant.org_id,
        [
            ("in@example.com", EXAMPLE_INSTANT),
            ("out@example.com", EXAMPLE_INSTANT + timedelta(microseconds=1000)),
        ],
    )
    response = await tenant.client.put(f"/sequences/{sequence_id}/start")
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"run_id"}
    rows = await enrollments(db, sequence_id)
    assert [r.contact_id for r in rows] == [inside]
    started = await get(tenant, sequence_id)
    assert_get_sequence_output(started)
    assert started["status"] == "active" and started["started_at"] is not None


# --- output shape and defaults --------------------------------------------------------------


async def test_defaults_and_output_shape(tenant: Tenant) -> None:
    raw_step = step()
    del raw_step["delay_in_minutes"]
    sequence_id = await create(tenant, {"filter": None, "steps": [raw_step]})
    body = await get(tenant, sequence_id)
    assert_get_sequence_output(body)
    assert body["name"] == "New Sequence" and body["is_continuous"] is True
    assert body["filter"] == {"or": [{"and": [{"type": "all_contacts"}]}]}
    assert body["steps"][0]["delay_in_minutes"] == 0
    assert "started_at" not in body["steps"][0] and "ended_at" not in body["steps"][0]
    for key in ("custom_id", "started_at", "canceled_at", "ended_at"):
        assert key in body
    assert body["send_window"] is None


async def test_phone_calls_fractional_delays_custom_id_and_send_window(tenant: Tenant) -> None:
    window = {
        "days": ["fri", "mon"],
        "start": "22:00",
        "end": "06:30",
        "timezone": "Europe/Amsterdam",
    }
    sequence_id = await create(
        tenant,
        {
            "custom_id": "welcome-1",
            "is_continuous": False,
            "steps": [
                {"action": {"type": "make_phone_calls", "data": {}}, "delay_in_minutes": 2.5},
                step(delay=0.25),
            ],
            "send_window": window,
        },
    )
    body = await get(tenant, "welcome-1")
    assert body["id"] == sequence_id and body["status"] == "pending"
    assert body["steps"][0] == {
        "action": {"type": "make_phone_calls", "data": {}},
        "delay_in_minutes": 2.5,
    }
    assert body["steps"][1]["delay_in_minutes"] == 0.25
    assert body["send_window"] == {**window, "days": ["mon", "fri"]}
    response = await tenant.client.patch(f"/sequences/{sequence_id}", json={"send_window": None})
    assert response.status_code == 200, response.text
    assert (await get(tenant, sequence_id))["send_window"] is None
    assert (await get(tenant, sequence_id.upper()))["id"] == sequence_id


async def test_list_paginates_and_filters_by_status(tenant: Tenant, other_tenant: Tenant) -> None:
    ids = [await create(tenant, {"is_continuous": i % 2 == 0, "steps": [step()]}) for i in range(5)]
    await create(other_tenant, {"steps": [step()]})
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        response = await tenant.client.get("/sequences", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == ids
    response = await tenant.client.get("/sequences", params={"status": "pending"})
    assert [i["id"] for i in response.json()["items"]] == [ids[1], ids[3]]
    assert_error(await tenant.client.get("/sequences", params={"status": "nope"}), 400, "status")
    assert_error(await tenant.client.get("/sequences", params={"cursor": "zz"}), 400, "cursor")


# --- PATCH ----------------------------------------------------------------------------------


async def test_patch_is_partial_and_keeps_positions(tenant: Tenant, db: Database) -> None:
    sequence_id = await create(
        tenant, {"name": "Drip", "is_continuous": False, "steps": [step(), step(delay=5)]}
    )
    response = await tenant.client.patch(f"/sequences/{sequence_id}", json={"custom_id": "c1"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["name"] == "Drip" and body["is_continuous"] is False
    assert body["custom_id"] == "c1" and body["status"] == "pending"

    await add_contacts(db, tenant.org_id, [("a@x.io", EXAMPLE_INSTANT)])
    assert (await tenant.client.put("/sequences/c1/start")).status_code == 200
    async with db.transaction() as session:
        row = (await session.scalars(select(Enrollment))).one()
        row.current_step = 1
    response = await tenant.client.patch(
        "/sequences/c1",
        json={"steps": [step(body="v2"), step(body="v2", delay=1), step(body="third")]},
    )
    assert response.status_code == 200, response.text
    assert [s["action"]["data"]["email_body"] for s in response.json()["steps"]] == [
        "v2",
        "v2",
        "third",
    ]
    (row,) = await enrollments(db, sequence_id)
    assert row.current_step == 1 and row.status == "active"
    assert_error(
        await tenant.client.patch("/sequences/c1", json={"is_continuous": True}), 409, "pending"
    )
    response = await tenant.client.patch("/sequences/c1", json={"is_continuous": False})
    assert response.status_code == 200, response.text


async def test_pending_one_off_patched_to_continuous_becomes_active(tenant: Tenant) -> None:
    sequence_id = await create(tenant, {"is_continuous": False, "steps": [step()]})
    response = await tenant.client.patch(f"/sequences/{sequence_id}", json={"is_continuous": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "active" and body["is_continuous"] is True
    assert body["started_at"] is not None
    assert_error(
        await tenant.client.patch(f"/sequences/{sequence_id}", json={"is_continuous": False}),
        409,
        "pending",
    )


async def test_duplicate_custom_id_conflicts_on_create_and_patch(
    tenant: Tenant, other_tenant: Tenant, db: Database
) -> None:
    await create(tenant, {"custom_id": "dup", "steps": [step()]})
    other = await create(tenant, {"custom_id": "other", "steps": [step()]})
    assert_error(
        await tenant.client.post("/sequences", json={"custom_id": "dup", "steps": [step()]}),
        409,
        "dup",
    )
    assert await count(db, Sequence) == 2
    assert_error(
        await tenant.client.patch(f"/sequences/{other}", json={"custom_id": "dup", "name": "x"}),
        409,
    )
    assert (await get(tenant, other))["name"] == "New Sequence"
    await create(other_tenant, {"custom_id": "dup", "steps": [step()]})


async def test_editing_complete_or_canceled_conflicts(tenant: Tenant) -> None:
    done = await create(
        tenant,
        {
            "is_continuous": False,
            "steps": [step()],
            "filter": {"or": [{"and": [{"type": "contact_id_in", "contact_ids": []}]}]},
        },
    )
    assert (await tenant.client.put(f"/sequences/{done}/start")).status_code == 200
    body = await get(tenant, done)
    assert body["status"] == "complete" and body["ended_at"] is not None
    assert_error(
        await tenant.client.patch(f"/sequences/{done}", json={"name": "x"}), 409, "complete"
    )
    assert_error(await tenant.client.put(f"/sequences/{done}/cancel"), 409, "complete")
    canceled = await create(tenant, {"steps": [step()]})
    assert (await tenant.client.put(f"/sequences/{canceled}/cancel")).status_code == 200
    assert_error(
        await tenant.client.patch(f"/sequences/{canceled}", json={"name": "x"}), 409, "canceled"
    )
    assert (await get(tenant, canceled))["name"] == "New Sequence"


# --- start ----------------------------------------------------------------------------------


async def test_start_enrolls_matching_contacts_as_one_run(
    tenant: Tenant, other_tenant: Tenant, db: Database
) -> None:
    ids = await add_contacts(
        db,
        tenant.org_id,
        [
            ("a@Match.io", EXAMPLE_INSTANT),
            ("b@other.io", EXAMPLE_INSTANT),
            ("c@match.io", EXAMPLE_INSTANT),
            (None, EXAMPLE_INSTANT),
        ],
    )
    await add_contacts(db, other_tenant.org_id, [("z@match.io", EXAMPLE_INSTANT)])
    sequence_id = await create(
        tenant,
        {
            "is_continuous": False,
            "steps": [step(delay=90.5), step()],
            "filter": {
                "or": [
                    {
                        "and": [
                            {
                                "type": "contacts_email_domain_name_in",
                                "domain_name_in": ["MATCH.io"],
                            }
                        ]
                    },
                    {"and": [{"type": "contact_id_in", "contact_ids": [str(ids[3]).upper()]}]},
                ]
            },
        },
    )
    response = await tenant.client.put(f"/sequences/{sequence_id}/start")
    assert response.status_code == 200, response.text
    run_id = uuid.UUID(response.json()["run_id"])
    rows = await enrollments(db, sequence_id)
    expected = sorted([ids[0], ids[2], ids[3]])
    assert [r.contact_id for r in rows] == expected
    assert [r.run_index for r in rows] == [0, 1, 2]
    async with db.transaction() as session:
        run = await session.get(Run, run_id)
    assert run is not None and run.kind == "start" and run.total == 3
    assert run.counts == {
        "added": 3,
        "created_and_added": 0,
        "filtered_out": 0,
        "already_enrolled": 0,
        "duplicate_in_request": 0,
        "not_found": 0,
    }
    for row in rows:
        assert row.run_id == run_id and row.status == "active" and row.current_step == 0
        assert row.org_id == tenant.org_id
        assert row.next_step_at == row.created_at + timedelta(minutes=90.5)
        assert len({r.id for r in rows}) == 3 and row.id.version == 7
    body = await get(tenant, sequence_id)
    assert body["status"] == "active" and body["started_at"] is not None
    assert_error(await tenant.client.put(f"/sequences/{sequence_id}/start"), 409, "started")
    assert await count(db, Run) == 1


async def test_the_largest_filter_starts_on_both_databases(tenant: Tenant, db: Database) -> None:
    """100 groups, 200 filters, 10,000 listed ids and domains: one SQL condition that SQLite
    nests under its depth limit and PostgreSQL binds under its parameter limit, with 99
    subqueries (contacts_affected_by_sequence) that PostgreSQL plans in well under a second."""
    ids = await add_contacts(db, tenant.org_id, [("a@match.io", EXAMPLE_INSTANT)])
    listed = [str(uuid.uuid4()) for _ in range(99)] + [str(ids[0])]
    since = {"type": "contacts_created_at_between", "after": "2000-01-01T00:00:00Z", "before": None}
    groups = [
        {
            "and": [
                {"type": "contact_id_in", "contact_ids": listed},
                {"type": "contacts_affected_by_sequence", "sequence_id": str(uuid.uuid4())},
            ]
        }
        for _ in range(99)
    ]
    domains = [f"d{i}.io" for i in range(99)] + ["match.io"]
    by_domain = {"type": "contacts_email_domain_name_in", "domain_name_in": domains}
    groups.append({"and": [by_domain, since]})
    sequence_id = await create(
        tenant, {"is_continuous": False, "steps": [step()], "filter": {"or": groups}}
    )
    response = await tenant.client.put(f"/sequences/{sequence_id}/start")
    assert response.status_code == 200, response.text
    assert [r.contact_id for r in await enrollments(db, sequence_id)] == ids


async def test_a_stored_filter_over_the_limits_is_a_conflict(tenant: Tenant, db: Database) -> None:
    """A filter saved before the limits on groups existed: starting or adding contacts says
    what to change, where it was a 500 (pydantic's error escaping the service)."""
    too_many = {"or": [{"and": [{"type": "all_contacts"}]}] * 101}
    one_off = await create(tenant, {"is_continuous": False, "steps": [step()]})
    continuous = await create(tenant, {"is_continuous": True, "steps": [step()]})
    async with db.transaction() as session:
        await session.execute(update(Sequence).values(filter=too_many))
    message = "the sequence's filter is over the limits (or: List should have at most 100"
    assert_error(await tenant.client.put(f"/sequences/{one_off}/start"), 409, message)
    added = await tenant.client.post(
        f"/sequences/{continuous}/contacts", json={"contacts": [{"email": "a@example.com"}]}
    )
    assert_error(added, 409, message)
    assert await count(db, Run) == 0
    assert await count(db, Contact) == 0


async def test_start_rejects_continuous_and_canceled(tenant: Tenant, db: Database) -> None:
    continuous = await create(tenant, {"steps": [step()]})
    assert_error(await tenant.client.put(f"/sequences/{continuous}/start"), 409)
    one_off = await create(tenant, {"is_continuous": False, "steps": [step()]})
    assert (await tenant.client.put(f"/sequences/{one_off}/cancel")).status_code == 200
    assert_error(await tenant.client.put(f"/sequences/{one_off}/start"), 409, "canceled")
    assert await count(db, Run) == 0


# --- cancel ---------------------------------------------------------------------------------


async def _second_run(
    db: Database, org_id: uuid.UUID, sequence_id: str, contact_id: uuid.UUID
) -> uuid.UUID:
    """Another run of the same sequence (as add-contacts would make), with one enrollment."""
    run_id = new_id()
    now = datetime.now(UTC)
    async with db.transaction() as session:
        session.add(
            Run(
                id=run_id,
                org_id=org_id,
                sequence_id=uuid.UUID(sequence_id),
                kind="add_contacts",
                total=1,
                counts={"added": 1},
                created_at=now,
            )
        )
        await session.flush()
        session.add(
            Enrollment(
                org_id=org_id,
                sequence_id=uuid.UUID(sequence_id),
                contact_id=contact_id,
                run_id=run_id,
                status="active",
                current_step=0,
                next_step_at=now,
                created_at=now,
                updated_at=now,
            )
        )
    return run_id


async def test_cancel_by_run_id_cancels_only_that_run(tenant: Tenant, db: Database) -> None:
    first, second = await add_contacts(
        db, tenant.org_id, [("a@x.io", EXAMPLE_INSTANT), ("b@x.io", EXAMPLE_INSTANT)]
    )
    sequence_id = await create(
        tenant,
        {
            "is_continuous": False,
            "steps": [step()],
            "filter": {"or": [{"and": [{"type": "contact_id_in", "contact_ids": [str(first)]}]}]},
        },
    )
    start_run = (await tenant.client.put(f"/sequences/{sequence_id}/start")).json()["run_id"]
    other_run = await _second_run(db, tenant.org_id, sequence_id, second)

    response = await tenant.client.put(f"/sequences/{start_run}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["kind"] == "run"
    canceled_at = response.json()["canceled_at"]
    by_contact = {r.contact_id: r for r in await enrollments(db, sequence_id)}
    assert by_contact[first].status == "canceled" and by_contact[first].next_step_at is None
    assert by_contact[second].status == "active" and by_contact[second].run_id == other_run
    assert (await get(tenant, sequence_id))["status"] == "active"
    async with db.transaction() as session:
        run = await session.get(Run, uuid.UUID(start_run))
        assert run is not None and run.canceled_at is not None

    again = await tenant.client.put(f"/sequences/{start_run}/cancel")
    assert again.status_code == 200 and again.json()["canceled_at"] == canceled_at

    response = await tenant.client.put(f"/sequences/{sequence_id}/cancel")
    assert response.status_code == 200, response.text
    first_cancel = response.json()["canceled_at"]
    assert all(
        r.status == "canceled" and r.next_step_at is None
        for r in await enrollments(db, sequence_id)
    )
    again = await tenant.client.put(f"/sequences/{sequence_id}/cancel")
    assert again.status_code == 200 and again.json()["canceled_at"] == first_cancel
    assert (await get(tenant, sequence_id))["canceled_at"] == first_cancel


async def test_canceling_the_last_active_run_completes_a_one_off(
    tenant: Tenant, db: Database
) -> None:
    await add_contacts(db, tenant.org_id, [("a@x.io", EXAMPLE_INSTANT)])
    sequence_id = await create(tenant, {"is_continuous": False, "steps": [step()]})
    run_id = (await tenant.client.put(f"/sequences/{sequence_id}/start")).json()["run_id"]
    assert (await tenant.client.put(f"/sequences/{run_id}/cancel")).status_code == 200
    body = await get(tenant, sequence_id)
    assert body["status"] == "complete" and body["ended_at"] is not None


# --- tenancy and scopes ---------------------------------------------------------------------


async def test_other_organizations_ids_are_not_found(
    tenant: Tenant, other_tenant: Tenant, db: Database
) -> None:
    await add_contacts(db, tenant.org_id, [("a@x.io", EXAMPLE_INSTANT)])
    sequence_id = await create(
        tenant, {"custom_id": "mine", "is_continuous": False, "steps": [step()]}
    )
    run_id = (await tenant.client.put(f"/sequences/{sequence_id}/start")).json()["run_id"]
    for ref in (sequence_id, "mine", run_id, str(uuid.uuid4())):
        assert_error(await other_tenant.client.get(f"/sequences/{ref}"), 404)
        assert_error(await other_tenant.client.patch(f"/sequences/{ref}", json={"name": "x"}), 404)
        assert_error(await other_tenant.client.put(f"/sequences/{ref}/start"), 404)
        assert_error(await other_tenant.client.put(f"/sequences/{ref}/cancel"), 404)
    body = await get(tenant, sequence_id)
    assert body["name"] == "New Sequence" and body["status"] == "active"
    assert all(r.status == "active" for r in await enrollments(db, sequence_id))


async def test_scopes(app: FastAPI) -> None:
    reader = await make_tenant(app, "readers", ["sequences:read"])
    async with reader.client:
        assert_error(await reader.client.post("/sequences", json={"steps": [step()]}), 403)
        assert (await reader.client.get("/sequences")).status_code == 200
    contacts_only = await make_tenant(app, "contacts-only", ["contacts:write"])
    async with contacts_only.client:
        assert_error(await contacts_only.client.get("/sequences"), 403)


# --- 400 paths write nothing ----------------------------------------------------------------


def _with(path: str, value: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"steps": [step()]}
    target: Any = body
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[int(key)] if key.isdigit() else target[key]
    last = keys[-1]
    if last.isdigit():
        target[int(last)] = value
    else:
        target[last] = value
    return body


BAD_CREATES = [
    (_with("name", "n" * 257), "name"),
    (_with("name", "a\x00b"), "name"),
    (_with("custom_id", "c" * 51), "custom_id"),
    (_with("custom_id", ""), "custom_id"),
    (_with("steps", []), "steps"),
    (_with("steps", [step()] * 101), "steps"),
    (_with("steps.0.delay_in_minutes", -1), "delay_in_minutes"),
    (_with("steps.0.action.data.from_email", "not-an-email"), "from_email"),
    (_with("steps.0.action.data.from_email", ".a@example.com"), "from_email"),
    (_with("steps.0.action.data.email_body", "é" * (128 * 1024 + 1)), "email_body"),
    (_with("steps.0.action.data.email_subject", "bell\x07"), "email_subject"),
    (_with("steps.0.action.type", "send_faxes"), "action"),
    (_with("steps.0.action.data", {}), "from_email"),
    (_with("is_continuous", "maybe"), "is_continuous"),
    (_with("filter", {"or": []}), "filter"),
    # Past what one SQL condition holds: 1,000 groups were accepted, then the start was a 500.
    (_with("filter", {"or": [{"and": [{"type": "all_contacts"}]}] * 101}), "filter.or:"),
    (_with("filter", {"or": [{"and": [{"type": "all_contacts"}] * 101}]}), "filter.or[0].and"),
    (
        _with(
            "filter",
            {
                "or": [
                    {"and": [{"type": "contact_id_in", "contact_ids": [str(uuid.uuid4())] * 5001}]},
                    {
                        "and": [
                            {
                                "type": "contacts_email_domain_name_in",
                                "domain_name_in": ["x.io"] * 5000,
                            }
                        ]
                    },
                ]
            },
        ),
        "10,001 contact ids and domain names in all; at most 10,000",
    ),
    (
        _with("filter", {"or": [{"and": [{"type": "contact_id_in", "contact_ids": ["x"]}]}]}),
        "filter",
    ),
    (
        _with(
            "filter",
            {
                "or": [
                    {
                        "and": [
                            {"type": "contacts_created_at_between", "after": "soon", "before": None}
                        ]
                    }
                ]
            },
        ),
        "filter",
    ),
    (
        _with("send_window", {"days": ["mon"], "start": "9:00", "end": "17:00", "timezone": "UTC"}),
        "send_window.start",
    ),
    (
        _with(
            "send_window",
            {"days": ["mon"], "start": "09:00", "end": "17:00", "timezone": "Mars/Olympus"},
        ),
        "send_window.timezone",
    ),
    # Past a century, a delay reached beyond the last datetime: starting or adding contacts
    # answered 500, and the worker crashed after sending the step before it.
    ({"steps": [step(), step(delay=1e10)]}, "steps[1].delay_in_minutes"),
    (
        # A directory of the zone database: reading it raised IsADirectoryError, a 500.
        _with(
            "send_window", {"days": ["mon"], "start": "09:00", "end": "17:00", "timezone": "Europe"}
        ),
        "send_window.timezone",
    ),
    (
        # The machine's zone: workers on machines in different zones would open it differently.
        _with(
            "send_window",
            {"days": ["mon"], "start": "09:00", "end": "17:00", "timezone": "localtime"},
        ),
        "send_window.timezone",
    ),
    (
        _with(
            "send_window", {"days": ["funday"], "start": "09:00", "end": "17:00", "timezone": "UTC"}
        ),
        "send_window.days",
    ),
    (
        {"steps": [step(), step(body="Hi\n\n{% if contact.name %}oops")]},
        "steps[1].action.data.email_body: line 3",
    ),
    ({"steps": [step(subject="{{ contact.name | }}")]}, "steps[0].action.data.email_subject"),
    ({"steps": [step(body="a\n{% endif %}\nb")]}, "steps[0].action.data.email_body: line 2"),
    # 100 kB that Liquid's lexer would take minutes over: refused at once.
    (
        {"steps": [step(body="<p>{{ contact.name }}</p>\n" + "{{" * 50_000)]},
        "steps[0].action.data.email_body: line 2: 50000 '{{' with no '}}' after them",
    ),
]


@pytest.mark.parametrize(("body", "message"), BAD_CREATES)
async def test_bad_create_is_400_and_writes_nothing(
    tenant: Tenant, db: Database, body: dict[str, Any], message: str
) -> None:
    assert_error(await tenant.client.post("/sequences", json=body), 400, message)
    assert await count(db, Sequence) == 0
    assert await count(db, SequenceStep) == 0


async def test_templates_are_stored_verbatim(tenant: Tenant) -> None:
    text = 'It\'s "quoted" \' OR 1=1; -- {{ contact.name | default: "friend" }} {% raw %}{{'
    text += "{% endraw %}"
    sequence_id = await create(tenant, {"steps": [step(subject=text, body="é" * 128 * 1024)]})
    data = (await get(tenant, sequence_id))["steps"][0]["action"]["data"]
    assert data["email_subject"] == text and len(data["email_body"]) == 128 * 1024


BAD_PATCHES = [
    ({"name": None}, "name"),
    ({"steps": None}, "steps"),
    ({"steps": []}, "steps"),
    ({"name": "x", "steps": [step(body="{% for x in y %}")]}, "steps[0].action.data.email_body"),
    ({"custom_id": "c" * 51}, "custom_id"),
    ({"filter": {"or": [{"and": [{"type": "nope"}]}]}}, "filter"),
]


@pytest.mark.parametrize(("body", "message"), BAD_PATCHES)
async def test_bad_patch_is_400_and_changes_nothing(
    tenant: Tenant, body: dict[str, Any], message: str
) -> None:
    sequence_id = await create(tenant, {"name": "Keep", "steps": [step()]})
    before = await get(tenant, sequence_id)
    assert_error(await tenant.client.patch(f"/sequences/{sequence_id}", json=body), 400, message)
    assert await get(tenant, sequence_id) == before


# --- concurrency ----------------------------------------------------------------------------


async def test_concurrent_starts_make_one_run(tenant: Tenant, db: Database) -> None:
    await add_contacts(db, tenant.org_id, [(f"u{i}@x.io", EXAMPLE_INSTANT) for i in range(50)])
    sequence_id = await create(tenant, {"is_continuous": False, "steps": [step()]})
    responses = await asyncio.gather(
        *(tenant.client.put(f"/sequences/{sequence_id}/start") for _ in range(4))
    )
    assert sorted(r.status_code for r in responses) == [200, 409, 409, 409]
    assert await count(db, Run) == 1
    assert len(await enrollments(db, sequence_id)) == 50


async def test_concurrent_creates_with_one_custom_id(tenant: Tenant, db: Database) -> None:
    responses = await asyncio.gather(
        *(
            tenant.client.post("/sequences", json={"custom_id": "race", "steps": [step()]})
            for _ in range(4)
        )
    )
    assert sorted(r.status_code for r in responses) == [201, 409, 409, 409]
    for response in responses:
        if response.status_code == 409:
            assert_error(response, 409, "race")
    assert await count(db, Sequence) == 1
