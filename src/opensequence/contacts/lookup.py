"""Find a contact of an organization by id (``{contact_id}`` paths)."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from opensequence.errors import NotFound
from opensequence.models import Contact
from opensequence.sequences.lookup import parse_uuid


async def get_contact(session: AsyncSession, org_id: uuid.UUID, ref: str) -> Contact:
    """The contact with id ``ref`` in this organization; anything else → NotFound (404), so
    another organization's id is indistinguishable from one that does not exist."""
    as_id = parse_uuid(ref)
    found = None
    if as_id is not None:
        found = await session.scalar(
            select(Contact).where(Contact.org_id == org_id, Contact.id == as_id)
        )
    if found is None:
        raise NotFound(f"contact {ref!r} not found")
    return found
