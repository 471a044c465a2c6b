"""Load bench: 2 API processes (``opensequence api --workers 2``) and 2 ``opensequence worker``
processes on a fresh PostgreSQL database, rate limits shared through Redis, mail into an aiosmtpd
sink in this process; ``--clients`` concurrent clients spread over several API keys of two
organizations send mixed traffic for ``--seconds``: create contacts, list contacts, add contacts
to a continuous sequence, get the sequence, get runs and run items, delivery history.

One key is hot (half the clients) so that the rate limit engages: 429s are expected and counted
separately. Prints throughput, p50/p99 latency (overall and per operation) and the status
counts; exits 1 on any 5xx or transport error. Loopback only; every loop is bounded by the
deadline.

Usage: ``python bench/load.py [--seconds 60] [--clients 16] [--rate-limit 300/minute]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from _common import free_port, fresh_database, percentile
from _drills import (
    SinkServer,
    create_key,
    email_step,
    start_worker,
    stop_workers,
    subprocess_env,
)

OPERATIONS = {
    "create_contact": 20,
    "list_contacts": 20,
    "add_contacts": 15,
    "get_sequence": 15,
    "get_run": 10,
    "run_items": 5,
    "enrollments": 10,
    "contact_messages": 5,
}


@dataclass
class Org:
    keys: list[str]
    sequence_id: str = ""
    run_ids: list[str] = field(default_factory=list)
    contact_ids: list[str] = field(default_factory=list)


@dataclass
class Results:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: Counter[int] = field(default_factory=Counter)
    by_operation: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    transport_errors: Counter[str] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)


async def one_request(
    client: httpx.AsyncClient, org: Org, operation: str, rng: random.Random, serial: list[int]
) -> httpx.Response:
    sequence = f"/sequences/{org.sequence_id}"
    if operation == "create_contact":
        serial[0] += 1
        email = f"c{serial[0]}-{rng.randrange(10**9)}@load.example"
        return await client.post("/contacts", json={"contact": {"email": email, "name": "Load"}})
    if operation == "list_contacts":
        return await client.get("/contacts", params={"limit": 50})
    if operation == "add_contacts":
        items: list[dict[str, Any]] = [
            {"email": f"a{rng.randrange(10**9)}@load.example"} for _ in range(4)
        ]
        if org.contact_ids:
            items.append({"id": rng.choice(org.contact_ids)})
        return await client.post(f"{sequence}/contacts", json={"contacts": items})
    if operation == "get_sequence":
        return await client.get(sequence)
    if operation == "get_run" and org.run_ids:
        return await client.get(f"{sequence}/runs/{rng.choice(org.run_ids)}")
    if operation == "run_items" and org.run_ids:
        return await client.get(f"{sequence}/runs/{rng.choice(org.run_ids)}/contacts")
    if operation == "contact_messages" and org.contact_ids:
        return await client.get(f"/contacts/{rng.choice(org.contact_ids)}/messages")
    return await client.get(f"{sequence}/enrollments", params={"limit": 50})


async def client_loop(
    base: str, org: Org, key: str, deadline: float, results: Results, seed: int
) -> None:
    rng = random.Random(seed)
    names = list(OPERATIONS)
    weights = list(OPERATIONS.values())
    serial = [seed * 1_000_000]
    async with httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as client:
        while time.monotonic() < deadline:
            operation = rng.choices(names, weights)[0]
            started = time.perf_counter()
            try:
                response = await one_request(client, org, operation, rng, serial)
            except httpx.TransportError as exc:
                results.transport_errors[type(exc).__name__] += 1
                continue
            elapsed = time.perf_counter() - started
            results.statuses[response.status_code] += 1
            results.by_operation[operation][response.status_code] += 1
            if response.status_code >= 500:
                results.server_errors.append(f"{operation}: {response.text[:200]}")
            if response.status_code == 429:
                await asyncio.sleep(min(1.0, float(response.headers.get("Retry-After", "1"))))
                continue
            results.latencies[operation].append(elapsed)
            if response.status_code in (200, 201):
                body = response.json()
                if operation == "create_contact" and len(org.contact_ids) < 1000:
                    org.contact_ids.append(body["id"])
                elif operation == "add_contacts" and len(org.run_ids) < 1000:
                    org.run_ids.append(body["run_id"])


async def prepare(base: str, org: Org) -> None:
    async with httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Bearer {org.keys[0]}"}, timeout=30
    ) as client:
        created = await client.post(
            "/sequences",
            json={
                "name": "load",
                "is_continuous": True,
                "filter": None,
                "steps": [email_step("step 1"), email_step("step 2")],
            },
        )
        created.raise_for_status()
        org.sequence_id = created.json()["id"]


def start_api(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    """``opensequence api --workers 2``: two API processes behind one port."""
    command = [sys.executable, "-m", "opensequence", "api", "--port", str(port), "--workers", "2"]
    with log.open("ab") as output:
        return subprocess.Popen(command, env=env, stdout=output, stderr=output)


def wait_healthy(base: str, process: subprocess.Popen[bytes], within: float = 60) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the API exited with {process.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the API did not become ready")


async def bench(args: argparse.Namespace) -> int:
    with fresh_database("postgresql") as url, tempfile.TemporaryDirectory() as tmp:
        server = SinkServer()
        server.start()
        orgs = [Org([await create_key(url, f"load-{o}") for _ in range(2)]) for o in range(2)]
        env = subprocess_env(
            url,
            OPENSEQUENCE_MAIL_URL=server.url,
            OPENSEQUENCE_REDIS_URL=args.redis_url,
            OPENSEQUENCE_RATE_LIMIT=args.rate_limit,
        )
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        api = start_api(env, port, Path(tmp) / "api.log")
        logs = [Path(tmp) / f"worker{n}.log" for n in range(args.workers)]
        workers = [start_worker(env, log) for log in logs]
        results = Results()
        try:
            await asyncio.to_thread(wait_healthy, base, api)
            for org in orgs:
                await prepare(base, org)
            # Half the clients on the first key (hot), the rest spread over the others.
            pairs = [(org, key) for org in orgs for key in org.keys]
            assignment = [pairs[0]] * (args.clients // 2) + [
                pairs[1 + i % (len(pairs) - 1)] for i in range(args.clients - args.clients // 2)
            ]
            started = time.monotonic()
            deadline = started + args.seconds
            await asyncio.gather(
                *(
                    client_loop(base, org, key, deadline, results, seed)
                    for seed, (org, key) in enumerate(assignment, start=1)
                )
            )
            elapsed = time.monotonic() - started
        finally:
            codes = stop_workers(workers)
            api.terminate()
            try:
                api.wait(timeout=30)
            except subprocess.TimeoutExpired:
                api.kill()
                api.wait()
            server.stop()

        answered = sum(results.statuses.values())
        limited = results.statuses.get(429, 0)
        served = answered - limited
        everything = [v for values in results.latencies.values() for v in values]
        print(f"duration                {elapsed:.1f} s, {args.clients} clients, {len(pairs)} keys")
        print(f"requests answered       {answered} ({answered / elapsed:.0f}/s)")
        print(f"served (not 429)        {served} ({served / elapsed:.0f}/s)")
        print(f"rate limited (429)      {limited}")
        print(
            f"latency p50 / p99       {percentile(everything, 0.5) * 1000:.1f} ms / "
            f"{percentile(everything, 0.99) * 1000:.1f} ms (429s excluded)"
        )
        print(f"statuses                {dict(sorted(results.statuses.items()))}")
        print(f"5xx                     {sum(n for s, n in results.statuses.items() if s >= 500)}")
        print(f"transport errors        {dict(results.transport_errors) or 0}")
        print(f"mail delivered to sink  {server.sink.total}")
        print("per operation           count    p50 ms   p99 ms   statuses")
        for operation, values in sorted(results.latencies.items()):
            print(
                f"  {operation:<21} {len(values):>6}  {percentile(values, 0.5) * 1000:>7.1f}"
                f"  {percentile(values, 0.99) * 1000:>7.1f}   "
                f"{dict(sorted(results.by_operation[operation].items()))}"
            )
        failures = [f"5xx: {error}" for error in results.server_errors[:10]]
        if results.transport_errors:
            failures.append(f"transport errors: {dict(results.transport_errors)}")
        if any(codes):
            failures.append(f"workers exited with {codes}")
        if served == 0:
            failures.append("no request was served")
        for failure in failures:
            print(f"FAIL: {failure}", file=sys.stderr)
        if failures:
            print((Path(tmp) / "api.log").read_text(errors="replace")[-3000:], file=sys.stderr)
        print("PASS" if not failures else "FAIL")
        return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="delivery worker processes")
    parser.add_argument("--rate-limit", default="300/minute")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("OPENSEQUENCE_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="rate limits are keyed by the run's fresh API key ids, so runs never collide",
    )
    args = parser.parse_args()
    sys.exit(asyncio.run(bench(args)))


if __name__ == "__main__":
    main()
