"""API latency beside heavy mail: ``opensequence serve`` on SQLite (API and worker in one
process, the embedded default) sends messages of one template to its maildir while
``GET /contacts/{id}`` is timed every 20 ms until they are out. Three templates: a short body
(the baseline, 2,000 sends), a newsletter-sized static body of ~60 kB (1,000 sends), and a body
whose loop renders ~600 kB (100 sends). Prints each one's latency percentiles, its p99 against
the baseline's, and how long the sends took.

    .venv/bin/python bench/serve_heavy_mail.py
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from _common import percentile, served_api
from _drills import create_key
from opensequence.db.migrate import upgrade

STATIC = "".join(
    f"<p>Section {i}: our spring range, with prices and pictures of every item.</p>"
    for i in range(800)
)
# label → (body, sends): enough sends for each to run a few seconds.
TEMPLATES = {
    "short body": ("<p>Hi {{ contact.name }}</p>", 2000),
    "~60 kB static body": ("<h1>Hi {{ contact.name }}</h1>" + STATIC, 1000),
    "~600 kB from a loop": (
        "{% for i in (1..20000) %}<p>{{ contact.name }}, item {{ i }}</p>{% endfor %}",
        100,
    ),
}


async def one(body: str, sends: int) -> tuple[list[float], float]:
    """GET latencies while ``sends`` messages of ``body`` go out, and how long they took."""
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        upgrade(url)
        key = await create_key(url, "bench")
        outbox = Path(tmp, "outbox", "new")
        mail = {
            "OPENSEQUENCE_MAIL_URL": f"maildir://{tmp}/outbox",
            "OPENSEQUENCE_WORKER_POLL_SECONDS": "0.1",
        }
        with served_api(url, extra_env=mail, command="serve", cwd=tmp) as base:
            async with httpx.AsyncClient(
                base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=120
            ) as client:
                created = await client.post(
                    "/contacts", json={"contact": {"email": "probe@example.org"}}
                )
                probe = created.json()["id"]
                sequence = await client.post("/sequences", json=sequence_body(body))
                people = [
                    {"email": f"p{i}@example.org", "name": f"Person {i}"} for i in range(sends)
                ]
                added = await client.post(
                    f"/sequences/{sequence.json()['id']}/contacts", json={"contacts": people}
                )
                added.raise_for_status()
                started = time.monotonic()
                latencies: list[float] = []
                while delivered(outbox) < sends:
                    if time.monotonic() - started > 600:
                        raise TimeoutError(f"{delivered(outbox)} of {sends} sent in 600 s")
                    before = time.perf_counter()
                    (await client.get(f"/contacts/{probe}")).raise_for_status()
                    latencies.append(time.perf_counter() - before)
                    await asyncio.sleep(0.02)
                return latencies, time.monotonic() - started


def delivered(outbox: Path) -> int:
    return sum(1 for _ in outbox.iterdir()) if outbox.exists() else 0


def sequence_body(body: str) -> dict[str, object]:
    data = {
        "from_email": "news@example.com",
        "email_subject": "News for {{ contact.name }}",
        "email_body": body,
        "email_sender_name": "News",
        "email_is_transactional": False,
    }
    return {
        "name": "bench",
        "is_continuous": True,
        "filter": None,
        "steps": [{"action": {"type": "send_emails", "data": data}, "delay_in_minutes": 0}],
    }


async def main() -> None:
    baseline: float | None = None
    print("GET /contacts/{id} every 20 ms while the sends go out (serve, SQLite, maildir)")
    for label, (body, sends) in TEMPLATES.items():
        latencies, took = await one(body, sends)
        p99 = percentile(latencies, 0.99)
        baseline = baseline or p99
        print(
            f"{label:<22} p50 {statistics.median(latencies) * 1000:7.1f} ms"
            f"  p99 {p99 * 1000:7.1f} ms  max {max(latencies) * 1000:7.1f} ms"
            f"  ({len(latencies)} requests; p99 {p99 / baseline:5.1f}x the short body's)"
            f"  {sends:,} sends took {took:.1f} s"
        )


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    asyncio.run(main())
