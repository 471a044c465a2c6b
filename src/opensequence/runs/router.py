"""HTTP for add-contacts (the seed operation) and runs. HTTP only: rules live in the service."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query

from opensequence.api.deps import ClockDep, DbDep, SettingsDep, require
from opensequence.api.openapi import error_responses
from opensequence.auth.service import Principal
from opensequence.db.types import iso
from opensequence.models import Run
from opensequence.pagination import DEFAULT_LIMIT, CursorQuery, LimitQuery
from opensequence.runs import service
from opensequence.runs.intake import parse_items
from opensequence.runs.schemas import (
    ADD_CONTACTS_INPUT_SCHEMA,
    ADD_CONTACTS_OUTPUT_SCHEMA,
    AddContactsOutput,
    Outcome,
    RunCounts,
    RunItemOut,
    RunItemsPage,
    RunOut,
)

router = APIRouter(tags=["Sequences"])


@router.post(
    "/sequences/{sequence_id}/contacts",
    operation_id="addContactsToSequence",
    summary="Add contacts to a continuous sequence",
    description=(
        "Add contacts to a continuous sequence (`is_continuous` property of the sequence must "
        "be `true`).\nContacts will *not* be added to the sequence if the sequence's `filter` "
        "does not apply to the contact.\n\nAny contacts added will automatically be added to "
        "contacts if they don't already exist.\n\nEach item is `{id}`, `{email}` or "
        "`{phone_number}`; an item carrying several resolves by id, then email, then phone. "
        "Extension: `name` and `custom_data` on an item are used when its contact is created. "
        "The response's `run_id` is queryable under `/sequences/{sequence_id}/runs/{run_id}`."
    ),
    status_code=200,
    response_model=AddContactsOutput,
    responses={
        200: {
            "description": "Default Response",
            "content": {"application/json": {"schema": ADD_CONTACTS_OUTPUT_SCHEMA}},
        },
        **error_responses(400, 401, 403, 404, 409, 413, 429),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ADD_CONTACTS_INPUT_SCHEMA}},
        }
    },
)
async def add_contacts_to_sequence(
    sequence_id: str,
    db: DbDep,
    clock: ClockDep,
    settings: SettingsDep,
    body: Annotated[Any, Body(include_in_schema=False)] = None,
    principal: Principal = require("sequences:write"),
) -> AddContactsOutput:
    items = parse_items(body, max_items=settings.max_contacts_per_request)
    async with db.transaction() as session:
        run_id = await service.add_contacts_to_sequence(
            session, principal.org_id, sequence_id, items, now=clock.now()
        )
    return AddContactsOutput(run_id=str(run_id))


def _run_out(run: Run) -> RunOut:
    counts = service.empty_counts() | dict(run.counts)
    return RunOut(
        id=str(run.id),
        sequence_id=str(run.sequence_id),
        kind=run.kind,  # type: ignore[arg-type]
        created_at=iso(run.created_at) or "",
        canceled_at=iso(run.canceled_at),
        total=run.total,
        counts=RunCounts(**counts),
    )


@router.get(
    "/sequences/{sequence_id}/runs/{run_id}",
    operation_id="getSequenceRun",
    summary="Get a run: counts per outcome",
    responses=error_responses(400, 401, 403, 404, 429),
)
async def get_run(
    sequence_id: str,
    run_id: str,
    db: DbDep,
    principal: Principal = require("sequences:read"),
) -> RunOut:
    async with db.reading() as session:
        run = await service.get_run(session, principal.org_id, sequence_id, run_id)
    return _run_out(run)


@router.get(
    "/sequences/{sequence_id}/runs/{run_id}/contacts",
    operation_id="listSequenceRunContacts",
    summary="List a run's items with their outcomes, in request order",
    responses=error_responses(400, 401, 403, 404, 429),
)
async def list_run_contacts(
    sequence_id: str,
    run_id: str,
    db: DbDep,
    outcome: Annotated[Outcome | None, Query(description="Only items with this outcome.")] = None,
    cursor: CursorQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
    principal: Principal = require("sequences:read"),
) -> RunItemsPage:
    async with db.reading() as session:
        views, next_cursor = await service.list_run_items(
            session,
            principal.org_id,
            sequence_id,
            run_id,
            outcome=outcome,
            cursor=cursor,
            limit=limit,
        )
    return RunItemsPage(
        items=[
            RunItemOut(
                index=view.index,
                input=view.input,
                contact_id=None if view.contact_id is None else str(view.contact_id),
                outcome=view.outcome,  # type: ignore[arg-type]
                reason=view.reason,
            )
            for view in views
        ],
        next=next_cursor,
    )
