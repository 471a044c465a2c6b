"""The engine's per-batch statements on a backlog PostgreSQL has no statistics for yet (an
import that autovacuum has not analysed), against the same statements once ``ANALYZE`` has
run, in the same process: a claim of 200, the pre-send recheck of those 200, and advancing
them in chunks of 100. Each figure is the median of ``--batches`` batches, in ms of wall time
(the statements run one at a time, so that is the server's time plus the driver's).

A ratio near 1.0 means the plans do not depend on statistics. Before the claim disabled sorts
for itself, the due index's predicate was narrowed (migration 0008) and the recheck looked up
sequence and contact per enrollment, 100,000 due gave a claim of ~50-70 ms and a recheck of
~30-38 ms fresh, against ~7-9 and ~4-6 analysed.

Usage: ``python bench/fresh_backlog.py [--due 100000] [--batches 6]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from _common import create_pg_database, drop_pg_database, seed
from opensequence.db import Database
from opensequence.engine import repository as repo


async def timed_batches(db: Database, batches: int, label: str) -> dict[str, float]:
    times: dict[str, list[float]] = {"claim": [], "recheck": [], "advance": []}
    for i in range(batches):
        worker = f"{label}-{i}"
        now = datetime.now(UTC)
        async with db.transaction() as session:
            started = time.perf_counter()
            claimed = await repo.claim_due(
                session, now=now, worker=worker, lease=timedelta(minutes=5), limit=200
            )
            times["claim"].append(time.perf_counter() - started)
        ids = [c.id for c in claimed]
        async with db.transaction() as session:
            started = time.perf_counter()
            live = await repo.still_live(session, ids, worker=worker)
            times["recheck"].append(time.perf_counter() - started)
        assert len(live) == len(ids) == 200, "the backlog ran out"
        changes = [
            {
                "b_id": c.id,
                "b_claimed_step": c.current_step,
                "b_status": "completed",
                "b_step": c.current_step + 1,
                "b_next_at": None,
                "b_waiting": None,
                "b_attempts": 0,
            }
            for c in claimed
        ]
        started = time.perf_counter()
        for chunk in (changes[:100], changes[100:]):
            async with db.transaction() as session:
                await repo.update_enrollments(session, chunk, worker=worker, now=now)
        times["advance"].append(time.perf_counter() - started)
    return {name: statistics.median(values) * 1000 for name, values in times.items()}


async def main(due: int, batches: int) -> None:
    url = create_pg_database("osq_fresh")
    db = Database(url)
    try:
        await seed(db, due)
        fresh = await timed_batches(db, batches, "fresh")
        async with db.engine.connect() as conn:
            await conn.execute(text("ANALYZE"))
            await conn.commit()
        analysed = await timed_batches(db, batches, "analysed")
    finally:
        await db.dispose()
        drop_pg_database(url)
    print(f"{due:,} due enrollments, batches of 200, median of {batches}")
    print(f"{'statement':<26} {'fresh ms':>9} {'analysed ms':>12} {'ratio':>6}")
    for name, label in (
        ("claim", "claim 200"),
        ("recheck", "recheck 200"),
        ("advance", "advance 2 x 100"),
    ):
        ratio = fresh[name] / analysed[name]
        print(f"{label:<26} {fresh[name]:9.1f} {analysed[name]:12.1f} {ratio:6.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--due", type=int, default=100_000)
    parser.add_argument("--batches", type=int, default=6)
    args = parser.parse_args()
    asyncio.run(main(args.due, args.batches))
