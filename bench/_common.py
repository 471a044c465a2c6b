"""Shared plumbing for the benchmarks: fresh databases, a served API, peak RSS."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg

PG_ADMIN_URL = os.environ.get(
    "OPENSEQUENCE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@contextlib.contextmanager
def fresh_database(backend: str) -> Iterator[str]:
    """A new, empty database URL for ``backend`` (sqlite or postgresql), removed afterwards."""
    from opensequence.db.migrate import upgrade

    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{Path(tmp) / 'bench.db'}"
            upgrade(url)
            yield url
        return
    name = f"osq_bench_{uuid.uuid4().hex[:10]}"
    base = PG_ADMIN_URL.rpartition("/")[0]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    url = f"{base}/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def served_api(database_url: str, *, extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """``opensequence api`` in a subprocess on a free port; yields its base URL."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OPENSEQUENCE_")},
        "OPENSEQUENCE_DATABASE_URL": database_url,
        "OPENSEQUENCE_RATE_LIMIT": "1000000/minute",
        **(extra_env or {}),
    }
    with subprocess.Popen(
        [sys.executable, "-m", "opensequence", "api", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as process:
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the API did not start")
                time.sleep(0.1)
            yield base
        finally:
            process.terminate()
            process.wait(timeout=30)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
