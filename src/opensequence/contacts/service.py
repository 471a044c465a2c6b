"""Contact rules (SPEC §2, §4). Services take a session and never commit (DESIGN rule 1)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from opensequence.contacts import repository
from opensequence.contacts.identity import normalize_email, normalize_phone
from opensequence.db.types import new_id
from opensequence.errors import Conflict

# Rounds of select → insert before giving up; only concurrent writers make a round fail.
_MAX_ROUNDS = 5
# From this round on, created rows carry only their deciding identifier: a secondary
# identifier that keeps colliding with concurrent inserts is dropped rather than retried.
_PRIMARY_ONLY_ROUND = 3


@dataclass(frozen=True)
class IdentifierInput:
    id: uuid.UUID | None = None
    email: str | None = None  # already validated against the seed pattern by the caller
    phone_number: str | None = None  # raw; normalized here
    name: str | None = None
    custom_data: dict[str, Any] | None = None


@dataclass(frozen=True)
class ResolvedContact:
    contact_id: uuid.UUID | None  # None: not found (id not in org, or no usable identifier)
    created: bool  # True only for the one item whose insert created it


@dataclass
class _NewRow:
    """A contact the plan wants to insert, with its pre-generated id."""

    id: uuid.UUID
    email: str | None
    email_normalized: str | None
    phone_number: str | None
    name: str | None
    custom_data: dict[str, Any] = field(default_factory=dict)

    def values(self, org_id: uuid.UUID, now: datetime) -> dict[str, Any]:
        return {
            "id": self.id,
            "org_id": org_id,
            "email": self.email,
            "email_normalized": self.email_normalized,
            "phone_number": self.phone_number,
            "name": self.name,
            "custom_data": self.custom_data,
            "created_at": now,
            "updated_at": now,
        }


@dataclass(frozen=True)
class _Key:
    """The deciding identifier of one item: ``kind`` is id, email or phone; ``None`` = nobody."""

    kind: str
    value: Any


def _deciding_key(item: IdentifierInput) -> _Key | None:
    if item.id is not None:
        return _Key("id", item.id)
    if item.email is not None:
        return _Key("email", normalize_email(item.email))
    if item.phone_number is not None:
        phone = normalize_phone(item.phone_number)
        return _Key("phone", phone) if phone is not None else None
    return None


def _plan(
    items: Sequence[IdentifierInput],
    keys: Sequence[_Key | None],
    known_ids: set[uuid.UUID],
    by_email: dict[str, uuid.UUID],
    by_phone: dict[str, uuid.UUID],
    *,
    with_secondaries: bool,
) -> tuple[list[uuid.UUID | _NewRow | None], list[_NewRow]]:
    """Decide, item by item in request order, which contact each item names: an existing one,
    a row to create, or nobody. Pure (no I/O) so the result equals processing the items one by
    one: a later item whose email or phone an earlier item's new contact already took resolves
    to that contact, and a secondary identifier already taken (in the database or earlier in
    the batch) is dropped from the new row instead of failing."""
    emails: dict[str, uuid.UUID | _NewRow] = dict(by_email)
    phones: dict[str, uuid.UUID | _NewRow] = dict(by_phone)
    targets: list[uuid.UUID | _NewRow | None] = []
    rows: list[_NewRow] = []
    for item, key in zip(items, keys, strict=True):
        if key is None:
            targets.append(None)
            continue
        if key.kind == "id":
            targets.append(key.value if key.value in known_ids else None)
            continue
        claimed = emails if key.kind == "email" else phones
        found = claimed.get(key.value)
        if found is not None:
            targets.append(found)
            continue
        email = item.email if key.kind == "email" else None
        phone = key.value if key.kind == "phone" else None
        if with_secondaries:
            if email is None and item.email is not None:
                email_key = normalize_email(item.email)
                if email_key not in emails:
                    email = item.email
            if phone is None and item.phone_number is not None:
                phone_key = normalize_phone(item.phone_number)
                if phone_key is not None and phone_key not in phones:
                    phone = phone_key
        row = _NewRow(
            id=new_id(),
            email=email,
            email_normalized=normalize_email(email) if email is not None else None,
            phone_number=phone,
            name=item.name,
            custom_data=dict(item.custom_data or {}),
        )
        if row.email_normalized is not None:
            emails[row.email_normalized] = row
        if row.phone_number is not None:
            phones[row.phone_number] = row
        rows.append(row)
        targets.append(row)
    return targets, rows


async def resolve_contacts(
    session: AsyncSession,
    org_id: uuid.UUID,
    items: Sequence[IdentifierInput],
    *,
    now: datetime,
) -> list[ResolvedContact]:
    """Resolve each item to a contact of ``org_id``, creating the missing ones (SPEC §4).

    Per item the first present identifier decides, in the order id, email, phone_number: an id
    must exist in the organization (else ``contact_id`` None, nothing created); an email or
    phone finds its contact or creates one, which also stores the item's other identifier, name
    and custom_data when that identifier is still free. Duplicates resolve to the same contact;
    ``created`` is True only for the first item naming a contact this call inserted. Existing
    contacts are never modified. Never raises for identifier conflicts.

    Set-based: per round, chunked ``SELECT … IN`` for ids, emails and phones, then chunked
    ``INSERT … ON CONFLICT DO NOTHING RETURNING id`` of the planned rows — a handful of
    statements whatever the size. A planned row that was not inserted lost a race with a
    concurrent transaction that inserted the same email or phone; the next round re-selects
    (now seeing the winner's committed row) and re-plans. Rows inserted in earlier rounds are
    found by that re-select, so nothing is created twice.

    Concurrency hazard (PostgreSQL): two transactions inserting overlapping new contacts whose
    *secondary* identifiers cross (A: email a + phone p, B: email b + phone p and A: z, B: z,
    in opposite lock order) can deadlock; PostgreSQL aborts one and the caller's transaction
    fails as a whole (nothing half-written). Rows are inserted sorted by email, then phone, so
    same-kind overlaps always lock in the same order and cannot deadlock.
    """
    keys = [_deciding_key(item) for item in items]
    ids = {key.value for key in keys if key is not None and key.kind == "id"}
    email_keys: set[str] = set()
    phone_keys: set[str] = set()
    for item, key in zip(items, keys, strict=True):
        if key is None or key.kind == "id":
            continue
        if item.email is not None:
            email_keys.add(normalize_email(item.email))
        phone = normalize_phone(item.phone_number)
        if phone is not None:
            phone_keys.add(phone)

    known_ids = await repository.existing_ids(session, org_id, ids) if ids else set()
    created_ids: set[uuid.UUID] = set()
    for round_number in range(_MAX_ROUNDS):
        by_email = await repository.ids_by_email(session, org_id, email_keys) if email_keys else {}
        by_phone = await repository.ids_by_phone(session, org_id, phone_keys) if phone_keys else {}
        targets, rows = _plan(
            items,
            keys,
            known_ids,
            by_email,
            by_phone,
            with_secondaries=round_number < _PRIMARY_ONLY_ROUND,
        )
        if rows:
            rows.sort(key=lambda r: (r.email_normalized or "\uffff", r.phone_number or ""))
            inserted = await repository.insert_contacts_ignoring_conflicts(
                session, [row.values(org_id, now) for row in rows]
            )
            created_ids |= inserted
            if len(inserted) < len(rows):
                continue
        return _outcomes(targets, created_ids)
    raise Conflict("contacts changed concurrently while resolving them; retry the request")


def _outcomes(
    targets: Sequence[uuid.UUID | _NewRow | None], created_ids: set[uuid.UUID]
) -> list[ResolvedContact]:
    seen: set[uuid.UUID] = set()
    results: list[ResolvedContact] = []
    for target in targets:
        contact_id = target.id if isinstance(target, _NewRow) else target
        if contact_id is None:
            results.append(ResolvedContact(None, False))
            continue
        first = contact_id not in seen
        seen.add(contact_id)
        results.append(ResolvedContact(contact_id, first and contact_id in created_ids))
    return results
