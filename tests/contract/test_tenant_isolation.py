"""Tenant isolation, walked over EVERY route of the app.

The route list comes from ``app.routes`` at test time, so a route added later is covered (or makes
this test fail until it says how its path parameters are filled and which body it takes). Three
properties:

1. Another organization's ids (sequence id and custom_id, run id, contact id, suppression email,
   sender) in any path parameter, with an otherwise valid request and a full-access key → 404,
   and no response ever carries the other organization's data; the other organization's rows
   read back unchanged afterwards.
2. Every authenticated route, with a key lacking the route's scope → 403 (nothing happens).
3. A handful of cross-tenant probes that do not go through path parameters: another
   organization's contact id inside an add-contacts body, list filters.
"""

from __future__ import annotations

import inspect
import itertools
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.routing import APIRoute

from opensequence.auth.service import SCOPES
from tests.helpers import STEP, Tenant, assert_error, http_client, make_tenant

# Routes that need no API key; they must never carry organization data.
PUBLIC = {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs-assets"}
# Keyless routes authorised by a signed ``{token}`` in the path (unsubscribe links): a token
# that was not signed by this installation must find nothing.
FORGED_TOKEN = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"

# A valid body per (method, path template): a request must get past validation to reach the
# lookup whose isolation is under test. A new route with a body must be added here.
BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/contacts"): {"contact": {"email": "fresh@example.com"}},
    ("PATCH", "/contacts/{contact_id}"): {"contact": {"name": "Renamed"}},
    ("POST", "/sequences"): {"name": "New", "filter": None, "steps": [STEP]},
    ("PATCH", "/sequences/{sequence_id}"): {"name": "Renamed"},
    ("POST", "/sequences/{sequence_id}/contacts"): {"contacts": [{"email": "x@example.com"}]},
    ("POST", "/suppressions"): {"email": "blocked@example.com"},
    ("PUT", "/sender-limits/{sender}"): {"per_minute": 5},
}

# Routes whose path parameter is a name the caller owns in its own namespace rather than a
# reference to an existing row (PUT creates or replaces the caller's own throttle for that
# sender): they may succeed, but only on the caller's rows; the final snapshot proves the other
# organization's row of the same name is untouched.
UPSERTS = {("PUT", "/sender-limits/{sender}")}


@dataclass
class Seeded:
    org_name: str
    contact_id: str
    contact_email: str
    sequence_id: str
    custom_id: str
    run_id: str
    suppression: str
    sender: str

    def values(self, parameter: str) -> list[str]:
        """Every way this organization's row can fill ``parameter``; KeyError if unknown."""
        return {
            "contact_id": [self.contact_id],
            "sequence_id": [self.sequence_id, self.custom_id],
            "run_id": [self.run_id],
            "email": [self.suppression],
            "sender": [self.sender],
        }[parameter]

    def markers(self) -> list[str]:
        return [
            self.contact_id,
            self.contact_email,
            self.sequence_id,
            self.custom_id,
            self.run_id,
            self.suppression,
            self.sender,
        ]


@dataclass
class Endpoint:
    method: str
    path: str
    scope: str | None  # None: public; "": any valid key
    route: APIRoute

    @property
    def parameters(self) -> list[str]:
        return re.findall(r"{(\w+)(?::\w+)?}", self.path)

    @property
    def label(self) -> str:
        return f"{self.method} {self.path}"


def _route_contexts(app: FastAPI) -> Iterator[tuple[str, set[str], Any]]:
    """(effective path, methods, original route) for every route, also inside included routers
    (FastAPI versions that include routers lazily expose them through ``iter_route_contexts``)."""
    try:
        from fastapi.routing import iter_route_contexts  # type: ignore[attr-defined]
    except ImportError:
        for route in app.routes:
            yield getattr(route, "path", ""), set(getattr(route, "methods", None) or ()), route
        return
    for context in iter_route_contexts(app.routes):
        yield context.path or "", set(context.methods or ()), context.original_route


def _required_scope(route: APIRoute) -> str | None:
    """The scope given to ``require(scope)`` among the route's dependencies, read from the
    dependency's closure; None when the route does not authenticate."""
    stack = list(route.dependant.dependencies)
    while stack:
        dependency = stack.pop()
        call = dependency.call
        if call is not None and getattr(call, "__qualname__", "").startswith("require."):
            return str(inspect.getclosurevars(call).nonlocals["scope"])
        stack.extend(dependency.dependencies)
    return None


