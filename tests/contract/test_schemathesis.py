"""schemathesis against our own ``/openapi.json``: every operation, in-process, with a real key.

The app runs inside schemathesis' ASGI client (its own event-loop thread and lifespan), so this
test is synchronous and builds its own app from the per-test database rather than using the async
``app`` fixture, whose database engine belongs to pytest's loop. Each operation is driven twice:
with generated path parameters (mostly unknown ids → 404) and with the ids of rows seeded
beforehand, so that real resources, non-empty pages and run reports are schema-checked too.
Generation is bounded (``MAX_EXAMPLES`` per operation and mode, no deadline) to keep CI fast.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from opensequence.api.app import create_app
from opensequence.auth import service as auth
from opensequence.config import Settings
from opensequence.db import Database
from tests.helpers import STEP

MAX_EXAMPLES = 25
SEEDED_EXAMPLES = 10
NEGATIVE_EXAMPLES = 10
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


async def _create_key(database_url: str) -> str:
    database = Database(database_url)
    try:
        async with database.transaction() as session:
            org = await auth.get_or_create_org(session, "contract")
            return (await auth.create_key(session, org, None)).key
    finally:
        await database.dispose()


def _seed(client: httpx.Client) -> dict[str, str]:
    """Rows every kind of path parameter can point at: contact, sequence, run, suppression,
    sender limit."""

    def ok(response: httpx.Response) -> dict[str, Any]:
        assert response.status_code in (200, 201), response.text
        body: dict[str, Any] = response.json()
        return body

    contact = ok(client.post("/contacts", json={"contact": {"email": "a@example.com"}}))
    sequence = ok(
        client.post(
            "/sequences",
            json={
                "name": "contract",
                "custom_id": "contract-seq",
                "is_continuous": True,
                "filter": None,
                "steps": [STEP],
            },
        )
    )
    run = ok(
        client.post(
            f"/sequences/{sequence['id']}/contacts",
            json={"contacts": [{"email": "b@example.com", "name": "B"}, {"id": contact["id"]}]},
        )
    )
    ok(client.post("/suppressions", json={"email": "gone@example.com"}))
    ok(client.put("/sender-limits/example.com", json={"per_minute": 10}))
    return {
        "contact_id": str(contact["id"]),
        "sequence_id": str(sequence["id"]),
        "run_id": str(run["run_id"]),
        "email": "gone@example.com",
        "sender": "example.com",
    }


@pytest.fixture
def contract_app(settings: Settings, database_url: str) -> Any:
    application = create_app(settings)
    key = asyncio.run(_create_key(database_url))
    yield application, key
    asgi.shutdown_lifespans()


def test_every_operation_honours_its_documented_contract(contract_app: Any) -> None:
    application, key = contract_app
    headers = {"Authorization": f"Bearer {key}"}
    schema = schemathesis.openapi.from_asgi("/openapi.json", application)
    with asgi.get_client(application) as session:
        session.headers.update(headers)
        seeded = _seed(_HttpxOverRequests(session))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20, [op.label for op in operations]
    statuses: dict[str, set[int]] = {}
    for operation in operations:
        seen = statuses.setdefault(operation.label, set())
        _drive(operation, GenerationMode.POSITIVE, None, headers, MAX_EXAMPLES, seen)
        _drive(operation, GenerationMode.NEGATIVE, None, headers, NEGATIVE_EXAMPLES, seen)
        names = {p.name for p in operation.path_parameters}
        # A parameter without a seeded row (e.g. a signed token) gets generated values only;
        # tests/contract/test_tenant_isolation.py is the one that insists on every route.
        if names and names <= set(seeded):
            pinned = {name: seeded[name] for name in names}
            _drive(operation, GenerationMode.POSITIVE, pinned, headers, SEEDED_EXAMPLES, seen)
    # Proof that the run was authenticated and reached real handlers, not a wall of 401/404.
    assert 200 in statuses["GET /me"], statuses["GET /me"]
    succeeded = [label for label, codes in statuses.items() if any(c < 300 for c in codes)]
    assert len(succeeded) * 2 >= len(statuses), statuses


def _drive(
    operation: Any,
    mode: GenerationMode,
    path_parameters: dict[str, str] | None,
    headers: dict[str, str],
    examples: int,
    seen: set[int],
) -> None:
    strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)

    @hypothesis_settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def check(case: Any) -> None:
        seen.add(case.call_and_validate(headers=headers, checks=CHECKS).status_code)

    try:
        check()
    except Unsatisfiable:
        # Negative mode has nothing to make invalid in an operation without parameters or body
        # (or whose only parameters are pinned to seeded ids); positive mode must always run.
        if mode is not GenerationMode.NEGATIVE:
            raise


class _HttpxOverRequests:
    """The seeding helper speaks httpx-style; schemathesis' in-process client is requests."""

    def __init__(self, session: Any) -> None:
        self.session = session

    def post(self, url: str, json: Any) -> httpx.Response:
        return self._wrap(self.session.post(url, json=json))

    def put(self, url: str, json: Any) -> httpx.Response:
        return self._wrap(self.session.put(url, json=json))

    @staticmethod
    def _wrap(response: Any) -> httpx.Response:
        return httpx.Response(response.status_code, content=response.content)
