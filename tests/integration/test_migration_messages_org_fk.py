"""Migration 0009 drops the send records' own foreign key to organizations (the key through
their enrollment remains), and downgrade puts it back; either way, deleting an organization
still removes its send records."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from alembic import command
from sqlalchemy import Engine, create_engine, event, insert, inspect, text

from opensequence.db.engine import sync_url
from opensequence.db.migrate import alembic_config, upgrade
from opensequence.models import Contact, Enrollment, Message, Organization, Run, Sequence


def _engine(url: str, backend: str) -> Engine:
    engine = create_engine(sync_url(url))
    if backend == "sqlite":
        event.listen(engine, "connect", lambda conn, _: conn.execute("PRAGMA foreign_keys=ON"))
    return engine


def _message_keys(url: str, backend: str) -> set[str]:
    engine = _engine(url, backend)
    try:
        with engine.connect() as conn:
            return {
                str(key["referred_table"]) for key in inspect(conn).get_foreign_keys("messages")
            }
    finally:
        engine.dispose()


def _message_shape(url: str, backend: str) -> tuple[object, ...]:
    """Columns, keys and indexes of ``messages`` besides its foreign keys (SQLite rebuilds
    the table: nothing else may change)."""
    engine = _engine(url, backend)
    try:
        with engine.connect() as conn:
            found = inspect(conn)
            return (
                [column["name"] for column in found.get_columns("messages")],
                found.get_pk_constraint("messages")["constrained_columns"],
                sorted(
                    (unique["name"], tuple(unique["column_names"]))
                    for unique in found.get_unique_constraints("messages")
                ),
                sorted(
                    (index["name"], tuple(index["column_names"]))
                    for index in found.get_indexes("messages")
                    if not index.get("duplicates_constraint")
                ),
            )
    finally:
        engine.dispose()


def _organization_delete_removes_its_messages(url: str, backend: str) -> None:
    org, seq, run, contact, enrollment = (uuid.uuid4() for _ in range(5))
    now = datetime.now(UTC)
    stamps = {"created_at": now, "updated_at": now}
    rows = [
        (Organization, {"id": org, "name": "o", "created_at": now}),
        (Contact, {"id": contact, "org_id": org, "custom_data": {}, **stamps}),
        (
            Sequence,
            {"id": seq, "org_id": org, "name": "s", "is_continuous": True, "status": "active"}
            | stamps,
        ),
        (
            Run,
            {"id": run, "org_id": org, "sequence_id": seq, "kind": "start", "total": 1}
            | {"counts": {}, "created_at": now},
        ),
        (
            Enrollment,
            {"id": enrollment, "org_id": org, "sequence_id": seq, "contact_id": contact}
            | {"run_id": run, "status": "completed", "current_step": 1, "attempts": 0}
            | stamps,
        ),
        (
            Message,
            {"id": enrollment, "org_id": org, "enrollment_id": enrollment, "sequence_id": seq}
            | {"contact_id": contact, "step_index": 0, "status": "sent", "attempts": 1}
            | {"message_id": "<m@example.com>"}
            | stamps,
        ),
    ]
    engine = _engine(url, backend)
    try:
        with engine.begin() as conn:
            for model, values in rows:
                conn.execute(insert(model.__table__), values)
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM organizations"))
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM messages")).scalar_one() == 0
    finally:
        engine.dispose()


def test_the_messages_org_key_moves_both_ways(empty_url: str, backend: str) -> None:
    upgrade(empty_url, "0008")
    shape = _message_shape(empty_url, backend)
    upgrade(empty_url, "0009")
    assert _message_keys(empty_url, backend) == {"enrollments"}
    assert _message_shape(empty_url, backend) == shape
    _organization_delete_removes_its_messages(empty_url, backend)

    command.downgrade(alembic_config(empty_url), "0008")
    assert _message_keys(empty_url, backend) == {"enrollments", "organizations"}
    assert _message_shape(empty_url, backend) == shape
    _organization_delete_removes_its_messages(empty_url, backend)

    upgrade(empty_url, "0009")
    assert _message_keys(empty_url, backend) == {"enrollments"}
