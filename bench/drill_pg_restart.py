"""Fault drill (PostgreSQL): the server restarts while two ``opensequence worker`` processes are
delivering into an aiosmtpd sink in this process.

Pass conditions (exit 1 otherwise): both workers survive the restart and reconnect; every send
record ends ``sent`` and reached the sink; a Message-ID arrives twice only if its record was not
yet ``sent`` when the restart began (in flight), and no more often than the workers can hold in
flight; no (recipient, step) arrives under two Message-IDs.

It restarts the machine's PostgreSQL cluster (``pg_ctlcluster … restart``), which briefly breaks
every other client of that server: run it sparingly.

Usage: ``python bench/drill_pg_restart.py [--messages 4000]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from sqlalchemy import text

from _common import PG_ADMIN_URL, fresh_database
from _drills import (
    CONCURRENCY,
    PIPELINES,
    SinkServer,
    account,
    report_with_logs,
    seed_sequence,
    start_worker,
    stop_workers,
    subprocess_env,
    tear_down,
    wait_for_sink,
    wait_until_settled,
)
from opensequence.db import Database


def default_restart_command() -> list[str]:
    versions = sorted(os.listdir("/etc/postgresql"))
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "restart"]


def wait_for_postgres(timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(PG_ADMIN_URL, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.Error:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


async def drill(messages: int, restart: list[str]) -> int:
    with fresh_database("postgresql") as url, tempfile.TemporaryDirectory() as tmp:
        server = SinkServer()
        server.start()
        db = Database(url)
        workers = []
        try:
            await seed_sequence(url, messages // 2, steps=2)
            env = subprocess_env(
                url, OPENSEQUENCE_MAIL_URL=server.url, OPENSEQUENCE_WORKER_LEASE_SECONDS="30"
            )
            started = time.monotonic()
            logs = [Path(tmp) / f"worker{n}.log" for n in range(2)]
            workers = [start_worker(env, log) for log in logs]
            await wait_for_sink(server.sink, int(messages * 0.3), within=120)
            async with db.transaction() as session:
                sent_before = set(
                    (
                        await session.execute(
                            text("SELECT message_id FROM messages WHERE status = 'sent'")
                        )
                    )
                    .scalars()
                    .all()
                )
            await db.dispose()
            delivered_at_restart = server.sink.total
            restart_began = time.monotonic()
            await asyncio.to_thread(
                subprocess.run, restart, check=True, timeout=120, capture_output=True
            )
            await asyncio.to_thread(wait_for_postgres)
            outage = time.monotonic() - restart_began
            await wait_until_settled(db, within=300)
            elapsed = time.monotonic() - started
            survived = [worker.poll() is None for worker in workers]
            codes = stop_workers(workers)
            counts, problems = await account(
                db,
                server.sink,
                messages,
                resend_allowed=lambda message_id: message_id not in sent_before,
                max_duplicates=len(workers) * PIPELINES * CONCURRENCY * 5,
            )
            late = [
                mid
                for mid, n in server.sink.ids.items()
                if n > 1 and server.sink.first_seen[mid] > restart_began
            ]
            counts["duplicates first delivered after the restart"] = len(late)
            if not all(survived):
                problems.append(f"a worker exited during the restart (alive: {survived})")
            if codes != [0, 0]:
                problems.append(f"workers exited with {codes} after SIGTERM")
            counts = {
                **counts,
                "delivered before the restart": delivered_at_restart,
                "sent (committed) before the restart": len(sent_before),
                "restart until PostgreSQL answered": f"{outage:.1f} s",
                "elapsed": f"{elapsed:.1f} s",
            }
            return report_with_logs(counts, problems, logs)
        finally:
            await tear_down(workers, db, server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=4000)
    args = parser.parse_args()
    sys.exit(asyncio.run(drill(args.messages, default_restart_command())))


if __name__ == "__main__":
    main()
