"""Contacts over HTTP (SPEC §2; OpenCX ``saveContact``, ``listContacts``, ``updateContact``,
``deleteContact``). HTTP only: each handler opens the transaction and calls the service."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response
from pydantic import AfterValidator

from opensequence.api.deps import ClockDep, DbDep, require
from opensequence.api.openapi import error_responses
from opensequence.auth.service import Principal
from opensequence.contacts import service
from opensequence.contacts.schemas import (
    ContactOut,
    DeleteContactOutput,
    SaveContactInput,
    SaveContactOutput,
    UpdateContactInput,
)
from opensequence.pagination import DEFAULT_LIMIT, CursorQuery, LimitQuery, Page
from opensequence.validation import MAX_EMAIL, MAX_PHONE, CleanText, utc_moment

router = APIRouter(prefix="/contacts", tags=["Contacts"])

TimeQuery = Annotated[
    datetime | None,
    AfterValidator(lambda value: None if value is None else utc_moment(value)),
    Query(description="ISO 8601 date-time (UTC when no offset is given)."),
]


@router.post(
    "",
    operation_id="saveContact",
    summary="Create a contact",
    description="Create a contact. When the email or phone already belongs to a contact, that "
    "contact is updated with the given fields and 200 is returned; when email and phone "
    "belong to two different contacts, 409.",
    status_code=201,
    responses={
        200: {"model": SaveContactOutput, "description": "Matched and updated"},
        **error_responses(400, 401, 403, 409, 413, 429),
    },
)
async def save_contact(
    body: SaveContactInput,
    response: Response,
    db: DbDep,
    clock: ClockDep,
    principal: Principal = require("contacts:write"),
) -> SaveContactOutput:
    async with db.transaction() as session:
        contact_id, created = await service.save_contact(
            session, principal.org_id, body.contact, now=clock.now()
        )
    if not created:
        response.status_code = 200
    return SaveContactOutput(id=str(contact_id))


@router.get(
    "",
    operation_id="listContacts",
    summary="List contacts",
    description="Contacts in id order (ids are time-ordered), `limit` per page; pass `next` "
    "as `cursor` for the following page. Stable while contacts are being added.",
    responses=error_responses(400, 401, 403, 429),
)
async def list_contacts(
    db: DbDep,
    principal: Principal = require("contacts:read"),
    cursor: CursorQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
    created_after: TimeQuery = None,
    created_before: TimeQuery = None,
    updated_after: TimeQuery = None,
    updated_before: TimeQuery = None,
    email: Annotated[
        CleanText | None,
        Query(max_length=MAX_EMAIL, description="Exact email, case-insensitive (extension)."),
    ] = None,
    phone_number: Annotated[
        CleanText | None,
        Query(max_length=MAX_PHONE, description="Exact phone, E.164-normalized (extension)."),
    ] = None,
) -> Page[ContactOut]:
    async with db.reading() as session:
        rows, next_cursor = await service.list_contacts(
            session,
            principal.org_id,
            cursor=cursor,
            limit=limit,
            created_after=created_after,
            created_before=created_before,
            updated_after=updated_after,
            updated_before=updated_before,
            email=email,
            phone_number=phone_number,
        )
        items = [service.to_wire(row) for row in rows]
    return Page[ContactOut](items=items, next=next_cursor)


@router.get(
    "/{contact_id}",
    operation_id="getContact",
    summary="Get a contact (extension)",
    responses=error_responses(401, 403, 404, 429),
)
async def get_contact(
    contact_id: str, db: DbDep, principal: Principal = require("contacts:read")
) -> ContactOut:
    async with db.reading() as session:
        contact = await service.get_contact_by_ref(session, principal.org_id, contact_id)
        return service.to_wire(contact)


@router.patch(
    "/{contact_id}",
    operation_id="updateContact",
    summary="Update a contact",
    description="Omitted fields are unchanged; `custom_data` is merged key by key and a null "
    "value removes that key. Returns the updated contact.",
    responses=error_responses(400, 401, 403, 404, 409, 413, 429),
)
async def update_contact(
    contact_id: str,
    body: UpdateContactInput,
    db: DbDep,
    clock: ClockDep,
    principal: Principal = require("contacts:write"),
) -> ContactOut:
    async with db.transaction() as session:
        contact = await service.update_contact(
            session, principal.org_id, contact_id, body.contact, now=clock.now()
        )
        return service.to_wire(contact)


@router.delete(
    "/{contact_id}",
    operation_id="deleteContact",
    summary="Delete a contact",
    description="Cancels the contact's active enrollments and removes its personal data; "
    "delivery history keeps only ids.",
    responses=error_responses(401, 403, 404, 429),
)
async def delete_contact(
    contact_id: str,
    db: DbDep,
    clock: ClockDep,
    principal: Principal = require("contacts:write"),
) -> DeleteContactOutput:
    async with db.transaction() as session:
        deleted = await service.delete_contact(
            session, principal.org_id, contact_id, now=clock.now()
        )
    return DeleteContactOutput(id=str(deleted))
