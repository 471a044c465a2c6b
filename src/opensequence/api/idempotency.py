"""``Idempotency-Key`` on every POST (SPEC §1): the same key with the same request within 24 h
returns the first response and does nothing again; the same key with a different request → 409.

A pure-ASGI middleware so that every POST route gets it without cooperating. Keys belong to the
organization of the API key presented (two organizations may use the same key string).

Concurrency: the key is *reserved* (a row with ``status_code = 0``) in its own committed
transaction before the request runs, so a second concurrent request with the same key sees the
reservation and gets 409 instead of running the work twice. A successful (2xx) response replaces
the reservation; any other outcome deletes it, so a client may retry a failed request with the
same key (a failed request changed nothing). If the process dies between the work committing and
the response being stored, the reservation stays until it expires (24 h) and retries answer 409:
the safe direction, never a double execution.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, update
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from opensequence.api.middleware import send_error_dto, send_json
from opensequence.auth.service import authenticate
from opensequence.db import Database
from opensequence.db.dialect import insert_for
from opensequence.db.types import utcnow
from opensequence.models import IdempotencyKey

HEADER = b"idempotency-key"
TTL = timedelta(hours=24)
MAX_KEY = 255
IN_PROGRESS = 0


class IdempotencyMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        raw_key = headers.get(HEADER)
        token = _bearer(headers.get(b"authorization"))
        if raw_key is None or token is None:
            await self.app(scope, receive, send)
            return
        key = raw_key.decode("latin-1")
        if not key or len(key) > MAX_KEY or not key.isprintable():
            await send_error_dto(send, 400, f"Idempotency-Key: must be 1-{MAX_KEY} printable chars")
            return
        db: Database = scope["app"].state.db
        async with db.reading() as session:
            principal = await authenticate(session, token)
        if principal is None:
            await self.app(scope, receive, send)  # the route answers 401 as usual
            return

        body, replay_receive = await _buffer(receive)
        digest = hashlib.sha256(
            b"%s\n%s\n%s\n"
            % (scope["method"].encode(), scope["path"].encode(), scope.get("query_string", b""))
            + body
        ).hexdigest()

        stored = await _reserve(db, principal.org_id, key, digest)
        if stored is not None:
            if stored.request_hash != digest:
                await send_error_dto(
                    send, 409, "Idempotency-Key was already used with a different request"
                )
            elif stored.status_code == IN_PROGRESS:
                await send_error_dto(
                    send, 409, "a request with this Idempotency-Key is in progress"
                )
            else:
                await _replay(send, stored.status_code, stored.response_body)
            return

        captured: dict[str, Any] = {"status": 0, "body": bytearray(), "type": b""}

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                captured["status"] = message["status"]
                for name, value in message.get("headers", []):
                    if name == b"content-type":
                        captured["type"] = value
            elif message["type"] == "http.response.body":
                captured["body"].extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, replay_receive, capture)
        finally:
            await _settle(db, principal.org_id, key, captured)


def _bearer(value: bytes | None) -> str | None:
    if not value:
        return None
    text = value.decode("latin-1")
    scheme, _, credentials = text.partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


async def _buffer(receive: Receive) -> tuple[bytes, Receive]:
    """Read the whole body (the app behind sees it again, unchanged). The outer middleware has
    already enforced the body-size limit."""
    chunks: list[bytes] = []
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(chunks)
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


async def _reserve(db: Database, org_id: Any, key: str, digest: str) -> IdempotencyKey | None:
    """Reserve ``key`` for this request; return the existing row instead when one is live."""
    now = utcnow()
    async with db.transaction() as session:
        existing = await session.get(IdempotencyKey, (org_id, key))
        if existing is not None and existing.created_at > now - TTL:
            return existing
        if existing is not None:
            await session.execute(
                delete(IdempotencyKey).where(
                    IdempotencyKey.org_id == org_id, IdempotencyKey.key == key
                )
            )
        inserted = await session.scalar(
            insert_for(session, IdempotencyKey)
            .values(
                org_id=org_id,
                key=key,
                request_hash=digest,
                status_code=IN_PROGRESS,
                response_body=b"",
                created_at=now,
            )
            .on_conflict_do_nothing()
            .returning(IdempotencyKey.key)
        )
    if inserted is not None:
        return None
    # A concurrent request reserved the key first (PostgreSQL let us wait for its commit).
    async with db.transaction() as session:
        return await session.get(IdempotencyKey, (org_id, key))


async def _settle(db: Database, org_id: Any, key: str, captured: dict[str, Any]) -> None:
    where = (
        IdempotencyKey.org_id == org_id,
        IdempotencyKey.key == key,
        IdempotencyKey.status_code == IN_PROGRESS,
    )
    async with db.transaction() as session:
        if 200 <= captured["status"] < 300:
            await session.execute(
                update(IdempotencyKey)
                .where(*where)
                .values(status_code=captured["status"], response_body=bytes(captured["body"]))
            )
        else:
            await session.execute(delete(IdempotencyKey).where(*where))


async def _replay(send: Send, status: int, body: bytes) -> None:
    await send_json(send, status, body, [(b"idempotent-replayed", b"true")])
