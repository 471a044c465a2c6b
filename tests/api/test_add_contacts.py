"""POST /sequences/{id}/contacts, the seed operation (SPEC §4), and the run endpoints."""

from __future__ import annotations

import asyncio
import random
import string
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from opensequence.models import Contact, Enrollment, Run, RunItemPage
from opensequence.pagination import encode_cursor
from opensequence.validation import SEED_EMAIL_PATTERN, SEED_ID_PATTERN
from tests.helpers import STEP, Tenant, assert_error


async def create_sequence(client: httpx.AsyncClient, **fields: Any) -> str:
    body = {"filter": None, "steps": [STEP], **fields}
    response = await client.post("/sequences", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def create_contact(client: httpx.AsyncClient, **contact: Any) -> str:
    response = await client.post("/contacts", json={"contact": contact})
    assert response.status_code in (200, 201), response.text
    return str(response.json()["id"])


async def add(
    client: httpx.AsyncClient, sequence: str, items: list[Any], **kw: Any
) -> httpx.Response:
    return await client.post(f"/sequences/{sequence}/contacts", json={"contacts": items}, **kw)


async def run_items(
    client: httpx.AsyncClient, sequence: str, run_id: str, **params: Any
) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {"limit": 137, **params, **({"cursor": cursor} if cursor else {})}
        page = await client.get(f"/sequences/{sequence}/runs/{run_id}/contacts", params=query)
        assert page.status_code == 200, page.text
        body = page.json()
        items.extend(body["items"])
        cursor = body["next"]
        if cursor is None:
            return items


async def table_counts(app: FastAPI) -> dict[str, int]:
    async with app.state.db.transaction() as session:
        return {
            model.__tablename__: int(
                await session.scalar(select(func.count()).select_from(model)) or 0
            )
            for model in (Contact, Enrollment, Run, RunItemPage)
        }


async def test_adds_new_and_existing_contacts_and_reports_the_run(
    app: FastAPI, tenant: Tenant
) -> None:
    sequence = await create_sequence(tenant.client, custom_id="welcome")
    existing = await create_contact(tenant.client, email="old@example.com", name="Old")
    response = await add(
        tenant.client,
        "welcome",
        [
            {"id": existing},
            {"email": "new@example.com", "name": "New", "custom_data": {"plan": "pro"}},
            {"phone_number": "+31 20 123 4567"},
        ],
    )
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"run_id"}
    run_id = response.json()["run_id"]
    uuid.UUID(run_id)

    run = (await tenant.client.get(f"/sequences/{sequence}/runs/{run_id}")).json()
    assert run["id"] == run_id and run["sequence_id"] == sequence and run["kind"] == "add_contacts"
    assert run["total"] == 3 and run["canceled_at"] is None and run["created_at"].endswith("Z")
    assert run["counts"] == {
        "added": 1,
        "created_and_added": 2,
        "filtered_out": 0,
        "already_enrolled": 0,
        "duplicate_in_request": 0,
        "not_found": 0,
    }
    items = await run_items(tenant.client, sequence, run_id)
    assert [i["index"] for i in items] == [0, 1, 2]
    assert items[0] == {
        "index": 0,
        "input": {"id": existing},
        "contact_id": existing,
        "outcome": "added",
        "reason": None,
    }
    assert items[1]["input"] == {
        "email": "new@example.com",
        "name": "New",
        "custom_data": {"plan": "pro"},
    }
    created = (await tenant.client.get(f"/contacts/{items[1]['contact_id']}")).json()
    assert created["name"] == "New" and created["custom_data"] == {"plan": "pro"}
    phone = (await tenant.client.get(f"/contacts/{items[2]['contact_id']}")).json()
    assert phone["phone_number"] == "+31201234567"


async def test_empty_list_makes_an_empty_run(tenant: Tenant) -> None:
    sequence = await create_sequence(tenant.client)
    response = await add(tenant.client, sequence, [])
    assert response.status_code == 200
    run = (
        await tenant.client.get(f"/sequences/{sequence}/runs/{response.json()['run_id']}")
    ).json()
    assert run["total"] == 0 and set(run["counts"].values()) == {0}


async def test_first_step_is_due_delay_after_now(app: FastAPI, tenant: Tenant) -> None:
    sequence = await create_sequence(tenant.client)
    before = datetime.now(UTC)
    await add(tenant.client, sequence, [{"email": "due@example.com"}])
    async with app.state.db.transaction() as session:
        enrollment = await session.scalar(select(Enrollment))
    assert enrollment is not None and enrollment.status == "active" and enrollment.current_step == 0
    assert enrollment.next_step_at is not None
    assert before + timedelta(minutes=30) <= enrollment.next_step_at
    assert enrollment.next_step_at <= datetime.now(UTC) + timedelta(minutes=30)


