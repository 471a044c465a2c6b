"""Migration 0008 narrows the due index's predicate to what only the claim implies, and
downgrade puts the old predicate back."""

from __future__ import annotations

from alembic import command
from sqlalchemy import create_engine, text

from opensequence.db.engine import sync_url
from opensequence.db.migrate import alembic_config, upgrade


def _due_index(url: str, backend: str) -> str:
    engine = create_engine(sync_url(url))
    try:
        with engine.connect() as conn:
            if backend == "sqlite":
                query = "SELECT sql FROM sqlite_master WHERE name = 'ix_enrollments_due'"
            else:
                query = "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_enrollments_due'"
            return str(conn.execute(text(query)).scalar_one())
    finally:
        engine.dispose()


def test_the_due_index_predicate_moves_both_ways(empty_url: str, backend: str) -> None:
    upgrade(empty_url, "0008")
    assert "next_step_at IS NOT NULL" in _due_index(empty_url, backend)
    command.downgrade(alembic_config(empty_url), "0007")
    old = _due_index(empty_url, backend)
    assert "status" in old and "IS NOT NULL" not in old
    upgrade(empty_url, "0008")
    assert "next_step_at IS NOT NULL" in _due_index(empty_url, backend)
