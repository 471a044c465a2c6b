"""Organizations and API keys. Services take a session and never commit (DESIGN rule 1)."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from opensequence.db.types import utcnow
from opensequence.errors import Invalid, NotFound
from opensequence.models import ApiKey, Organization
from opensequence.models.organization import MAX_ORG_NAME

SCOPES = ("sequences:read", "sequences:write", "contacts:read", "contacts:write")
FULL_ACCESS = "*"
KEY_PREFIX = "osk_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the organization and the key's scopes."""

    org_id: uuid.UUID
    key_id: uuid.UUID
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        """An empty ``scope`` means "any valid key"."""
        return not scope or FULL_ACCESS in self.scopes or scope in self.scopes


@dataclass(frozen=True)
class CreatedKey:
    org_id: uuid.UUID
    key_id: uuid.UUID
    key: str


def hash_key(key: str) -> str:
    """Keys carry 256 bits of entropy, so a fast hash is enough: nothing to brute-force."""
    return hashlib.sha256(key.encode()).hexdigest()


def normalise_scopes(scopes: list[str] | None) -> list[str]:
    if not scopes:
        return [FULL_ACCESS]
    unknown = sorted(set(scopes) - set(SCOPES) - {FULL_ACCESS})
    if unknown:
        raise Invalid(f"unknown scope {unknown[0]!r}; expected one of {', '.join(SCOPES)}")
    if FULL_ACCESS in scopes:
        return [FULL_ACCESS]
    return sorted(set(scopes))


async def get_or_create_org(session: AsyncSession, name: str) -> Organization:
    if not name.strip():
        raise Invalid("organization name must not be empty")
    if len(name) > MAX_ORG_NAME:
        # PostgreSQL refuses a longer one (a traceback in the CLI); SQLite stored it.
        raise Invalid(f"organization name must be at most {MAX_ORG_NAME} characters")
    org = await session.scalar(select(Organization).where(Organization.name == name))
    if org is None:
        org = Organization(name=name)
        session.add(org)
        await session.flush()
    return org


async def find_org(session: AsyncSession, name: str) -> Organization:
    org = await session.scalar(select(Organization).where(Organization.name == name))
    if org is None:
        raise NotFound(f"organization {name!r} does not exist")
    return org


async def count_orgs(session: AsyncSession) -> int:
    return int(await session.scalar(select(func.count()).select_from(Organization)) or 0)


async def create_key(
    session: AsyncSession, org: Organization, scopes: list[str] | None = None
) -> CreatedKey:
    secret = secrets.token_urlsafe(32)
    key = f"{KEY_PREFIX}{secret}"
    row = ApiKey(
        org_id=org.id,
        prefix=key[: len(KEY_PREFIX) + 8],
        key_hash=hash_key(key),
        scopes=normalise_scopes(scopes),
    )
    session.add(row)
    await session.flush()
    return CreatedKey(org_id=org.id, key_id=row.id, key=key)


async def list_keys(session: AsyncSession, org: Organization) -> list[ApiKey]:
    rows = await session.scalars(
        select(ApiKey).where(ApiKey.org_id == org.id).order_by(ApiKey.created_at, ApiKey.id)
    )
    return list(rows)


async def revoke_key(session: AsyncSession, key_id: uuid.UUID) -> datetime:
    """Idempotent: revoking a revoked key keeps its first ``revoked_at``."""
    row = await session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"API key {key_id} does not exist")
    if row.revoked_at is None:
        await session.execute(update(ApiKey).where(ApiKey.id == key_id).values(revoked_at=utcnow()))
        await session.refresh(row)
    assert row.revoked_at is not None
    return row.revoked_at


async def authenticate(session: AsyncSession, key: str) -> Principal | None:
    """The principal for a presented key, or None when it is unknown or revoked."""
    if not key.startswith(KEY_PREFIX) or len(key) > 128:
        return None
    row = (
        await session.execute(
            select(ApiKey.id, ApiKey.org_id, ApiKey.scopes, ApiKey.revoked_at).where(
                ApiKey.key_hash == hash_key(key)
            )
        )
    ).one_or_none()
    if row is None or row.revoked_at is not None:
        return None
    return Principal(org_id=row.org_id, key_id=row.id, scopes=frozenset(row.scopes))
