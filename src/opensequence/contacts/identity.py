"""How a contact is identified inside an organization (SPEC §2): pure, no database.

Email identity is case-insensitive (``email_normalized`` = lower-case). Phone identity is the
E.164 form when the text is written with ``+`` and parses as a possible number without a
default region; anything else is kept verbatim, so ``"0612345678"`` and ``"06 12 34 56 78"``
remain two different identifiers (we cannot guess their country).
"""

from __future__ import annotations

import phonenumbers


def normalize_email(email: str) -> str:
    return email.lower()


def normalize_phone(raw: str | None) -> str | None:
    """The stored/compared form of a phone; ``None`` for a missing or blank value, which
    identifies nobody (SPEC §4)."""
    if raw is None or not raw.strip():
        return None
    text = raw.strip()
    if text.startswith("+"):
        try:
            parsed = phonenumbers.parse(text, None)
        except phonenumbers.NumberParseException:
            return raw
        if phonenumbers.is_possible_number(parsed):
            return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    return raw
