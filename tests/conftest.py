"""Fixtures shared by every test tier.

Both databases run through one fixture parameter (``backend``). Each test gets a database of its
own, cloned from a migrated template: a file copy on SQLite, ``CREATE DATABASE … TEMPLATE`` on
PostgreSQL. Choose backends with ``OPENSEQUENCE_TEST_BACKENDS=sqlite,postgresql`` (the default).
Where PostgreSQL is unreachable its leg is skipped with the reason — except under ``CI=true``,
where it fails loudly.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from opensequence.api.app import create_app
from opensequence.config import Settings
from opensequence.db import Database
from opensequence.db.migrate import upgrade
from tests.helpers import Tenant, http_client, make_tenant

BACKENDS = [
    b.strip()
    for b in os.environ.get("OPENSEQUENCE_TEST_BACKENDS", "sqlite,postgresql").split(",")
    if b.strip()
]
PG_ADMIN_URL = os.environ.get(
    "OPENSEQUENCE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
IN_CI = os.environ.get("CI", "").lower() == "true"


def _pg_url(dbname: str) -> str:
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    return f"{base}/{dbname}"


def _pg_admin(sql: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    try:
        _pg_admin("SELECT 1")
    except psycopg.Error as exc:
        message = f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}"
        if IN_CI:
            pytest.fail(f"CI=true requires the PostgreSQL leg: {message}", pytrace=False)
        pytest.skip(message)
    name = f"osq_tmpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    upgrade(_pg_url(name))
    yield name
    _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    if name not in ("sqlite", "postgresql"):
        pytest.fail(f"unknown backend {name!r} in OPENSEQUENCE_TEST_BACKENDS")
    return name


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database for this test only."""
    if backend == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        target = tmp_path / "test.db"
        shutil.copyfile(template, target)
        yield f"sqlite:///{target}"
        return
    template_name: str = request.getfixturevalue("pg_template")
    name = f"osq_t_{uuid.uuid4().hex[:12]}"
    _pg_admin(f'CREATE DATABASE "{name}" TEMPLATE "{template_name}"')
    yield _pg_url(name)
    _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=database_url,
        mail_url=f"maildir://{tmp_path / 'outbox'}",
        rate_limit="100000/minute",
        redis_url=None,
    )


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with LifespanManager(application):
        yield application


@pytest.fixture
async def db(app: FastAPI) -> Database:
    database: Database = app.state.db
    return database


@pytest.fixture
async def tenant(app: FastAPI) -> AsyncIterator[Tenant]:
    """An organization with a full-access key and an HTTP client that presents it."""
    made = await make_tenant(app, "acme")
    async with made.client:
        yield made


@pytest.fixture
async def other_tenant(app: FastAPI) -> AsyncIterator[Tenant]:
    made = await make_tenant(app, "globex")
    async with made.client:
        yield made


@pytest.fixture
async def anonymous(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with http_client(app) as client:
        yield client
