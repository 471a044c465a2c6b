"""Benchmark: ``PUT /sequences/{id}/start`` over N contacts (the service, one transaction).

For each ``backend:N`` leg it creates a fresh database (a temp SQLite file, or a PostgreSQL
database it drops afterwards), migrates it, bulk-inserts N contacts server-side (a recursive CTE
on SQLite, ``generate_series`` on PostgreSQL — the raw baseline for writing N rows), then times
``start_sequence`` with a domain filter every contact matches, and prints contacts/s, the time
of the raw contact insert for comparison, the SQL statements the start issued, and the peak RSS
of this process.

    .venv/bin/python bench/start_oneoff.py    # sqlite:100000 postgresql:100000 postgresql:1000000
    .venv/bin/python bench/start_oneoff.py sqlite:10000 postgresql:10000
    OPENSEQUENCE_BENCH_PG_URL=postgresql://postgres@127.0.0.1:5432/postgres  (admin database)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import event, func, select, text

from opensequence.db import Database
from opensequence.db.migrate import upgrade
from opensequence.db.types import new_id
from opensequence.models import Enrollment, Organization
from opensequence.sequences import service
from opensequence.sequences.schemas import CreateSequenceInput

PG_ADMIN = os.environ.get(
    "OPENSEQUENCE_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
DEFAULT_LEGS = ["sqlite:100000", "postgresql:100000", "postgresql:1000000"]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _pg_admin(sql: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(sql)


async def insert_contacts(db: Database, org_id: uuid.UUID, n: int) -> float:
    """N contacts written by the database itself (no rows through Python)."""
    started = time.perf_counter()
    async with db.transaction() as session:
        if db.is_postgresql:
            await session.execute(
                text(
                    "INSERT INTO contacts (id, org_id, email, email_normalized, custom_data,"
                    " created_at, updated_at)"
                    " SELECT gen_random_uuid(), :org, 'user' || i || '@example.com',"
                    " 'user' || i || '@example.com', '{}'::jsonb, now(), now()"
                    " FROM generate_series(1, :n) AS i"
                ),
                {"org": org_id, "n": n},
            )
        else:
            await session.execute(
                text(
                    "WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq"
                    " WHERE i < :n)"
                    " INSERT INTO contacts (id, org_id, email, email_normalized, custom_data,"
                    " created_at, updated_at)"
                    " SELECT lower(hex(randomblob(16))), :org, 'user' || i || '@example.com',"
                    " 'user' || i || '@example.com', '{}', :now, :now FROM seq"
                ),
                {
                    "org": org_id.hex,
                    "n": n,
                    "now": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f"),
                },
            )
    return time.perf_counter() - started


async def run_leg(backend: str, n: int) -> dict[str, Any]:
    cleanup: list[Any] = []
    if backend == "sqlite":
        tmp = tempfile.TemporaryDirectory(prefix="osq-bench-")
        cleanup.append(tmp.cleanup)
        url = f"sqlite:///{Path(tmp.name) / 'bench.db'}"
    elif backend == "postgresql":
        name = f"osq_bench_{uuid.uuid4().hex[:10]}"
        _pg_admin(f'CREATE DATABASE "{name}"')
        cleanup.append(lambda: _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        url = PG_ADMIN.rpartition("/")[0] + f"/{name}"
    else:
        raise SystemExit(f"unknown backend {backend!r}")
    try:
        upgrade(url)
        db = Database(url)
        try:
            org_id = new_id()
            async with db.transaction() as session:
                session.add(Organization(id=org_id, name="bench"))
            insert_seconds = await insert_contacts(db, org_id, n)
            body = CreateSequenceInput.model_validate(
                {
                    "is_continuous": False,
                    "filter": {
                        "or": [
                            {
                                "and": [
                                    {
                                        "type": "contacts_email_domain_name_in",
                                        "domain_name_in": ["EXAMPLE.com"],
                                    }
                                ]
                            }
                        ]
                    },
                    "steps": [
                        {
                            "action": {
                                "type": "send_emails",
                                "data": {
                                    "from_email": "team@example.com",
                                    "email_subject": "Hi {{ contact.name }}",
                                    "email_body": "Hello",
                                    "email_sender_name": "Team",
                                    "email_is_transactional": False,
                                },
                            },
                            "delay_in_minutes": 5,
                        }
                    ],
                }
            )
            async with db.transaction() as session:
                sequence = await service.create_sequence(session, org_id, body, datetime.now(UTC))
            statements: list[str] = []

            def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
                statements.append(statement)

            rss_before = peak_rss_mib()
            event.listen(db.engine.sync_engine, "before_cursor_execute", count)
            started = time.perf_counter()
            async with db.transaction() as session:
                run = await service.start_sequence(
                    session, org_id, str(sequence.id), datetime.now(UTC)
                )
            seconds = time.perf_counter() - started
            event.remove(db.engine.sync_engine, "before_cursor_execute", count)
            async with db.transaction() as session:
                enrolled = await session.scalar(
                    select(func.count()).where(Enrollment.run_id == run.id)
                )
            if enrolled != n or run.total != n:
                raise SystemExit(f"{backend}: enrolled {enrolled}, run.total {run.total}, n {n}")
        finally:
            await db.dispose()
    finally:
        for step in reversed(cleanup):
            step()
    return {
        "backend": backend,
        "contacts": n,
        "start_seconds": seconds,
        "contacts_per_second": n / seconds,
        "raw_insert_seconds": insert_seconds,
        "ratio_vs_raw_insert": seconds / insert_seconds,
        "statements": len(statements),
        "statement_heads": [" ".join(s.split())[:60] for s in statements],
        "peak_rss_mib_before_start": rss_before,
        "peak_rss_mib_after_start": peak_rss_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "legs", nargs="*", default=DEFAULT_LEGS, help="backend:N pairs (default: %(default)s)"
    )
    parser.add_argument("--verbose", action="store_true", help="print every statement issued")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}; legs: {' '.join(args.legs)}")
    for leg in args.legs:
        backend, _, count = leg.partition(":")
        result = asyncio.run(run_leg(backend, int(count)))
        print(
            f"{result['backend']:<10} n={result['contacts']:>9,}"
            f"  start {result['start_seconds']:7.2f} s"
            f"  {result['contacts_per_second']:>10,.0f} contacts/s"
            f"  (raw insert of the contacts {result['raw_insert_seconds']:.2f} s,"
            f" start/raw {result['ratio_vs_raw_insert']:.2f})"
            f"  statements {result['statements']}"
            f"  peak RSS {result['peak_rss_mib_after_start']:.0f} MiB"
            f" (before start {result['peak_rss_mib_before_start']:.0f} MiB)",
            flush=True,
        )
        if args.verbose:
            for head in result["statement_heads"]:
                print(f"    {head}")


if __name__ == "__main__":
    main()
