"""HTTP for sequences: OpenCX's create/get/update/start/cancel plus the list extension."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse

from opensequence.api.deps import ClockDep, DbDep, require
from opensequence.api.openapi import error_responses
from opensequence.auth.service import Principal
from opensequence.pagination import DEFAULT_LIMIT, CursorQuery, LimitQuery
from opensequence.sequences import service
from opensequence.sequences.schemas import (
    CancelSequenceOutput,
    CreateSequenceInput,
    CreateSequenceOutput,
    SequenceOutput,
    SequencePage,
    StartSequenceOutput,
    UpdateSequenceInput,
)

router = APIRouter(tags=["Sequences"])

SequenceRef = Annotated[
    str,
    Path(description="ID or _custom ID_ for the sequence", max_length=256),
]
CancelRef = Annotated[
    str,
    Path(
        description="ID or _custom ID_ for the sequence. This can also be a _run ID_.",
        max_length=256,
    ),
]


@router.post(
    "/sequences",
    operation_id="createSequence",
    summary="Create a sequence",
    status_code=201,
    responses=error_responses(400, 401, 403, 409, 413, 429),
)
async def create_sequence(
    body: CreateSequenceInput,
    db: DbDep,
    clock: ClockDep,
    principal: Principal = require("sequences:write"),
) -> CreateSequenceOutput:
    async with db.transaction() as session:
        sequence = await service.create_sequence(session, principal.org_id, body, clock.now())
    return CreateSequenceOutput(id=str(sequence.id))


@router.get(
    "/sequences",
    operation_id="listSequences",
    summary="List sequences (extension)",
    response_model=SequencePage,
    responses=error_responses(400, 401, 403, 429),
)
async def list_sequences(
    db: DbDep,
    status: Annotated[
        Literal["pending", "active", "complete", "canceled"] | None,
        Query(description="Only sequences in this status."),
    ] = None,
    cursor: CursorQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
    principal: Principal = require("sequences:read"),
) -> Any:
    async with db.reading() as session:
        page = await service.list_sequences(
            session, principal.org_id, status=status, cursor=cursor, limit=limit
        )
    return JSONResponse(page)


@router.get(
    "/sequences/{sequence_id}",
    operation_id="getSequence",
    summary="Get a sequence",
    response_model=SequenceOutput,
    responses=error_responses(401, 403, 404, 429),
)
async def get_sequence(
    sequence_id: SequenceRef,
    db: DbDep,
    principal: Principal = require("sequences:read"),
) -> Any:
    async with db.reading() as session:
        body = await service.read_sequence(session, principal.org_id, sequence_id)
    return JSONResponse(body)


@router.patch(
    "/sequences/{sequence_id}",
    operation_id="updateSequence",
    summary="Update a sequence",
    response_model=SequenceOutput,
    responses=error_responses(400, 401, 403, 404, 409, 413, 429),
)
async def update_sequence(
    sequence_id: SequenceRef,
    body: UpdateSequenceInput,
    db: DbDep,
    clock: ClockDep,
    principal: Principal = require("sequences:write"),
) -> Any:
    async with db.transaction() as session:
        sequence = await service.update_sequence(
            session, principal.org_id, sequence_id, body, clock.now()
        )
        result = await service.read_sequence(session, principal.org_id, str(sequence.id))
    return JSONResponse(result)


@router.put(
    "/sequences/{sequence_id}/start",
    operation_id="startSequence",
    summary="Start a oneoff sequence",
    description=(
        "Start a oneoff sequence.\n- The sequence must have the `is_continuous` property set to "
        "`false`\n- The sequence must not have been previously canceled\n\nEnrolls every contact "
        "matching the filter at this moment as one run; zero matches complete the sequence."
    ),
    responses=error_responses(401, 403, 404, 409, 429),
)
async def start_sequence(
    sequence_id: SequenceRef,
    db: DbDep,
    clock: ClockDep,
    principal: Principal = require("sequences:write"),
) -> StartSequenceOutput:
    async with db.transaction() as session:
        run = await service.start_sequence(session, principal.org_id, sequence_id, clock.now())
    return StartSequenceOutput(run_id=str(run.id))


@router.put(
    "/sequences/{sequence_id}/cancel",
    operation_id="cancelSequence",
    summary="Cancel a sequence",
    description=(
        "By sequence id or custom_id: cancels the sequence and every active enrollment. By a run "
        "id: cancels only that run's active enrollments. Idempotent."
    ),
    responses=error_responses(401, 403, 404, 409, 429),
)
async def cancel_sequence(
    sequence_id: CancelRef,
    db: DbDep,
    clock: ClockDep,
    principal: Principal = require("sequences:write"),
) -> CancelSequenceOutput:
    async with db.transaction() as session:
        done = await service.cancel(session, principal.org_id, sequence_id, clock.now())
    return CancelSequenceOutput.model_validate(done.wire())
