"""Crash drill (PostgreSQL): two ``opensequence worker`` processes deliver 2,000 messages into an
aiosmtpd sink running in this process; one worker is SIGKILLed mid-run and restarted.

Pass conditions (exit 1 otherwise):
- every send record ends ``sent`` and every one of them reached the sink;
- a Message-ID arrives more than once only if its send record was in flight (``sending``, leased
  by the killed worker) at the moment of the kill;
- no (recipient, step) ever arrives under two different Message-IDs.

Usage: ``python bench/crash_drill.py [--messages 2000]`` (PostgreSQL at
``OPENSEQUENCE_TEST_PG_URL`` or 127.0.0.1:5432).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import time

from sqlalchemy import text

from _common import (
    WORKER,
    RecordingSink,
    create_pg_database,
    drop_pg_database,
    seed,
    start_sink,
    subprocess_env,
)
from opensequence.db import Database


def start_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*WORKER, "--concurrency", "20"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def count(db: Database, sql: str, **params: object) -> int:
    async with db.transaction() as session:
        return int((await session.execute(text(sql), params)).scalar_one())


async def drill(messages: int) -> int:
    url = create_pg_database("osq_drill")
    sink = RecordingSink()
    controller, port = start_sink(sink)
    db = Database(url)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        contacts = messages // 2
        await seed(db, contacts, steps=2)
        env = subprocess_env(
            url, f"smtp://127.0.0.1:{port}?tls=none", OPENSEQUENCE_WORKER_LEASE_SECONDS="20"
        )
        started = time.perf_counter()
        workers = [start_worker(env), start_worker(env)]
        victim = workers[0]
        while sink.total < messages * 0.3:
            await asyncio.sleep(0.01)
            if time.perf_counter() - started > 120:
                print("FAIL: workers made no progress", file=sys.stderr)
                return 1
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        delivered_at_kill = sink.total
        killed_after = time.perf_counter() - started
        async with db.transaction() as session:
            in_flight = set(
                (
                    await session.execute(
                        text(
                            "SELECT m.message_id FROM messages m JOIN enrollments e"
                            " ON e.id = m.enrollment_id AND e.current_step = m.step_index"
                            " WHERE m.status = 'sending' AND e.locked_by LIKE :pattern"
                        ),
                        {"pattern": f"%:{victim.pid}:%"},
                    )
                )
                .scalars()
                .all()
            )
        workers[0] = start_worker(env)
        deadline = time.perf_counter() + 300
        while await count(db, "SELECT count(*) FROM enrollments WHERE status = 'active'"):
            if time.perf_counter() > deadline:
                print("FAIL: enrollments still active after 300 s", file=sys.stderr)
                return 1
            await asyncio.sleep(0.2)
        elapsed = time.perf_counter() - started
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        codes = [worker.wait(timeout=60) for worker in workers]

        async with db.transaction() as session:
            rows = (await session.execute(text("SELECT message_id, status FROM messages"))).all()
        statuses = {status for _, status in rows}
        recorded = {message_id for message_id, _ in rows}
        duplicates = {mid: n for mid, n in sink.ids.items() if n > 1}
        problems: list[str] = []
        if len(rows) != messages or statuses != {"sent"}:
            problems.append(f"{len(rows)} send records with statuses {sorted(statuses)}")
        missing = recorded - set(sink.ids)
        if missing:
            problems.append(f"{len(missing)} recorded messages never reached the sink")
        unknown = set(sink.ids) - recorded
        if unknown:
            problems.append(f"{len(unknown)} received Message-IDs have no send record")
        outside = set(duplicates) - in_flight
        if outside:
            problems.append(f"{len(outside)} duplicates were not in flight at the kill")
        split = [key for key, ids in sink.keys.items() if len(ids) > 1]
        if split:
            problems.append(f"{len(split)} (recipient, step) pairs arrived under 2+ Message-IDs")
        if codes != [0, 0]:
            problems.append(f"workers exited with {codes} after SIGTERM")

        print(f"messages expected            {messages}")
        print(f"send records sent            {sum(1 for _, s in rows if s == 'sent')}")
        print(f"unique Message-IDs received  {len(sink.ids)}")
        print(f"total deliveries received    {sink.total}")
        print(f"delivered before the kill    {delivered_at_kill} (at {killed_after:.1f} s)")
        print(f"in flight at the kill        {len(in_flight)}")
        print(f"duplicates (same Message-ID) {sum(n - 1 for n in duplicates.values())}")
        print(f"elapsed                      {elapsed:.1f} s")
        for problem in problems:
            print(f"FAIL: {problem}", file=sys.stderr)
        if not problems:
            print("PASS")
        return 1 if problems else 0
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        await db.dispose()
        controller.stop()
        drop_pg_database(url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    sys.exit(asyncio.run(drill(args.messages)))


if __name__ == "__main__":
    main()