async def test_error_paths_answer_errordto_and_write_nothing(
    app: FastAPI, tenant: Tenant, other_tenant: Tenant
) -> None:
    sequence = await create_sequence(tenant.client)
    oneoff = await create_sequence(tenant.client, is_continuous=False)
    canceled = await create_sequence(tenant.client)
    assert (await tenant.client.put(f"/sequences/{canceled}/cancel")).status_code == 200
    foreign = await create_sequence(other_tenant.client)
    baseline = await table_counts(app)
    good = [{"email": "someone@example.com"}]

    assert_error(await add(tenant.client, foreign, good), 404)
    assert_error(await add(tenant.client, str(uuid.uuid4()), good), 404)
    assert_error(await add(tenant.client, "no-such-custom-id", good), 404)
    assert_error(await add(tenant.client, oneoff, good), 409, "continuous")
    assert_error(await add(tenant.client, canceled, good), 409, "canceled")

    url = f"/sequences/{sequence}/contacts"
    assert_error(await tenant.client.post(url, json={}), 400, "contacts")
    assert_error(
        await tenant.client.post(url, json={"contacts": {"email": "a@b.co"}}), 400, "array"
    )
    assert_error(await tenant.client.post(url, json=[]), 400, "object")
    assert_error(
        await tenant.client.post(
            url, content=b"{nope", headers={"content-type": "application/json"}
        ),
        400,
    )
    assert_error(await add(tenant.client, sequence, [*good, "a@b.co"]), 400, "contacts[1]")
    assert_error(await add(tenant.client, sequence, [*good, {}]), 400, "contacts[1]")
    assert_error(
        await add(tenant.client, sequence, [{"email": "not-an-email"}]), 400, "contacts[0]"
    )
    assert_error(
        await add(tenant.client, sequence, [{"email": ".dot@example.com"}]), 400, "pattern"
    )
    assert_error(await add(tenant.client, sequence, [{"id": "123"}]), 400, "contacts[0]")
    assert_error(await add(tenant.client, sequence, [{"id": 5}]), 400, "contacts[0]")
    assert_error(
        await add(tenant.client, sequence, [{"phone_number": 31201234567}]), 400, "contacts[0]"
    )
    assert_error(
        await add(tenant.client, sequence, [{"phone_number": "+31\u0000"}]), 400, "contacts[0]"
    )
    assert_error(
        await add(tenant.client, sequence, [{"email": "a@b.co", "name": "x" * 257}]),
        400,
        "contacts[0].name",
    )
    assert_error(
        await add(
            tenant.client, sequence, [{"email": "a@b.co", "custom_data": {"deep": {"x": 1}}}]
        ),
        400,
        "contacts[0].custom_data",
    )
    too_many = [{"email": f"u{i}@example.com"} for i in range(10_001)]
    assert_error(await add(tenant.client, sequence, too_many), 413, "10000")
    assert await table_counts(app) == baseline


@pytest.mark.parametrize("field", ["email", "phone_number"])
async def test_an_identifier_too_long_for_postgresql_to_index_is_a_400(
    app: FastAPI, tenant: Tenant, backend: str, field: str
) -> None:
    """SPEC §4: any length is accepted. SQLite stores it; PostgreSQL's unique indexes cannot
    hold an entry over ~2,700 bytes once compressed, which was a 500."""
    sequence = await create_sequence(tenant.client)
    noise = "".join(random.Random(7).choices(string.ascii_letters + string.digits, k=8000))
    value = f"{noise}@example.com" if field == "email" else f"+{noise}"
    baseline = await table_counts(app)
    response = await add(tenant.client, sequence, [{"email": "ok@example.com"}, {field: value}])
    if backend == "sqlite":
        assert response.status_code == 200, response.text
        return
    assert_error(response, 400, "too long to store on PostgreSQL")
    assert await table_counts(app) == baseline


async def test_limit_follows_settings(app: FastAPI, tenant: Tenant) -> None:
    app.state.settings = app.state.settings.model_copy(update={"max_contacts_per_request": 3})
    sequence = await create_sequence(tenant.client)
    response = await add(
        tenant.client, sequence, [{"email": f"u{i}@example.com"} for i in range(4)]
    )
    assert_error(response, 413, "at most 3")
    assert (await add(tenant.client, sequence, [{"email": "x@example.com"}] * 3)).status_code == 200


