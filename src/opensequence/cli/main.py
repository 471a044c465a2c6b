"""``opensequence``: serve | api | worker | db upgrade | keys | contacts import."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import sys
import threading
import uuid
from contextlib import suppress
from typing import TYPE_CHECKING, Annotated

import typer

from opensequence.api.app import BackgroundFactory
from opensequence.auth import service as auth
from opensequence.cli.common import (
    bind_port,
    cannot_listen,
    fail,
    flag_errors,
    load_settings,
    migrate,
    run_with_db,
    setup_logging,
)
from opensequence.cli.contacts import contacts_app
from opensequence.config import Settings
from opensequence.db import Database
from opensequence.db.types import iso
from opensequence.heap import settle

if TYPE_CHECKING:
    import uvicorn

app = typer.Typer(
    help="OpenSequence: self-hostable outbound sequencing engine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database administration.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(contacts_app, name="contacts")

METRICS_HOST = "127.0.0.1"

HostOpt = Annotated[str, typer.Option("--host", help="Interface to bind.")]
PortOpt = Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")]


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply database migrations."""
    settings = load_settings()
    migrate(settings.database_url)
    typer.echo("database is up to date")


async def _bootstrap(db: Database) -> str | None:
    """On an empty database: create an organization and one full-access key, once."""
    async with db.transaction() as session:
        if await auth.count_orgs(session):
            return None
        org = await auth.get_or_create_org(session, "default")
        created = await auth.create_key(session, org)
        return created.key


@app.command()
def serve(host: HostOpt = "127.0.0.1", port: PortOpt = 8000) -> None:
    """API and delivery worker in one process (the embedded default). Migrates first."""
    import uvicorn

    from opensequence.api.app import create_app

    settings = load_settings()
    setup_logging()
    check_mail_url(settings)  # the worker inside would otherwise die unseen
    check_redis_url(settings)
    sock = bind_port(host, port, port_flag="--port", host_flag="--host")
    migrate(settings.database_url)
    key = run_with_db(settings, _bootstrap)
    if key:
        typer.echo(f"API key: {key}")
    application = create_app(settings, background=_serve_background())
    settle()
    _exit_0_after_sigterm()
    run_server(
        uvicorn.Config(application, host=host, port=port, log_config=None),
        sock,
        announce=f"OpenSequence listening on http://{_url_host(host)}:{port} (docs at /docs)",
    )


def _url_host(host: str) -> str:
    """``host`` as a URL writes it: an IPv6 address in brackets (``http://[::1]:8000``), and
    ``--host ""`` (every IPv4 interface, as for ``bind``) as ``0.0.0.0``."""
    return f"[{host}]" if ":" in host else host or "0.0.0.0"


def run_server(config: uvicorn.Config, sock: socket.socket, *, announce: str) -> None:
    """Serve on ``sock`` (from :func:`bind_port`), as ``uvicorn.run`` would, and print
    ``announce`` once the app has started and the socket listens: the first request after the
    line is answered. Printed before uvicorn started, the line was false for a moment, and
    false for good when the port was busy."""
    import uvicorn
    from uvicorn.main import STARTUP_FAILURE

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                typer.echo(announce)

    server = AnnouncingServer(config)
    with sock, suppress(KeyboardInterrupt):  # SIGINT: a graceful stop, as under uvicorn.run
        server.run(sockets=[sock])
    if not server.started:
        raise typer.Exit(STARTUP_FAILURE)


def _exit_0_after_sigterm() -> None:
    """uvicorn shuts down gracefully on SIGTERM, then raises the signal again under the handler
    that was there before it: the default one killed the process (exit 143) once the graceful
    part was done. Under this one the command ends with exit 0, as SPEC §7 says."""

    def exit_0(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, exit_0)


def check_mail_url(settings: Settings) -> None:
    """Exit 2 naming OPENSEQUENCE_MAIL_URL when no transport can be built from it."""
    from opensequence.mail.transports import transport_from_url

    try:
        transport_from_url(settings.mail_url)
    except ValueError as exc:
        fail(f"OPENSEQUENCE_MAIL_URL: {exc}")


