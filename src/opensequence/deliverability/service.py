"""Rules of the suppression list and sender limits. Takes a session; never commits."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from opensequence.contacts.identity import normalize_email
from opensequence.contacts.lookup import get_contact
from opensequence.deliverability import repository as repo
from opensequence.enrollments.repository import wake_waiting
from opensequence.errors import Invalid, NotFound
from opensequence.models import SenderLimit, Suppression
from opensequence.pagination import decode_cursor, encode_cursor, position_str
from opensequence.validation import is_seed_email

# Stronger reasons win: an address that bounced stays bounced when it later unsubscribes.
_RANK = {"unsubscribed": 0, "manual": 1, "complained": 2, "bounced": 3}
# Which reasons block transactional mail too (SPEC §6): all but a marketing unsubscribe.
BLOCKS_TRANSACTIONAL = frozenset({"bounced", "complained", "manual"})
# Skip reason recorded on a message for each suppression reason.
SKIP_REASON = {
    "unsubscribed": "unsubscribed",
    "bounced": "bounced",
    "complained": "suppressed",
    "manual": "suppressed",
}

_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")


async def suppress(
    session: AsyncSession, org_id: uuid.UUID, email: str, reason: str, now: datetime
) -> bool:
    """Add ``email`` to the organization's suppression list, or strengthen its reason.
    Returns True when the entry is new."""
    normalized = normalize_email(email)
    existing = await repo.get_suppression(session, org_id, normalized)
    if existing is not None and _RANK[existing.reason] >= _RANK[reason]:
        return False
    await repo.upsert_suppression(session, org_id, email, normalized, reason, now)
    return existing is None


async def suppress_bounces(
    session: AsyncSession, bounces: Iterable[tuple[uuid.UUID, str]], now: datetime
) -> None:
    """Record hard bounces ``(org_id, email)``: each address is suppressed ``bounced`` in its
    own organization only, whatever it was before (bounced outranks every other reason)."""
    rows = {(org_id, normalize_email(email)): email for org_id, email in bounces}
    await repo.upsert_bounced(
        session, [(org_id, email, normalized) for (org_id, normalized), email in rows.items()], now
    )


async def unsubscribe_contact(
    session: AsyncSession, org_id: uuid.UUID, contact_ref: str, now: datetime
) -> Suppression | None:
    """Suppress the contact's address as ``unsubscribed`` (a stronger existing reason stays).
    NotFound for another organization's or an unknown contact; None when it has no email."""
    contact = await get_contact(session, org_id, contact_ref)
    if not contact.email:
        return None
    await suppress(session, org_id, contact.email, "unsubscribed", now)
    return await repo.get_suppression(session, org_id, normalize_email(contact.email))


async def unsuppress(session: AsyncSession, org_id: uuid.UUID, email: str) -> None:
    if not await repo.delete_suppression(session, org_id, normalize_email(email)):
        raise NotFound(f"{email!r} is not on the suppression list")


async def get_suppression(session: AsyncSession, org_id: uuid.UUID, email: str) -> Suppression:
    found = await repo.get_suppression(session, org_id, normalize_email(email))
    if found is None:
        raise NotFound(f"{email!r} is not on the suppression list")
    return found


async def list_suppressions(
    session: AsyncSession, org_id: uuid.UUID, *, cursor: str | None, limit: int
) -> tuple[list[Suppression], str | None]:
    after = _cursor_key(cursor)
    rows = await repo.list_suppressions(session, org_id, after=after, limit=limit)
    following = encode_cursor({"k": rows[-1].email_normalized}) if len(rows) == limit else None
    return rows, following


def blocking_reason(reason: str | None, *, transactional: bool) -> str | None:
    """The message skip reason when a suppression of ``reason`` blocks this kind of mail."""
    if reason is None:
        return None
    if transactional and reason not in BLOCKS_TRANSACTIONAL:
        return None
    return SKIP_REASON[reason]


def normalise_sender(sender: str) -> str:
    """A sender is an email address (seed pattern) or a domain; compared lower-cased."""
    value = sender.strip()
    if "@" in value:
        if not is_seed_email(value):
            raise Invalid("sender: must be an email address or a domain name")
        return value.lower()
    if not _DOMAIN.match(value.lower()):
        raise Invalid("sender: must be an email address or a domain name")
    return value.lower()


# A throttled send waits at most the widest window (per_day, SPEC §5) from when it was held.
_LONGEST_THROTTLE_WAIT = timedelta(days=1, minutes=1)


async def _wake_throttled(session: AsyncSession, org_id: uuid.UUID, now: datetime) -> None:
    """The organization's throttled sends contend again under the changed limits. There is no
    index on the organization: the due index's next day is read instead of the whole table."""
    await wake_waiting(
        session, "throttled", now, org_id=org_id, due_by=now + _LONGEST_THROTTLE_WAIT
    )


async def put_sender_limit(
    session: AsyncSession,
    org_id: uuid.UUID,
    sender: str,
    limits: dict[str, int | None],
    now: datetime,
) -> SenderLimit:
    key = normalise_sender(sender)
    await repo.lock_senders(session, [(org_id, key)])
    await repo.upsert_sender_limit(session, org_id, key, limits, now)
    await _wake_throttled(session, org_id, now)
    found = await repo.get_sender_limit(session, org_id, key)
    assert found is not None
    await session.refresh(found)
    return found


async def get_sender_limit(session: AsyncSession, org_id: uuid.UUID, sender: str) -> SenderLimit:
    found = await repo.get_sender_limit(session, org_id, normalise_sender(sender))
    if found is None:
        raise NotFound(f"no sender limit for {sender!r}")
    return found


async def delete_sender_limit(
    session: AsyncSession, org_id: uuid.UUID, sender: str, now: datetime
) -> None:
    """SPEC §5: a send waiting for a limit goes out once the limit is lifted."""
    key = normalise_sender(sender)
    await repo.lock_senders(session, [(org_id, key)])
    if not await repo.delete_sender_limit(session, org_id, key):
        raise NotFound(f"no sender limit for {sender!r}")
    await _wake_throttled(session, org_id, now)


async def list_sender_limits(
    session: AsyncSession, org_id: uuid.UUID, *, cursor: str | None, limit: int
) -> tuple[list[SenderLimit], str | None]:
    after = _cursor_key(cursor)
    rows = await repo.list_sender_limits(session, org_id, after=after, limit=limit)
    following = encode_cursor({"k": rows[-1].sender}) if len(rows) == limit else None
    return rows, following


def _cursor_key(cursor: str | None) -> str | None:
    position = decode_cursor(cursor)
    return position_str(position, "k") if position is not None else None
