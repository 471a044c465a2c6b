"""Add-contacts throughput: 10,000 new email contacts through the real HTTP stack
(``opensequence api`` over TCP) against a raw driver insert of the same contacts and
enrollments, in the same run, on each database.

    python bench/add_contacts.py [--items 10000] [--repeat 3] [--backends sqlite,postgresql]

Prints seconds per request (median of --repeat), items/s, and the ratio HTTP / raw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fresh_database, served_api
from opensequence.auth import service as auth
from opensequence.db import Database
from opensequence.db.types import new_id

STEP = {
    "action": {
        "type": "send_emails",
        "data": {
            "from_email": "team@example.com",
            "email_subject": "Hi {{ contact.name }}",
            "email_body": "<p>Hello</p>",
            "email_sender_name": "Team",
            "email_is_transactional": False,
        },
    },
    "delay_in_minutes": 60,
}


async def make_key(url: str) -> str:
    db = Database(url)
    try:
        async with db.transaction() as session:
            org = await auth.get_or_create_org(session, "bench")
            return (await auth.create_key(session, org)).key
    finally:
        await db.dispose()


def http_runs(url: str, items: int, repeat: int) -> list[float]:
    key = asyncio.run(make_key(url))
    timings: list[float] = []
    with (
        served_api(url) as base,
        httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=600
        ) as client,
    ):
        for run in range(repeat):
            created = client.post("/sequences", json={"steps": [STEP], "filter": None})
            created.raise_for_status()
            sequence = created.json()["id"]
            body = {"contacts": [{"email": f"r{run}-{i}@example.com"} for i in range(items)]}
            started = time.perf_counter()
            response = client.post(f"/sequences/{sequence}/contacts", json=body)
            timings.append(time.perf_counter() - started)
            response.raise_for_status()
            run_id = response.json()["run_id"]
            counts = client.get(f"/sequences/{sequence}/runs/{run_id}").json()["counts"]
            assert counts["created_and_added"] == items, counts
    return timings


def raw_rows(
    items: int, run: int, org: uuid.UUID, seq: uuid.UUID, run_id: uuid.UUID
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    now = datetime.now(UTC)
    contacts: list[tuple[Any, ...]] = []
    enrollments: list[tuple[Any, ...]] = []
    for i in range(items):
        contact_id = new_id()
        email = f"raw{run}-{i}@example.com"
        contacts.append((contact_id, org, email, email, None, None, "{}", now, now))
        enrollments.append(
            (
                new_id(),
                org,
                seq,
                contact_id,
                run_id,
                None,
                "active",
                0,
                now,
                None,
                0,
                None,
                None,
                now,
                now,
            )
        )
    return contacts, enrollments


CONTACTS_SQL = (
    "INSERT INTO contacts (id, org_id, email, email_normalized, phone_number, name, custom_data,"
    " created_at, updated_at) VALUES ({})"
)
ENROLL_SQL = (
    "INSERT INTO enrollments (id, org_id, sequence_id, contact_id, run_id, run_index, status,"
    " current_step, next_step_at, waiting_reason, attempts, locked_until, locked_by, created_at,"
    " updated_at) VALUES ({})"
)


def raw_baseline(url: str, backend: str, items: int, repeat: int) -> list[float]:
    """The same rows through the bare driver: one transaction, two executemany calls."""
    org, seq = new_id(), new_id()
    timings: list[float] = []
    setup = [
        (
            "INSERT INTO organizations (id, name, created_at) VALUES ({})",
            (org, "raw", datetime.now(UTC)),
        ),
        (
            "INSERT INTO sequences (id, org_id, name, is_continuous, status, created_at,"
            " updated_at) VALUES ({})",
            (seq, org, "raw", True, "active", datetime.now(UTC), datetime.now(UTC)),
        ),
    ]
    if backend == "sqlite":
        path = url.removeprefix("sqlite:///")
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")

        def adapt(row: tuple[Any, ...]) -> tuple[Any, ...]:
            return tuple(
                v.hex
                if isinstance(v, uuid.UUID)
                else v.replace(tzinfo=None).isoformat(" ")
                if isinstance(v, datetime)
                else v
                for v in row
            )

        for sql, row in setup:
            conn.execute(sql.format(",".join("?" * len(row))), adapt(row))
        conn.commit()
        for run in range(repeat):
            run_id = new_id()
            conn.execute(
                "INSERT INTO runs (id, org_id, sequence_id, kind, total, counts, created_at)"
                " VALUES (?,?,?,?,?,?,?)",
                adapt((run_id, org, seq, "add_contacts", items, json.dumps({}), datetime.now(UTC))),
            )
            conn.commit()
            contacts, enrollments = raw_rows(items, run, org, seq, run_id)
            contacts = [adapt(r) for r in contacts]
            enrollments = [adapt(r) for r in enrollments]
            started = time.perf_counter()
            conn.executemany(CONTACTS_SQL.format(",".join("?" * 9)), contacts)
            conn.executemany(ENROLL_SQL.format(",".join("?" * 15)), enrollments)
            conn.commit()
            timings.append(time.perf_counter() - started)
        conn.close()
        return timings
    with psycopg.connect(url) as pg:
        for sql, row in setup:
            pg.execute(sql.format(",".join(["%s"] * len(row))), row)
        pg.commit()
        for run in range(repeat):
            run_id = new_id()
            pg.execute(
                "INSERT INTO runs (id, org_id, sequence_id, kind, total, counts, created_at)"
                " VALUES (%s,%s,%s,%s,%s,%s,%s)",
                (run_id, org, seq, "add_contacts", items, json.dumps({}), datetime.now(UTC)),
            )
            pg.commit()
            contacts, enrollments = raw_rows(items, run, org, seq, run_id)
            started = time.perf_counter()
            with pg.cursor() as cur:
                cur.executemany(CONTACTS_SQL.format(",".join(["%s"] * 9)), contacts)
                cur.executemany(ENROLL_SQL.format(",".join(["%s"] * 15)), enrollments)
            pg.commit()
            timings.append(time.perf_counter() - started)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    print(f"add-contacts: {args.items} new email contacts per request, median of {args.repeat}")
    for backend in args.backends.split(","):
        with fresh_database(backend) as url:
            http = statistics.median(http_runs(url, args.items, args.repeat))
            raw = statistics.median(raw_baseline(url, backend, args.items, args.repeat))
        print(
            f"{backend:>10}: HTTP {http:6.3f} s ({args.items / http:8.0f} items/s)   "
            f"raw driver {raw:6.3f} s ({args.items / raw:8.0f} rows/s)   ratio {http / raw:4.2f}"
        )


if __name__ == "__main__":
    main()
