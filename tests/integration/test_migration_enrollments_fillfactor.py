"""Migration 0011 keeps 40 % of the enrollments' pages free on PostgreSQL (for claims updated in
place) and downgrade takes the setting away; on SQLite it changes nothing."""

from __future__ import annotations

from alembic import command
from sqlalchemy import create_engine, text

from opensequence.db.engine import sync_url
from opensequence.db.migrate import alembic_config, upgrade


def _options(url: str, backend: str) -> list[str] | str:
    """PostgreSQL: the table's storage options. SQLite: the table's definition."""
    engine = create_engine(sync_url(url))
    try:
        with engine.connect() as conn:
            if backend == "sqlite":
                query = "SELECT sql FROM sqlite_master WHERE name = 'enrollments'"
                return str(conn.execute(text(query)).scalar_one())
            query = "SELECT reloptions FROM pg_class WHERE relname = 'enrollments'"
            return list(conn.execute(text(query)).scalar_one() or [])
    finally:
        engine.dispose()


def test_the_fillfactor_comes_and_goes(empty_url: str, backend: str) -> None:
    upgrade(empty_url, "0010")
    before = _options(empty_url, backend)
    upgrade(empty_url, "0011")
    after = _options(empty_url, backend)
    if backend == "postgresql":
        assert before == []
        assert after == ["fillfactor=60"]
    else:
        assert after == before
    command.downgrade(alembic_config(empty_url), "0010")
    assert _options(empty_url, backend) == before
