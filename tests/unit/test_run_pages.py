"""Run items packed into pages and read back (pure code)."""

from __future__ import annotations

import uuid

from opensequence.runs.pages import OUTCOME_BITS, StoredItem, pack, select_items, unpack


def items(count: int) -> list[StoredItem]:
    contact = uuid.UUID("0190f5b4-0000-7000-8000-000000000001")
    return [
        StoredItem(
            index=i,
            input={"email": f"p{i}@example.com", "custom": {"n": i, "s": "ü\u2028"}},
            contact_id=None if i % 5 == 0 else contact,
            outcome="not_found" if i % 5 == 0 else "added",
            reason=None if i % 7 else f"or[0]: rule {i}",
        )
        for i in range(count)
    ]


def test_pack_splits_into_pages_and_unpack_restores_every_field() -> None:
    given = items(25)
    pages = pack(given, size=10)
    assert [(p.first_index, p.last_index) for p in pages] == [(0, 9), (10, 19), (20, 24)]
    assert [item for page in pages for item in unpack(page.items)] == given
    assert pages[0].outcomes == OUTCOME_BITS["added"] | OUTCOME_BITS["not_found"]


def test_outcome_bits_mark_only_the_outcomes_present() -> None:
    only_added = [i for i in items(12) if i.outcome == "added"][:4]
    (page,) = pack(only_added, size=10)
    assert page.outcomes == OUTCOME_BITS["added"]
    assert len(set(OUTCOME_BITS.values())) == len(OUTCOME_BITS) == 6
    assert pack([]) == []


def test_select_items_honours_cursor_outcome_and_limit() -> None:
    pages = [page.items for page in pack(items(40), size=10)]
    first = select_items(pages, after_index=-1, outcome=None, limit=15)
    assert [i.index for i in first] == list(range(15))
    rest = select_items(pages, after_index=first[-1].index, outcome=None, limit=100)
    assert [i.index for i in rest] == list(range(15, 40))
    missing = select_items(pages, after_index=3, outcome="not_found", limit=3)
    assert [i.index for i in missing] == [5, 10, 15]
    assert select_items(pages, after_index=39, outcome=None, limit=5) == []
