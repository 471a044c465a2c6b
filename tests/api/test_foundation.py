"""Foundation contract (SPEC §1): auth, scopes, ErrorDto for every error, request ids, limits."""

from __future__ import annotations

import uuid

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, Field

from opensequence.api.deps import require
from opensequence.auth import service as auth
from opensequence.auth.service import Principal
from tests.helpers import Tenant, assert_error, http_client, make_tenant

probe = APIRouter()


class ProbeBody(BaseModel):
    name: str = Field(max_length=256)
    count: int
    tags: list[str] = []


@probe.post("/_probe/write")
async def probe_write(body: ProbeBody, _: Principal = require("contacts:write")) -> dict[str, int]:
    return {"count": body.count}


@probe.get("/_probe/read")
async def probe_read(_: Principal = require("contacts:read")) -> dict[str, bool]:
    return {"ok": True}


@probe.get("/_probe/boom")
async def probe_boom(_: Principal = require("")) -> None:
    raise RuntimeError("secret internal detail")


@pytest.fixture
async def app(app: FastAPI) -> FastAPI:
    app.include_router(probe)
    return app


async def test_missing_key_is_401_errordto(anonymous: httpx.AsyncClient) -> None:
    response = await anonymous.get("/me")
    assert_error(response, 401, "missing")
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["x-request-id"]


async def test_unknown_key_is_401(app: FastAPI) -> None:
    async with http_client(app, "osk_" + "x" * 43) as client:
        assert_error(await client.get("/me"), 401, "invalid")
    async with http_client(app, "not-even-our-format") as client:
        assert_error(await client.get("/me"), 401)


async def test_revoked_key_is_401(app: FastAPI, tenant: Tenant) -> None:
    assert (await tenant.client.get("/me")).status_code == 200
    async with app.state.db.transaction() as session:
        await auth.revoke_key(session, tenant.key_id)
    assert_error(await tenant.client.get("/me"), 401, "revoked")


async def test_scope_lacking_is_403_and_scope_present_passes(app: FastAPI) -> None:
    reader = await make_tenant(app, "readers", ["contacts:read"])
    async with reader.client as client:
        assert (await client.get("/_probe/read")).json() == {"ok": True}
        response = await client.post("/_probe/write", json={"name": "a", "count": 1})
        assert_error(response, 403, "contacts:write")
        me = (await client.get("/me")).json()
        assert me["scopes"] == ["contacts:read"]


async def test_full_access_key_reports_star_scope(tenant: Tenant) -> None:
    body = (await tenant.client.get("/me")).json()
    assert body == {"org_id": str(tenant.org_id), "key_id": str(tenant.key_id), "scopes": ["*"]}


async def test_malformed_json_is_400(tenant: Tenant) -> None:
    response = await tenant.client.post(
        "/_probe/write",
        content=b'{"name": "a", "count": ',
        headers={"content-type": "application/json"},
    )
    assert_error(response, 400, "malformed JSON")


async def test_wrong_field_type_is_400_naming_the_field(tenant: Tenant) -> None:
    response = await tenant.client.post("/_probe/write", json={"name": "a", "count": "many"})
    assert_error(response, 400, "count:")
    response = await tenant.client.post(
        "/_probe/write", json={"name": "a", "count": 1, "tags": ["ok", 7]}
    )
    assert_error(response, 400, "tags[1]")


async def test_unknown_route_is_404_and_wrong_method_is_405(tenant: Tenant) -> None:
    assert_error(await tenant.client.get("/no/such/route"), 404, "/no/such/route")
    response = await tenant.client.delete("/healthz")
    assert_error(response, 405)
    assert response.headers["allow"] == "GET"
    # Every method of the path, not only those of the first route that matched it.
    for method, path, allowed in (
        ("DELETE", "/sequences", "GET, POST"),
        ("POST", "/sequences/x", "GET, PATCH"),
        ("POST", "/contacts/x", "DELETE, GET, PATCH"),
        ("POST", "/sender-limits/x", "DELETE, PUT"),
    ):
        response = await tenant.client.request(method, path)
        assert_error(response, 405)
        assert response.headers["allow"] == allowed, (method, path)
    # Outside the API's routes, Starlette's own answer stands (it was emptied).
    response = await tenant.client.post("/docs-assets/x.js")
    assert response.status_code == 405 and response.headers["allow"] == "GET, HEAD"


async def test_body_over_16_mib_is_413(tenant: Tenant) -> None:
    big = b'{"name": "' + b"a" * (16 * 1024 * 1024 + 10) + b'", "count": 1}'
    response = await tenant.client.post(
        "/_probe/write", content=big, headers={"content-type": "application/json"}
    )
    assert_error(response, 413, "limit")


async def test_unexpected_error_is_generic_500_with_request_id(tenant: Tenant) -> None:
    response = await tenant.client.get("/_probe/boom", headers={"X-Request-Id": "trace-me-42"})
    body = assert_error(response, 500)
    assert "secret" not in str(body["message"])
    assert response.headers["x-request-id"] == "trace-me-42"


async def test_request_id_is_generated_per_request(anonymous: httpx.AsyncClient) -> None:
    first = await anonymous.get("/healthz")
    second = await anonymous.get("/healthz")
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


async def test_health_ready_and_metrics_need_no_key(anonymous: httpx.AsyncClient) -> None:
    assert (await anonymous.get("/healthz")).json() == {"status": "ok"}
    assert (await anonymous.get("/readyz")).json()["database"] == "ok"
    await anonymous.get("/me")
    metrics = await anonymous.get("/metrics")
    assert metrics.status_code == 200
    assert 'opensequence_http_requests_total{method="GET",route="/me",status="401"}' in metrics.text
    assert "opensequence_http_request_duration_seconds_bucket" in metrics.text
    assert "ratelimit-limit" not in metrics.headers


async def test_keys_are_hashed_at_rest(app: FastAPI, tenant: Tenant) -> None:
    async with app.state.db.transaction() as session:
        rows = await auth.list_keys(session, await auth.find_org(session, "acme"))
    assert len(rows) == 1
    assert tenant.key not in (rows[0].key_hash, rows[0].prefix)
    assert rows[0].key_hash == auth.hash_key(tenant.key)
    assert tenant.key.startswith(rows[0].prefix)


async def test_org_id_of_key_is_the_tenant(app: FastAPI) -> None:
    first = await make_tenant(app, "one")
    second = await make_tenant(app, "two")
    async with first.client, second.client:
        assert (await first.client.get("/me")).json()["org_id"] == str(first.org_id)
        assert (await second.client.get("/me")).json()["org_id"] == str(second.org_id)
        assert first.org_id != second.org_id
    assert isinstance(first.org_id, uuid.UUID)


async def test_non_json_bodies_are_415_and_deep_nesting_is_400(tenant: Tenant) -> None:
    url = "/_probe/write"
    body = b'{"name": "a", "count": 1}'
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/xml"):
        response = await tenant.client.post(
            url, content=body, headers={"content-type": content_type}
        )
        assert_error(response, 415, "application/json")
    ok = await tenant.client.post(
        url, content=body, headers={"content-type": "application/json; charset=utf-8"}
    )
    assert ok.status_code == 200
    deep = b"[" * 100_000 + b"]" * 100_000
    response = await tenant.client.post(
        url, content=deep, headers={"content-type": "application/json"}
    )
    assert_error(response, 400)
    assert (await tenant.client.get("/me")).status_code == 200