async def test_identifier_rules_of_the_seed(tenant: Tenant) -> None:
    sequence = await create_sequence(tenant.client)
    known = await create_contact(tenant.client, email="known@example.com")
    weird_but_valid = "o'neil+tag@sub-domain.example.co"
    items = [
        {"id": known.upper(), "email": "ignored@example.com"},  # id wins, any case
        {"id": "not-a-uuid", "email": "fallback@example.com"},  # bad id ignored: email decides
        {"email": weird_but_valid},
        {"phone_number": ""},
        {"phone_number": "   "},
        {"phone_number": "call me maybe"},  # any string is a phone number
        {"email": "x" * 400 + "@example.com"},  # §1 limits do not narrow the seed's email
        {"id": "ffffffff-ffff-ffff-ffff-ffffffffffff"},
    ]
    response = await add(tenant.client, sequence, items)
    assert response.status_code == 200, response.text
    result = await run_items(tenant.client, sequence, response.json()["run_id"])
    outcomes = [(i["outcome"], i["contact_id"]) for i in result]
    assert outcomes[0] == ("added", known)
    assert outcomes[1][0] == "created_and_added"
    assert outcomes[2][0] == "created_and_added"
    assert outcomes[3] == ("not_found", None) and outcomes[4] == ("not_found", None)
    assert outcomes[5][0] == "created_and_added"
    assert outcomes[6][0] == "created_and_added"
    assert outcomes[7] == ("not_found", None)
    fallback = (await tenant.client.get(f"/contacts/{outcomes[1][1]}")).json()
    assert fallback["email"] == "fallback@example.com"
    assert result[0]["input"] == items[0]


async def test_mixed_batch_of_1000_items(app: FastAPI, tenant: Tenant) -> None:
    phone_ids = [await create_contact(tenant.client, phone=f"+3161234{i:04d}") for i in range(20)]
    good = [await create_contact(tenant.client, email=f"good{i}@good.io") for i in range(150)]
    bad = [await create_contact(tenant.client, email=f"bad{i}@bad.io") for i in range(50)]
    sequence = await create_sequence(
        tenant.client,
        filter={
            "or": [
                {"and": [{"type": "contacts_email_domain_name_in", "domain_name_in": ["GOOD.io"]}]},
                {"and": [{"type": "contact_id_in", "contact_ids": phone_ids}]},
            ]
        },
    )
    first = await add(tenant.client, sequence, [{"id": cid} for cid in good[:50]])
    assert first.status_code == 200

    items: list[dict[str, Any]] = []
    expected: list[str] = []

    def put(item: dict[str, Any], outcome: str) -> None:
        items.append(item)
        expected.append(outcome)

    for cid in good[:50]:
        put({"id": cid}, "already_enrolled")
    for cid in good[50:100]:
        put({"id": cid}, "added")
    for i in range(100, 150):
        put({"email": f"GOOD{i}@GOOD.IO"}, "added")  # existing emails, another case
    for _ in range(100):
        put({"id": str(uuid.uuid4())}, "not_found")
    for i in range(300):
        put({"email": f"fresh{i}@good.io"}, "created_and_added")
    for i in range(20):
        put({"phone_number": f"+31 6 1234 {i:04d}"}, "added")  # admitted by or[1]
    for i in range(80):
        put({"phone_number": f"+3162222{i:04d}"}, "filtered_out")  # created, no group admits
    for cid in bad:
        put({"id": cid}, "filtered_out")
    for cid in good[50:100]:
        put({"id": cid}, "duplicate_in_request")
    for i in range(200):
        put({"email": f"FRESH{i}@Good.IO"}, "duplicate_in_request")
    for cid in good[100:150]:
        put({"id": cid}, "duplicate_in_request")  # first referenced by email above
    assert len(items) == 1000
    response = await add(tenant.client, sequence, items)
    assert response.status_code == 200, response.text
    run_id = response.json()["run_id"]
    result = await run_items(tenant.client, sequence, run_id)
    assert [r["index"] for r in result] == list(range(1000))
    assert [r["input"] for r in result] == items
    mismatches = [
        (r["index"], r["outcome"], e)
        for r, e in zip(result, expected, strict=True)
        if r["outcome"] != e
    ]
    assert mismatches == []
    for r in result:
        if r["outcome"] == "filtered_out":
            assert r["reason"] == "or[0]: contacts_email_domain_name_in; or[1]: contact_id_in"
        else:
            assert r["reason"] is None
    run = (await tenant.client.get(f"/sequences/{sequence}/runs/{run_id}")).json()
    totals: dict[str, int] = {}
    for outcome in expected:
        totals[outcome] = totals.get(outcome, 0) + 1
    assert run["total"] == 1000
    assert {k: v for k, v in run["counts"].items() if v} == totals
    filtered = await run_items(tenant.client, sequence, run_id, outcome="filtered_out")
    assert len(filtered) == totals["filtered_out"]
    assert all(r["outcome"] == "filtered_out" for r in filtered)