def endpoints(app: FastAPI) -> list[Endpoint]:
    found: list[Endpoint] = []
    for path, methods, route in _route_contexts(app):
        if not isinstance(route, APIRoute):
            assert path in PUBLIC, f"{path}: a non-API route must be listed as public"
            continue
        scope = _required_scope(route)
        for method in sorted(methods - {"HEAD", "OPTIONS"}):
            found.append(Endpoint(method, path, scope, route))
    return found


async def _seed(client: httpx.AsyncClient, org: str) -> Seeded:
    async def ok(response: Any) -> dict[str, Any]:
        result = await response
        assert result.status_code in (200, 201), result.text
        body: dict[str, Any] = result.json()
        return body

    email = f"{org}-person@{org}.example"
    contact = await ok(
        client.post("/contacts", json={"contact": {"email": email, "name": f"{org} secret"}})
    )
    custom_id = f"{org}-seq"
    sequence = await ok(
        client.post(
            "/sequences",
            json={
                "name": f"{org} sequence",
                "custom_id": custom_id,
                "is_continuous": True,
                "filter": None,
                "steps": [STEP],
            },
        )
    )
    run = await ok(
        client.post(
            f"/sequences/{sequence['id']}/contacts",
            json={"contacts": [{"id": contact["id"]}, {"email": f"{org}-2@{org}.example"}]},
        )
    )
    suppression = f"{org}-blocked@{org}.example"
    await ok(client.post("/suppressions", json={"email": suppression}))
    sender = f"{org}.example"
    await ok(client.put(f"/sender-limits/{sender}", json={"per_minute": 7}))
    return Seeded(
        org, contact["id"], email, sequence["id"], custom_id, run["run_id"], suppression, sender
    )


async def _snapshot(client: httpx.AsyncClient, seeded: Seeded) -> list[Any]:
    """What the owner sees of its own rows; must not change under another tenant's requests."""
    paths = [
        f"/contacts/{seeded.contact_id}",
        f"/sequences/{seeded.sequence_id}",
        f"/sequences/{seeded.sequence_id}/runs/{seeded.run_id}",
        f"/sequences/{seeded.sequence_id}/runs/{seeded.run_id}/contacts",
        f"/sequences/{seeded.sequence_id}/enrollments",
        f"/contacts/{seeded.contact_id}/messages",
        "/suppressions",
        "/sender-limits",
        "/contacts",
    ]
    snapshot = []
    for path in paths:
        response = await client.get(path)
        assert response.status_code == 200, (path, response.text)
        snapshot.append(response.json())
    return snapshot


def _fillings(endpoint: Endpoint, mine: Seeded, theirs: Seeded) -> Iterator[dict[str, str]]:
    """Every assignment of the path parameters where at least one comes from ``theirs`` (the
    others from ``mine``, so a route cannot pass by failing on its own first parameter)."""
    names = endpoint.parameters
    for owners in itertools.product((mine, theirs), repeat=len(names)):
        if theirs not in owners:
            continue
        choices = [owner.values(name) for owner, name in zip(owners, names, strict=True)]
        for values in itertools.product(*choices):
            yield dict(zip(names, values, strict=True))


def _request(endpoint: Endpoint, values: dict[str, str]) -> dict[str, Any]:
    path = re.sub(r"{(\w+)(?::\w+)?}", lambda match: values[match.group(1)], endpoint.path)
    request: dict[str, Any] = {"method": endpoint.method, "url": path}
    if endpoint.route.body_field is not None:
        key = (endpoint.method, endpoint.path)
        assert key in BODIES, f"{endpoint.label}: add a valid body to BODIES"
        request["json"] = BODIES[key]
    return request


