"""Engine throughput: 5,000 messages into an aiosmtpd sink (its own process), against a raw
aiosmtplib loop that sends the same 5,000 messages, pre-built, over the same number of
connections, in the same run. Engine figures on SQLite and PostgreSQL (one in-process worker),
and with two ``opensequence worker`` processes on PostgreSQL (already running when the messages
fall due, so their start-up is not counted).

The raw loop runs before the first engine run and again after each one; an engine figure's
ratio is against the mean of the raw runs just before and just after it, so that a slow minute
of a shared machine weighs on both sides of the ratio rather than on one. ``--repeat N`` runs the
whole sequence N times and ends with each configuration's median ratio and range: on a shared
machine single ratios of the same code move by a fifth from one run to the next.

Each run also reports the CPU time per message of the sending side (this process for the raw
loop and the in-process worker, the worker processes otherwise), of the sink and of all of
PostgreSQL's server processes, read from ``/proc`` (Linux; elsewhere no CPU figures). Sender,
sink and database share the machine's cores, so these say where a gap in msg/s comes from.

The floor (PostgreSQL): the engine with none of its own work. The pre-built messages go out over
the engine's SMTP transport, with only the database work of an engine that records every send
before and after it (so that none is lost, and a crash resends only what was in flight), through
psycopg alone. Per batch, one transaction leases the due enrollments and writes their send
records ``sending`` (committed before the first send); after every chunk of sends, one marks the
records ``sent`` and advances the enrollments; batch and chunk sizes and two batches in flight as
in the worker. No rendering, MIME, loads, re-check, throttle or SQLAlchemy: the gap between the
floor and the raw loop is what the transport and the bookkeeping cost on this machine, the gap
between the engine and the floor what its own work costs.

``--sink-pipelining``: the sink's EHLO announces PIPELINING (RFC 2920), as Postfix's and
Exim's do, and the engine sends MAIL, RCPT and DATA in one write; the raw loop (aiosmtplib,
which has no pipelining) is unchanged. Without it the sink announces what aiosmtpd does, and
both sides send one command at a time.

Usage: ``python bench/engine_send.py [--messages 5000] [--concurrency 20] [--skip-pg]
[--repeat 1] [--sink-pipelining]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import aiosmtplib
import httpx
import psycopg
from sqlalchemy import text

from _common import (
    STEP,
    WORKER,
    cpu_seconds,
    create_pg_database,
    drop_pg_database,
    free_port,
    postgres_cpu_seconds,
    seed,
    start_ready,
    subprocess_env,
)
from opensequence.cli.common import run_async
from opensequence.config import Settings
from opensequence.db import Database
from opensequence.db.migrate import upgrade
from opensequence.db.types import new_id
from opensequence.engine.worker import Worker
from opensequence.heap import settle
from opensequence.mail.message import Outgoing, build_message, domain_of, make_message_id
from opensequence.mail.render import render
from opensequence.mail.transports import transport_from_url
from opensequence.unsubscribe import make_token, unsubscribe_url


@dataclass(frozen=True)
class Run:
    """One timed run: messages per second, and CPU seconds per message of the senders, the sink
    and PostgreSQL."""

    rate: float
    cpu: tuple[float, float, float]


class CpuMeter:
    """CPU seconds used so far by ``senders`` (together), the sink and PostgreSQL's processes."""

    def __init__(self, sink: int, senders: list[int] | None = None) -> None:
        self.sink = sink
        self.senders = senders or [os.getpid()]
        self._start = self._read()

    def _read(self) -> tuple[float, float, float]:
        senders = sum(cpu_seconds(pid) for pid in self.senders)
        return senders, cpu_seconds(self.sink), postgres_cpu_seconds()

    def per_message(self, messages: int) -> tuple[float, float, float]:
        end = self._read()
        return (
            (end[0] - self._start[0]) / messages,
            (end[1] - self._start[1]) / messages,
            (end[2] - self._start[2]) / messages,
        )


