"""Shared pieces of the benchmarks: throwaway databases, set-based seeding, SMTP sinks, a served
API, peak RSS, CPU time of processes."""

from __future__ import annotations

import contextlib
import email
import email.policy
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from aiosmtpd.controller import Controller
from sqlalchemy import insert

from opensequence.db import Database
from opensequence.db.migrate import upgrade
from opensequence.db.types import new_id
from opensequence.models import Contact, Enrollment, Organization, Run, Sequence, SequenceStep

PG_ADMIN_URL = os.environ.get(
    "OPENSEQUENCE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pg_url(name: str) -> str:
    return f"{PG_ADMIN_URL.rpartition('/')[0]}/{name}"


def create_pg_database(prefix: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = pg_url(name)
    upgrade(url)
    return url


def drop_pg_database(url: str) -> None:
    name = url.rpartition("/")[2]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


STEP: dict[str, Any] = {
    "type": "send_emails",
    "data": {
        "from_email": "bench@example.com",
        "email_subject": "Step {{ step.index }} for {{ contact.email }}",
        "email_body": "<p>Hello {{ contact.name }},</p><p>plan {{ contact.custom_data.plan }}"
        ' — <a href="{{ unsubscribe_url }}">unsubscribe</a></p>',
        "email_sender_name": "Bench",
        "email_is_transactional": False,
    },
}


async def seed(db: Database, contacts: int, steps: int = 1) -> uuid.UUID:
    """One continuous sequence of ``steps`` zero-delay email steps and ``contacts`` enrollments
    all due now, written with a handful of bulk INSERTs."""
    now = datetime.now(UTC)
    org_id, sequence_id, run_id = new_id(), new_id(), new_id()
    contact_rows = [
        {
            "id": new_id(),
            "org_id": org_id,
            "email": f"person{i}@example.org",
            "email_normalized": f"person{i}@example.org",
            "name": f"Person {i}",
            "custom_data": {"plan": "pro"},
            "created_at": now,
            "updated_at": now,
        }
        for i in range(contacts)
    ]
    async with db.transaction() as session:
        await session.execute(
            insert(Organization), [{"id": org_id, "name": f"bench-{org_id}", "created_at": now}]
        )
        await session.execute(insert(Contact), contact_rows)
        await session.execute(
            insert(Sequence),
            [
                {
                    "id": sequence_id,
                    "org_id": org_id,
                    "name": "Bench",
                    "is_continuous": True,
                    "status": "active",
                    "started_at": now,
                    "created_at": now,
                    "updated_at": now,
                }
            ],
        )
        await session.execute(
            insert(SequenceStep),
            [
                {"sequence_id": sequence_id, "step_index": i, "action": STEP, "delay_in_minutes": 0}
                for i in range(steps)
            ],
        )
        await session.execute(
            insert(Run),
            [
                {
                    "id": run_id,
                    "org_id": org_id,
                    "sequence_id": sequence_id,
                    "kind": "start",
                    "total": contacts,
                    "counts": {},
                    "created_at": now,
                }
            ],
        )
        await session.execute(
            insert(Enrollment),
            [
                {
                    "id": new_id(),
                    "org_id": org_id,
                    "sequence_id": sequence_id,
                    "contact_id": row["id"],
                    "run_id": run_id,
                    "run_index": i,
                    "status": "active",
                    "current_step": 0,
                    "next_step_at": now,
                    "attempts": 0,
                    "created_at": now,
                    "updated_at": now,
                }
                for i, row in enumerate(contact_rows)
            ],
        )
    return sequence_id


class RecordingSink:
    """An aiosmtpd handler that keeps every accepted message's Message-ID, To and Subject."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ids: Counter[str] = Counter()
        self.keys: dict[tuple[str, str], set[str]] = {}
        self.total = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        message_id = str(message["Message-ID"])
        key = (str(message["To"]), str(message["Subject"]))
        with self.lock:
            self.total += 1
            self.ids[message_id] += 1
            self.keys.setdefault(key, set()).add(message_id)
        return "250 OK"


class CountingSink:
    """The cheapest possible sink: accept and count (throughput runs)."""

    def __init__(self) -> None:
        self.total = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.total += 1
        return "250 OK"


class PipeliningCountingSink(CountingSink):
    """:class:`CountingSink` whose EHLO reply announces PIPELINING (RFC 2920), as Postfix's and
    Exim's do. aiosmtpd reads commands in order however many arrive in one read; it only does
    not say so."""

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]


def start_ready(script: str, *args: str) -> subprocess.Popen[str]:
    """``python bench/<script> ARGS`` in its own process, returned once it prints ``ready``."""
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name(script)), *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready", f"{script} did not start"
    return process


def start_sink(handler: Any, port: int | None = None) -> tuple[Controller, int]:
    port = port or free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    return controller, port


def subprocess_env(database_url: str, mail_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENSEQUENCE_")}
    env.update(
        OPENSEQUENCE_DATABASE_URL=database_url,
        OPENSEQUENCE_MAIL_URL=mail_url,
        OPENSEQUENCE_WORKER_POLL_SECONDS="0.1",
        **extra,
    )
    return env


WORKER = [sys.executable, "-m", "opensequence", "worker"]


@contextlib.contextmanager
def fresh_database(backend: str) -> Iterator[str]:
    """A new, migrated database URL for ``backend`` (sqlite or postgresql), removed afterwards."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{Path(tmp) / 'bench.db'}"
            upgrade(url)
            yield url
        return
    url = create_pg_database("osq_bench")
    try:
        yield url
    finally:
        drop_pg_database(url)


@contextlib.contextmanager
def served_api(
    database_url: str,
    *,
    extra_env: dict[str, str] | None = None,
    command: str = "api",
    cwd: str | None = None,
) -> Iterator[str]:
    """``opensequence api`` (or ``command``, e.g. ``serve``) in a subprocess on a free port,
    run in ``cwd``; yields its base URL once it answers."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OPENSEQUENCE_")},
        "OPENSEQUENCE_DATABASE_URL": database_url,
        "OPENSEQUENCE_RATE_LIMIT": "1000000/minute",
        **(extra_env or {}),
    }
    with subprocess.Popen(
        [sys.executable, "-m", "opensequence", command, "--port", str(port)],
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as process:
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"opensequence {command} did not start")
                time.sleep(0.1)
            yield base
        finally:
            process.terminate()
            process.wait(timeout=30)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds(pid: int | None) -> float:
    """User plus system CPU of ``pid`` (``/proc/<pid>/stat`` fields 14 and 15, in ticks); NaN
    without ``/proc`` (not Linux) or without a pid."""
    if pid is None:
        return float("nan")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds() -> float:
    """User plus system CPU of every PostgreSQL server process on this machine (backends and
    the WAL writer, checkpointer and the rest), so run nothing else against the server while
    measuring. A process that exits takes its CPU with it: read before closing connections.
    NaN without ``/proc``."""
    proc = Path("/proc")
    if not proc.is_dir():
        return float("nan")
    total = 0.0
    for entry in proc.glob("[0-9]*"):
        try:
            if (entry / "comm").read_text().strip() == "postgres":
                total += cpu_seconds(int(entry.name))
        except OSError:
            continue
    return total


def percentile(values: list[float], fraction: float) -> float:
    """The value below which ``fraction`` of ``values`` lie (nearest rank); NaN for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
