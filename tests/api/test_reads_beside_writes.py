"""Reads answer while a write transaction is open (a sequence start over many contacts, a
worker's batch), on both databases, and see only what was committed. On SQLite they read a
snapshot beside the single writer (``Database.reading``) instead of waiting for its lock."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import insert, text
from sqlalchemy.exc import OperationalError

from opensequence.db import Database
from opensequence.models import Contact
from tests.helpers import Tenant


async def test_api_reads_answer_while_a_write_transaction_is_open(
    tenant: Tenant, db: Database, backend: str
) -> None:
    created = await tenant.client.post("/contacts", json={"contact": {"email": "a@x.org"}})
    assert created.status_code == 201, created.text
    holding, release = asyncio.Event(), asyncio.Event()

    async def long_write() -> None:
        now = datetime.now(UTC)
        async with db.transaction() as session:
            await session.execute(
                insert(Contact),
                [
                    {
                        "id": uuid.uuid4(),
                        "org_id": tenant.org_id,
                        "email": "uncommitted@x.org",
                        "email_normalized": "uncommitted@x.org",
                        "created_at": now,
                        "updated_at": now,
                    }
                ],
            )
            holding.set()
            await release.wait()

    writer = asyncio.create_task(long_write())
    await holding.wait()
    try:
        listed = await asyncio.wait_for(tenant.client.get("/contacts"), timeout=10)
        one = await asyncio.wait_for(
            tenant.client.get(f"/contacts/{created.json()['id']}"), timeout=10
        )
        sequences = await asyncio.wait_for(tenant.client.get("/sequences"), timeout=10)
        ready = await asyncio.wait_for(tenant.client.get("/readyz"), timeout=10)
    finally:
        release.set()
        await writer
    assert listed.status_code == 200, listed.text
    assert [c["email"] for c in listed.json()["items"]] == ["a@x.org"], "only what was committed"
    assert one.status_code == 200 and sequences.status_code == 200
    assert ready.json() == {"status": "ok", "database": "ok"}
    after = await tenant.client.get("/contacts")
    assert sorted(c["email"] for c in after.json()["items"]) == ["a@x.org", "uncommitted@x.org"]


async def test_a_write_inside_a_reading_transaction_fails_and_changes_nothing(
    tenant: Tenant, db: Database, backend: str
) -> None:
    if backend != "sqlite":
        pytest.skip("on PostgreSQL reading() runs in autocommit and does not refuse writes")
    with pytest.raises(OperationalError, match="readonly"):
        async with db.reading() as session:
            await session.execute(text("DELETE FROM organizations"))
    async with db.reading() as session:
        assert (await session.execute(text("SELECT count(*) FROM organizations"))).scalar_one() == 1