def check_redis_url(settings: Settings) -> None:
    """Exit 2 naming OPENSEQUENCE_REDIS_URL when no rate-limit storage can be built from it:
    the app builds it at startup, where it was a traceback after `listening` and exit 3. A
    server that does not answer is not found here (nothing connects until a request)."""
    from opensequence.api.ratelimit import RateLimiter

    try:
        RateLimiter(settings.rate_limit, settings.redis_url)
    except ValueError as exc:
        fail(f"OPENSEQUENCE_REDIS_URL: {exc}")


def _serve_background() -> list[BackgroundFactory]:
    from opensequence.engine.runner import background_worker

    return [background_worker()]


@app.command()
def worker(
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, max=1000, help="Sends in flight at once.")
    ] = 20,
    metrics_port: Annotated[
        int | None,
        typer.Option("--metrics-port", min=1, max=65535, help="Serve /metrics on this port."),
    ] = None,
) -> None:
    """Delivery engine only (scale-out role). Migrates first. SIGTERM/SIGINT: stop claiming,
    finish in-flight sends, release unused claims, exit 0."""
    from prometheus_client import CollectorRegistry, start_http_server

    from opensequence.engine.runner import run_worker

    settings = load_settings()
    setup_logging()
    check_mail_url(settings)
    registry = None
    if metrics_port is not None:
        # Held while migrating: /metrics answers once the worker is about to start its loop.
        reserved = bind_port(METRICS_HOST, metrics_port, port_flag="--metrics-port")
    migrate(settings.database_url)
    if metrics_port is not None:
        reserved.close()
        registry = CollectorRegistry()
        try:
            start_http_server(metrics_port, addr=METRICS_HOST, registry=registry)
        except OSError as exc:
            cannot_listen("--metrics-port", METRICS_HOST, metrics_port, exc)
    settle()

    async def work(db: Database) -> None:
        await run_worker(
            db, settings, concurrency=concurrency, registry=registry, handle_signals=True
        )

    run_with_db(settings, work)


@app.command()
def api(
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    workers: Annotated[int, typer.Option("--workers", min=1, help="API processes.")] = 1,
) -> None:
    """API only (scale-out role). Migrates first (serialised across processes)."""
    import uvicorn

    settings = load_settings()
    setup_logging()
    check_redis_url(settings)
    sock = bind_port(host, port, port_flag="--port", host_flag="--host")
    migrate(settings.database_url)
    _exit_0_after_sigterm()
    processes = "" if workers == 1 else f", {workers} processes"
    announce = (
        f"OpenSequence API listening on http://{_url_host(host)}:{port} (docs at /docs{processes})"
    )
    if workers == 1:
        config = uvicorn.Config(
            "opensequence.api.factory:app", factory=True, host=host, port=port, log_config=None
        )
        run_server(config, sock, announce=announce)
        return
    answered = threading.Event()
    threading.Thread(
        target=_announce_once_answering,
        args=(host, port, announce, answered),
        daemon=True,
    ).start()
    try:
        with sock, _StopSignals() as stop_signals:
            # uvicorn serves (and its worker processes inherit) a duplicate of sock
            uvicorn.run(
                "opensequence.api.factory:app",
                factory=True,
                fd=sock.fileno(),
                workers=workers,
                log_config=None,
            )
    finally:
        answered.set()
    if not stop_signals.seen:
        from uvicorn.main import STARTUP_FAILURE

        fail("the API processes stopped: one failed to start (its error is above)", STARTUP_FAILURE)


class _StopSignals:
    """Whether SIGINT or SIGTERM reached this process within the block. uvicorn's supervisor of
    ``--workers N`` returns normally both when told to stop and when a process failed to start
    (it stops them all rather than restart one that would fail again), and its signal handlers
    replace ours; the two are told apart through the interpreter's wakeup fd, to which every
    signal with a Python handler writes its number, whichever handler that is. (The supervisor
    runs no event loop, the fd's other user.)"""

    def __init__(self) -> None:
        self.seen = False

    def __enter__(self) -> _StopSignals:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._previous = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.set_wakeup_fd(self._previous)
        received = b""
        with suppress(BlockingIOError):
            while chunk := self._reader.recv(4096):
                received += chunk
        self.seen = bool({signal.SIGINT, signal.SIGTERM} & set(received))
        self._reader.close()
        self._writer.close()


