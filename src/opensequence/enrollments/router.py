"""``GET /sequences/{id}/enrollments`` and ``GET /contacts/{id}/messages`` (SPEC §6)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from opensequence.api.deps import DbDep, require
from opensequence.api.openapi import error_responses
from opensequence.auth.service import Principal
from opensequence.enrollments import service
from opensequence.enrollments.schemas import (
    EnrollmentOut,
    EnrollmentStatus,
    MessageOut,
)
from opensequence.pagination import DEFAULT_LIMIT, CursorQuery, LimitQuery, Page

router = APIRouter(tags=["Delivery history"])


@router.get(
    "/sequences/{sequence_id}/enrollments",
    operation_id="listSequenceEnrollments",
    summary="A sequence's enrollments (where each contact is, what it waits for)",
    responses=error_responses(400, 401, 403, 404, 429),
)
async def list_enrollments(
    sequence_id: str,
    db: DbDep,
    status: Annotated[
        EnrollmentStatus | None, Query(description="Only enrollments in this status.")
    ] = None,
    contact_id: Annotated[uuid.UUID | None, Query(description="Only this contact.")] = None,
    cursor: CursorQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
    principal: Principal = require("sequences:read"),
) -> Page[EnrollmentOut]:
    async with db.reading() as session:
        return await service.list_enrollments(
            session,
            principal.org_id,
            sequence_id,
            status=status,
            contact_id=contact_id,
            cursor=cursor,
            limit=limit,
        )


@router.get(
    "/contacts/{contact_id}/messages",
    operation_id="listContactMessages",
    summary="Every send record of a contact, newest first",
    responses=error_responses(400, 401, 403, 404, 429),
)
async def list_messages(
    contact_id: str,
    db: DbDep,
    cursor: CursorQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
    principal: Principal = require("contacts:read"),
) -> Page[MessageOut]:
    async with db.reading() as session:
        return await service.list_messages(
            session, principal.org_id, contact_id, cursor=cursor, limit=limit
        )