async def test_concurrent_overlapping_requests_enroll_each_contact_once(
    app: FastAPI, tenant: Tenant
) -> None:
    sequence = await create_sequence(tenant.client)
    shared = [{"email": f"shared{i}@example.com"} for i in range(200)]
    first = shared + [{"email": f"a{i}@example.com"} for i in range(50)]
    second = list(reversed(shared)) + [{"email": f"b{i}@example.com"} for i in range(50)]
    responses = await asyncio.gather(
        add(tenant.client, sequence, first), add(tenant.client, sequence, second)
    )
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    runs = [
        (await tenant.client.get(f"/sequences/{sequence}/runs/{r.json()['run_id']}")).json()
        for r in responses
    ]
    enrolled_by_runs = sum(
        run["counts"]["added"] + run["counts"]["created_and_added"] for run in runs
    )
    assert enrolled_by_runs == 300
    assert sum(run["counts"]["already_enrolled"] for run in runs) == 200
    async with app.state.db.transaction() as session:
        per_contact = (
            await session.execute(
                select(Enrollment.contact_id, func.count()).group_by(Enrollment.contact_id)
            )
        ).all()
        contacts = int(await session.scalar(select(func.count()).select_from(Contact)) or 0)
    assert len(per_contact) == 300 and {n for _, n in per_contact} == {1}
    assert contacts == 300


async def test_idempotent_replay_returns_same_run_and_enrolls_nothing_new(
    app: FastAPI, tenant: Tenant
) -> None:
    sequence = await create_sequence(tenant.client)
    items = [{"email": f"i{i}@example.com"} for i in range(20)]
    headers = {"Idempotency-Key": "import-2024-09-14"}
    first = await add(tenant.client, sequence, items, headers=headers)
    after_first = await table_counts(app)
    replay = await add(tenant.client, sequence, items, headers=headers)
    assert replay.status_code == 200 and replay.json() == first.json()
    assert await table_counts(app) == after_first
    conflict = await add(tenant.client, sequence, items[:3], headers=headers)
    assert_error(conflict, 409, "Idempotency-Key")


async def test_run_endpoints_are_tenant_scoped_and_validate(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    sequence = await create_sequence(tenant.client)
    run_id = (await add(tenant.client, sequence, [{"email": "a@example.com"}])).json()["run_id"]
    other_sequence = await create_sequence(tenant.client)
    assert_error(await other_tenant.client.get(f"/sequences/{sequence}/runs/{run_id}"), 404)
    assert_error(await tenant.client.get(f"/sequences/{other_sequence}/runs/{run_id}"), 404)
    assert_error(await tenant.client.get(f"/sequences/{sequence}/runs/not-a-uuid"), 404)
    url = f"/sequences/{sequence}/runs/{run_id}/contacts"
    assert_error(await tenant.client.get(url, params={"outcome": "exploded"}), 400, "outcome")
    assert_error(await tenant.client.get(url, params={"limit": 0}), 400, "limit")
    assert_error(await tenant.client.get(url, params={"cursor": "garbage!"}), 400, "cursor")
    # Past a 64-bit integer: the driver raised, a 500.
    for index in (2**63, -(2**63) - 1, 10**30):
        forged = encode_cursor({"i": index})
        assert_error(await tenant.client.get(url, params={"cursor": forged}), 400, "cursor")


async def test_openapi_carries_the_seed_operation(anonymous: httpx.AsyncClient) -> None:
    document = (await anonymous.get("/openapi.json")).json()
    operation = document["paths"]["/sequences/{sequence_id}/contacts"]["post"]
    assert operation["operationId"] == "addContactsToSequence"
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    branches = schema["properties"]["contacts"]["items"]["anyOf"]
    assert branches[0]["properties"]["id"]["pattern"] == SEED_ID_PATTERN
    assert branches[1]["properties"]["email"]["pattern"] == SEED_EMAIL_PATTERN
    assert branches[2]["required"] == ["phone_number"]
    assert schema["required"] == ["contacts"]
    ok = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["additionalProperties"] is False and ok["required"] == ["run_id"]
    for status in ("400", "404", "409", "413", "500"):
        assert operation["responses"][status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorDto"
        }