def _announce_once_answering(host: str, port: int, announce: str, stop: threading.Event) -> None:
    """Print ``announce`` once a ``GET /healthz`` on ``host:port`` is answered, as ``serve``
    prints its line once the app has started: with ``--workers N`` the processes start on
    their own, and the socket listens only once the first of them has started, so the
    first answer says that one serves. Gives up when ``stop`` is set (the server ended before
    it answered)."""
    target = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    while not stop.is_set():
        connection = http.client.HTTPConnection(target, port, timeout=1.0)
        try:
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                typer.echo(announce)
                return
        except (OSError, http.client.HTTPException):
            pass
        finally:
            connection.close()
        stop.wait(0.05)


@keys_app.command("create")
def keys_create(
    org: Annotated[str, typer.Option("--org", help="Organization name (created if needed).")],
    scope: Annotated[
        list[str] | None, typer.Option("--scope", help="Scope; repeat for several.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create an API key (shown once)."""
    settings = load_settings()
    with flag_errors("--scope"):
        auth.normalise_scopes(scope)
    migrate(settings.database_url)

    async def work(db: Database) -> auth.CreatedKey:
        async with db.transaction() as session:
            with flag_errors("--org"):
                organization = await auth.get_or_create_org(session, org)
            return await auth.create_key(session, organization, scope)

    created = run_with_db(settings, work)
    if as_json:
        typer.echo(
            json.dumps(
                {"org_id": str(created.org_id), "key_id": str(created.key_id), "key": created.key}
            )
        )
    else:
        typer.echo(created.key)


@keys_app.command("list")
def keys_list(
    org: Annotated[str, typer.Option("--org", help="Organization name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List an organization's keys (never the secrets)."""
    settings = load_settings()
    migrate(settings.database_url)

    async def work(db: Database) -> list[dict[str, object]]:
        async with db.transaction() as session:
            with flag_errors("--org"):
                organization = await auth.find_org(session, org)
            rows = await auth.list_keys(session, organization)
            return [
                {
                    "key_id": str(row.id),
                    "prefix": row.prefix,
                    "scopes": row.scopes,
                    "created_at": iso(row.created_at),
                    "revoked_at": iso(row.revoked_at),
                }
                for row in rows
            ]

    keys = run_with_db(settings, work)
    if as_json:
        typer.echo(json.dumps(keys))
        return
    for key in keys:
        state = f"revoked {key['revoked_at']}" if key["revoked_at"] else "active"
        typer.echo(f"{key['key_id']}  {key['prefix']}…  {','.join(key['scopes'])}  {state}")  # type: ignore[arg-type]


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key_id to revoke.")]) -> None:
    """Revoke a key; requests with it answer 401 from now on."""
    settings = load_settings()
    try:
        parsed = uuid.UUID(key_id)
    except ValueError:
        fail(f"KEY_ID: {key_id!r} is not a key id (a UUID)")
    migrate(settings.database_url)

    async def work(db: Database) -> str | None:
        async with db.transaction() as session:
            with flag_errors("KEY_ID"):
                return iso(await auth.revoke_key(session, parsed))

    revoked_at = run_with_db(settings, work)
    typer.echo(f"revoked {parsed} at {revoked_at}")


def main() -> None:
    """The ``opensequence`` command. A usage error (a missing option, a value out of range, an
    unknown option) is one line naming the flag and exit 2, as SPEC §7 says of usage errors:
    Typer's own form is five lines in a box."""
    try:  # a recent Typer carries its own copy of click
        from typer._click import exceptions as click
    except ImportError:  # pragma: no cover - an older Typer uses click itself
        from click import exceptions as click  # type: ignore[no-redef]

    try:
        code = app(standalone_mode=False)
    except click.NoArgsIsHelpError as exc:
        exc.show()  # the help, as for --help
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        where = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        message = " ".join(exc.format_message().split())
        typer.echo(f"error: {message}{where}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("Aborted.", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
