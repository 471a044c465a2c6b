"""Unsubscribing (SPEC §6): the signed link in every marketing email, and the API equivalent.

``GET /unsubscribe/{token}`` only shows a confirmation page: mail scanners and link previewers
fetch every URL in a message, so a GET that unsubscribed would unsubscribe people who never
clicked. ``POST /unsubscribe/{token}`` is RFC 8058 one-click: mail providers POST
``List-Unsubscribe=One-Click`` (form-encoded; the request middleware lets form bodies through on
these paths) without cookies or credentials, so the token alone authorises it. The body is not
read: the signed token says everything and nothing in the body could change the outcome.

Neither needs an API key nor counts against a rate limit; both answer without touching the
database when the token is forged or mangled (404, nothing changed). Unsubscribing is
idempotent: a second POST, or one for an address already suppressed for a stronger reason
(bounced), changes nothing and still answers 200.
"""

from __future__ import annotations

import contextlib
import html
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel

from opensequence.api.deps import ClockDep, DbDep, SettingsDep, require
from opensequence.api.openapi import error_responses
from opensequence.auth.service import Principal
from opensequence.db import Database
from opensequence.db.types import iso
from opensequence.deliverability import service
from opensequence.deliverability.schemas import SuppressionOut
from opensequence.errors import Conflict, NotFound
from opensequence.unsubscribe import load_secret, read_token

router = APIRouter(tags=["Deliverability"])

_SECRET_CACHE = "unsubscribe_secret"


class UnsubscribeOut(BaseModel):
    unsubscribed: bool


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 32rem; margin: 4rem auto;
       padding: 0 1rem; line-height: 1.5; color: #1a1a1a; background: #fff; }}
button {{ font: inherit; padding: .6rem 1.2rem; border: 2px solid #1a1a1a; border-radius: 4px;
         background: #1a1a1a; color: #fff; cursor: pointer; }}
button:focus-visible {{ outline: 3px solid #0a58ca; outline-offset: 2px; }}
</style>
</head>
<body>
<main>
<h1>{title}</h1>
{content}
</main>
</body>
</html>
"""


def _page(title: str, content: str, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(
        _PAGE.format(title=html.escape(title), content=content),
        status_code=status_code,
        headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"},
    )


def _invalid_page() -> HTMLResponse:
    return _page(
        "Link not valid",
        "<p>This unsubscribe link is not valid. Please use the link from the most recent "
        "email you received.</p>",
        status_code=404,
    )


async def _read(
    request: Request, db: Database, configured: str | None, token: str
) -> tuple[uuid.UUID, uuid.UUID] | None:
    """``(org_id, contact_id)`` of a token this installation signed. The secret is looked up
    once per process (it never changes while the installation runs)."""
    secret: str | None = getattr(request.app.state, _SECRET_CACHE, None)
    if secret is None:
        async with db.transaction() as session:
            secret = await load_secret(session, configured)
        setattr(request.app.state, _SECRET_CACHE, secret)
    return read_token(secret, token)


@router.get(
    "/unsubscribe/{token}",
    operation_id="unsubscribePage",
    summary="Confirmation page for an unsubscribe link (changes nothing)",
    response_class=HTMLResponse,
    responses={
        200: {"content": {"text/html": {}}, "description": "Page with a confirm button"},
        404: {"content": {"text/html": {}}, "description": "Forged or mangled token"},
    },
)
async def unsubscribe_page(
    token: str, request: Request, db: DbDep, settings: SettingsDep
) -> HTMLResponse:
    if await _read(request, db, settings.secret_key, token) is None:
        return _invalid_page()
    # No ``action``: the form posts back to the URL the page was served at, whatever prefix a
    # reverse proxy put in front of it.
    return _page(
        "Unsubscribe",
        "<p>Do you want to stop receiving these emails?</p>"
        '<form method="post">'
        '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
        '<button type="submit">Unsubscribe</button>'
        "</form>",
    )


@router.post(
    "/unsubscribe/{token}",
    operation_id="unsubscribeOneClick",
    summary="RFC 8058 one-click unsubscribe (no API key; the signed token authorises it)",
    response_model=UnsubscribeOut,
    responses={
        200: {
            "content": {"text/html": {}},
            "description": "Unsubscribed (an HTML page when the client accepts HTML)",
        },
        **error_responses(404),
    },
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {
                "application/x-www-form-urlencoded": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "List-Unsubscribe": {"type": "string", "enum": ["One-Click"]}
                        },
                    }
                }
            },
        }
    },
)
async def unsubscribe_one_click(
    token: str, request: Request, db: DbDep, clock: ClockDep, settings: SettingsDep
) -> Response:
    found = await _read(request, db, settings.secret_key, token)
    if found is None:
        raise NotFound("unsubscribe link not valid")
    org_id, contact_id = found
    # A contact deleted since the mail went out has nobody left to mail: still a success.
    async with db.transaction() as session:
        with contextlib.suppress(NotFound):
            await service.unsubscribe_contact(session, org_id, str(contact_id), clock.now())
    if "text/html" in request.headers.get("accept", ""):
        return _page("Unsubscribed", "<p>You will not receive these emails any more.</p>")
    return JSONResponse({"unsubscribed": True})


@router.post(
    "/contacts/{contact_id}/unsubscribe",
    operation_id="unsubscribeContact",
    summary="Unsubscribe a contact from marketing email (suppression reason unsubscribed)",
    responses=error_responses(401, 403, 404, 409, 429),
)
async def unsubscribe_contact(
    contact_id: str,
    db: DbDep,
    clock: ClockDep,
    principal: Principal = require("contacts:write"),
) -> SuppressionOut:
    async with db.transaction() as session:
        row = await service.unsubscribe_contact(session, principal.org_id, contact_id, clock.now())
    if row is None:
        raise Conflict("contact has no email address to unsubscribe")
    return SuppressionOut(email=row.email, reason=row.reason, created_at=iso(row.created_at) or "")  # type: ignore[arg-type]
