"""Rate limits per key (memory and Redis), offline docs and a valid OpenAPI 3.1 document."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from openapi_spec_validator import validate

from opensequence.api.app import create_app
from opensequence.api.ratelimit import RateLimiter
from opensequence.config import Settings
from tests.helpers import assert_error, make_tenant

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"rate_limit": "100/minute"})


async def test_101st_request_is_429_and_other_keys_are_unaffected(app: FastAPI) -> None:
    first = await make_tenant(app, "busy")
    second = await make_tenant(app, "quiet")
    async with first.client, second.client:
        for i in range(100):
            response = await first.client.get("/me")
            assert response.status_code == 200, (i, response.text)
            assert response.headers["ratelimit-limit"] == "100"
            assert response.headers["ratelimit-remaining"] == str(99 - i)
            assert 0 <= int(response.headers["ratelimit-reset"]) <= 60
        limited = await first.client.get("/me")
        assert_error(limited, 429, "rate limit")
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert limited.headers["ratelimit-remaining"] == "0"
        other = await second.client.get("/me")
        assert other.status_code == 200
        assert other.headers["ratelimit-remaining"] == "99"


def _redis_available() -> bool:
    try:
        with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


async def test_two_app_instances_share_one_budget_through_redis(settings: Settings) -> None:
    if not _redis_available():
        pytest.skip(f"Redis not reachable at {REDIS_URL}")
    namespace = f"osq-test-{uuid.uuid4().hex}"
    shared = settings.model_copy(update={"rate_limit": "10/minute", "redis_url": REDIS_URL})
    first_app, second_app = create_app(shared), create_app(shared)
    async with LifespanManager(first_app), LifespanManager(second_app):
        # Both instances point at one Redis; a fresh namespace keeps runs apart.
        for instance in (first_app, second_app):
            instance.state.rate_limiter = RateLimiter("10/minute", REDIS_URL, namespace=namespace)
        tenant = await make_tenant(first_app, "shared")
        async with (
            tenant.client as one,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=second_app),
                base_url="http://testserver",
                headers={"Authorization": f"Bearer {tenant.key}"},
            ) as two,
        ):
            statuses = []
            for i in range(10):
                client = one if i % 2 == 0 else two
                statuses.append((await client.get("/me")).status_code)
            assert statuses == [200] * 10
            assert_error(await one.get("/me"), 429)
            assert_error(await two.get("/me"), 429)
        for instance in (first_app, second_app):
            await instance.state.rate_limiter.aclose()
    with redis.Redis.from_url(REDIS_URL) as client:
        for key in client.scan_iter(f"{namespace}*"):
            client.delete(key)


@pytest.fixture
def redis_socket(tmp_path: Path) -> Iterator[Path]:
    """A Redis server of the test's own, listening only on a unix socket."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    path = tmp_path / "redis.sock"
    process = subprocess.Popen(
        [server, "--port", "0", "--unixsocket", str(path), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            if path.exists():
                break
            time.sleep(0.05)
        else:
            pytest.fail("redis-server did not open its socket")
        yield path
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_two_limiters_share_one_budget_through_redis_on_a_unix_socket(
    redis_socket: Path,
) -> None:
    """``unix:///PATH`` as redis-py spells it (``?db=N`` selects the database): Redis beside
    the API on one host, without a TCP port. It was refused at start."""
    url = f"unix://{redis_socket}?db=3"
    first, second = RateLimiter("3/minute", url), RateLimiter("3/minute", url)
    try:
        allowed = [(await (first, second)[i % 2].hit("key")).allowed for i in range(5)]
    finally:
        await first.aclose()
        await second.aclose()
    assert allowed == [True, True, True, False, False]
    with redis.Redis(unix_socket_path=str(redis_socket), db=3) as client:
        assert client.dbsize() > 0  # counted in database 3


@pytest.mark.parametrize("url", ["unix://redis.sock", "unix://"])
def test_a_unix_socket_url_without_an_absolute_path_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="expected redis://"):
        RateLimiter("3/minute", url)


async def test_an_unreachable_redis_lets_requests_through_uncounted(
    app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    """Every authenticated request answered 500 while the shared rate-limit storage was down.
    The limit guards the API; its store's outage now leaves the API up, logged."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]  # nothing listens once the socket is closed
    await app.state.rate_limiter.aclose()
    app.state.rate_limiter = RateLimiter("100/minute", f"redis://127.0.0.1:{closed}/0")
    tenant = await make_tenant(app, "unlimited")
    async with tenant.client:
        for _ in range(2):
            response = await tenant.client.get("/me")
            assert response.status_code == 200, response.text
            assert "ratelimit-remaining" not in response.headers
    warnings = [r for r in caplog.records if "rate-limit storage unreachable" in r.message]
    assert len(warnings) == 1


async def test_docs_load_with_assets_served_locally(anonymous: httpx.AsyncClient) -> None:
    page = await anonymous.get("/docs")
    assert page.status_code == 200
    assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text)
    assert assets, page.text
    for asset in assets:
        assert asset.startswith("/"), f"docs reference a remote asset: {asset}"
        served = await anonymous.get(asset)
        assert served.status_code == 200, asset
        assert len(served.content) > 100


async def test_openapi_is_valid_3_1_with_bearer_and_errordto(anonymous: httpx.AsyncClient) -> None:
    document = (await anonymous.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.1")
    validate(document)
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert set(document["components"]["schemas"]["ErrorDto"]["properties"]) == {
        "statusCode",
        "message",
        "error",
    }
    text = str(document)
    assert "HTTPValidationError" not in text
    me = document["paths"]["/me"]["get"]
    assert me["security"] == [{"bearerAuth": []}]
    for status in ("401", "429", "500"):
        assert me["responses"][status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorDto"
        }
