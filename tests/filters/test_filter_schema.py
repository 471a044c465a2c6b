"""The filter schema and ``explain``: pure, no database."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from opensequence.errors import Invalid
from opensequence.filters import (
    ALL_CONTACTS_OUTPUT,
    ContactFacts,
    all_contacts_output,
    explain,
    matches,
    parse_filter,
    referenced_sequence_ids,
)

CONTACT = ContactFacts(
    id=uuid.UUID("0190f0a0-0000-7000-8000-000000000001"),
    email="Jane@Example.COM",
    created_at=datetime(2024, 9, 14, 15, 34, 49, 121000, tzinfo=UTC),
    enrolled_sequence_ids=frozenset({uuid.UUID("0190f0a0-0000-7000-8000-0000000000aa")}),
)


def group(*filters: dict[str, object]) -> dict[str, object]:
    return {"and": list(filters)}


DOMAIN_OTHER = {"type": "contacts_email_domain_name_in", "domain_name_in": ["other.org"]}
IDS_OTHER = {"type": "contact_id_in", "contact_ids": [str(uuid.uuid4())]}
ALL = {"type": "all_contacts"}


def test_explain_names_the_first_failing_filter_of_every_group() -> None:
    f = parse_filter({"or": [group(DOMAIN_OTHER, IDS_OTHER), group(ALL, IDS_OTHER)]})
    assert not matches(f, CONTACT)
    assert explain(f, CONTACT) == "or[0]: contacts_email_domain_name_in; or[1]: contact_id_in"


def test_explain_is_none_when_any_group_matches() -> None:
    f = parse_filter({"or": [group(DOMAIN_OTHER), group(ALL)]})
    assert matches(f, CONTACT)
    assert explain(f, CONTACT) is None
    assert explain(None, CONTACT) is None


def test_empty_and_group_matches_everyone() -> None:
    f = parse_filter({"or": [{"and": []}]})
    assert matches(f, CONTACT) and explain(f, CONTACT) is None


def test_domain_compares_the_part_after_the_last_at_ignoring_ascii_case() -> None:
    def dom(*names: str) -> object:
        return parse_filter(
            {
                "or": [
                    group({"type": "contacts_email_domain_name_in", "domain_name_in": list(names)})
                ]
            }
        )

    assert matches(dom("example.com"), CONTACT)
    assert not matches(dom("jane@example.com"), CONTACT)
    assert not matches(dom("ample.com"), CONTACT)
    assert not matches(dom(), CONTACT)
    quoted = ContactFacts(CONTACT.id, '"a@b"@Corp.io', CONTACT.created_at, frozenset())
    assert matches(dom("corp.io"), quoted)
    no_email = ContactFacts(CONTACT.id, None, CONTACT.created_at, frozenset())
    assert explain(dom("example.com"), no_email) == "or[0]: contacts_email_domain_name_in"


def test_created_at_bounds_are_inclusive_and_null_is_open() -> None:
    def between(after: str | None, before: str | None) -> object:
        return parse_filter(
            {
                "or": [
                    group({"type": "contacts_created_at_between", "after": after, "before": before})
                ]
            }
        )

    assert matches(between("2024-09-14T15:34:49.121Z", "2024-09-14T15:34:49.121Z"), CONTACT)
    assert matches(between("2024-09-14T17:34:49.121+02:00", None), CONTACT)
    assert not matches(between("2024-09-14T15:34:49.121001Z", None), CONTACT)
    assert not matches(between(None, "2024-09-14T15:34:49.120999Z"), CONTACT)
    assert matches(between(None, None), CONTACT)


def test_affected_by_sequence_and_referenced_ids() -> None:
    seq = "0190F0A0-0000-7000-8000-0000000000AA"
    f = parse_filter(
        {
            "or": [
                group({"type": "contacts_affected_by_sequence", "sequence_id": seq}),
                group({"type": "contacts_affected_by_sequence", "sequence_id": "my-custom-id"}),
            ]
        }
    )
    assert matches(f, CONTACT)
    assert referenced_sequence_ids(f) == {uuid.UUID(seq)}
    assert referenced_sequence_ids(None) == set()
    only_custom = parse_filter(
        {"or": [group({"type": "contacts_affected_by_sequence", "sequence_id": "my-custom-id"})]}
    )
    assert explain(only_custom, CONTACT) == "or[0]: contacts_affected_by_sequence"


def test_contact_ids_are_matched_case_insensitively_and_returned_lower_case() -> None:
    f = parse_filter(
        {"or": [group({"type": "contact_id_in", "contact_ids": [str(CONTACT.id).upper()]})]}
    )
    assert f is not None and matches(f, CONTACT)
    assert f.to_wire()["or"][0]["and"][0]["contact_ids"] == [str(CONTACT.id)]


def test_wire_form_round_trips() -> None:
    raw = {
        "or": [
            group(
                {
                    "type": "contacts_created_at_between",
                    "before": "2024-09-14T15:34:49.121Z",
                    "after": None,
                }
            )
        ]
    }
    f = parse_filter(raw)
    assert f is not None
    assert f.to_wire() == {
        "or": [
            {
                "and": [
                    {
                        "type": "contacts_created_at_between",
                        "after": None,
                        "before": "2024-09-14T15:34:49.121Z",
                    }
                ]
            }
        ]
    }
    assert parse_filter(f.to_wire()) == f


@pytest.mark.parametrize(
    "raw",
    [
        {"or": []},
        {},
        {"or": [{"and": [{"type": "nope"}]}]},
        {"or": [{"and": [{"type": "contact_id_in"}]}]},
        {"or": [{"and": [{"type": "contact_id_in", "contact_ids": ["not-a-uuid"]}]}]},
        {"or": [{"and": [{"type": "contacts_created_at_between", "after": None}]}]},
        {
            "or": [
                {
                    "and": [
                        {
                            "type": "contacts_created_at_between",
                            "after": "yesterday",
                            "before": None,
                        }
                    ]
                }
            ]
        },
        {"or": [{"and": [{"type": "contacts_email_domain_name_in", "domain_name_in": ["a\x00"]}]}]},
        {"or": [{"and": [{"type": "contacts_affected_by_sequence"}]}]},
    ],
)
def test_malformed_filters_are_rejected(raw: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        parse_filter(raw)


def test_filters_in_all_groups_are_at_most_200() -> None:
    """Each contacts_affected_by_sequence is a subquery: 100 groups of 100 took PostgreSQL 82 s
    and ~3 GB per connection to plan."""
    affected = {"type": "contacts_affected_by_sequence", "sequence_id": str(uuid.uuid4())}
    assert parse_filter({"or": [{"and": [affected] * 100}] * 2}) is not None
    with pytest.raises(ValidationError, match="201 filters in all groups; at most 200"):
        parse_filter({"or": [{"and": [affected] * 100}] * 2 + [{"and": [affected]}]})


def test_not_an_object_and_null() -> None:
    assert parse_filter(None) is None
    with pytest.raises(Invalid):
        parse_filter([])  # type: ignore[arg-type]


def test_all_contacts_output_copy() -> None:
    copy = all_contacts_output()
    assert copy == ALL_CONTACTS_OUTPUT == {"or": [{"and": [{"type": "all_contacts"}]}]}
    copy["or"].clear()
    assert ALL_CONTACTS_OUTPUT["or"]
    assert matches(parse_filter(ALL_CONTACTS_OUTPUT), CONTACT)