def start_sink_process(port: int, *, pipelining: bool = False) -> subprocess.Popen[str]:
    """The sink (``sink_server.py``) on ``port``; its EHLO announces PIPELINING if asked."""
    options = ["--pipelining"] if pipelining else []
    return start_ready("sink_server.py", str(port), *options)


def engine_messages(count: int) -> list[tuple[str, bytes]]:
    """What the engine sends for the seeded contacts (``_common.seed``), built by the same
    functions it uses: the step's templates rendered for each contact, a signed unsubscribe
    URL, a Message-ID from a fresh row id, the same MIME. The raw loop sends these, so that
    both sides hand the sink the same bytes per message (same size and line count)."""
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    secret, org_id, now = os.urandom(32).hex(), new_id(), datetime.now(UTC)
    data = STEP["data"]
    built: list[tuple[str, bytes]] = []
    for i in range(count):
        email = f"person{i}@example.org"
        url = unsubscribe_url(settings.public_url, make_token(secret, org_id, new_id()))
        context = {
            "contact": {"email": email, "name": f"Person {i}", "custom_data": {"plan": "pro"}},
            "step": {"index": 0},
            "unsubscribe_url": url,
        }
        message = build_message(
            from_email=data["from_email"],
            sender_name=data["email_sender_name"],
            to_email=email,
            subject=render(data["email_subject"], context, html=False),
            html_body=render(data["email_body"], context, html=True),
            message_id=make_message_id(new_id(), domain_of(data["from_email"])),
            date=now,
            unsubscribe_url=url,
        )
        built.append((email, message))
    return built


async def raw_loop(port: int, sink: int, messages: int, concurrency: int) -> Run:
    """The ceiling: the engine's messages pre-built, ``concurrency`` connections each sending
    its share."""
    built = engine_messages(messages)
    meter = CpuMeter(sink)

    async def lane(first: int) -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        await client.connect()
        for i in range(first, messages, concurrency):
            recipient, message = built[i]
            await client.sendmail(STEP["data"]["from_email"], [recipient], message)
        await client.quit()

    started = time.perf_counter()
    await asyncio.gather(*(lane(i) for i in range(concurrency)))
    rate = messages / (time.perf_counter() - started)
    return Run(rate, meter.per_message(messages))


# The floor's statements: a lease over the due index that also reads each contact's address and
# looks up the send record a resend would reuse (as the worker's claim does; here there is
# none), the send records from one JSON document (as the worker writes them), and the two
# writes after each chunk of sends.
_FLOOR_CLAIM = """
UPDATE enrollments SET locked_until = now() + interval '5 minutes', locked_by = 'floor'
FROM contacts
WHERE contacts.id = enrollments.contact_id AND enrollments.id = ANY(ARRAY(
    SELECT id FROM enrollments
    WHERE status = 'active' AND next_step_at <= now()
      AND (locked_until IS NULL OR locked_until < now())
    ORDER BY next_step_at LIMIT %s FOR UPDATE SKIP LOCKED))
RETURNING enrollments.id, enrollments.org_id, enrollments.sequence_id, enrollments.contact_id,
    enrollments.current_step, contacts.email,
    (SELECT messages.id FROM messages WHERE messages.enrollment_id = enrollments.id
        AND messages.step_index = enrollments.current_step)"""
_FLOOR_COLUMNS = (
    "id uuid, org_id uuid, enrollment_id uuid, sequence_id uuid, contact_id uuid, "
    "step_index integer, from_email text, to_email text, status text, message_id text, "
    "attempts integer, created_at timestamptz, updated_at timestamptz"
)
_FLOOR_NAMES = ", ".join(column.split()[0] for column in _FLOOR_COLUMNS.split(", "))
_FLOOR_RECORD = (
    f"INSERT INTO messages ({_FLOOR_NAMES}) SELECT {_FLOOR_NAMES} "
    f"FROM json_to_recordset(%s::json) AS t({_FLOOR_COLUMNS}) "
    "ON CONFLICT (enrollment_id, step_index) DO NOTHING RETURNING id"
)
_FLOOR_SENT = (
    "UPDATE messages SET status = 'sent', attempts = attempts + 1, sent_at = now(), "
    "updated_at = now() WHERE id = ANY(%s)"
)
_FLOOR_ADVANCE = (
    "UPDATE enrollments SET status = 'completed', current_step = current_step + 1, "
    "next_step_at = NULL, locked_until = NULL, locked_by = NULL, updated_at = now() "
    "WHERE id = ANY(%s) AND locked_by = 'floor'"
)


