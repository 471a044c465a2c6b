"""Signed unsubscribe tokens and the installation secret that signs them.

A token is ``base64url(org_id ‖ contact_id ‖ HMAC-SHA256(secret, org_id ‖ contact_id)[:16])``:
self-contained (no table lookup to verify), unforgeable without the secret, and compared in
constant time. The secret is ``OPENSEQUENCE_SECRET_KEY`` or, when unset, a random value stored
once in ``system_settings``: ``INSERT … ON CONFLICT DO NOTHING`` then a re-read, so processes
starting at the same moment all end up with the value that won.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from opensequence.db.conflict import insert_ignoring_conflicts
from opensequence.models import SystemSetting

SECRET_SETTING = "secret_key"
_MAC_BYTES = 16


def _mac(secret: str, payload: bytes) -> bytes:
    # ``hmac.digest`` is the one-shot C path: the same MAC as ``hmac.new(...).digest()`` at a
    # fraction of the cost, which matters because every non-transactional send signs a token.
    return hmac.digest(secret.encode(), payload, "sha256")[:_MAC_BYTES]


def make_token(secret: str, org_id: uuid.UUID, contact_id: uuid.UUID) -> str:
    payload = org_id.bytes + contact_id.bytes
    raw = payload + _mac(secret, payload)
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def read_token(secret: str, token: str) -> tuple[uuid.UUID, uuid.UUID] | None:
    """``(org_id, contact_id)`` of a token we signed; None for anything forged or mangled."""
    if len(token) > 128:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 32 + _MAC_BYTES:
        return None
    payload, mac = raw[:32], raw[32:]
    if not hmac.compare_digest(mac, _mac(secret, payload)):
        return None
    return uuid.UUID(bytes=payload[:16]), uuid.UUID(bytes=payload[16:])


def unsubscribe_url(public_url: str, token: str) -> str:
    return f"{public_url.rstrip('/')}/unsubscribe/{token}"


async def load_secret(session: AsyncSession, configured: str | None) -> str:
    """The signing secret: the configured one, else the stored one (created on first use)."""
    if configured:
        return configured
    statement = insert_ignoring_conflicts(session, SystemSetting.__table__, ["key"]).values(
        key=SECRET_SETTING, value=secrets.token_urlsafe(32)
    )
    await session.execute(statement)
    value = await session.scalar(
        select(SystemSetting.value).where(SystemSetting.key == SECRET_SETTING)
    )
    assert value is not None
    return value