async def test_every_route_hides_other_organizations(
    app: FastAPI, tenant: Tenant, other_tenant: Tenant
) -> None:
    mine = await _seed(tenant.client, "acme")
    theirs = await _seed(other_tenant.client, "globex")
    before = await _snapshot(other_tenant.client, theirs)
    routes = endpoints(app)
    assert len(routes) >= 25, [e.label for e in routes]

    probed = 0
    # Upserts last: one creates the caller's own row of that name, which later routes on the
    # same name would then rightly find.
    for endpoint in sorted(routes, key=lambda e: (e.method, e.path) in UPSERTS):
        if endpoint.scope is None:
            if endpoint.parameters == ["token"]:
                path = endpoint.path.replace("{token}", FORGED_TOKEN)
                response = await tenant.client.request(endpoint.method, path)
                assert response.status_code == 404, (endpoint.label, response.text)
            else:
                assert endpoint.path in PUBLIC, f"{endpoint.label} needs no key: isolate or list it"
                assert not endpoint.parameters, endpoint.label
                response = await tenant.client.get(endpoint.path)
            assert not any(marker in response.text for marker in theirs.markers()), endpoint.label
            continue
        for name in endpoint.parameters:
            try:
                mine.values(name)
            except KeyError:
                raise AssertionError(
                    f"{endpoint.label}: no known way to fill {{{name}}}; extend Seeded.values"
                ) from None
        if not endpoint.parameters:
            response = await tenant.client.request(**_request(endpoint, {}))
            assert response.status_code < 500, (endpoint.label, response.text)
            leaked = [m for m in theirs.markers() if m in response.text]
            assert not leaked, (endpoint.label, leaked, response.text)
            probed += 1
            continue
        for values in _fillings(endpoint, mine, theirs):
            response = await tenant.client.request(**_request(endpoint, values))
            if (endpoint.method, endpoint.path) in UPSERTS:
                assert response.status_code in (200, 201), (endpoint.label, response.text)
            else:
                assert_error(response, 404)
            # A 404 may echo what the caller sent; anything else of theirs is a leak.
            echoed = " ".join(values.values())
            leaked = [m for m in theirs.markers() if m not in echoed and m in response.text]
            assert not leaked, (endpoint.label, values, leaked)
            probed += 1
    assert probed >= len(routes)
    assert await _snapshot(other_tenant.client, theirs) == before


async def test_every_authenticated_route_requires_its_scope(app: FastAPI, tenant: Tenant) -> None:
    mine = await _seed(tenant.client, "acme")
    lacking: dict[str, httpx.AsyncClient] = {}
    for scope in SCOPES:
        made = await make_tenant(app, "acme", [s for s in SCOPES if s != scope])
        lacking[scope] = made.client
    before = await _snapshot(tenant.client, mine)
    checked = 0
    try:
        for endpoint in endpoints(app):
            if endpoint.scope is None:
                continue
            if endpoint.scope == "":
                # Any valid key: a key with a single scope still answers.
                response = await lacking["contacts:write"].request(**_request(endpoint, {}))
                assert response.status_code == 200, (endpoint.label, response.text)
                continue
            assert endpoint.scope in SCOPES, endpoint.label
            values = {name: mine.values(name)[0] for name in endpoint.parameters}
            response = await lacking[endpoint.scope].request(**_request(endpoint, values))
            assert_error(response, 403, endpoint.scope)
            checked += 1
    finally:
        for client in lacking.values():
            await client.aclose()
    assert checked >= 20
    assert await _snapshot(tenant.client, mine) == before


async def test_cross_tenant_ids_inside_bodies_and_filters(
    app: FastAPI, tenant: Tenant, other_tenant: Tenant
) -> None:
    mine = await _seed(tenant.client, "acme")
    theirs = await _seed(other_tenant.client, "globex")

    added = await tenant.client.post(
        f"/sequences/{mine.sequence_id}/contacts", json={"contacts": [{"id": theirs.contact_id}]}
    )
    assert added.status_code == 200, added.text
    items = await tenant.client.get(
        f"/sequences/{mine.sequence_id}/runs/{added.json()['run_id']}/contacts"
    )
    assert items.status_code == 200
    assert [item["outcome"] for item in items.json()["items"]] == ["not_found"], items.text
    assert theirs.contact_email not in items.text

    for query in (
        {"email": theirs.contact_email},
        {"email": theirs.contact_email.upper()},
    ):
        listed = await tenant.client.get("/contacts", params=query)
        assert listed.status_code == 200
        assert listed.json()["items"] == [], (query, listed.text)

    enrollments = await other_tenant.client.get(f"/contacts/{theirs.contact_id}/messages")
    assert enrollments.status_code == 200
    mine_enrollments = await tenant.client.get(f"/sequences/{mine.sequence_id}/enrollments")
    assert theirs.contact_id not in mine_enrollments.text

    async with http_client(app, f"osk_{uuid.uuid4().hex}") as stranger:
        assert_error(await stranger.get(f"/contacts/{theirs.contact_id}"), 401)
