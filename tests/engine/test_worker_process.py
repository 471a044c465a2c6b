"""The worker as operators run it: ``opensequence worker`` (a real process, SIGTERM) and the
same worker inside the app (``serve``'s background task), with its metrics."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from asgi_lifespan import LifespanManager
from sqlalchemy import func, select

from opensequence.api.app import create_app
from opensequence.clock import ManualClock
from opensequence.config import Settings
from opensequence.db import Database
from opensequence.engine.runner import background_worker
from opensequence.models import Message
from tests.engine.factories import email_step, enroll, make_contacts, make_org, make_sequence
from tests.helpers import http_client


async def wait_for(condition, what: str, attempts: int = 600) -> None:  # type: ignore[no-untyped-def]
    """Poll ``condition`` until it holds; the bound only stops a hung test (the machine may be
    busy), it asserts nothing about speed."""
    for _ in range(attempts):
        if await condition():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"gave up waiting for {what}")


async def count_sent(db: Database) -> int:
    async with db.transaction() as session:
        return int(
            await session.scalar(
                select(func.count()).select_from(Message).where(Message.status == "sent")
            )
            or 0
        )


async def test_worker_command_delivers_and_stops_cleanly_on_sigterm(
    db: Database, database_url: str, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    org = await make_org(db)
    contacts = await make_contacts(db, org, [{"email": f"w{i}@example.org"} for i in range(5)])
    sequence_id = await make_sequence(db, org, [email_step()], started_at=now)
    await enroll(db, org, sequence_id, contacts, now=now)
    outbox = tmp_path / "outbox"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENSEQUENCE_")}
    env.update(
        OPENSEQUENCE_DATABASE_URL=database_url,
        OPENSEQUENCE_MAIL_URL=f"maildir://{outbox}",
        OPENSEQUENCE_WORKER_POLL_SECONDS="0.05",
    )
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "opensequence", "worker", "--concurrency", "3"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:

        async def all_sent() -> bool:
            # Watch the outbox, not the database: polling SQLite from here would compete for
            # its single write lock with the worker under test.
            new = outbox / "new"
            return new.is_dir() and len(list(new.iterdir())) == 5

        try:
            await wait_for(all_sent, "the worker process to send 5 messages")
        except AssertionError:
            process.kill()
            _, stderr = await process.communicate()
            lines = [x for x in stderr.decode().splitlines() if "alembic" not in x]
            raise AssertionError("\n".join(lines)[-3000:]) from None
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode()
    assert len(list((outbox / "new").iterdir())) == 5
    assert await count_sent(db) == 5


async def test_serve_runs_the_worker_in_the_background_with_metrics(
    settings: Settings, tmp_path: Path
) -> None:
    clock = ManualClock(datetime(2026, 6, 1, 12, 0, tzinfo=UTC))
    custom = settings.model_copy(update={"worker_poll_seconds": 0.05})
    app = create_app(custom, clock=clock, background=[background_worker(concurrency=2)])
    async with LifespanManager(app):
        db: Database = app.state.db
        org = await make_org(db)
        contacts = await make_contacts(db, org, [{"email": "s@example.org"}])
        # Continuous: the running worker's lifecycle sweep would rightly mark a started one-off
        # sequence ``complete`` in the moment between these two factory transactions, before
        # it has any enrollment (the real start writes both in one transaction).
        sequence_id = await make_sequence(
            db,
            org,
            [email_step(), email_step(delay=60)],
            started_at=clock.now(),
            is_continuous=True,
        )
        await enroll(db, org, sequence_id, contacts, now=clock.now())

        async def sent(n: int) -> bool:
            return await count_sent(db) == n

        await wait_for(lambda: sent(1), "the background worker to send step 0")
        clock.advance(hours=1)
        await wait_for(lambda: sent(2), "step 1 once the clock moved")
        async with http_client(app) as client:
            metrics = (await client.get("/metrics")).text
    assert 'opensequence_messages_total{status="sent"} 2.0' in metrics
    assert "opensequence_due_backlog" in metrics
    assert len(list((tmp_path / "outbox" / "new").iterdir())) == 2
