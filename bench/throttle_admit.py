"""Benchmark: what a per-sender throttle adds to a worker's claim transaction.

For each ``backend:N[:DAYS]`` leg it creates a fresh database with N messages sent by one address
of one domain, spread evenly over the last DAYS days (default 1: the worst case for a ``per_day``
limit, every row inside the window; with more days only N/DAYS are, which shows that older
messages cost little thanks to the ``(org_id, updated_at)`` index), sets limits on the address
and on the domain (per second, minute and day; high enough that everything is admitted), then
times :func:`opensequence.engine.throttle.admit` for a batch
of 100 sends from that address, in a transaction that is rolled back. Prints the median and
the worst of 20 batches.

    .venv/bin/python bench/throttle_admit.py      # sqlite:100000 postgresql:100000 ...
    .venv/bin/python bench/throttle_admit.py postgresql:300000:30
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sqlalchemy import insert

from _common import fresh_database
from opensequence.db import Database
from opensequence.db.types import new_id
from opensequence.engine import throttle
from opensequence.models import (
    Contact,
    Enrollment,
    Message,
    Organization,
    Run,
    SenderLimit,
    Sequence,
)

DEFAULT_LEGS = ["sqlite:100000", "postgresql:100000", "sqlite:300000:30", "postgresql:300000:30"]
BATCH = 100
ROUNDS = 20
CHUNK = 10_000


async def seed(db: Database, n: int, now: datetime, days: int = 1) -> uuid.UUID:
    async with db.transaction() as session:
        org = Organization(name="bench")
        session.add(org)
        await session.flush()
        contact = Contact(org_id=org.id, email="c@example.org", email_normalized="c@example.org")
        sequence = Sequence(org_id=org.id, name="s", is_continuous=True, status="active")
        session.add_all([contact, sequence])
        await session.flush()
        run = Run(org_id=org.id, sequence_id=sequence.id, kind="start", total=1)
        session.add(run)
        await session.flush()
        enrollment = Enrollment(
            org_id=org.id,
            sequence_id=sequence.id,
            contact_id=contact.id,
            run_id=run.id,
            status="active",
        )
        session.add(enrollment)
        await session.flush()
        for limit in ("sales@example.com", "example.com"):
            session.add(
                SenderLimit(
                    org_id=org.id,
                    sender=limit,
                    per_second=10**9,
                    per_minute=10**9,
                    per_day=10**9,
                    created_at=now,
                )
            )
        ids = (org.id, sequence.id, contact.id, enrollment.id)
    org_id, sequence_id, contact_id, enrollment_id = ids
    spacing = timedelta(days=days) / (n + 1)
    for start in range(0, n, CHUNK):
        rows = []
        for i in range(start, min(n, start + CHUNK)):
            at = now - timedelta(days=days) + spacing * (i + 1)
            row_id = new_id()
            rows.append(
                {
                    "id": row_id,
                    "org_id": org_id,
                    "enrollment_id": enrollment_id,
                    "sequence_id": sequence_id,
                    "contact_id": contact_id,
                    "step_index": i,
                    "from_email": "Sales@Example.com",
                    "to_email": "c@example.org",
                    "status": "sent",
                    "message_id": f"<{row_id}@example.com>",
                    "attempts": 1,
                    "sent_at": at,
                    "created_at": at,
                    "updated_at": at,
                }
            )
        async with db.transaction() as session:
            await session.execute(insert(Message), rows)
    return org_id


async def leg(backend: str, n: int, days: int) -> None:
    with fresh_database(backend) as url:
        db = Database(url)
        now = datetime.now(UTC).replace(microsecond=0)
        org_id = await seed(db, n, now, days)
        requests = [throttle.Request(i, org_id, "sales@example.com") for i in range(BATCH)]
        timings = []
        for _ in range(ROUNDS):
            async with db.sessions() as session:
                started = time.perf_counter()
                waits = (await throttle.admit(session, requests, now)).waits
                timings.append(time.perf_counter() - started)
                await session.rollback()
            assert waits == {}, "everything fits under the benchmark's limits"
        await db.dispose()
    print(
        f"{backend:<11} {n:>9,} messages over {days:>2} day(s), {n // days:>7,} in the day "
        f"window: admit({BATCH}) "
        f"median {statistics.median(timings) * 1000:.1f} ms, "
        f"worst {max(timings) * 1000:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("legs", nargs="*", default=DEFAULT_LEGS, help="backend:N")
    for spec in parser.parse_args().legs:
        backend, count, *days = spec.split(":")
        asyncio.run(leg(backend, int(count), int(days[0]) if days else 1))


if __name__ == "__main__":
    main()
