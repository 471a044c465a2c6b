"""Cursor pagination shared by every list endpoint: ``{"items": [...], "next": str | null}``.

Cursors are opaque (base64url of a small JSON object holding the last row's sort key), so a
list ordered by a unique key stays stable while rows are inserted concurrently: a page never
repeats or skips a row that existed when the walk began.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel

from opensequence.errors import Invalid
from opensequence.validation import has_lone_surrogate

T = TypeVar("T")

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


class Page(BaseModel, Generic[T]):
    items: list[T]
    next: str | None


def encode_cursor(position: dict[str, Any]) -> str:
    raw = json.dumps(position, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


BAD_CURSOR = "cursor: not a cursor issued by this API"


def decode_cursor(cursor: str | None) -> dict[str, Any] | None:
    """The position inside ``cursor``; a cursor we did not issue → 400 naming ``cursor``."""
    if cursor is None or cursor == "":
        return None
    if len(cursor) > 1024:
        raise Invalid(BAD_CURSOR)
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise Invalid(BAD_CURSOR) from exc
    if not isinstance(value, dict):
        raise Invalid(BAD_CURSOR)
    return value


# Typed reads of a decoded position: a missing key or a value of the wrong kind is a cursor we
# did not issue (400 naming ``cursor``).


def position_uuid(position: dict[str, Any], key: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(position[key]))
    except (KeyError, ValueError) as exc:
        raise Invalid(BAD_CURSOR) from exc


def position_int(position: dict[str, Any], key: str) -> int:
    """An integer a database column holds (64 bits, signed): a larger one made the driver raise,
    a 500."""
    value = position.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not -(2**63) <= value < 2**63:
        raise Invalid(BAD_CURSOR)
    return value


def position_str(position: dict[str, Any], key: str) -> str:
    """Text a database can compare: no lone surrogate (JSON's ``"\\ud800"``, which no UTF-8
    encodes: a 500) and no NUL."""
    value = position.get(key)
    if not isinstance(value, str) or "\x00" in value or has_lone_surrogate(value):
        raise Invalid(BAD_CURSOR)
    return value


LimitQuery = Annotated[
    int,
    Query(ge=1, le=MAX_LIMIT, description=f"Page size (1-{MAX_LIMIT}, default {DEFAULT_LIMIT})."),
]
CursorQuery = Annotated[
    str | None,
    Query(description="The `next` value of the previous page.", max_length=1024),
]