async def floor_loop(url: str, port: int, sink: int, messages: int, concurrency: int) -> Run:
    """The floor (see the module's docstring): ``messages`` seeded enrollments leased and
    recorded a batch at a time as the worker does (``concurrency`` x 10, outcomes recorded every
    ``concurrency`` x 5 sends, two batches in flight), their pre-built messages sent over the
    engine's SMTP transport by ``concurrency`` lanes."""
    db = Database(url)
    try:
        await seed(db, messages)
    finally:
        await db.dispose()
    built = dict(engine_messages(messages))
    sender = STEP["data"]["from_email"]
    batch, chunk = concurrency * 10, concurrency * 5
    transport = transport_from_url(f"smtp://127.0.0.1:{port}?tls=none", pool_size=concurrency)
    Sent = tuple[uuid.UUID, uuid.UUID] | BaseException  # (record, enrollment), or the failure
    queue: asyncio.Queue[tuple[Outgoing, tuple[uuid.UUID, uuid.UUID], asyncio.Queue[Sent]] | None]
    queue = asyncio.Queue()

    async def lane() -> None:
        while (item := await queue.get()) is not None:
            outgoing, key, finished = item
            try:
                await transport.send(outgoing)
            except Exception as exc:  # the pipeline raises it: the run fails
                finished.put_nowait(exc)
            else:
                finished.put_nowait(key)

    async def pipeline(connection: psycopg.AsyncConnection[Any]) -> int:
        done = 0
        while True:
            async with connection.transaction():
                await connection.execute("SET LOCAL enable_sort = off")  # as the worker's claim
                claimed = await (await connection.execute(_FLOOR_CLAIM, (batch,))).fetchall()
                await connection.execute("SET LOCAL enable_sort TO DEFAULT")
                if not claimed:
                    return done
                now = datetime.now(UTC).isoformat()
                ids = [new_id() for _ in claimed]
                records = [
                    {
                        "id": record.hex,
                        "org_id": org.hex,
                        "enrollment_id": enrollment.hex,
                        "sequence_id": sequence.hex,
                        "contact_id": contact.hex,
                        "step_index": step,
                        "from_email": sender,
                        "to_email": email,
                        "status": "sending",
                        "message_id": make_message_id(record, domain_of(sender)),
                        "attempts": 0,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for record, (enrollment, org, sequence, contact, step, email, _) in zip(
                        ids, claimed, strict=True
                    )
                ]
                assert all(row[-1] is None for row in claimed)  # no resends in this run
                cursor = await connection.execute(_FLOOR_RECORD, (json.dumps(records),))
                assert len(await cursor.fetchall()) == len(claimed)
            finished: asyncio.Queue[Sent] = asyncio.Queue()
            for record, (enrollment, *_, email, _) in zip(ids, claimed, strict=True):
                queue.put_nowait(
                    (Outgoing(sender, email, built[email]), (record, enrollment), finished)
                )
            left = len(claimed)
            while left:
                outcomes = [await finished.get() for _ in range(min(chunk, left))]
                left -= len(outcomes)
                for outcome in outcomes:
                    if isinstance(outcome, BaseException):
                        raise outcome
                keys = cast(list[tuple[uuid.UUID, uuid.UUID]], outcomes)
                async with connection.transaction():
                    await connection.execute(_FLOOR_SENT, ([record for record, _ in keys],))
                    advanced = await connection.execute(
                        _FLOOR_ADVANCE, ([enrollment for _, enrollment in keys],)
                    )
                    assert advanced.rowcount == len(keys)
                done += len(keys)

    connections = [await psycopg.AsyncConnection.connect(url) for _ in range(2)]
    lanes = [asyncio.create_task(lane()) for _ in range(concurrency)]
    try:
        meter = CpuMeter(sink)
        started = time.perf_counter()
        # A failure cancels the other pipeline rather than leaving it on a closing connection.
        async with asyncio.TaskGroup() as group:
            pipelines = [group.create_task(pipeline(c)) for c in connections]
        done = sum(task.result() for task in pipelines)
        rate = messages / (time.perf_counter() - started)
        cpu = meter.per_message(messages)  # before the connections close
        cursor = await connections[0].execute(
            "SELECT count(*) FROM messages WHERE status = 'sent' AND sent_at IS NOT NULL"
        )
        sent = (await cursor.fetchone() or [0])[0]
        assert done == sent == messages, f"{done} advanced, {sent} of {messages} sent"
        return Run(rate, cpu)
    finally:
        while not queue.empty():  # after a failure, what is still queued is not sent
            queue.get_nowait()
        for _ in lanes:
            queue.put_nowait(None)
        await asyncio.gather(*lanes, return_exceptions=True)
        await transport.aclose()
        for connection in connections:
            await connection.close()


async def engine_in_process(url: str, port: int, sink: int, messages: int, concurrency: int) -> Run:
    db = Database(url)
    try:
        await seed(db, messages)
        # As `opensequence worker` and `serve` do before they start working (opensequence.heap):
        # without it, each full collection walks this process's whole heap, ~0.1 s in which
        # every connection waits.
        settle()
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            database_url=url,
            mail_url=f"smtp://127.0.0.1:{port}?tls=none",
        )
        transport = transport_from_url(settings.mail_url, pool_size=concurrency)
        worker = Worker(db, transport, settings, concurrency=concurrency)
        meter = CpuMeter(sink)
        started = time.perf_counter()
        await asyncio.gather(*(worker.drain() for _ in range(worker.pipelines)))
        elapsed = time.perf_counter() - started
        cpu = meter.per_message(messages)  # before the connections close
        await transport.aclose()
        async with db.transaction() as session:
            sent = (
                await session.execute(text("SELECT count(*) FROM messages WHERE status = 'sent'"))
            ).scalar_one()
        assert sent == messages, f"only {sent} of {messages} sent"
        return Run(messages / elapsed, cpu)
    finally:
        await db.dispose()


