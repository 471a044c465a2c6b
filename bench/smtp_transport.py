"""The SMTP transport alone: the same pre-built messages over the same number of connections
into an aiosmtpd sink (its own process), through ``SmtpTransport`` (the engine's) and through a
raw aiosmtplib loop (``sendmail`` per message), alternating, in one run. Prints each side's
messages per second and client CPU per message (this process's), and the transport's ratio to
the raw loop; with ``--repeat N`` the medians over N rounds, each round running every side in
alternating order.

The transport runs twice: to the same sink as the raw loop, one command at a time, and to a
second sink whose EHLO announces PIPELINING (as Postfix's and Exim's do), sending MAIL, RCPT and
DATA in one write. ``--latency MS`` puts a relay in front of both sinks that delays every byte
by MS each way (``latency_proxy.py``), as a network between the worker and its provider would:
there the round trips a message takes, four or two, decide the rate.

The engine's other work (claims, rendering, MIME, records) is left out: this is what a message
costs the event loop between the hand-over and the server's last reply. On loopback the sink is
usually the bottleneck of every side (one core of its own), so msg/s come out close; the CPU
figures say what the transport leaves for the rest of the worker.

Usage: ``python bench/smtp_transport.py [--messages 3000] [--concurrency 20] [--repeat 5]
[--latency 0]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import aiosmtplib

from _common import STEP, cpu_seconds, free_port, start_ready
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


PIPELINED = "SmtpTransport, pipelined"


@contextlib.contextmanager
def sinks(latency_ms: float) -> Iterator[dict[bool, tuple[int, int]]]:
    """Two sinks, one announcing PIPELINING: ``{pipelining: (port to connect to, sink pid)}``;
    behind a relay adding ``latency_ms`` each way (``latency_proxy.py``) if that is not 0."""
    processes: list[subprocess.Popen[str]] = []
    try:
        found = {}
        for pipelining in (False, True):
            port = free_port()
            sink = start_sink_process(port, pipelining=pipelining)
            processes.append(sink)
            if latency_ms:
                relay_port = free_port()
                processes.append(
                    start_ready("latency_proxy.py", str(relay_port), str(port), str(latency_ms))
                )
                port = relay_port
            found[pipelining] = (port, sink.pid)
        yield found
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=30)


async def main(messages: int, concurrency: int, repeat: int, latency_ms: float) -> None:
    built = engine_messages(messages)
    results: dict[str, list[Run]] = {}
    with sinks(latency_ms) as found:
        plain, pipelining = found[False], found[True]
        sides = {
            "raw aiosmtplib loop": (raw, plain),
            "SmtpTransport": (transport, plain),
            PIPELINED: (transport, pipelining),
        }
        results = {name: [] for name in sides}
        # Warm-up: imports, both sinks.
        await raw(*plain, built[: concurrency * 10], concurrency)
        await transport(*pipelining, built[: concurrency * 10], concurrency)
        for round_ in range(repeat):
            order = list(sides) if round_ % 2 == 0 else list(sides)[::-1]
            for name in order:
                side, (port, sink) = sides[name]
                run = await side(port, sink, built, concurrency)
                results[name].append(run)
                print(f"{name:<24} {figures(run)}", flush=True)
    if not all(results.values()):
        return
    link = f", {latency_ms:g} ms each way" if latency_ms else ""
    print(f"over {repeat} round(s), {messages} messages, {concurrency} connections{link}:")
    medians = {}
    for name, runs in results.items():
        medians[name] = median = Run(
            statistics.median(run.rate for run in runs),
            statistics.median(run.client for run in runs),
            statistics.median(run.sink for run in runs),
        )
        print(f"{name:<24} median {figures(median)}")
    baseline = medians["raw aiosmtplib loop"]
    for name in ("SmtpTransport", PIPELINED):
        ours = medians[name]
        print(
            f"{name}: {ours.rate / baseline.rate:.2f}x the raw loop's msg/s,"
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
    parser.add_argument("--repeat", type=int, default=5, help="rounds of every side")
    parser.add_argument(
        "--latency", type=float, default=0.0, help="ms added each way between client and sink"
    )
    args = parser.parse_args()
    if args.repeat < 1 or args.messages < 1 or args.concurrency < 1:
        parser.error("--messages, --concurrency and --repeat must be at least 1")
    if not 0 <= args.latency <= 1000:
        parser.error("--latency must be between 0 and 1000 ms")
    # The event loop `opensequence worker` runs on (uvloop where installed), for every side.
    run_async(main(args.messages, args.concurrency, args.repeat, args.latency))
