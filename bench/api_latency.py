"""Request latency of one ``opensequence api`` process, one request at a time: ``GET
/contacts/{id}`` and ``POST /contacts`` (a new contact each), with the server process's CPU per
request; against the raw driver reading the same contact row by id in this process, the least a
read can cost.

    .venv/bin/python bench/api_latency.py [--requests 1000] [--backend postgresql|sqlite]

Loopback HTTP over httpx; each figure comes after 100 warm-up requests of its kind.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg

from _common import cpu_seconds, fresh_database, percentile, served_api
from _drills import create_key


def server_pid(base: str) -> int | None:
    """The API process serving ``base``, found through ``/proc`` (Linux; elsewhere None and no
    CPU figures)."""
    port = base.rpartition(":")[2]
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"api" in cmdline and b"--port" in cmdline and port.encode() in cmdline:
            return int(entry.name)
    return None


def timed(requests: int, call: Callable[[int], Any]) -> list[float]:
    latencies = []
    for i in range(requests):
        started = time.perf_counter()
        call(i)
        latencies.append(time.perf_counter() - started)
    return latencies


def raw_reads(url: str, contact_id: str, requests: int) -> list[float]:
    """The contact row by primary key through the bare driver, one connection, autocommit."""
    if url.startswith("sqlite"):
        connection: Any = sqlite3.connect(url.removeprefix("sqlite:///"))
        query = "SELECT * FROM contacts WHERE id = ?"
        key: Any = contact_id.replace("-", "")
    else:
        connection = psycopg.connect(url, autocommit=True)
        query = "SELECT * FROM contacts WHERE id = %s"
        key = contact_id
    try:
        for _ in range(100):
            connection.execute(query, (key,)).fetchall()
        return timed(requests, lambda _: connection.execute(query, (key,)).fetchall())
    finally:
        connection.close()


def main(backend: str, requests: int) -> None:
    with fresh_database(backend) as url:
        key = asyncio.run(create_key(url, "latency"))
        with served_api(url) as base:
            server = server_pid(base)
            headers = {"Authorization": f"Bearer {key}"}
            with httpx.Client(base_url=base, headers=headers) as client:
                created = client.post("/contacts", json={"contact": {"email": "a@example.org"}})
                created.raise_for_status()
                contact_id = created.json()["id"]

                def get(_: int) -> None:
                    client.get(f"/contacts/{contact_id}").raise_for_status()

                def post(i: int) -> None:
                    body = {"contact": {"email": f"p{i}@example.org"}}
                    client.post("/contacts", json=body).raise_for_status()

                rows = []
                for label, call in (("GET /contacts/{id}", get), ("POST /contacts", post)):
                    for i in range(100):
                        call(-1 - i)
                    before = cpu_seconds(server)
                    latencies = timed(requests, call)
                    cpu = (cpu_seconds(server) - before) / requests
                    rows.append((label, latencies, cpu))
            raw = raw_reads(url, contact_id, requests)
    raw_p50 = statistics.median(raw)
    print(f"{backend}, {requests} requests of each kind, one at a time")
    print(f"{'':22} {'p50 ms':>8} {'p90 ms':>8} {'server CPU ms':>14} {'p50 / raw read':>15}")
    for label, latencies, cpu in rows:
        p50 = statistics.median(latencies)
        print(
            f"{label:22} {p50 * 1e3:8.2f} {percentile(latencies, 0.9) * 1e3:8.2f} "
            f"{cpu * 1e3:14.2f} {p50 / raw_p50:14.1f}x"
        )
    print(f"{'raw driver read':22} {raw_p50 * 1e3:8.3f} {percentile(raw, 0.9) * 1e3:8.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--backend", choices=("postgresql", "sqlite"), default="postgresql")
    args = parser.parse_args()
    main(args.backend, args.requests)
