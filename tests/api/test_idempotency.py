"""Idempotency-Key on POST (SPEC §1), exercised through a probe route that counts executions."""

from __future__ import annotations

import asyncio
import itertools

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from pydantic import BaseModel

from opensequence.api.deps import require
from opensequence.auth.service import Principal
from opensequence.errors import Conflict
from tests.helpers import Tenant, assert_error, make_tenant

probe = APIRouter()
executions: list[dict[str, object]] = []
_counter = itertools.count(1)


class Order(BaseModel):
    item: str
    fail: bool = False
    slow: bool = False


@probe.post("/_probe/orders", status_code=201)
async def create_order(order: Order, principal: Principal = require("")) -> dict[str, object]:
    if order.slow:
        await asyncio.sleep(0.3)
    if order.fail:
        executions.append({"item": order.item, "failed": True})
        raise Conflict("out of stock")
    record = {"id": next(_counter), "item": order.item, "org": str(principal.org_id)}
    executions.append(record)
    return record


@pytest.fixture
async def app(app: FastAPI) -> FastAPI:
    app.include_router(probe)
    executions.clear()
    return app


async def test_replay_returns_first_response_and_runs_once(tenant: Tenant) -> None:
    headers = {"Idempotency-Key": "order-1"}
    first = await tenant.client.post("/_probe/orders", json={"item": "a"}, headers=headers)
    second = await tenant.client.post("/_probe/orders", json={"item": "a"}, headers=headers)
    assert first.status_code == second.status_code == 201
    assert second.json() == first.json()
    assert second.headers["idempotent-replayed"] == "true"
    assert len(executions) == 1


async def test_same_key_different_body_is_409(tenant: Tenant) -> None:
    headers = {"Idempotency-Key": "order-2"}
    assert (
        await tenant.client.post("/_probe/orders", json={"item": "a"}, headers=headers)
    ).is_success
    response = await tenant.client.post("/_probe/orders", json={"item": "b"}, headers=headers)
    assert_error(response, 409, "different request")
    assert len(executions) == 1


async def test_without_key_every_post_runs(tenant: Tenant) -> None:
    for _ in range(2):
        await tenant.client.post("/_probe/orders", json={"item": "a"})
    assert len(executions) == 2


async def test_failed_request_is_not_remembered(tenant: Tenant) -> None:
    headers = {"Idempotency-Key": "order-3"}
    failed = await tenant.client.post(
        "/_probe/orders", json={"item": "a", "fail": True}, headers=headers
    )
    assert_error(failed, 409, "out of stock")
    retried = await tenant.client.post(
        "/_probe/orders", json={"item": "a", "fail": True}, headers=headers
    )
    assert_error(retried, 409, "out of stock")
    assert len(executions) == 2


async def test_concurrent_same_key_runs_once(tenant: Tenant) -> None:
    headers = {"Idempotency-Key": "order-4"}
    body = {"item": "a", "slow": True}
    responses = await asyncio.gather(
        *(tenant.client.post("/_probe/orders", json=body, headers=headers) for _ in range(3))
    )
    assert len(executions) == 1
    successes = [r.json() for r in responses if r.status_code == 201]
    assert successes and all(body == successes[0] for body in successes)
    for response in responses:
        if response.status_code != 201:
            assert_error(response, 409, "in progress")


async def test_keys_are_per_organization(app: FastAPI, tenant: Tenant) -> None:
    other = await make_tenant(app, "other-org")
    headers = {"Idempotency-Key": "shared-key"}
    async with other.client:
        mine = await tenant.client.post("/_probe/orders", json={"item": "a"}, headers=headers)
        theirs = await other.client.post("/_probe/orders", json={"item": "a"}, headers=headers)
    assert mine.json()["org"] != theirs.json()["org"]
    assert len(executions) == 2


async def test_bad_key_is_400_and_missing_auth_is_401(
    tenant: Tenant, anonymous: httpx.AsyncClient
) -> None:
    response = await tenant.client.post(
        "/_probe/orders", json={"item": "a"}, headers={"Idempotency-Key": "x" * 300}
    )
    assert_error(response, 400, "Idempotency-Key")
    response = await anonymous.post(
        "/_probe/orders", json={"item": "a"}, headers={"Idempotency-Key": "k"}
    )
    assert_error(response, 401)
    assert executions == []
