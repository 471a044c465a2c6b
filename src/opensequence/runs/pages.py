"""How a run's per-item outcomes are stored: in pages of up to ``PAGE_SIZE`` items (pure code).

An add-contacts request of 10,000 items used to write 10,000 result rows, which cost more than
its enrollments. A page is one row holding a JSON array of items in request order, plus what
the listing needs to skip pages without reading them: the first and last item index, and a
bitmask of the outcomes present. Reading ``?outcome=…&cursor=…&limit=…`` then touches only pages
past the cursor that hold that outcome.

An item is stored as ``[index, input, contact id (32 hex digits) or null, outcome, reason or
null]``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from opensequence.models.run import OUTCOMES

PAGE_SIZE = 1000
OUTCOME_BITS = {name: 1 << position for position, name in enumerate(OUTCOMES)}


@dataclass(slots=True)
class StoredItem:
    index: int
    input: dict[str, Any]
    contact_id: uuid.UUID | None
    outcome: str
    reason: str | None


@dataclass(frozen=True)
class Page:
    first_index: int
    last_index: int
    outcomes: int
    items: str


def pack(items: Sequence[StoredItem], size: int = PAGE_SIZE) -> list[Page]:
    """Pages of ``size`` consecutive items (the items in ascending index order)."""
    pages: list[Page] = []
    for start in range(0, len(items), size):
        part = items[start : start + size]
        mask = 0
        for outcome in {item.outcome for item in part}:
            mask |= OUTCOME_BITS[outcome]
        encoded = json.dumps(
            [
                [
                    item.index,
                    item.input,
                    None if item.contact_id is None else item.contact_id.hex,
                    item.outcome,
                    item.reason,
                ]
                for item in part
            ],
            separators=(",", ":"),
        )
        pages.append(Page(part[0].index, part[-1].index, mask, encoded))
    return pages


def unpack(text: str) -> Iterator[StoredItem]:
    for index, given, contact_id, outcome, reason in json.loads(text):
        yield StoredItem(
            index, given, None if contact_id is None else uuid.UUID(contact_id), outcome, reason
        )


def select_items(
    pages: Iterable[str], *, after_index: int, outcome: str | None, limit: int
) -> list[StoredItem]:
    """The first ``limit`` items past ``after_index`` (with ``outcome``, when given) from pages
    in ascending order."""
    found: list[StoredItem] = []
    for text in pages:
        for item in unpack(text):
            if item.index <= after_index or (outcome is not None and item.outcome != outcome):
                continue
            found.append(item)
            if len(found) == limit:
                return found
    return found
