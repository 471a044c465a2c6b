"""Pure helpers: error field paths, ids, timestamps, settings validation."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from opensequence.api.errors import field_path, validation_message
from opensequence.config import MAX_PUBLIC_URL, Settings
from opensequence.db.engine import async_url, sync_url
from opensequence.db.types import iso, new_id
from opensequence.mail.message import build_message
from opensequence.unsubscribe import make_token, unsubscribe_url

SEED_ID = (
    r"^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[1-8][0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}"
    r"|00000000-0000-0000-0000-000000000000|ffffffff-ffff-ffff-ffff-ffffffffffff)$"
)


def test_field_path_formats_pydantic_locations() -> None:
    assert field_path(("body", "contacts", 3, "email")) == "contacts[3].email"
    assert field_path(("query", "limit")) == "limit"
    assert field_path(("body",)) == "body"
    assert field_path(("body", "steps", 0, "action", "send_emails", "data", "from_email")) == (
        "steps[0].action.send_emails.data.from_email"
    )


def test_validation_message_is_bounded_and_deduplicated() -> None:
    errors = [{"loc": ("body", "x", i), "msg": "bad", "type": "t"} for i in range(1000)]
    message = validation_message(errors)
    assert message.startswith("x[0]: bad; x[1]: bad")
    assert len(message) <= 2000
    assert validation_message([{"loc": ("body", 3), "type": "json_invalid", "msg": "x"}]) == (
        "body: malformed JSON"
    )


def test_new_ids_are_uuid7_and_match_the_seed_pattern() -> None:
    ids = [new_id() for _ in range(500)]
    assert len(set(ids)) == 500
    assert all(i.version == 7 and re.match(SEED_ID, str(i)) for i in ids)


def test_iso_is_utc_with_z() -> None:
    moment = datetime(2024, 9, 14, 17, 34, 49, 121000, tzinfo=timezone(timedelta(hours=2)))
    assert iso(moment) == "2024-09-14T15:34:49.121Z"
    assert iso(None) is None
    assert iso(datetime(2024, 1, 1, tzinfo=UTC)) == "2024-01-01T00:00:00.000Z"


def test_database_urls_map_to_drivers() -> None:
    assert async_url("sqlite:///./x.db") == "sqlite+aiosqlite:///./x.db"
    assert sync_url("sqlite:///./x.db") == "sqlite+pysqlite:///./x.db"
    assert async_url("postgresql://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert async_url("postgres://h/db") == "postgresql+psycopg://h/db"


def test_settings_reject_unknown_databases_and_bad_rates() -> None:
    with pytest.raises(ValidationError, match="database_url"):
        Settings(_env_file=None, database_url="mysql://x")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="rate_limit"):
        Settings(_env_file=None, rate_limit="often")  # type: ignore[call-arg]
    assert Settings(_env_file=None, rate_limit="5/second").rate_limit == "5/second"  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "url",
    [
        "mail.example.com",  # no scheme
        "ftp://mail.example.com",
        "https://",
        "https://mail.example.com/a b",
        "https://mail.example.com/\r\nBcc: x@example.org",  # would write a header of its own
        "https://exämple.com",
        "https://example.com/" + "p" * MAX_PUBLIC_URL,  # the unsubscribe header outgrows a line
    ],
)
def test_settings_reject_public_urls_that_cannot_go_into_a_header(url: str) -> None:
    with pytest.raises(ValidationError, match="public_url"):
        Settings(_env_file=None, public_url=url)  # type: ignore[call-arg]


def test_the_longest_public_url_still_makes_an_unsubscribe_header_of_one_line() -> None:
    url = "https://example.com/" + "p" * (MAX_PUBLIC_URL - len("https://example.com/"))
    settings = Settings(_env_file=None, public_url=url)  # type: ignore[call-arg]
    link = unsubscribe_url(settings.public_url, make_token("s", new_id(), new_id()))
    raw = build_message(
        from_email="a@example.com",
        sender_name=None,
        to_email="b@example.org",
        subject="Hi",
        html_body="<p>hi</p>",
        message_id="<1@example.com>",
        date=datetime(2026, 1, 1, tzinfo=UTC),
        unsubscribe_url=link,
    )
    assert f"List-Unsubscribe: <{link}>\r\n".encode() in raw
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
