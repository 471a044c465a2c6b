"""Input rules shared by every wire model (SPEC §1 limits, the seed's patterns)."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from functools import cache
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from pydantic import AfterValidator, Field

# The seed document's patterns, verbatim. The email pattern uses look-aheads, so models that
# use it need ``ConfigDict(regex_engine="python-re")``.
SEED_ID_PATTERN = (
    r"^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[1-8][0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}"
    r"|00000000-0000-0000-0000-000000000000|ffffffff-ffff-ffff-ffff-ffffffffffff)$"
)
SEED_EMAIL_PATTERN = (
    r"^(?!\.)(?!.*\.\.)([A-Za-z0-9_'+\-\.]*)[A-Za-z0-9_+-]"
    r"@([A-Za-z0-9][A-Za-z0-9\-]*\.)+[A-Za-z]{2,}$"
)
SEED_ID_RE = re.compile(SEED_ID_PATTERN)
SEED_EMAIL_RE = re.compile(SEED_EMAIL_PATTERN)

MAX_NAME = 256
MAX_EMAIL = 320
MAX_PHONE = 64
MAX_CUSTOM_KEYS = 100
MAX_CUSTOM_KEY = 128
MAX_CUSTOM_STRING = 4096
MAX_TEMPLATE_BYTES = 256 * 1024
MAX_STEPS = 100

# C0 controls except tab, LF and CR (SPEC §1).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


# A lone surrogate: JSON's "\ud800" escape decodes to one, and neither UTF-8 nor PostgreSQL can
# store it (a phone number carrying one answered 500).
_SURROGATE = re.compile("[\ud800-\udfff]")


MAX_ZONE_NAME = 64


# Files of a zone directory that are not zones of the IANA database but of the machine:
# ``localtime`` is the machine's own zone, ``posixrules`` the rules its POSIX TZ strings default
# to. A send window in either would follow each worker's machine, not the sequence.
_MACHINE_ZONES = frozenset({"localtime", "posixrules"})


@cache
def _iana_names() -> frozenset[str]:
    """The zone database's names (the system's and the ``tzdata`` package's): ~600 names, read
    once per process. Directories (``Europe``) and paths (``/etc/localtime``,
    ``posix/Europe/Paris``, ``right/UTC``) are not among them."""
    return frozenset(available_timezones()) - _MACHINE_ZONES


def zone_named(name: object) -> ZoneInfo | None:
    """The IANA zone called ``name``; None for anything that is not one of the database's
    names (:func:`_iana_names`), or that does not load."""
    if not isinstance(name, str) or not name or len(name) > MAX_ZONE_NAME:
        return None
    if name not in _iana_names():
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


def utc_moment(value: datetime) -> datetime:
    """``value`` in UTC (no offset reads as UTC). ValueError when it has no UTC reading inside
    a datetime's range (``0001-01-01T00:00:00+14:00`` is before year 1 in UTC)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError as exc:
        raise ValueError("date-time out of range") from exc


def has_lone_surrogate(value: str) -> bool:
    return _SURROGATE.search(value) is not None


def reject_control_chars(value: str) -> str:
    """Text we store: no C0 controls (SPEC §1) and valid Unicode."""
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    if has_lone_surrogate(value):
        raise ValueError("must be valid Unicode (no lone surrogates)")
    return value


def reject_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def is_seed_email(value: str) -> bool:
    # fullmatch: the seed's patterns end in ``$``, the end of the string in JSON Schema, but
    # in Python's ``re.match`` also the place before a final newline.
    return SEED_EMAIL_RE.fullmatch(value) is not None


def is_seed_id(value: str) -> bool:
    return SEED_ID_RE.fullmatch(value) is not None


CleanText = Annotated[str, AfterValidator(reject_control_chars)]
Name = Annotated[str, Field(max_length=MAX_NAME), AfterValidator(reject_control_chars)]


def require_whole_seed_email(value: str) -> str:
    """The pattern check again with :func:`is_seed_email`: pydantic's python-re engine lets a
    final newline through, as Python's ``$`` does."""
    if not is_seed_email(value):
        raise ValueError(f"String should match pattern '{SEED_EMAIL_PATTERN}'")
    return value


Email = Annotated[
    str,
    Field(max_length=MAX_EMAIL, pattern=SEED_EMAIL_PATTERN, json_schema_extra={"format": "email"}),
    AfterValidator(require_whole_seed_email),
]
Phone = Annotated[str, Field(max_length=MAX_PHONE), AfterValidator(reject_control_chars)]

CustomValue = str | int | float | bool | None


def check_custom_data(value: dict[str, Any]) -> dict[str, Any]:
    """Flat JSON objects only: ≤ 100 keys of ≤ 128 chars; scalar values, strings ≤ 4,096.

    Numbers must be finite: Python's JSON parser accepts ``NaN``/``Infinity``, which SQLite
    silently stored as null and PostgreSQL's jsonb refused with a 500 (found by the hostile-input
    drill)."""
    if len(value) > MAX_CUSTOM_KEYS:
        raise ValueError(f"at most {MAX_CUSTOM_KEYS} keys")
    for key, item in value.items():
        if len(key) > MAX_CUSTOM_KEY:
            raise ValueError(f"key {key[:32]!r}… is longer than {MAX_CUSTOM_KEY} characters")
        reject_control_chars(key)
        if isinstance(item, str):
            if len(item) > MAX_CUSTOM_STRING:
                raise ValueError(f"value of {key!r} is longer than {MAX_CUSTOM_STRING} characters")
            reject_control_chars(item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"value of {key!r} must be a finite number")
    return value


CustomData = Annotated[dict[str, CustomValue], AfterValidator(check_custom_data)]
