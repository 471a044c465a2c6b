"""Fault drill (PostgreSQL): the SMTP server disappears for ``--down-seconds`` (default 60)
while two ``opensequence worker`` processes are delivering, then comes back on the same port.

Pass conditions (exit 1 otherwise): every send record ends ``sent`` (none failed: connection
refused is transient) and every message reached the sink after the server returned; a Message-ID
arrives twice only if its record was not yet ``sent`` when the server went away; no (recipient,
step) arrives under two Message-IDs. Use a short ``OPENSEQUENCE_RETRY_BASE_SECONDS`` (the drill
sets ``--retry-base``, default 2 s) so that the backoff does not outlast the drill.

Usage: ``python bench/drill_smtp_outage.py [--messages 2000] [--down-seconds 60]``
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import text

from _common import fresh_database
from _drills import (
    CONCURRENCY,
    PIPELINES,
    SinkServer,
    account,
    report_with_logs,
    scalar,
    seed_sequence,
    start_worker,
    stop_workers,
    subprocess_env,
    tear_down,
    wait_for_sink,
    wait_until_settled,
)
from opensequence.db import Database


async def drill(messages: int, down_seconds: float, retry_base: float) -> int:
    with fresh_database("postgresql") as url, tempfile.TemporaryDirectory() as tmp:
        server = SinkServer()
        server.start()
        db = Database(url)
        workers = []
        try:
            await seed_sequence(url, messages // 2, steps=2)
            env = subprocess_env(
                url,
                OPENSEQUENCE_MAIL_URL=server.url,
                OPENSEQUENCE_RETRY_BASE_SECONDS=str(retry_base),
                OPENSEQUENCE_WORKER_LEASE_SECONDS="30",
            )
            started = time.monotonic()
            logs = [Path(tmp) / f"worker{n}.log" for n in range(2)]
            workers = [start_worker(env, log) for log in logs]
            await wait_for_sink(server.sink, int(messages * 0.2), within=120)
            server.stop()
            went_down = time.monotonic()
            delivered_before = server.sink.total
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
            await asyncio.sleep(down_seconds)
            retried = int(await scalar(db, "SELECT count(*) FROM messages WHERE attempts > 1"))
            waiting = int(await scalar(db, "SELECT count(*) FROM messages WHERE status <> 'sent'"))
            failed_during = int(
                await scalar(db, "SELECT count(*) FROM messages WHERE status = 'failed'")
            )
            server.start()
            came_back = time.monotonic()
            await wait_until_settled(db, within=max(300, down_seconds * 4))
            drained = time.monotonic() - came_back
            elapsed = time.monotonic() - started
            codes = stop_workers(workers)
            counts, problems = await account(
                db,
                server.sink,
                messages,
                resend_allowed=lambda message_id: message_id not in sent_before,
                max_duplicates=len(workers) * PIPELINES * CONCURRENCY * 5,
            )
            if failed_during:
                problems.append(f"{failed_during} messages failed while the server was down")
            if codes != [0, 0]:
                problems.append(f"workers exited with {codes} after SIGTERM")
            counts = {
                **counts,
                "delivered before the outage": delivered_before,
                "outage": f"{came_back - went_down:.1f} s",
                "messages retried during the outage": retried,
                "send records not sent at the end of the outage": waiting,
                "delivered after the server returned": server.sink.total - delivered_before,
                "drained after the server returned in": f"{drained:.1f} s",
                "elapsed": f"{elapsed:.1f} s",
            }
            return report_with_logs(counts, problems, logs)
        finally:
            await tear_down(workers, db, server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--down-seconds", type=float, default=60.0)
    parser.add_argument("--retry-base", type=float, default=2.0)
    args = parser.parse_args()
    sys.exit(asyncio.run(drill(args.messages, args.down_seconds, args.retry_base)))


if __name__ == "__main__":
    main()
