"""``GET /me``: who am I (organization, key, scopes) — handy to check a key works."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from opensequence.api.deps import require
from opensequence.api.openapi import error_responses
from opensequence.auth.service import Principal

router = APIRouter(tags=["Auth"])


class WhoAmI(BaseModel):
    org_id: str
    key_id: str
    scopes: list[str]


@router.get(
    "/me",
    operation_id="whoAmI",
    summary="Describe the calling API key",
    responses=error_responses(401, 429),
)
async def who_am_i(principal: Principal = require("")) -> WhoAmI:
    return WhoAmI(
        org_id=str(principal.org_id),
        key_id=str(principal.key_id),
        scopes=sorted(principal.scopes),
    )
