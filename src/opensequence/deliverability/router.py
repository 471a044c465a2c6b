"""HTTP for the suppression list and sender limits (SPEC §5, §6 extensions)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from opensequence.api.deps import ClockDep, DbDep, require
from opensequence.api.openapi import error_responses
from opensequence.auth.service import Principal
from opensequence.db.types import iso
from opensequence.deliverability import service
from opensequence.deliverability.schemas import (
    SenderLimitIn,
    SenderLimitOut,
    SenderLimitPage,
    SuppressionIn,
    SuppressionOut,
    SuppressionPage,
)
from opensequence.models import SenderLimit, Suppression
from opensequence.pagination import DEFAULT_LIMIT, CursorQuery, LimitQuery

router = APIRouter(tags=["Deliverability"])


def _suppression(row: Suppression) -> SuppressionOut:
    return SuppressionOut(email=row.email, reason=row.reason, created_at=iso(row.created_at) or "")  # type: ignore[arg-type]


def _limit(row: SenderLimit) -> SenderLimitOut:
    return SenderLimitOut(
        sender=row.sender,
        per_second=row.per_second,
        per_minute=row.per_minute,
        per_day=row.per_day,
    )


@router.get(
    "/suppressions",
    operation_id="listSuppressions",
    summary="List the organization's suppressed addresses",
    responses=error_responses(400, 401, 403, 429),
)
async def list_suppressions(
    db: DbDep,
    cursor: CursorQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
    principal: Principal = require("contacts:read"),
) -> SuppressionPage:
    async with db.reading() as session:
        rows, following = await service.list_suppressions(
            session, principal.org_id, cursor=cursor, limit=limit
        )
    return SuppressionPage(items=[_suppression(r) for r in rows], next=following)


@router.post(
    "/suppressions",
    operation_id="addSuppression",
    summary="Suppress an address (201 when new, 200 when it was already listed)",
    status_code=201,
    responses={
        200: {"model": SuppressionOut, "description": "Already listed"},
        **error_responses(400, 401, 403, 429),
    },
)
async def add_suppression(
    body: SuppressionIn,
    response: Response,
    db: DbDep,
    clock: ClockDep,
    principal: Principal = require("contacts:write"),
) -> SuppressionOut:
    async with db.transaction() as session:
        created = await service.suppress(
            session, principal.org_id, body.email, body.reason, clock.now()
        )
        row = await service.get_suppression(session, principal.org_id, body.email)
    if not created:
        response.status_code = 200
    return _suppression(row)


@router.delete(
    "/suppressions/{email}",
    operation_id="removeSuppression",
    summary="Remove an address from the suppression list",
    responses=error_responses(400, 401, 403, 404, 429),
)
async def remove_suppression(
    email: str, db: DbDep, principal: Principal = require("contacts:write")
) -> SuppressionOut:
    async with db.transaction() as session:
        row = await service.get_suppression(session, principal.org_id, email)
        out = _suppression(row)
        await service.unsuppress(session, principal.org_id, email)
    return out


@router.get(
    "/sender-limits",
    operation_id="listSenderLimits",
    summary="List per-sender throttles",
    responses=error_responses(400, 401, 403, 429),
)
async def list_sender_limits(
    db: DbDep,
    cursor: CursorQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
    principal: Principal = require("sequences:read"),
) -> SenderLimitPage:
    async with db.reading() as session:
        rows, following = await service.list_sender_limits(
            session, principal.org_id, cursor=cursor, limit=limit
        )
    return SenderLimitPage(items=[_limit(r) for r in rows], next=following)


@router.put(
    "/sender-limits/{sender}",
    operation_id="putSenderLimit",
    summary="Set the throttle of a sender (an email address or a domain)",
    responses=error_responses(400, 401, 403, 429),
)
async def put_sender_limit(
    sender: str,
    body: SenderLimitIn,
    db: DbDep,
    clock: ClockDep,
    principal: Principal = require("sequences:write"),
) -> SenderLimitOut:
    async with db.transaction() as session:
        row = await service.put_sender_limit(
            session, principal.org_id, sender, body.model_dump(), clock.now()
        )
    return _limit(row)


@router.delete(
    "/sender-limits/{sender}",
    operation_id="deleteSenderLimit",
    summary="Remove the throttle of a sender",
    responses=error_responses(400, 401, 403, 404, 429),
)
async def delete_sender_limit(
    sender: str, db: DbDep, clock: ClockDep, principal: Principal = require("sequences:write")
) -> SenderLimitOut:
    async with db.transaction() as session:
        out = _limit(await service.get_sender_limit(session, principal.org_id, sender))
        await service.delete_sender_limit(session, principal.org_id, sender, clock.now())
    return out
