"""Helpers for tests: tenants with keys, an in-process HTTP client, ErrorDto assertions."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import httpx
from fastapi import FastAPI

from opensequence.auth import service as auth
from opensequence.db import Database

# An email step for API tests: one rendered field, due 30 minutes after enrollment.
STEP = {
    "action": {
        "type": "send_emails",
        "data": {
            "from_email": "team@example.com",
            "email_subject": "Hello {{ contact.name }}",
            "email_body": "<p>Hi</p>",
            "email_sender_name": "Team",
            "email_is_transactional": False,
        },
    },
    "delay_in_minutes": 30,
}


def http_client(app: FastAPI, key: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://testserver",
        headers=headers,
    )


@dataclass
class Tenant:
    org_id: uuid.UUID
    key_id: uuid.UUID
    key: str
    client: httpx.AsyncClient


async def make_tenant(
    app: FastAPI, org_name: str | None = None, scopes: list[str] | None = None
) -> Tenant:
    database: Database = app.state.db
    async with database.transaction() as session:
        org = await auth.get_or_create_org(session, org_name or f"org-{uuid.uuid4().hex[:8]}")
        created = await auth.create_key(session, org, scopes)
    return Tenant(created.org_id, created.key_id, created.key, http_client(app, created.key))


def assert_error(response: httpx.Response, status: int, contains: str = "") -> dict[str, object]:
    """Assert an ErrorDto body with ``status`` whose message contains ``contains``."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"statusCode", "message", "error"}, body
    assert body["statusCode"] == status
    assert isinstance(body["error"], str) and body["error"]
    assert contains.lower() in str(body["message"]).lower(), body
    return dict(body)
