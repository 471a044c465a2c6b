"""Migration 0010 drops the send records' unused ``(org_id, from_email, sent_at)`` index, and
downgrade puts it back; nothing else about the table changes."""

from __future__ import annotations

from alembic import command
from sqlalchemy import create_engine, inspect

from opensequence.db.engine import sync_url
from opensequence.db.migrate import alembic_config, upgrade

_NAME = "ix_messages_org_id_from_email_sent_at"


def _indexes(url: str) -> dict[str, tuple[str, ...]]:
    engine = create_engine(sync_url(url))
    try:
        with engine.connect() as conn:
            return {
                str(index["name"]): tuple(str(c) for c in index["column_names"])
                for index in inspect(conn).get_indexes("messages")
                if not index.get("duplicates_constraint")
            }
    finally:
        engine.dispose()


def test_the_unused_sender_index_goes_and_comes_back(empty_url: str) -> None:
    upgrade(empty_url, "0009")
    before = _indexes(empty_url)
    assert before[_NAME] == ("org_id", "from_email", "sent_at")

    upgrade(empty_url, "0010")
    after = _indexes(empty_url)
    assert _NAME not in after
    assert after == {name: columns for name, columns in before.items() if name != _NAME}

    command.downgrade(alembic_config(empty_url), "0009")
    assert _indexes(empty_url) == before
