"""A TCP relay that delays everything it forwards, in both directions, by a fixed time: a
provider's SMTP server across a network link, on loopback. ``python bench/latency_proxy.py
PORT TARGET_PORT DELAY_MS`` listens on ``PORT``, relays to ``127.0.0.1:TARGET_PORT`` and prints
``ready``; a round trip through it takes twice ``DELAY_MS`` more than without it. Bytes keep
their order; the delay is per chunk read, so a chunk is never held longer than ``DELAY_MS``."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys


async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            await asyncio.sleep(max(0.0, due - loop.time()))
            writer.write(data)
            await writer.drain()
        writer.close()

    delivering = asyncio.create_task(deliver())
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            queue.put_nowait((loop.time() + delay, data))
    queue.put_nowait((loop.time() + delay, b""))
    with contextlib.suppress(ConnectionError):
        await delivering


async def main(port: int, target: int, delay: float) -> None:
    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(
            relay(reader, upstream_writer, delay), relay(upstream_reader, writer, delay)
        )

    server = await asyncio.start_server(connected, "127.0.0.1", port)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    print("ready", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) / 1000))
