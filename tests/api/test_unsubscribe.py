"""Unsubscribe endpoints (SPEC §6): the API route, the signed-link routes' contract in OpenAPI,
and the confirmation page."""

from __future__ import annotations

import uuid

import httpx
from fastapi import FastAPI

from opensequence.unsubscribe import load_secret, make_token
from tests.helpers import Tenant, assert_error, make_tenant


async def new_contact(tenant: Tenant, contact: dict[str, object]) -> str:
    response = await tenant.client.post("/contacts", json={"contact": contact})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def test_api_unsubscribe_suppresses_in_the_callers_organization(
    app: FastAPI, tenant: Tenant, other_tenant: Tenant
) -> None:
    contact_id = await new_contact(tenant, {"email": "Pat@Example.com", "name": "Pat"})
    done = await tenant.client.post(f"/contacts/{contact_id}/unsubscribe")
    assert done.status_code == 200, done.text
    assert done.json()["email"] == "Pat@Example.com" and done.json()["reason"] == "unsubscribed"
    again = await tenant.client.post(f"/contacts/{contact_id}/unsubscribe")
    assert again.status_code == 200 and again.json()["created_at"] == done.json()["created_at"]

    assert_error(await other_tenant.client.post(f"/contacts/{contact_id}/unsubscribe"), 404)
    assert (await other_tenant.client.get("/suppressions")).json()["items"] == []
    assert_error(await tenant.client.post("/contacts/not-an-id/unsubscribe"), 404)

    no_email = await new_contact(tenant, {"phone_number": "+14155550100"})
    assert_error(await tenant.client.post(f"/contacts/{no_email}/unsubscribe"), 409, "email")

    reader = await make_tenant(app, "acme", ["contacts:read"])
    async with reader.client:
        assert_error(await reader.client.post(f"/contacts/{contact_id}/unsubscribe"), 403)

    bounced = await tenant.client.post(
        "/suppressions", json={"email": "b@example.com", "reason": "bounced"}
    )
    assert bounced.status_code == 201
    other = await new_contact(tenant, {"email": "B@example.com"})
    kept = await tenant.client.post(f"/contacts/{other}/unsubscribe")
    assert kept.json()["reason"] == "bounced", "an unsubscribe never weakens a bounce"


async def test_an_unsubscribed_contact_stays_unsubscribed_at_a_new_email(tenant: Tenant) -> None:
    """SPEC §6: an unsubscribe unsubscribes the contact. The suppression is by address, so a
    new email (PATCH, or a POST matching the contact by phone) received marketing mail again.
    A bounce or a manual block is about the old address and does not follow."""
    contact_id = await new_contact(tenant, {"email": "old@example.com", "phone": "+14155550101"})
    assert (await tenant.client.post(f"/contacts/{contact_id}/unsubscribe")).status_code == 200
    patched = await tenant.client.patch(
        f"/contacts/{contact_id}", json={"contact": {"email": "New@example.com"}}
    )
    assert patched.status_code == 200, patched.text
    merged = await tenant.client.post(
        "/contacts", json={"contact": {"phone": "+14155550101", "email": "third@example.com"}}
    )
    assert merged.status_code == 200, merged.text
    bounced = await new_contact(tenant, {"email": "bounced@example.com"})
    await tenant.client.post(
        "/suppressions", json={"email": "bounced@example.com", "reason": "manual"}
    )
    await tenant.client.patch(f"/contacts/{bounced}", json={"contact": {"email": "b2@example.com"}})
    listed = (await tenant.client.get("/suppressions")).json()["items"]
    assert sorted((item["email"], item["reason"]) for item in listed) == [
        ("New@example.com", "unsubscribed"),
        ("bounced@example.com", "manual"),
        ("old@example.com", "unsubscribed"),
        ("third@example.com", "unsubscribed"),
    ]


async def test_signed_link_for_a_deleted_contact_still_succeeds(
    app: FastAPI, tenant: Tenant, anonymous: httpx.AsyncClient
) -> None:
    contact_id = await new_contact(tenant, {"email": "gone@example.com"})
    async with app.state.db.transaction() as session:
        secret = await load_secret(session, app.state.settings.secret_key)
    token = make_token(secret, tenant.org_id, uuid.UUID(contact_id))
    assert (await tenant.client.delete(f"/contacts/{contact_id}")).status_code == 200
    posted = await anonymous.post(f"/unsubscribe/{token}", content=b"List-Unsubscribe=One-Click")
    assert posted.status_code == 200
    assert (await tenant.client.get("/suppressions")).json()["items"] == []


async def test_openapi_documents_unsubscribe_without_auth_on_the_links(
    anonymous: httpx.AsyncClient,
) -> None:
    document = (await anonymous.get("/openapi.json")).json()
    link = document["paths"]["/unsubscribe/{token}"]
    assert "security" not in link["get"] and "security" not in link["post"]
    assert "text/html" in link["get"]["responses"]["200"]["content"]
    assert "application/x-www-form-urlencoded" in link["post"]["requestBody"]["content"]
    api = document["paths"]["/contacts/{contact_id}/unsubscribe"]["post"]
    assert api["security"] == [{"bearerAuth": []}]
