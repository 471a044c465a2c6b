"""Contact identity rules (SPEC §2), pure."""

from __future__ import annotations

import pytest

from opensequence.contacts.identity import normalize_email, normalize_phone


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        ("+1 415-555-0100", "+14155550100"),
        ("+1 (415) 555 0100", "+14155550100"),
        ("+31 6 12345678", "+31612345678"),
        ("+44 20 7183 8750", "+442071838750"),
        ("  +14155550100 ", "+14155550100"),
        ("0612345678", "0612345678"),
        ("415-555-0100", "415-555-0100"),
        ("+1 2", "+1 2"),
        ("+not a number", "+not a number"),
        ("ext. 42", "ext. 42"),
        ("", None),
        ("   ", None),
        (None, None),
    ],
)
def test_normalize_phone(raw: str | None, stored: str | None) -> None:
    assert normalize_phone(raw) == stored


def test_normalize_email_is_lower_case_only() -> None:
    assert normalize_email("Ann.O'Neil+x@Example.COM") == "ann.o'neil+x@example.com"