def start_worker(
    env: dict[str, str], concurrency: int, metrics_port: int
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*WORKER, "--concurrency", str(concurrency), "--metrics-port", str(metrics_port)],
        env=env,
        stderr=subprocess.DEVNULL,
    )


def wait_until_serving(port: int, timeout: float = 60.0) -> None:
    """A worker serves /metrics once it has migrated and is about to start its loop."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1.0).raise_for_status()
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


async def engine_processes(
    url: str, port: int, sink: int, messages: int, concurrency: int, n: int
) -> Run:
    """``n`` worker processes, started (and idle, polling every 0.1 s) before the messages are
    written; timed from the commit that makes them all due until the last one is sent. The
    progress query (a count every 20 ms) is part of PostgreSQL's CPU figure."""
    db = Database(url)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        env = subprocess_env(url, f"smtp://127.0.0.1:{port}?tls=none")
        metrics_ports = [free_port() for _ in range(n)]
        workers = [start_worker(env, concurrency, metrics) for metrics in metrics_ports]
        for metrics in metrics_ports:
            wait_until_serving(metrics)
        await seed(db, messages)
        meter = CpuMeter(sink, [worker.pid for worker in workers])
        started = time.perf_counter()
        while True:
            async with db.transaction() as session:
                sent = (
                    await session.execute(
                        text("SELECT count(*) FROM messages WHERE status = 'sent'")
                    )
                ).scalar_one()
            if sent >= messages:
                break
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - started
        return Run(messages / elapsed, meter.per_message(messages))
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait(timeout=60)
        await db.dispose()


