"""Validation of the add-contacts body exactly as the seed document states it (pure code).

An item is valid when it matches at least one of ``{id}``, ``{email}``, ``{phone_number}`` (JSON
Schema ``anyOf``; extra keys allowed), where the seed's regex patterns are the only test of an
``id`` or ``email``. An identifier failing its own pattern is ignored when another shape
matches. ``name`` and ``custom_data`` (our extension) follow SPEC §1's limits.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from opensequence.errors import Invalid, PayloadTooLarge
from opensequence.validation import (
    CustomData,
    Name,
    has_lone_surrogate,
    is_seed_email,
    is_seed_id,
)

_NAME = TypeAdapter(Name)
_CUSTOM = TypeAdapter(CustomData)


@dataclass(slots=True)
class Item:
    """One request item after validation. ``kind`` is the identifier that decides resolution
    (id, then email, then phone_number); the others are kept for a contact it creates."""

    index: int
    raw: dict[str, Any]
    kind: str
    id: uuid.UUID | None
    email: str | None
    phone_number: str | None
    name: str | None
    custom_data: dict[str, Any] | None


def parse_items(body: Any, *, max_items: int) -> list[Item]:
    if not isinstance(body, dict):
        raise Invalid("body: must be a JSON object with a `contacts` array")
    if "contacts" not in body:
        raise Invalid("contacts: field required")
    contacts = body["contacts"]
    if not isinstance(contacts, list):
        raise Invalid("contacts: must be an array")
    if len(contacts) > max_items:
        raise PayloadTooLarge(
            f"contacts: at most {max_items} items per request (got {len(contacts)}); "
            "split the list into several requests"
        )
    return [_parse_item(index, raw) for index, raw in enumerate(contacts)]


def _parse_item(index: int, raw: Any) -> Item:
    path = f"contacts[{index}]"
    if not isinstance(raw, dict):
        raise Invalid(f"{path}: must be an object with `id`, `email` or `phone_number`")
    problems: list[str] = []

    contact_id: uuid.UUID | None = None
    if "id" in raw:
        value = raw["id"]
        if isinstance(value, str) and is_seed_id(value):
            contact_id = uuid.UUID(value)
        else:
            problems.append(
                "id: does not match pattern" if isinstance(value, str) else "id: must be a string"
            )
    email: str | None = None
    if "email" in raw:
        value = raw["email"]
        if isinstance(value, str) and is_seed_email(value):
            email = value
        else:
            problems.append(
                "email: does not match pattern"
                if isinstance(value, str)
                else "email: must be a string"
            )
    phone: str | None = None
    if "phone_number" in raw:
        value = raw["phone_number"]
        if isinstance(value, str) and "\x00" not in value and not has_lone_surrogate(value):
            phone = value
        else:
            problems.append(
                "phone_number: must be valid Unicode without NUL characters"
                if isinstance(value, str)
                else "phone_number: must be a string"
            )

    if contact_id is not None:
        kind = "id"
    elif email is not None:
        kind = "email"
    elif phone is not None:
        kind = "phone_number"
    else:
        detail = f" ({'; '.join(problems)})" if problems else ""
        raise Invalid(
            f"{path}: must match at least one of {{id}}, {{email}}, {{phone_number}}{detail}"
        )

    name = _extension(path, "name", raw, _NAME)
    custom_data = _extension(path, "custom_data", raw, _CUSTOM)
    return Item(
        index=index,
        raw=raw,
        kind=kind,
        id=contact_id,
        email=email,
        phone_number=phone,
        name=name,
        custom_data=custom_data,
    )


def _extension(path: str, field: str, raw: dict[str, Any], adapter: TypeAdapter[Any]) -> Any:
    if field not in raw or raw[field] is None:
        return None
    try:
        return adapter.validate_python(raw[field], strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first.get("loc", ()))
        message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        raise Invalid(f"{path}.{field}{where}: {message}") from None
