"""Composition of a running worker: transport from settings, graceful stop, and the factory
``serve`` hands to ``create_app(background=…)``."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from prometheus_client import CollectorRegistry

from opensequence.clock import Clock
from opensequence.config import Settings
from opensequence.db import Database
from opensequence.engine.worker import Worker
from opensequence.mail.transports import transport_from_url


async def run_worker(
    db: Database,
    settings: Settings,
    *,
    concurrency: int,
    clock: Clock | None = None,
    registry: CollectorRegistry | None = None,
    handle_signals: bool = False,
) -> None:
    """Run a worker until it is stopped: by SIGTERM/SIGINT when ``handle_signals``, or by
    cancellation of this coroutine. Either way it stops claiming, lets in-flight sends finish
    and record their outcome, releases claims it did not start, and closes the transport.

    Cancellation is absorbed while the worker winds down (the task is shielded) and re-raised
    afterwards, so a cancel never abandons a message between "sent" and "recorded".
    """
    transport = transport_from_url(settings.mail_url, pool_size=concurrency)
    worker = Worker(
        db, transport, settings, clock=clock, concurrency=concurrency, registry=registry
    )
    loop = asyncio.get_running_loop()
    if handle_signals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, worker.stop)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        worker.stop()
        await task
        raise
    finally:
        if handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
        await transport.aclose()


def background_worker(concurrency: int = 20) -> Callable[[Any], Coroutine[Any, Any, None]]:
    """For ``serve``: the worker for the app's lifetime, on the app's database, clock and
    metrics registry."""

    async def run(app: Any) -> None:
        await run_worker(
            app.state.db,
            app.state.settings,
            concurrency=concurrency,
            clock=app.state.clock,
            registry=app.state.registry,
        )

    return run
