"""Plumbing shared by the load bench and the fault drills: a recording SMTP sink, worker
processes, seeding through the real API (in-process), and the delivery accounting.

The accounting follows the engine's crash drill: the sink counts deliveries per Message-ID and
per (recipient, step); afterwards every send record must be ``sent`` and have reached the sink,
no received Message-ID may lack a send record, a Message-ID may arrive twice only for a send that
was in flight, and no (recipient, step) may arrive under two Message-IDs (which would be a true
duplicate: two send records for one step).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from aiosmtpd.controller import Controller
from asgi_lifespan import LifespanManager
from sqlalchemy import text

from _common import free_port
from opensequence.api.app import create_app
from opensequence.auth import service as auth
from opensequence.config import Settings
from opensequence.db import Database
from opensequence.engine import worker as engine_worker

WORKER = [sys.executable, "-m", "opensequence", "worker"]
CONCURRENCY = 20
# The worker's default loops; each records its sends' outcomes in chunks of CONCURRENCY * 5, so a
# fault leaves at most that many sent-but-unrecorded messages per loop.
PIPELINES = engine_worker.PIPELINES


def email_step(subject: str) -> dict[str, Any]:
    return {
        "action": {
            "type": "send_emails",
            "data": {
                "from_email": "drill@example.com",
                "email_subject": subject,
                "email_body": "<p>Hi {{ contact.name }}</p>",
                "email_sender_name": "Drill",
                "email_is_transactional": True,
            },
        },
        "delay_in_minutes": 0,
    }


class RecordingSink:
    """aiosmtpd handler: every accepted DATA counted by Message-ID and by (recipient, subject);
    subjects are ``step N`` so the pair identifies one step of one enrollment."""

    def __init__(self) -> None:
        self.ids: Counter[str] = Counter()
        self.keys: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.total = 0
        self.first_seen: dict[str, float] = {}
        self._lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        message_id = str(parsed["Message-ID"])
        with self._lock:
            self.ids[message_id] += 1
            self.first_seen.setdefault(message_id, time.monotonic())
            for recipient in envelope.rcpt_tos:
                self.keys[(recipient, str(parsed["Subject"]))].add(message_id)
            self.total += 1
        return "250 OK"


@dataclass
class SinkServer:
    """The sink on a fixed loopback port that can be taken down and brought back."""

    sink: RecordingSink = field(default_factory=RecordingSink)
    port: int = field(default_factory=free_port)
    controller: Controller | None = None

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}?tls=none"

    def start(self) -> None:
        self.controller = Controller(self.sink, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None


def subprocess_env(database_url: str, **extra: str) -> dict[str, str]:
    """The parent's environment without any OPENSEQUENCE_* setting, plus ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENSEQUENCE_")}
    env["OPENSEQUENCE_DATABASE_URL"] = database_url
    env["OPENSEQUENCE_WORKER_POLL_SECONDS"] = "0.2"
    env.update(extra)
    return env


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A worker whose log goes to ``log`` (appended: a file, never a pipe nobody drains)."""
    with log.open("ab") as sink:
        return subprocess.Popen(
            [*WORKER, "--concurrency", str(CONCURRENCY)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )


def count_in_logs(logs: list[Path], needle: str) -> int:
    return sum(log.read_text(errors="replace").count(needle) for log in logs if log.exists())


def stop_workers(workers: list[subprocess.Popen[bytes]], timeout: float = 60) -> list[int]:
    """SIGTERM (the worker finishes in-flight sends and exits 0); SIGKILL past ``timeout``."""
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    codes = []
    for worker in workers:
        try:
            codes.append(worker.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            worker.kill()
            codes.append(worker.wait())
    return codes


async def create_key(database_url: str, org: str) -> str:
    db = Database(database_url)
    try:
        async with db.transaction() as session:
            organization = await auth.get_or_create_org(session, org)
            return (await auth.create_key(session, organization, None)).key
    finally:
        await db.dispose()


async def seed_sequence(database_url: str, contacts: int, steps: int) -> str:
    """A continuous sequence of ``steps`` immediate email steps with ``contacts`` new contacts
    added through ``POST /sequences/{id}/contacts`` (the real API, in-process). Returns its id."""
    key = await create_key(database_url, "drill")
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=database_url,
        rate_limit="1000000/minute",
        redis_url=None,
    )
    app = create_app(settings)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://drill",
            headers={"Authorization": f"Bearer {key}"},
            timeout=300,
        ) as client,
    ):
        created = await client.post(
            "/sequences",
            json={
                "name": "drill",
                "is_continuous": True,
                "filter": None,
                "steps": [email_step(f"step {n}") for n in range(1, steps + 1)],
            },
        )
        created.raise_for_status()
        sequence_id = str(created.json()["id"])
        for start in range(0, contacts, 5000):
            batch = [
                {"email": f"person{i}@drill.example", "name": f"Person {i}"}
                for i in range(start, min(contacts, start + 5000))
            ]
            added = await client.post(
                f"/sequences/{sequence_id}/contacts", json={"contacts": batch}
            )
            added.raise_for_status()
    return sequence_id


async def scalar(db: Database, sql: str, **params: Any) -> Any:
    async with db.transaction() as session:
        return (await session.execute(text(sql), params)).scalar_one()


async def wait_for(
    condition: Callable[[], Awaitable[bool]], within: float, what: str, step: float = 0.2
) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {within:.0f} s")
        await asyncio.sleep(step)


async def wait_for_sink(sink: RecordingSink, count: int, within: float) -> None:
    async def reached() -> bool:
        return sink.total >= count

    await wait_for(reached, within, f"the sink has {sink.total} of {count} messages")


async def wait_until_settled(db: Database, within: float) -> None:
    """Until no enrollment is active (every step sent or given up)."""

    async def settled() -> bool:
        try:
            active = await scalar(db, "SELECT count(*) FROM enrollments WHERE status = 'active'")
        except Exception:  # the database may still be coming back
            return False
        return int(active) == 0

    await wait_for(settled, within, "enrollments still active", step=0.5)


async def account(
    db: Database,
    sink: RecordingSink,
    expected: int,
    *,
    resend_allowed: Callable[[str], bool],
    max_duplicates: int,
) -> tuple[dict[str, Any], list[str]]:
    """Compare send records with what the sink received; ``resend_allowed(message_id)`` says
    whether that message was in flight at the fault. Returns (counts, problems)."""
    async with db.transaction() as session:
        rows = (await session.execute(text("SELECT message_id, status FROM messages"))).all()
    statuses = Counter(status for _, status in rows)
    recorded = {message_id for message_id, _ in rows}
    duplicates = {mid: n for mid, n in sink.ids.items() if n > 1}
    extra = sum(n - 1 for n in duplicates.values())
    problems: list[str] = []
    if len(rows) != expected or set(statuses) != {"sent"}:
        problems.append(f"{len(rows)} send records (expected {expected}), {dict(statuses)}")
    missing = recorded - set(sink.ids)
    if missing:
        problems.append(f"{len(missing)} recorded messages never reached the sink")
    unknown = set(sink.ids) - recorded
    if unknown:
        problems.append(f"{len(unknown)} received Message-IDs have no send record")
    outside = [mid for mid in duplicates if not resend_allowed(mid)]
    if outside:
        problems.append(f"{len(outside)} Message-IDs resent although not in flight at the fault")
    if extra > max_duplicates:
        problems.append(f"{extra} duplicate deliveries exceed the in-flight bound {max_duplicates}")
    split = [key for key, ids in sink.keys.items() if len(ids) > 1]
    if split:
        problems.append(f"{len(split)} (recipient, step) pairs arrived under 2+ Message-IDs")
    counts: dict[str, Any] = {
        "expected": expected,
        "send records sent": statuses.get("sent", 0),
        "unique Message-IDs received": len(sink.ids),
        "total deliveries received": sink.total,
        "duplicate deliveries (same Message-ID)": extra,
    }
    return counts, problems


def report(counts: dict[str, Any], problems: list[str]) -> int:
    width = max(len(name) for name in counts)
    for name, value in counts.items():
        print(f"{name:<{width}}  {value}")
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    print("PASS" if not problems else "FAIL")
    return 1 if problems else 0


def report_with_logs(counts: dict[str, Any], problems: list[str], logs: list[Path]) -> int:
    """``report`` for a drill that ran worker processes: adds how often their iterations failed
    and retried, and shows the tail of each worker's log when the drill failed."""
    counts["worker iterations that failed and retried"] = count_in_logs(
        logs, "worker iteration failed"
    )
    if problems:
        for log in logs:
            print(f"--- {log.name} (last lines)", file=sys.stderr)
            print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
    return report(counts, problems)


async def tear_down(workers: list[subprocess.Popen[bytes]], db: Database, server: Any) -> None:
    """Kill workers still running (a failed drill may leave some), close the database and the
    SMTP sink."""
    for worker in workers:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    await db.dispose()
    server.stop()