def microseconds(cpu: tuple[float, ...], sides: int = 3) -> str:
    """``cpu/msg: sender …, sink …, PostgreSQL … us`` for the first ``sides`` figures; nothing
    where they could not be read."""
    if any(value != value for value in cpu[:sides]):  # NaN: no /proc
        return ""
    names = ("sender", "sink", "PostgreSQL")[:sides]
    pairs = zip(names, cpu[:sides], strict=True)
    figures = ", ".join(f"{name} {value * 1e6:.0f}" for name, value in pairs)
    return f"  cpu/msg: {figures} us"


def median_cpu(runs: list[Run]) -> tuple[float, ...]:
    return tuple(statistics.median(run.cpu[side] for run in runs) for side in range(3))


async def main(
    messages: int, concurrency: int, skip_pg: bool, repeat: int, sink_pipelining: bool
) -> None:
    port = free_port()
    sink = start_sink_process(port, pipelining=sink_pipelining)
    raws: list[Run] = []
    results: list[tuple[str, Run, float]] = []

    async def raw_after(label: str, run: Run) -> None:
        raws.append(await raw_loop(port, sink.pid, messages, concurrency))
        results.append((label, run, (raws[-2].rate + raws[-1].rate) / 2))

    try:
        raws.append(await raw_loop(port, sink.pid, messages, concurrency))
        for _ in range(repeat):
            await one_round(port, sink.pid, messages, concurrency, skip_pg, raw_after)
    finally:
        sink.send_signal(signal.SIGTERM)
        sink.wait(timeout=30)
        rates = ", ".join(f"{raw.rate:.0f}" for raw in raws)
        if sink_pipelining:
            print("the sink announces PIPELINING: the engine uses it, the raw loop cannot")
        print(f"raw aiosmtplib loop, {concurrency} connections: {rates} msg/s (in run order)")
        if raws:
            print(f"raw aiosmtplib loop, median of its runs{microseconds(median_cpu(raws), 2)}")
        for label, run, around in results:
            ratio = run.rate / around
            print(
                f"{label:<40} {run.rate:6.0f} msg/s  {ratio:.2f}x raw ({around:.0f} around it)"
                + microseconds(run.cpu)
            )
        if repeat > 1:
            print(f"over {repeat} rounds:")
            for label in dict.fromkeys(label for label, _, _ in results):
                runs = [(run, around) for name, run, around in results if name == label]
                ratios = [run.rate / around for run, around in runs]
                print(
                    f"{label:<40} median {statistics.median(ratios):.2f}x raw"
                    f"  ({min(ratios):.2f}-{max(ratios):.2f}x, {len(ratios)} runs)"
                    + microseconds(median_cpu([run for run, _ in runs]))
                )


async def one_round(
    port: int,
    sink: int,
    messages: int,
    concurrency: int,
    skip_pg: bool,
    raw_after: Callable[[str, Run], Awaitable[None]],
) -> None:
    """Each engine configuration once, the raw loop after each."""
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        upgrade(url)
        run = await engine_in_process(url, port, sink, messages, concurrency)
    await raw_after("engine, SQLite, 1 worker", run)
    if skip_pg:
        return

    async def on_postgresql(label: str, configuration: Callable[[str], Awaitable[Run]]) -> None:
        """One run on a fresh PostgreSQL database, dropped after it."""
        url = create_pg_database("osq_bench")
        try:
            run = await configuration(url)
        finally:
            drop_pg_database(url)
        await raw_after(label, run)

    await on_postgresql(
        "engine, PostgreSQL, 1 worker",
        lambda url: engine_in_process(url, port, sink, messages, concurrency),
    )
    await on_postgresql(
        "engine, PostgreSQL, 2 worker processes",
        lambda url: engine_processes(url, port, sink, messages, concurrency, 2),
    )
    await on_postgresql(
        "floor, PostgreSQL", lambda url: floor_loop(url, port, sink, messages, concurrency)
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--skip-pg", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of every configuration")
    parser.add_argument(
        "--sink-pipelining", action="store_true", help="the sink announces PIPELINING"
    )
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    # The event loop `opensequence worker` runs on (uvloop where installed), for both sides.
    run_async(
        main(args.messages, args.concurrency, args.skip_pg, args.repeat, args.sink_pipelining)
    )
