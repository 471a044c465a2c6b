"""``resolve_contacts`` (SPEC §4) against both databases: semantics, bounded statements,
concurrent callers on PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import event, func, select, text

from opensequence.contacts.service import IdentifierInput, ResolvedContact, resolve_contacts
from opensequence.db import Database
from opensequence.models import Contact
from tests.helpers import Tenant

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


async def resolve(db: Database, org_id: uuid.UUID, items: list[IdentifierInput]) -> list[Any]:
    async with db.transaction() as session:
        return await resolve_contacts(session, org_id, items, now=NOW)


async def contacts_of(db: Database, org_id: uuid.UUID) -> list[Contact]:
    async with db.transaction() as session:
        rows = await session.scalars(
            select(Contact).where(Contact.org_id == org_id).order_by(Contact.id)
        )
        return list(rows)


@contextmanager
def count_statements(db: Database) -> Iterator[list[str]]:
    seen: list[str] = []

    def listener(*args: Any) -> None:
        seen.append(str(args[2]))

    engine = db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", listener)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", listener)


async def test_email_creates_then_finds_case_insensitively(db: Database, tenant: Tenant) -> None:
    first = await resolve(db, tenant.org_id, [IdentifierInput(email="Ann@Example.com")])
    assert first[0].created and first[0].contact_id is not None
    again = await resolve(db, tenant.org_id, [IdentifierInput(email="ann@example.COM")])
    assert again == [ResolvedContact(first[0].contact_id, False)]
    [stored] = await contacts_of(db, tenant.org_id)
    assert stored.email == "Ann@Example.com" and stored.email_normalized == "ann@example.com"


async def test_first_identifier_decides_and_id_never_creates(db: Database, tenant: Tenant) -> None:
    [made] = await resolve(
        db,
        tenant.org_id,
        [
            IdentifierInput(
                email="bob@example.com",
                phone_number="+1 (415) 555-0100",
                name="Bob",
                custom_data={"plan": "pro", "seats": 3},
            )
        ],
    )
    [stored] = await contacts_of(db, tenant.org_id)
    assert stored.phone_number == "+14155550100"
    assert stored.name == "Bob" and stored.custom_data == {"plan": "pro", "seats": 3}

    results = await resolve(
        db,
        tenant.org_id,
        [
            IdentifierInput(id=made.contact_id, email="someone-else@example.com"),
            IdentifierInput(id=uuid.uuid4(), email="would-create@example.com"),
            IdentifierInput(phone_number="+14155550100"),
            IdentifierInput(phone_number="   "),
            IdentifierInput(phone_number=""),
            IdentifierInput(),
        ],
    )
    assert results == [
        ResolvedContact(made.contact_id, False),
        ResolvedContact(None, False),
        ResolvedContact(made.contact_id, False),
        ResolvedContact(None, False),
        ResolvedContact(None, False),
        ResolvedContact(None, False),
    ]
    assert len(await contacts_of(db, tenant.org_id)) == 1


async def test_other_org_id_is_not_found(
    db: Database, tenant: Tenant, other_tenant: Tenant
) -> None:
    [theirs] = await resolve(db, other_tenant.org_id, [IdentifierInput(email="x@example.com")])
    [mine] = await resolve(db, tenant.org_id, [IdentifierInput(id=theirs.contact_id)])
    assert mine == ResolvedContact(None, False)
    [own] = await resolve(db, tenant.org_id, [IdentifierInput(email="x@example.com")])
    assert own.created and own.contact_id != theirs.contact_id


async def test_duplicates_and_secondaries_in_one_batch(db: Database, tenant: Tenant) -> None:
    [existing] = await resolve(
        db, tenant.org_id, [IdentifierInput(email="old@example.com", phone_number="+31612345678")]
    )
    results = await resolve(
        db,
        tenant.org_id,
        [
            IdentifierInput(email="new@example.com", phone_number="+31 6 12345678"),
            IdentifierInput(email="NEW@example.com"),
            IdentifierInput(phone_number="+442071838750", email="second@example.com"),
            IdentifierInput(email="second@example.com"),
            IdentifierInput(email="third@example.com", phone_number="+44 20 7183 8750"),
            IdentifierInput(phone_number="+442071838750"),
            IdentifierInput(phone_number="0612345678"),
            IdentifierInput(phone_number="0612345678"),
        ],
    )
    ids = [r.contact_id for r in results]
    created = [r.created for r in results]
    assert created == [True, False, True, False, True, False, True, False]
    assert ids[0] == ids[1] and ids[0] != existing.contact_id
    assert ids[2] == ids[3] == ids[5]
    assert ids[6] == ids[7]
    assert len({ids[0], ids[2], ids[4], ids[6]}) == 4
    stored = {c.id: c for c in await contacts_of(db, tenant.org_id)}
    assert len(stored) == 5
    # the phone of "new" already belonged to "old": dropped, not failed
    assert stored[ids[0]].phone_number is None
    assert stored[ids[2]].email == "second@example.com"
    assert stored[ids[2]].phone_number == "+442071838750"
    # the phone of "third" was taken earlier in the same batch: dropped
    assert stored[ids[4]].phone_number is None
    assert stored[ids[6]].phone_number == "0612345678"


async def test_statements_are_bounded_whatever_the_size(db: Database, tenant: Tenant) -> None:
    small = [IdentifierInput(email=f"s{i}@example.com") for i in range(10)]
    with count_statements(db) as few:
        await resolve(db, tenant.org_id, small)
    big = [
        IdentifierInput(email=f"b{i}@example.com", phone_number=f"+1415555{i:04d}")
        for i in range(6000)
    ]
    with count_statements(db) as many:
        results = await resolve(db, tenant.org_id, big)
    assert all(r.created for r in results)
    assert len(few) <= 6
    # 6,000 rows: 2 email selects, 2 phone selects, 3 insert chunks (+ BEGIN/COMMIT on SQLite)
    assert len(many) <= 12, many
    with count_statements(db) as again:
        results = await resolve(db, tenant.org_id, big + small)
    assert not any(r.created for r in results)
    assert len(again) <= 12
    async with db.transaction() as session:
        total = await session.scalar(
            select(func.count()).select_from(Contact).where(Contact.org_id == tenant.org_id)
        )
    assert total == 6010


async def _wait_until_blocked(db: Database) -> None:
    """Until some other backend of this database waits on a lock (an observable, not a sleep
    of a guessed length)."""
    for _ in range(500):
        async with db.engine.connect() as conn:
            waiting = await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
        if waiting:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the second transaction never waited on the first")


async def test_concurrent_transactions_create_each_contact_once(
    backend: str, db: Database, tenant: Tenant
) -> None:
    if backend != "postgresql":
        pytest.skip("SQLite serialises writers with BEGIN IMMEDIATE; the race needs PostgreSQL")
    first_items = [IdentifierInput(email=e) for e in ("a@x.io", "b@x.io", "c@x.io")]
    second_items = [IdentifierInput(email=e) for e in ("D@x.io", "C@x.io", "B@x.io")]

    async with db.transaction() as first_session:
        first = await resolve_contacts(first_session, tenant.org_id, first_items, now=NOW)
        second_task = asyncio.create_task(resolve(db, tenant.org_id, second_items))
        await _wait_until_blocked(db)
    second = await second_task

    assert all(r.created for r in first)
    assert second[0].created
    assert second[1] == ResolvedContact(first[2].contact_id, False)
    assert second[2] == ResolvedContact(first[1].contact_id, False)
    emails = sorted(c.email_normalized or "" for c in await contacts_of(db, tenant.org_id))
    assert emails == ["a@x.io", "b@x.io", "c@x.io", "d@x.io"]


async def test_concurrent_gathered_callers_agree(db: Database, tenant: Tenant) -> None:
    batches = [
        [IdentifierInput(email=f"u{(start + i) % 40}@example.com") for i in range(25)]
        for start in (0, 10, 20, 30)
    ]
    results = await asyncio.gather(*(resolve(db, tenant.org_id, b) for b in batches))
    by_email: dict[str, set[uuid.UUID | None]] = {}
    for batch, outcome in zip(batches, results, strict=True):
        for item, resolved in zip(batch, outcome, strict=True):
            by_email.setdefault(item.email or "", set()).add(resolved.contact_id)
    assert all(len(ids) == 1 for ids in by_email.values())
    created = sum(r.created for outcome in results for r in outcome)
    assert created == 40 == len(await contacts_of(db, tenant.org_id))
