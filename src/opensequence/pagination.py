"""Cursor pagination shared by every list endpoint: ``{"items": [...], "next": str | null}``.

Cursors are opaque (base64url of a small JSON object holding the last row's sort key), so a
list ordered by a unique key stays stable while rows are inserted concurrently: a page never
repeats or skips a row that existed when the walk began.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel

from opensequence.errors import Invalid

T = TypeVar("T")

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


class Page(BaseModel, Generic[T]):
    items: list[T]
    next: str | None


def encode_cursor(position: dict[str, Any]) -> str:
    raw = json.dumps(position, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> dict[str, Any] | None:
    """The position inside ``cursor``; a cursor we did not issue → 400 naming ``cursor``."""
    if cursor is None or cursor == "":
        return None
    if len(cursor) > 1024:
        raise Invalid("cursor: not a cursor issued by this API")
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise Invalid("cursor: not a cursor issued by this API") from exc
    if not isinstance(value, dict):
        raise Invalid("cursor: not a cursor issued by this API")
    return value


LimitQuery = Annotated[
    int,
    Query(ge=1, le=MAX_LIMIT, description=f"Page size (1-{MAX_LIMIT}, default {DEFAULT_LIMIT})."),
]
CursorQuery = Annotated[
    str | None,
    Query(description="The `next` value of the previous page.", max_length=1024),
]
