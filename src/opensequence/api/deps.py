"""Request dependencies: the database, and the authenticated, scoped, rate-limited principal."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from opensequence.auth.service import Principal, authenticate
from opensequence.clock import Clock
from opensequence.config import Settings
from opensequence.db import Database
from opensequence.errors import Forbidden, RateLimited, Unauthorized

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearerAuth",
    bearerFormat="API key",
    description="An API key created with `opensequence keys create` (shown once).",
)

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def get_db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_clock(request: Request) -> Clock:
    clock: Clock = request.app.state.clock
    return clock


ClockDep = Annotated[Clock, Depends(get_clock)]
DbDep = Annotated[Database, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def require(scope: str) -> Principal:
    """Dependency factory: authenticate the Bearer key, check ``scope``, apply the rate limit."""

    async def principal(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Security(bearer),
    ) -> Principal:
        if credentials is None or not credentials.credentials:
            raise Unauthorized("missing Bearer API key", headers=_CHALLENGE)
        db: Database = request.app.state.db
        async with db.reading() as session:
            found = await authenticate(session, credentials.credentials)
        if found is None:
            raise Unauthorized("invalid or revoked API key", headers=_CHALLENGE)
        decision = await request.app.state.rate_limiter.hit(str(found.key_id))
        request.state.rate_limit_headers = decision.headers()
        if not decision.allowed:
            retry = str(max(1, decision.reset_seconds))
            raise RateLimited(
                f"rate limit of {decision.limit} requests exceeded; retry in {retry} s",
                headers={"Retry-After": retry},
            )
        if not found.allows(scope):
            raise Forbidden(f"this API key lacks the {scope!r} scope")
        request.state.principal = found
        return found

    return Depends(principal)
