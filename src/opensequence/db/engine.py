"""Engine and session factories for SQLite (embedded) and PostgreSQL (scale-out).

Callers own transactions (DESIGN rule 1): :meth:`Database.transaction` opens one and commits on
success; services only flush. :meth:`Database.reading` opens one that only reads (API key checks
and ``GET`` handlers): on SQLite it does not wait for the writer.
"""

from __future__ import annotations

import asyncio
import contextvars
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from opensequence.db.dialect import register_uuid_arrays


def _normalise(url: str) -> str:
    if url.startswith("postgres://"):
        return "postgresql://" + url[len("postgres://") :]
    return url


def is_postgresql(url: str) -> bool:
    return make_url(_normalise(url)).get_backend_name() == "postgresql"


def async_url(url: str) -> str:
    """The SQLAlchemy async URL for a user-facing ``sqlite:///`` or ``postgresql://`` URL."""
    parsed = make_url(_normalise(url))
    driver = "psycopg" if parsed.get_backend_name() == "postgresql" else "aiosqlite"
    return parsed.set(drivername=f"{parsed.get_backend_name()}+{driver}").render_as_string(
        hide_password=False
    )


def sync_url(url: str) -> str:
    """The sync URL (migrations run synchronously through Alembic)."""
    parsed = make_url(_normalise(url))
    driver = "psycopg" if parsed.get_backend_name() == "postgresql" else "pysqlite"
    return parsed.set(drivername=f"{parsed.get_backend_name()}+{driver}").render_as_string(
        hide_password=False
    )


# SQLite's busy timeout: how long a transaction waits for the write lock before failing with
# ``database is locked`` (PRAGMA busy_timeout, and the same bound on the in-process queue).
SQLITE_BUSY_SECONDS = 30.0


def configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    """WAL lets readers run beside the single writer; the busy timeout makes writers queue
    instead of failing with ``database is locked``; foreign keys are off by default in SQLite."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_SECONDS * 1000)}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin_immediate(conn: Any) -> None:
    # A deferred transaction that later writes can fail with SQLITE_BUSY when another writer got
    # there first, without waiting on busy_timeout. BEGIN IMMEDIATE takes the write lock up front,
    # so concurrent writers queue on the timeout instead.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_reader_connect(dbapi_connection: Any, record: Any) -> None:
    _sqlite_connect(dbapi_connection, record)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA query_only=ON")  # a write in Database.reading() fails at once
    cursor.close()


def _sqlite_begin_deferred(conn: Any) -> None:
    # A read-only transaction: a snapshot of the database (WAL) taken at its first read, beside
    # the writer, without its lock.
    conn.exec_driver_sql("BEGIN")


# The SQLite databases whose in-process writer turn the current task holds (see
# Database.transaction): a transaction opened inside another one of the same database does not
# queue behind itself.
_HOLDING: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "opensequence_sqlite_turns", default=frozenset()
)


class Database:
    """One engine plus its session factory (SQLite: and a second pair for :meth:`reading`).
    Built by the app lifespan, the worker or the CLI."""

    def __init__(self, url: str, *, pool_size: int = 10, echo: bool = False) -> None:
        self.url = url
        self.is_postgresql = is_postgresql(url)
        kwargs: dict[str, Any] = {"echo": echo}
        if self.is_postgresql:
            # No pool_pre_ping: see _ping_if_idle.
            kwargs.update(pool_size=pool_size, max_overflow=pool_size)
        else:
            # Pooled: opening a SQLite connection (and its PRAGMAs) per transaction cost the
            # engine ~30 ms a batch under load. Each transaction still takes the write lock
            # (BEGIN IMMEDIATE), in turn (see transaction).
            kwargs.update(
                pool_size=pool_size,
                max_overflow=pool_size,
                connect_args={"timeout": SQLITE_BUSY_SECONDS},
            )
        self.engine: AsyncEngine = create_async_engine(async_url(url), **kwargs)
        sync_engine = self.engine.sync_engine
        # Reads (reading): SQLite reads a snapshot on connections of its own, which never take
        # the write lock nor a turn. PostgreSQL reads on the same pool in autocommit: under
        # READ COMMITTED every statement of a transaction sees its own snapshot anyway, so
        # each statement reads exactly what it would inside one, without BEGIN and COMMIT (two
        # of a single-statement read's three round trips).
        self._reader_engine: AsyncEngine | None = None
        if self.is_postgresql:
            event.listen(sync_engine, "connect", _postgresql_connect)
            event.listen(sync_engine, "checkin", _note_idle)
            dialect = sync_engine.dialect
            event.listen(
                sync_engine,
                "checkout",
                lambda connection, record, _proxy: _ping_if_idle(dialect, connection, record),
            )
            reads = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        else:
            event.listen(sync_engine, "connect", _sqlite_connect)
            event.listen(sync_engine, "begin", _sqlite_begin_immediate)
            self._reader_engine = reads = create_async_engine(async_url(url), **kwargs)
            event.listen(reads.sync_engine, "connect", _sqlite_reader_connect)
            event.listen(reads.sync_engine, "begin", _sqlite_begin_deferred)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._reads = async_sessionmaker(reads, expire_on_commit=False)
        # SQLite has one writer at a time and every transaction here takes the write lock up
        # front (BEGIN IMMEDIATE). Left to SQLite, the transactions of this process that find
        # it taken poll for it in the busy handler's growing sleeps (1, 2, 5 … 100 ms), and a
        # waiter can lose the race to newer ones again and again: the worker's pipelines waited
        # up to ~340 ms for a lock held a few ms at a time. They queue here instead, in order,
        # and each gets the lock as the previous transaction ends. Other processes (a CLI
        # import beside `serve`) still meet the busy handler.
        self._turn = None if self.is_postgresql else asyncio.Lock()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session inside one transaction: committed on success, rolled back on error."""
        async with self._writer_turn(), self.sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def _writer_turn(self) -> AsyncIterator[None]:
        """SQLite: wait for this process's turn at the write lock (see ``_turn``), unless the
        task already holds it. PostgreSQL: nothing to wait for."""
        if self._turn is None or id(self) in _HOLDING.get():
            yield
            return
        try:
            async with asyncio.timeout(SQLITE_BUSY_SECONDS):
                await self._turn.acquire()
        except TimeoutError:
            raise OperationalError(
                "BEGIN IMMEDIATE", None, sqlite3.OperationalError("database is locked")
            ) from None
        holding = _HOLDING.set(_HOLDING.get() | {id(self)})
        try:
            yield
        finally:
            _HOLDING.reset(holding)
            self._turn.release()

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncSession]:
        """A session that only reads. On SQLite it reads a snapshot beside the writer, without
        the write lock or a turn (a read is not held up by a worker's batch or a sequence
        start), and a write in it fails with ``attempt to write a readonly database``. On
        PostgreSQL its statements run in autocommit, each its own transaction: a read sees what
        it would inside one (READ COMMITTED), without the round trips of BEGIN and COMMIT;
        nothing stops a write there, and one would commit at once."""
        async with self._reads() as session:
            if self.is_postgresql:  # autocommit: SQLAlchemy's begin/commit would only cost CPU
                yield session
            else:
                async with session.begin():
                    yield session

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self._reader_engine is not None:
            await self._reader_engine.dispose()


def _postgresql_connect(dbapi_connection: Any, _record: Any) -> None:
    register_uuid_arrays(dbapi_connection.driver_connection.adapters)


# A pooled PostgreSQL connection idle for longer than this is tested (a round trip) before it is
# handed out.
PING_AFTER_IDLE_SECONDS = 1.0


def _note_idle(_dbapi_connection: Any, record: Any) -> None:
    record.info["idle_since"] = time.monotonic()


def _ping_if_idle(dialect: Any, dbapi_connection: Any, record: Any) -> None:
    """Test a connection that sat in the pool for a while before it is handed out; a dead one
    (the server restarted, a proxy dropped it) is replaced, and the caller never sees it.

    ``pool_pre_ping`` tests every checkout: a round trip per transaction, ~70 us of the
    client's CPU and a wake-up of its server process, four times per batch of the worker and
    twice per API request. A connection handed back moments ago was working moments ago, and
    one that broke since fails its first statement, upon which SQLAlchemy drops every pooled
    connection opened before it; what that costs is the one failed statement, which the worker
    retries and which is the same one a restart in the middle of it would fail anyway."""
    idle_since = record.info.get("idle_since")
    if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
        return
    try:
        dialect.do_ping(dbapi_connection)
    except Exception as exc:
        raise DisconnectionError(f"pooled connection failed its test: {exc}") from exc


def _sqlite_connect(dbapi_connection: Any, record: Any) -> None:
    # Take over transaction control from pysqlite so that BEGIN IMMEDIATE is ours to issue.
    dbapi_connection.isolation_level = None
    configure_sqlite(dbapi_connection, record)
