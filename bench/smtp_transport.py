"""The SMTP transport alone: the same pre-built messages over the same number of connections
into an aiosmtpd sink (its own process), through ``SmtpTransport`` (the engine's) and through a
raw aiosmtplib loop (``sendmail`` per message), alternating, in one run. Prints each side's
messages per second and client CPU per message (this process's), and the transport's ratio to
the raw loop; with ``--repeat N`` the medians over N rounds, each round running both sides in
alternating order.

The engine's other work (claims, rendering, MIME, records) is left out: this is what a message
costs the event loop between the hand-over and the server's last reply. The sink is usually
the bottleneck of both sides (one core of its own), so msg/s come out close; the CPU figures
say what the transport leaves for the rest of the worker.

Usage: ``python bench/smtp_transport.py [--messages 3000] [--concurrency 20] [--repeat 5]``
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiosmtplib

from _common import STEP, cpu_seconds, free_port
from engine_send import engine_messages, start_sink_process
from opensequence.cli.common import run_async
from opensequence.mail.message import Outgoing
from opensequence.mail.transports import transport_from_url

SENDER = STEP["data"]["from_email"]


@dataclass(frozen=True)
class Run:
    rate: float  # messages per second
    client: float  # CPU seconds per message: this process
    sink: float  # and the sink's


async def timed(
    sink: int,
    lanes: int,
    lane: Callable[[int], Awaitable[None]],
    messages: int,
    then: Callable[[], Awaitable[None]] | None = None,
) -> Run:
    """What ``lanes`` concurrent ``lane(i)`` achieved, ``then`` included (the transport's
    QUITs, as each raw lane sends its own); ``sink`` is the sink's process id."""
    cpu, sink_cpu, wall = time.process_time(), cpu_seconds(sink), time.perf_counter()
    await asyncio.gather(*(lane(i) for i in range(lanes)))
    if then is not None:
        await then()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return Run(messages / wall, cpu / messages, (cpu_seconds(sink) - sink_cpu) / messages)


async def raw(port: int, sink: int, built: list[tuple[str, bytes]], concurrency: int) -> Run:
    async def lane(first: int) -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        await client.connect()
        for i in range(first, len(built), concurrency):
            recipient, message = built[i]
            await client.sendmail(SENDER, [recipient], message)
        await client.quit()

    return await timed(sink, concurrency, lane, len(built))


async def transport(port: int, sink: int, built: list[tuple[str, bytes]], concurrency: int) -> Run:
    """The transport as the worker uses it: ``concurrency`` lanes handing messages over, a pool
    of as many connections (opened on the first messages, as in a worker's first batch)."""
    smtp = transport_from_url(f"smtp://127.0.0.1:{port}?tls=none", pool_size=concurrency)
    outgoing = [Outgoing(SENDER, recipient, message) for recipient, message in built]

    async def lane(first: int) -> None:
        for i in range(first, len(outgoing), concurrency):
            await smtp.send(outgoing[i])

    return await timed(sink, concurrency, lane, len(built), then=smtp.aclose)


async def main(messages: int, concurrency: int, repeat: int) -> None:
    port = free_port()
    sink = start_sink_process(port)
    built = engine_messages(messages)
    sides = {"raw aiosmtplib loop": raw, "SmtpTransport": transport}
    results: dict[str, list[Run]] = {name: [] for name in sides}
    try:
        await raw(port, sink.pid, built[: concurrency * 10], concurrency)  # warm-up: imports, sink
        for round_ in range(repeat):
            order = list(sides) if round_ % 2 == 0 else list(sides)[::-1]
            for name in order:
                run = await sides[name](port, sink.pid, built, concurrency)
                results[name].append(run)
                print(f"{name:<22} {figures(run)}", flush=True)
    finally:
        sink.send_signal(signal.SIGTERM)
        sink.wait(timeout=30)
    if not all(results.values()):
        return
    print(f"over {repeat} round(s), {messages} messages, {concurrency} connections:")
    medians = {}
    for name, runs in results.items():
        medians[name] = median = Run(
            statistics.median(run.rate for run in runs),
            statistics.median(run.client for run in runs),
            statistics.median(run.sink for run in runs),
        )
        print(f"{name:<22} median {figures(median)}")
    baseline, ours = medians["raw aiosmtplib loop"], medians["SmtpTransport"]
    print(
        f"SmtpTransport: {ours.rate / baseline.rate:.2f}x the raw loop's msg/s,"
        f" {ours.client / baseline.client:.2f}x its client CPU"
    )


def figures(run: Run) -> str:
    return (
        f"{run.rate:6.0f} msg/s  cpu/msg: client {run.client * 1e6:4.0f}, "
        f"sink {run.sink * 1e6:4.0f} us"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5, help="rounds of both sides")
    args = parser.parse_args()
    if args.repeat < 1 or args.messages < 1 or args.concurrency < 1:
        parser.error("--messages, --concurrency and --repeat must be at least 1")
    # The event loop `opensequence worker` runs on (uvloop where installed), for both sides.
    run_async(main(args.messages, args.concurrency, args.repeat))
