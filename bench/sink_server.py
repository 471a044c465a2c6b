"""A counting aiosmtpd sink in its own process, so that the benchmarks' sender and receiver do
not share a GIL: ``python bench/sink_server.py PORT [--pipelining]`` prints ``ready`` once
listening; with ``--pipelining`` its EHLO reply announces PIPELINING."""

from __future__ import annotations

import signal
import sys
import threading

from _common import CountingSink, PipeliningCountingSink, start_sink


def main() -> None:
    if len(sys.argv) not in (2, 3) or sys.argv[2:] not in ([], ["--pipelining"]):
        sys.exit("usage: sink_server.py PORT [--pipelining]")
    port = int(sys.argv[1])
    pipelining = sys.argv[2:] == ["--pipelining"]
    controller, _ = start_sink(PipeliningCountingSink() if pipelining else CountingSink(), port)
    print("ready", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    controller.stop()


if __name__ == "__main__":
    main()
