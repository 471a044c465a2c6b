"""Hostile input (SPEC §1): every attack is either a clear 4xx ErrorDto that writes nothing, or
— when it is merely text that looks like SQL or Liquid — stored and returned verbatim. After
each group the server still answers ``/readyz``. Runs on both databases through ``app``.

"Nothing written" is checked by counting the rows of every table before and after, and by
reading back the rows a PATCH aimed at.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from opensequence.models import Base
from tests.helpers import STEP, Tenant, assert_error

SQL = "'; DROP TABLE contacts; --"
SQL_VARIANTS = [
    SQL,
    "Robert'); DROP TABLE sequences;--",
    "x' OR '1'='1",
    '" OR ""="',
    "1; SELECT pg_sleep(10); --",
    "%' UNION SELECT * FROM api_keys --",
    "O'Brien \\' \\\" `backtick`",
]
LIQUID = ["{{ 7*7 }}", "{% for i in (1..100000000) %}x{% endfor %}", "{{ contact.email }}", "{%"]
CONTROLS = ["\x00", "a\x00b", "\x01", "\x08", "\x0b", "\x1b[31m", "\x1f"]
MIB = 1024 * 1024


def step(**data: Any) -> dict[str, Any]:
    return {**STEP, "action": {**STEP["action"], "data": {**STEP["action"]["data"], **data}}}


async def send_json(client: Any, method: str, path: str, content: Any) -> Any:
    """``content`` sent as it is (text, bytes or a stream) under a JSON content type: bodies
    a JSON encoder would never write."""
    if isinstance(content, str):
        content = content.encode()
    return await client.request(
        method, path, content=content, headers={"Content-Type": "application/json"}
    )


async def table_counts(app: FastAPI) -> dict[str, int]:
    async with app.state.db.transaction() as session:
        return {
            table.name: int(await session.scalar(select(func.count()).select_from(table)) or 0)
            for table in Base.metadata.sorted_tables
        }


@pytest.fixture
async def world(app: FastAPI, tenant: Tenant) -> AsyncIterator[dict[str, str]]:
    """One contact and one continuous sequence to aim PATCH and add-contacts at."""
    contact = await tenant.client.post(
        "/contacts", json={"contact": {"email": "target@example.com", "name": "Target"}}
    )
    sequence = await tenant.client.post(
        "/sequences",
        json={"name": "Target", "is_continuous": True, "filter": None, "steps": [STEP]},
    )
    assert contact.status_code == 201 and sequence.status_code == 201
    yield {"contact": contact.json()["id"], "sequence": sequence.json()["id"]}


def body_routes(world: dict[str, str]) -> list[tuple[str, str]]:
    return [
        ("POST", "/contacts"),
        ("PATCH", f"/contacts/{world['contact']}"),
        ("POST", "/sequences"),
        ("PATCH", f"/sequences/{world['sequence']}"),
        ("POST", f"/sequences/{world['sequence']}/contacts"),
        ("POST", "/suppressions"),
        ("PUT", "/sender-limits/example.com"),
    ]


class Unchanged:
    """Asserts that a block of rejected requests left every table and the targets as they were."""

    def __init__(self, app: FastAPI, client: httpx.AsyncClient, world: dict[str, str]) -> None:
        self.app, self.client, self.world = app, client, world

    async def _state(self) -> tuple[dict[str, int], Any, Any]:
        contact = await self.client.get(f"/contacts/{self.world['contact']}")
        sequence = await self.client.get(f"/sequences/{self.world['sequence']}")
        return await table_counts(self.app), contact.json(), sequence.json()

    async def __aenter__(self) -> Unchanged:
        self.before = await self._state()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if exc[0] is None:
            assert await self._state() == self.before
            ready = await self.client.get("/readyz")
            assert ready.status_code == 200, ready.text


async def test_malformed_json_is_400_everywhere(
    app: FastAPI, tenant: Tenant, world: dict[str, str]
) -> None:
    bodies = [
        b"{",
        b'{"contact": ',
        b'{"contact": {"email": "a@example.com",}}',
        b"\xff\xfe\x00{",
        b"{'single': 'quotes'}",
        b'{"a": 1}{"b": 2}',
        b"null",
        b"[]",
        b'"just a string"',
        b"12345",
        b'{"name": "x", "steps": [], "filter": null, "name": "dup" ',
    ]
    async with Unchanged(app, tenant.client, world):
        for method, path in body_routes(world):
            for body in bodies:
                response = await send_json(tenant.client, method, path, body)
                assert_error(response, 400)


async def test_wrong_content_type_is_415(
    app: FastAPI, tenant: Tenant, world: dict[str, str]
) -> None:
    valid = json.dumps({"contact": {"email": "ct@example.com"}}).encode()
    async with Unchanged(app, tenant.client, world):
        for method, path in body_routes(world):
            for content_type in (
                "text/plain",
                "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x",
                "application/xml",
                "application/jsonp",
                "",
            ):
                response = await tenant.client.request(
                    method, path, content=valid, headers={"Content-Type": content_type}
                )
                assert_error(response, 415, "application/json")


async def test_deeply_nested_json_is_400(
    app: FastAPI, tenant: Tenant, world: dict[str, str]
) -> None:
    """Nesting where each route expects a scalar or a flat object, up to 200,000 levels (beyond
    what Python's recursive parsers survive)."""
    sequence = f"/sequences/{world['sequence']}"
    async with Unchanged(app, tenant.client, world):
        for depth in (64, 5_000, 200_000):
            arrays = "[" * depth + "]" * depth
            objects = '{"a":' * depth + "1" + "}" * depth
            documents: list[tuple[str, str, str]] = [
                (
                    "POST",
                    "/contacts",
                    f'{{"contact": {{"email": "d@ex.co", "custom_data": {{"k": {arrays}}}}}}}',
                ),
                (
                    "POST",
                    "/contacts",
                    f'{{"contact": {{"email": "d@example.com", "custom_data": {objects}}}}}',
                ),
                ("PATCH", f"/contacts/{world['contact']}", f'{{"contact": {{"name": {arrays}}}}}'),
                ("POST", "/sequences", f'{{"name": "deep", "filter": {objects}, "steps": []}}'),
                ("PATCH", sequence, f'{{"filter": {{"or": [{{"and": [{objects}]}}]}}}}'),
                ("PATCH", sequence, f'{{"steps": {arrays}}}'),
                ("POST", f"{sequence}/contacts", f'{{"contacts": [{arrays}]}}'),
                ("POST", f"{sequence}/contacts", f'{{"contacts": [{{"email": {objects}}}]}}'),
                ("POST", "/suppressions", f'{{"email": {arrays}}}'),
                ("PUT", "/sender-limits/example.com", f'{{"per_minute": {objects}}}'),
            ]
            documents += [(method, path, arrays) for method, path in body_routes(world)]
            for method, path, document in documents:
                response = await send_json(tenant.client, method, path, document)
                assert_error(response, 400)


async def test_non_finite_numbers_are_400(
    app: FastAPI, tenant: Tenant, world: dict[str, str]
) -> None:
    """Python's JSON parser accepts NaN and Infinity, which JSON does not have."""
    sequence = f"/sequences/{world['sequence']}"
    async with Unchanged(app, tenant.client, world):
        for literal in ("NaN", "Infinity", "-Infinity", "1e400"):
            for method, path, document, field in [
                (
                    "POST",
                    "/contacts",
                    f'{{"contact": {{"email": "n@ex.co", "custom_data": {{"x": {literal}}}}}}}',
                    "custom_data",
                ),
                (
                    "PATCH",
                    f"/contacts/{world['contact']}",
                    f'{{"contact": {{"custom_data": {{"x": {literal}}}}}}}',
                    "custom_data",
                ),
                (
                    "POST",
                    f"{sequence}/contacts",
                    f'{{"contacts": [{{"email": "n@ex.co", "custom_data": {{"x": {literal}}}}}]}}',
                    "custom_data",
                ),
                (
                    "PATCH",
                    sequence,
                    '{"steps": [{"action": {"type": "make_phone_calls", "data": {}}, '
                    f'"delay_in_minutes": {literal}}}]}}',
                    "delay_in_minutes",
                ),
                ("PUT", "/sender-limits/example.com", f'{{"per_minute": {literal}}}', "per_minute"),
            ]:
                response = await send_json(tenant.client, method, path, document)
                assert_error(response, 400, field)


async def test_lone_surrogates_are_400(app: FastAPI, tenant: Tenant, world: dict[str, str]) -> None:
    """JSON's ``\\ud800`` escape decodes to a lone surrogate, which neither UTF-8 nor
    PostgreSQL can store: a phone number carrying one answered 500 on both databases and a
    custom_data value 500 on PostgreSQL (found by a review of add-contacts)."""
    sequence = f"/sequences/{world['sequence']}"
    lone = "\\ud800"
    async with Unchanged(app, tenant.client, world):
        for method, path, document, field in [
            (
                "POST",
                f"{sequence}/contacts",
                f'{{"contacts": [{{"phone_number": "+1{lone}"}}]}}',
                "phone_number",
            ),
            (
                "POST",
                f"{sequence}/contacts",
                f'{{"contacts": [{{"email": "s@ex.co", "custom_data": {{"k": "{lone}"}}}}]}}',
                "custom_data",
            ),
            (
                "POST",
                f"{sequence}/contacts",
                f'{{"contacts": [{{"email": "s@ex.co", "custom_data": {{"{lone}": 1}}}}]}}',
                "custom_data",
            ),
            ("POST", "/contacts", f'{{"contact": {{"phone_number": "+1{lone}"}}}}', "phone_number"),
            (
                "POST",
                "/contacts",
                f'{{"contact": {{"email": "s@ex.co", "custom_data": {{"k": "{lone}"}}}}}}',
                "custom_data",
            ),
            (
                "PATCH",
                f"/contacts/{world['contact']}",
                f'{{"contact": {{"custom_data": {{"k": "{lone}"}}}}}}',
                "custom_data",
            ),
            ("PATCH", sequence, f'{{"name": "x{lone}"}}', "name"),
        ]:
            response = await send_json(tenant.client, method, path, document)
            assert_error(response, 400, field)


async def test_ten_megabyte_fields_are_400_and_over_16_mib_is_413(
    app: FastAPI, tenant: Tenant, world: dict[str, str]
) -> None:
    big = "x" * (10 * MIB)
    sequence = f"/sequences/{world['sequence']}"
    async with Unchanged(app, tenant.client, world):
        for method, path, body, field in [
            ("POST", "/contacts", {"contact": {"email": "b@example.com", "name": big}}, "name"),
            (
                "POST",
                "/contacts",
                {"contact": {"email": "b@example.com", "custom_data": {"k": big}}},
                "custom_data",
            ),
            ("PATCH", f"/contacts/{world['contact']}", {"contact": {"name": big}}, "name"),
            ("POST", "/sequences", {"name": "x", "steps": [step(email_body=big)]}, "email_body"),
            ("PATCH", sequence, {"steps": [step(email_subject=big)]}, "email_subject"),
            ("PATCH", sequence, {"name": big}, "name"),
            (
                "POST",
                f"{sequence}/contacts",
                {"contacts": [{"email": "b@example.com", "name": big}]},
                "name",
            ),
            ("POST", "/suppressions", {"email": big + "@example.com"}, "email"),
        ]:
            response = await tenant.client.request(method, path, json=body)
            assert_error(response, 400, field)

        huge = json.dumps({"contact": {"email": "h@example.com", "name": "y" * (17 * MIB)}})
        for method, path in body_routes(world):
            declared = await send_json(tenant.client, method, path, huge)
            assert_error(declared, 413, "limit")

            async def chunks() -> AsyncIterator[bytes]:
                data = huge.encode()
                for start in range(0, len(data), MIB):
                    yield data[start : start + MIB]

            streamed = await send_json(tenant.client, method, path, chunks())
            assert_error(streamed, 413, "limit")


async def test_ten_thousand_and_one_items_is_413(
    app: FastAPI, tenant: Tenant, world: dict[str, str]
) -> None:
    items = [{"email": f"p{i}@example.com"} for i in range(10_001)]
    async with Unchanged(app, tenant.client, world):
        response = await tenant.client.post(
            f"/sequences/{world['sequence']}/contacts", json={"contacts": items}
        )
        assert_error(response, 413, "10000")


async def test_control_characters_are_400_naming_the_field(
    app: FastAPI, tenant: Tenant, world: dict[str, str]
) -> None:
    sequence = f"/sequences/{world['sequence']}"
    async with Unchanged(app, tenant.client, world):
        for bad in CONTROLS:
            cases: list[tuple[str, str, Any, str]] = [
                ("POST", "/contacts", {"contact": {"email": "c@example.com", "name": bad}}, "name"),
                ("POST", "/contacts", {"contact": {"phone": f"+1555{bad}"}}, "phone"),
                (
                    "POST",
                    "/contacts",
                    {"contact": {"email": "c@example.com", "custom_data": {bad: "v"}}},
                    "custom_data",
                ),
                (
                    "POST",
                    "/contacts",
                    {"contact": {"email": "c@example.com", "custom_data": {"k": bad}}},
                    "custom_data",
                ),
                ("POST", "/contacts", {"contact": {"email": f"c{bad}@example.com"}}, "email"),
                ("PATCH", f"/contacts/{world['contact']}", {"contact": {"name": bad}}, "name"),
                ("POST", "/sequences", {"name": bad, "steps": [STEP]}, "name"),
                ("PATCH", sequence, {"custom_id": f"id{bad}"}, "custom_id"),
                ("PATCH", sequence, {"steps": [step(email_subject=f"Hi{bad}")]}, "email_subject"),
                ("PATCH", sequence, {"steps": [step(email_body=f"<p>{bad}</p>")]}, "email_body"),
                (
                    "PATCH",
                    sequence,
                    {"steps": [step(email_sender_name=f"Team{bad}")]},
                    "email_sender_name",
                ),
                (
                    "PATCH",
                    sequence,
                    {
                        "filter": {
                            "or": [
                                {
                                    "and": [
                                        {
                                            "type": "contacts_email_domain_name_in",
                                            "domains": [f"ex{bad}ample.com"],
                                        }
                                    ]
                                }
                            ]
                        }
                    },
                    "filter",
                ),
                (
                    "POST",
                    f"{sequence}/contacts",
                    {"contacts": [{"email": "c@example.com", "name": bad}]},
                    "contacts[0]",
                ),
                ("POST", "/suppressions", {"email": f"s{bad}@example.com"}, "email"),
            ]
            for method, path, body, field in cases:
                response = await tenant.client.request(method, path, json=body)
                assert_error(response, 400, field)
            for field, query in (("email", f"a{bad}@example.com"), ("phone_number", bad)):
                response = await tenant.client.get("/contacts", params={field: query})
                assert_error(response, 400, "NUL" if "\x00" in bad else field)
        for bad in ("%00", "a%00b"):
            for method, path, body in [
                ("GET", f"/contacts/{bad}", None),
                ("GET", f"/sequences/{bad}", None),
                ("PATCH", f"/sequences/{bad}", {"name": "x"}),
                ("GET", f"/sequences/{bad}/enrollments", None),
                ("GET", f"{sequence}/runs/{bad}", None),
                ("DELETE", f"/suppressions/{bad}@example.com", None),
                ("PUT", f"/sender-limits/{bad}.com", {"per_minute": 1}),
                ("DELETE", f"/sender-limits/{bad}.com", None),
                ("GET", f"/contacts?cursor={bad}", None),
                ("GET", f"/sequences?cursor={bad}", None),
            ]:
                response = await tenant.client.request(method, path, json=body)
                assert_error(response, 400, "NUL")


async def test_a_newline_after_an_email_or_id_does_not_match_the_seed_patterns(
    app: FastAPI, tenant: Tenant, world: dict[str, str]
) -> None:
    """The seed's patterns end in ``$``, which in JSON Schema means the end of the string; in
    Python's ``re.match`` it also matches before a final newline."""
    sequence = f"/sequences/{world['sequence']}"
    async with Unchanged(app, tenant.client, world):
        for method, path, body, field in [
            ("POST", f"{sequence}/contacts", {"contacts": [{"email": "n@example.com\n"}]}, "email"),
            (
                "POST",
                f"{sequence}/contacts",
                {"contacts": [{"id": f"{world['contact']}\n"}]},
                "id",
            ),
            ("POST", "/contacts", {"contact": {"email": "n@example.com\n"}}, "email"),
            ("POST", "/suppressions", {"email": "n@example.com\n"}, "email"),
        ]:
            response = await tenant.client.request(method, path, json=body)
            assert_error(response, 400, field)


async def test_sql_and_liquid_look_alikes_are_stored_verbatim(
    app: FastAPI, tenant: Tenant, world: dict[str, str]
) -> None:
    tables_before = await table_counts(app)
    texts = [*SQL_VARIANTS, *LIQUID, "tab\tand\nnewline\r\n", "emoji 🚀 and ümlaut"]
    for index, text in enumerate(texts):
        created = await tenant.client.post(
            "/contacts",
            json={
                "contact": {
                    "email": f"look{index}@example.com",
                    "name": text[:256],
                    "custom_data": {text[:128]: text, "plain": text},
                }
            },
        )
        assert created.status_code == 201, created.text
        read = await tenant.client.get(f"/contacts/{created.json()['id']}")
        assert read.json()["name"] == text[:256]
        assert read.json()["custom_data"] == {text[:128]: text, "plain": text}

        listed = await tenant.client.get("/contacts", params={"email": text})
        assert listed.status_code in (200, 400), listed.text
        if listed.status_code == 200:
            assert listed.json()["items"] == []

        sequence = await tenant.client.post(
            "/sequences",
            json={
                "name": text[:256],
                "custom_id": f"look-{index}",
                "filter": {
                    "or": [
                        {
                            "and": [
                                {"type": "contacts_email_domain_name_in", "domains": [text]},
                            ]
                        }
                    ]
                },
                "steps": [step(email_sender_name=text)],
            },
        )
        assert sequence.status_code in (201, 400), sequence.text
        if sequence.status_code == 201:
            got = await tenant.client.get(f"/sequences/{sequence.json()['id']}")
            assert got.json()["name"] == text[:256]
            data = got.json()["steps"][0]["action"]["data"]
            assert data["email_sender_name"] == text
        else:
            assert_error(sequence, 400, "filter")

        suppressed = await tenant.client.post(
            "/suppressions", json={"email": f"look{index}@example.com", "reason": text}
        )
        assert suppressed.status_code == 400 or suppressed.status_code == 201, suppressed.text

    after = await table_counts(app)
    assert after["contacts"] == tables_before["contacts"] + len(texts)
    ready = await tenant.client.get("/readyz")
    assert ready.status_code == 200


async def test_liquid_templates_parse_at_write_time(
    app: FastAPI, tenant: Tenant, world: dict[str, str]
) -> None:
    """A template IS Liquid: valid Liquid (even a huge loop, bounded when rendered) is stored
    verbatim; Liquid that does not parse is a 400 naming the step, field and line."""
    valid = [
        "{{ contact.name }} {{ contact.custom_data.plan | default: 'free' }}",
        "{% for i in (1..100000000) %}x{% endfor %}",
        "{% raw %}{{ 7*7 }}{% endraw %}",
        SQL,
    ]
    for source in valid:
        created = await tenant.client.post(
            "/sequences", json={"name": "tpl", "steps": [step(email_body=source)]}
        )
        assert created.status_code == 201, (source, created.text)
        got = await tenant.client.get(f"/sequences/{created.json()['id']}")
        assert got.json()["steps"][0]["action"]["data"]["email_body"] == source

    invalid = [
        "{{ 7*7 }}",
        "{% for %}",
        "{% for i in %}{% endfor %}",
        "{% if %}",
        "{{",
        "{% endfor %}",
    ]
    async with Unchanged(app, tenant.client, world):
        for source in invalid:
            for field in ("email_subject", "email_body"):
                response = await tenant.client.post(
                    "/sequences", json={"name": "tpl", "steps": [STEP, step(**{field: source})]}
                )
                assert_error(response, 400, "steps[1]")
                assert field in response.json()["message"], response.text
