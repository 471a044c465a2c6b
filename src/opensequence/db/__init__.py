"""Database plumbing: engine and session factories, portable column types, dialect helpers."""

from opensequence.db.engine import Database, async_url, is_postgresql, sync_url

__all__ = ["Database", "async_url", "is_postgresql", "sync_url"]
