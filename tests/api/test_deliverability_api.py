"""Suppression list and sender limits APIs (SPEC §5, §6 extensions)."""

from __future__ import annotations

from fastapi import FastAPI

from opensequence.pagination import encode_cursor
from tests.helpers import Tenant, assert_error, make_tenant


async def test_suppressions_add_list_remove(tenant: Tenant, other_tenant: Tenant) -> None:
    created = await tenant.client.post("/suppressions", json={"email": "Someone@Example.com"})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["email"] == "Someone@Example.com" and body["reason"] == "manual"
    assert body["created_at"].endswith("Z")
    again = await tenant.client.post(
        "/suppressions", json={"email": "someone@example.com", "reason": "manual"}
    )
    assert again.status_code == 200
    stronger = await tenant.client.post(
        "/suppressions", json={"email": "someone@example.com", "reason": "bounced"}
    )
    assert stronger.status_code == 200 and stronger.json()["reason"] == "bounced"
    weaker = await tenant.client.post(
        "/suppressions", json={"email": "someone@example.com", "reason": "unsubscribed"}
    )
    assert weaker.json()["reason"] == "bounced"

    for i in range(5):
        await tenant.client.post("/suppressions", json={"email": f"u{i}@example.com"})
    seen: list[str] = []
    cursor = None
    while True:
        page = (
            await tenant.client.get(
                "/suppressions", params={"limit": 2, **({"cursor": cursor} if cursor else {})}
            )
        ).json()
        seen.extend(item["email"] for item in page["items"])
        cursor = page["next"]
        if cursor is None:
            break
    assert sorted(seen, key=str.lower) == seen and len(seen) == 6
    assert (await other_tenant.client.get("/suppressions")).json() == {"items": [], "next": None}
    # A lone surrogate, or a NUL, in a cursor's text: no database takes it (a 500 before).
    for path in ("/suppressions", "/sender-limits"):
        for text in ("\ud800", "a\x00"):
            forged = encode_cursor({"k": text})
            assert_error(await tenant.client.get(path, params={"cursor": forged}), 400, "cursor")
    assert_error(await other_tenant.client.delete("/suppressions/u1@example.com"), 404)

    removed = await tenant.client.delete("/suppressions/SOMEONE@example.com")
    assert removed.status_code == 200 and removed.json()["reason"] == "bounced"
    assert_error(await tenant.client.delete("/suppressions/someone@example.com"), 404)


async def test_suppression_input_is_validated(tenant: Tenant) -> None:
    assert_error(await tenant.client.post("/suppressions", json={"email": "nope"}), 400, "email")
    assert_error(
        await tenant.client.post("/suppressions", json={"email": "a@b.co", "reason": "spite"}),
        400,
        "reason",
    )
    assert (await tenant.client.get("/suppressions")).json()["items"] == []


async def test_sender_limits_put_list_delete(tenant: Tenant) -> None:
    put = await tenant.client.put(
        "/sender-limits/News@Example.com", json={"per_minute": 10, "per_day": 1000}
    )
    assert put.status_code == 200, put.text
    assert put.json() == {
        "sender": "news@example.com",
        "per_second": None,
        "per_minute": 10,
        "per_day": 1000,
    }
    replaced = await tenant.client.put("/sender-limits/news@example.com", json={"per_second": 2})
    assert replaced.json() == {
        "sender": "news@example.com",
        "per_second": 2,
        "per_minute": None,
        "per_day": None,
    }
    domain = await tenant.client.put("/sender-limits/example.com", json={"per_minute": 60})
    assert domain.status_code == 200
    listed = (await tenant.client.get("/sender-limits")).json()
    assert [item["sender"] for item in listed["items"]] == ["example.com", "news@example.com"]
    assert (await tenant.client.delete("/sender-limits/example.com")).status_code == 200
    assert_error(await tenant.client.delete("/sender-limits/example.com"), 404)


async def test_sender_limits_validate(tenant: Tenant) -> None:
    for bad in ({"per_minute": 0}, {"per_minute": -1}, {"per_minute": 1.5}, {"per_hour": 3}):
        response = await tenant.client.put("/sender-limits/example.com", json=bad)
        assert_error(response, 400)
    assert_error(
        await tenant.client.put("/sender-limits/not a domain", json={"per_minute": 1}),
        400,
        "sender",
    )
    assert (await tenant.client.get("/sender-limits")).json()["items"] == []


async def test_scopes_apply(app: FastAPI, tenant: Tenant) -> None:
    reader = await make_tenant(app, "acme", ["contacts:read", "sequences:read"])
    async with reader.client:
        assert (await reader.client.get("/suppressions")).status_code == 200
        assert (await reader.client.get("/sender-limits")).status_code == 200
        assert_error(await reader.client.post("/suppressions", json={"email": "a@b.co"}), 403)
        assert_error(
            await reader.client.put("/sender-limits/example.com", json={"per_minute": 1}), 403
        )
