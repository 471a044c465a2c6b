"""Contact rules (SPEC §2, §4). Services take a session and never commit (DESIGN rule 1)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from opensequence.contacts import repository
from opensequence.contacts.identity import normalize_email, normalize_phone
from opensequence.contacts.lookup import get_contact
from opensequence.contacts.repository import NewContact
from opensequence.contacts.schemas import ContactInput, ContactOut
from opensequence.db.types import iso, new_id, new_ids
from opensequence.deliverability import repository as suppressions
from opensequence.deliverability.service import suppress
from opensequence.errors import Conflict, Invalid, NotFound
from opensequence.models import Contact
from opensequence.pagination import decode_cursor, encode_cursor, position_uuid
from opensequence.sequences.lookup import parse_uuid
from opensequence.validation import MAX_CUSTOM_KEYS

# Rounds of select → insert before giving up; only concurrent writers make a round fail.
_MAX_ROUNDS = 5
# From this round on, created rows carry only their deciding identifier: a secondary
# identifier that keeps colliding with concurrent inserts is dropped rather than retried.
_PRIMARY_ONLY_ROUND = 3


class Identifiers(Protocol):
    """What ``resolve_contacts`` reads from an item (an :class:`IdentifierInput` or the
    add-contacts request's own items, passed as they are)."""

    @property
    def id(self) -> uuid.UUID | None: ...
    @property
    def email(self) -> str | None: ...
    @property
    def phone_number(self) -> str | None: ...
    @property
    def name(self) -> str | None: ...
    @property
    def custom_data(self) -> dict[str, Any] | None: ...


@dataclass(slots=True)
class IdentifierInput:
    id: uuid.UUID | None = None
    email: str | None = None  # already validated against the seed pattern by the caller
    phone_number: str | None = None  # raw; normalized here
    name: str | None = None
    custom_data: dict[str, Any] | None = None


@dataclass(slots=True)
class ResolvedContact:
    contact_id: uuid.UUID | None  # None: not found (id not in org, or no usable identifier)
    created: bool  # True only for the one item whose insert created it


@dataclass(slots=True)
class _Key:
    """The deciding identifier of one item: ``kind`` is id, email or phone; ``None`` = nobody."""

    kind: str
    value: Any


def _deciding_key(item: Identifiers) -> _Key | None:
    if item.id is not None:
        return _Key("id", item.id)
    if item.email is not None:
        return _Key("email", normalize_email(item.email))
    if item.phone_number is not None:
        phone = normalize_phone(item.phone_number)
        return _Key("phone", phone) if phone is not None else None
    return None


def _plan(
    items: Sequence[Identifiers],
    keys: Sequence[_Key | None],
    known_ids: set[uuid.UUID],
    by_email: dict[str, uuid.UUID],
    by_phone: dict[str, uuid.UUID],
    *,
    with_secondaries: bool,
) -> tuple[list[uuid.UUID | NewContact | None], list[NewContact]]:
    """Decide, item by item in request order, which contact each item names: an existing one,
    a row to create, or nobody. Pure (no I/O) so the result equals processing the items one by
    one: a later item whose email or phone an earlier item's new contact already took resolves
    to that contact, and a secondary identifier already taken (in the database or earlier in
    the batch) is dropped from the new row instead of failing."""
    emails: dict[str, uuid.UUID | NewContact] = dict(by_email)
    phones: dict[str, uuid.UUID | NewContact] = dict(by_phone)
    targets: list[uuid.UUID | NewContact | None] = []
    rows: list[NewContact] = []
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
        row = NewContact(
            id=_ID_PENDING,
            email=email,
            email_normalized=key.value
            if key.kind == "email"
            else (normalize_email(email) if email is not None else None),
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
    for row, contact_id in zip(rows, new_ids(len(rows)), strict=True):
        row.id = contact_id
    return targets, rows


# Planned rows get their ids in one batch once planning is done.
_ID_PENDING = uuid.UUID(int=0)


async def resolve_contacts(
    session: AsyncSession,
    org_id: uuid.UUID,
    items: Sequence[Identifiers],
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

    Set-based: per round, one ``SELECT`` each for ids, emails and phones, then an
    ``INSERT … ON CONFLICT DO NOTHING`` of the planned rows — a handful of statements
    whatever the size. A planned row that was not inserted lost a race with a
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
        by_email = await repository.ids_by_email(session, org_id, email_keys)
        by_phone = await repository.ids_by_phone(session, org_id, phone_keys)
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
            inserted = await _insert_storable(session, org_id, rows, now=now)
            created_ids |= inserted
            if len(inserted) < len(rows):
                continue
        return _outcomes(targets, created_ids)
    raise Conflict("contacts changed concurrently while resolving them; retry the request")


def _outcomes(
    targets: Sequence[uuid.UUID | NewContact | None], created_ids: set[uuid.UUID]
) -> list[ResolvedContact]:
    seen: set[uuid.UUID] = set()
    results: list[ResolvedContact] = []
    for target in targets:
        contact_id = target.id if isinstance(target, NewContact) else target
        if contact_id is None:
            results.append(ResolvedContact(None, False))
            continue
        first = contact_id not in seen
        seen.add(contact_id)
        results.append(ResolvedContact(contact_id, first and contact_id in created_ids))
    return results


# --- single-contact operations (the HTTP API) ------------------------------------------------


def to_wire(contact: Contact) -> ContactOut:
    return ContactOut(
        id=str(contact.id),
        email=contact.email,
        phone_number=contact.phone_number,
        name=contact.name,
        custom_data=dict(contact.custom_data or {}),
        created_at=iso(contact.created_at) or "",
        updated_at=iso(contact.updated_at) or "",
    )


def _merged(current: dict[str, Any] | None, changes: dict[str, Any]) -> dict[str, Any]:
    """Key-by-key merge; a ``None`` value removes the key (SPEC §2). The limit on keys holds for
    the result: 100 keys, then 100 more in a PATCH, made a contact of 200."""
    merged = dict(current or {})
    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    if len(merged) > MAX_CUSTOM_KEYS:
        raise Invalid(
            f"contact.custom_data: at most {MAX_CUSTOM_KEYS} keys; merged into the contact's "
            f"{len(current or {})} it would have {len(merged)} (a null value removes a key)"
        )
    return merged


def _apply(contact: Contact, data: ContactInput, now: datetime) -> None:
    """Write the fields present in ``data`` onto ``contact``; explicit nulls clear a field."""
    given = data.model_fields_set
    if "email" in given:
        contact.email = data.email
        contact.email_normalized = normalize_email(data.email) if data.email is not None else None
    if data.phone_was_given():
        contact.phone_number = normalize_phone(data.given_phone())
    if "name" in given:
        contact.name = data.name
    if "custom_data" in given:
        contact.custom_data = _merged(contact.custom_data, data.custom_data or {})
    contact.updated_at = now


# Suppressions that are the person's wish rather than a fact about an address: they follow the
# contact to a new email (SPEC §6: an unsubscribe unsubscribes the contact).
_PERSONAL = ("unsubscribed", "complained")


async def _update(
    session: AsyncSession, contact: Contact, data: ContactInput, now: datetime
) -> None:
    """:func:`_apply` and flush; a contact that unsubscribed (or complained) keeps that choice
    when its email changes: the new address is suppressed the same way. It used to get
    marketing mail again at the new address."""
    before = contact.email_normalized
    _apply(contact, data, now)
    await _flush_or_conflict(session)
    if before is None or contact.email is None or contact.email_normalized == before:
        return
    found = await suppressions.get_suppression(session, contact.org_id, before)
    if found is not None and found.reason in _PERSONAL:
        await suppress(session, contact.org_id, contact.email, found.reason, now)


# PostgreSQL's SQLSTATE for "program limit exceeded": here an index entry over its size limit.
_PROGRAM_LIMIT_EXCEEDED = "54000"


async def _insert_storable(
    session: AsyncSession, org_id: uuid.UUID, rows: list[NewContact], *, now: datetime
) -> set[uuid.UUID]:
    """Add-contacts accepts an email or phone number of any length (SPEC §4: the seed's schema
    is the whole test). PostgreSQL's unique indexes cannot hold an entry over ~2,700 bytes
    (after compression): such a value is a 400 saying so, where it was a 500."""
    try:
        return await repository.insert_contacts_ignoring_conflicts(session, org_id, rows, now=now)
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) != _PROGRAM_LIMIT_EXCEEDED:
            raise
        raise Invalid(
            "contacts: an email or phone_number is too long to store on PostgreSQL, whose "
            "indexes hold at most ~2,700 bytes of one"
        ) from exc


async def _flush_or_conflict(session: AsyncSession) -> None:
    """A unique violation here means a concurrent writer took the email or phone between our
    check and our write; report it as the 409 the check would have given."""
    try:
        await session.flush()
    except IntegrityError as exc:
        raise Conflict("contact.email or contact.phone belongs to another contact") from exc


async def save_contact(
    session: AsyncSession, org_id: uuid.UUID, data: ContactInput, *, now: datetime
) -> tuple[uuid.UUID, bool]:
    """``POST /contacts``: ``(id, created)``. The contact owning the email or phone is updated
    with the given fields; no owner → created (through :func:`resolve_contacts`, so a
    concurrent POST of the same email ends with one contact); two owners → Conflict.

    Owners are read ``FOR UPDATE`` on PostgreSQL, so concurrent updates of one contact apply
    one after the other. When a concurrent POST creates the contact between our read and our
    insert, the next round finds it and updates it instead.
    """
    email_key = normalize_email(data.email) if data.email is not None else None
    phone = normalize_phone(data.given_phone())
    for _ in range(3):
        owners = await repository.owners_of(
            session, org_id, email_normalized=email_key, phone_number=phone
        )
        if len(owners) > 1:
            raise Conflict(
                "contact.email and contact.phone belong to two different contacts "
                f"({owners[0].id} and {owners[1].id})"
            )
        if owners:
            await _update(session, owners[0], data, now)
            return owners[0].id, False
        custom_data = _merged({}, data.custom_data or {})
        if email_key is None and phone is None:
            contact = Contact(
                id=new_id(),
                org_id=org_id,
                name=data.name,
                custom_data=custom_data,
                created_at=now,
                updated_at=now,
            )
            session.add(contact)
            await session.flush()
            return contact.id, True
        [resolved] = await resolve_contacts(
            session,
            org_id,
            [
                IdentifierInput(
                    email=data.email, phone_number=phone, name=data.name, custom_data=custom_data
                )
            ],
            now=now,
        )
        if resolved.created and resolved.contact_id is not None:
            return resolved.contact_id, True
    raise Conflict("the contact changed concurrently; retry the request")


async def _locked(session: AsyncSession, org_id: uuid.UUID, ref: str) -> Contact:
    contact_id = parse_uuid(ref)
    found = None
    if contact_id is not None:
        found = await repository.lock_contact(session, org_id, contact_id)
    if found is None:
        raise NotFound(f"contact {ref!r} not found")
    return found


async def update_contact(
    session: AsyncSession, org_id: uuid.UUID, ref: str, data: ContactInput, *, now: datetime
) -> Contact:
    """``PATCH /contacts/{id}``: omitted fields unchanged, custom_data merged key by key, an
    email or phone that belongs to another contact → Conflict (nothing written)."""
    contact = await _locked(session, org_id, ref)
    email_key = normalize_email(data.email) if data.email is not None else None
    phone = normalize_phone(data.given_phone()) if data.phone_was_given() else None
    for owner in await repository.owners_of(
        session, org_id, email_normalized=email_key, phone_number=phone
    ):
        if owner.id == contact.id:
            continue
        same_email = email_key is not None and owner.email_normalized == email_key
        field = "email" if same_email else "phone"
        raise Conflict(f"contact.{field}: belongs to another contact ({owner.id})")
    await _update(session, contact, data, now)
    return contact


async def get_contact_by_ref(session: AsyncSession, org_id: uuid.UUID, ref: str) -> Contact:
    return await get_contact(session, org_id, ref)


async def delete_contact(
    session: AsyncSession, org_id: uuid.UUID, ref: str, *, now: datetime
) -> uuid.UUID:
    """``DELETE /contacts/{id}``: cancel its active enrollments, remove its address from
    delivery history and delete the row, in the caller's transaction (SPEC §2, §6)."""
    contact = await _locked(session, org_id, ref)
    contact_id = contact.id
    session.expunge(contact)
    await repository.delete_contact(session, org_id, contact_id, now=now)
    return contact_id


async def list_contacts(
    session: AsyncSession,
    org_id: uuid.UUID,
    *,
    cursor: str | None,
    limit: int,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    updated_after: datetime | None = None,
    updated_before: datetime | None = None,
    email: str | None = None,
    phone_number: str | None = None,
) -> tuple[list[Contact], str | None]:
    """One page ordered by id, and the cursor of the next page (None at the end). The cursor
    holds the last id shown, so rows inserted during a walk never shift it. Time bounds are in
    UTC (the router reads one without an offset as UTC)."""
    phone_key = normalize_phone(phone_number) if phone_number is not None else None
    if phone_number is not None and phone_key is None:
        return [], None  # a blank phone identifies nobody
    position = decode_cursor(cursor)
    after_id = position_uuid(position, "id") if position is not None else None
    query = repository.list_query(
        org_id,
        after_id=after_id,
        created_after=created_after,
        created_before=created_before,
        updated_after=updated_after,
        updated_before=updated_before,
        email_normalized=normalize_email(email) if email is not None else None,
        phone_number=phone_key,
        limit=limit + 1,
    )
    rows = await repository.list_contacts(session, query)
    if len(rows) > limit:
        rows = rows[:limit]
        return rows, encode_cursor({"id": str(rows[-1].id)})
    return rows, None
