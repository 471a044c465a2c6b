"""Resolve 10,000 new and then 10,000 existing emails through ``resolve_contacts`` on SQLite
(a temp file) and PostgreSQL (a fresh database, created and dropped here), and compare each
with the raw driver doing the same rows by ``executemany`` in the same run.

    .venv/bin/python bench/contacts_upsert.py [--rows 10000] [--pg postgresql://postgres@127.0.0.1:5432/postgres]

Baselines: "new" = ``executemany`` of a plain INSERT of the same rows into an emptied
contacts table; "existing" = ``executemany`` of the same INSERT … ON CONFLICT DO NOTHING
again (every row conflicts), i.e. the least work a driver can do to learn the rows exist.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from opensequence.auth import service as auth
from opensequence.contacts.service import IdentifierInput, resolve_contacts
from opensequence.db import Database
from opensequence.db.migrate import upgrade
from opensequence.db.types import new_id

RAW_INSERT = (
    "INSERT INTO contacts (id, org_id, email, email_normalized, phone_number, name, "
    "custom_data, created_at, updated_at) VALUES ({p}, {p}, {p}, {p}, NULL, NULL, {p}, {p}, {p})"
)


async def through_service(url: str, emails: list[str]) -> tuple[float, float, uuid.UUID]:
    db = Database(url, pool_size=1)
    try:
        async with db.transaction() as session:
            org_id = (await auth.get_or_create_org(session, "bench")).id
        items = [IdentifierInput(email=email) for email in emails]
        timings = []
        for expect_created in (True, False):
            started = time.perf_counter()
            async with db.transaction() as session:
                results = await resolve_contacts(session, org_id, items, now=datetime.now(UTC))
            timings.append(time.perf_counter() - started)
            assert all(r.created is expect_created for r in results)
            assert len({r.contact_id for r in results}) == len(emails)
        return timings[0], timings[1], org_id
    finally:
        await db.dispose()


def raw_rows(
    org_id: uuid.UUID, emails: list[str], *, sqlite_form: bool
) -> list[tuple[object, ...]]:
    now = datetime.now(UTC)
    stamp: object = now.replace(tzinfo=None).isoformat(sep=" ") if sqlite_form else now
    rows: list[tuple[object, ...]] = []
    for email in emails:
        contact_id = new_id()
        rows.append(
            (
                contact_id.hex if sqlite_form else contact_id,
                org_id.hex if sqlite_form else org_id,
                email,
                email.lower(),
                "{}",
                stamp,
                stamp,
            )
        )
    return rows


def timed(work: Callable[[], None]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def sqlite_raw(path: Path, org_id: uuid.UUID, emails: list[str]) -> tuple[float, float]:
    rows = raw_rows(org_id, emails, sqlite_form=True)
    insert = RAW_INSERT.format(p="?")
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("DELETE FROM contacts")

        def run(statement: str) -> Callable[[], None]:
            def work() -> None:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(statement, rows)
                conn.execute("COMMIT")

            return work

        new = timed(run(insert))
        existing = timed(run(insert + " ON CONFLICT DO NOTHING"))
        return new, existing
    finally:
        conn.close()


def pg_raw(url: str, org_id: uuid.UUID, emails: list[str]) -> tuple[float, float]:
    rows = raw_rows(org_id, emails, sqlite_form=False)
    insert = RAW_INSERT.format(p="%s")
    with psycopg.connect(url) as conn:
        conn.execute("DELETE FROM contacts")
        conn.commit()

        def run(statement: str) -> Callable[[], None]:
            def work() -> None:
                with conn.cursor() as cursor:
                    cursor.executemany(statement, rows)
                conn.commit()

            return work

        new = timed(run(insert))
        existing = timed(run(insert + " ON CONFLICT DO NOTHING"))
        return new, existing


def report(name: str, service: tuple[float, float], raw: tuple[float, float], rows: int) -> None:
    for label, ours, base in (
        ("new", service[0], raw[0]),
        ("existing", service[1], raw[1]),
    ):
        print(
            f"{name:<10} {rows} {label:<8}  resolve_contacts {ours:7.3f} s  "
            f"raw executemany {base:7.3f} s  ratio {ours / base:5.2f}x  "
            f"({rows / ours:,.0f} rows/s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument(
        "--pg",
        default=os.environ.get(
            "OPENSEQUENCE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="admin URL of a PostgreSQL server (a scratch database is created and dropped)",
    )
    parser.add_argument("--skip-pg", action="store_true")
    args = parser.parse_args()
    emails = [f"Bench.User{i}@Example.com" for i in range(args.rows)]

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        url = f"sqlite:///{path}"
        upgrade(url)
        new, existing, org_id = asyncio.run(through_service(url, emails))
        report("sqlite", (new, existing), sqlite_raw(path, org_id, emails), args.rows)

    if args.skip_pg:
        return
    name = f"osq_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    base, _, _ = args.pg.rpartition("/")
    url = f"{base}/{name}"
    with psycopg.connect(args.pg, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        upgrade(url)
        new, existing, org_id = asyncio.run(through_service(url, emails))
        report("postgresql", (new, existing), pg_raw(url, org_id, emails), args.rows)
    finally:
        with psycopg.connect(args.pg, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
