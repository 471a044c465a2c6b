"""SQL and memory agree: for generated contacts and filters, ``compile_filter`` run in the
database selects exactly the contacts ``matches`` accepts, on SQLite and PostgreSQL.

The database is created once per backend (the ``database_url`` fixture); each hypothesis example
writes its contacts under a fresh organization, so examples never see each other's rows, and
evaluates all its filters in one SELECT (each filter a selected boolean column, which also checks
that the expression is never NULL).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, insert, select

from opensequence.db.engine import sync_url
from opensequence.filters import ContactFacts, compile_filter, explain, matches, parse_filter
from opensequence.models import Contact, Enrollment, Organization, Run, Sequence

EXAMPLES = 500

SEQUENCE_IDS = [uuid.UUID(int=(7 << 76) | (2 << 62) | n) for n in range(1, 4)]
RUN_ID = uuid.UUID(int=(7 << 76) | (2 << 62) | 99)
SETUP_ORG = uuid.UUID(int=(7 << 76) | (2 << 62) | 100)
BASE = datetime(2024, 9, 14, 15, 34, 49, 121000, tzinfo=UTC)

DOMAINS = [
    "example.com",
    "EXAMPLE.com",
    "Example.COM",
    "ex.co",
    "exämple.com",
    "ÄBC.de",
    "äbc.de",
    "x.example.com",
    "",
    "a@b.com",
    "\u212aelvin.org",
    "kelvin.org",
]
LOCALS = ["a", "Bob", "a.b", "x@y", "é"]


emails = st.one_of(
    st.none(),
    st.builds(
        lambda local, domain: f"{local}@{domain}", st.sampled_from(LOCALS), st.sampled_from(DOMAINS)
    ),
    st.sampled_from(["no-at-sign", "", "@", "trailing@"]),
)
offsets = st.integers(min_value=-3, max_value=3).map(lambda n: timedelta(microseconds=n))
instants = st.builds(
    lambda days, delta: BASE + timedelta(days=days) + delta,
    st.integers(min_value=-2, max_value=2),
    offsets,
)
contacts_strategy = st.lists(
    st.tuples(emails, instants, st.sets(st.sampled_from(SEQUENCE_IDS), max_size=2)),
    min_size=0,
    max_size=8,
)


def _bound(draw: st.DrawFn, created: list[datetime]) -> str | None:
    if draw(st.booleans()) and created:
        value = draw(st.sampled_from(created)) + draw(offsets)
    elif draw(st.booleans()):
        return None
    else:
        value = draw(instants)
    zone = draw(st.sampled_from([UTC, timezone(timedelta(hours=2)), timezone(-timedelta(hours=5))]))
    text = value.astimezone(zone).isoformat()
    return text.replace("+00:00", "Z") if draw(st.booleans()) else text


@st.composite
def one_filter(draw: st.DrawFn, ids: list[uuid.UUID], created: list[datetime]) -> dict[str, Any]:
    kind = draw(st.sampled_from(["all", "ids", "created", "domain", "sequence"]))
    if kind == "all":
        return {"type": "all_contacts"}
    if kind == "ids":
        pool = [str(i) for i in ids] + [str(uuid.uuid4())]
        chosen = draw(st.lists(st.sampled_from(pool), max_size=4))
        return {"type": "contact_id_in", "contact_ids": [c.upper() for c in chosen]}
    if kind == "created":
        return {
            "type": "contacts_created_at_between",
            "after": _bound(draw, created),
            "before": _bound(draw, created),
        }
    if kind == "domain":
        return {
            "type": "contacts_email_domain_name_in",
            "domain_name_in": draw(st.lists(st.sampled_from(DOMAINS), max_size=3)),
        }
    pool = [str(s) for s in SEQUENCE_IDS] + ["not-a-uuid", str(uuid.uuid4())]
    return {"type": "contacts_affected_by_sequence", "sequence_id": draw(st.sampled_from(pool))}


@st.composite
def composite(draw: st.DrawFn, ids: list[uuid.UUID], created: list[datetime]) -> dict[str, Any]:
    groups = draw(st.lists(st.lists(one_filter(ids, created), max_size=3), min_size=1, max_size=3))
    return {"or": [{"and": group} for group in groups]}


def _setup(engine: Any) -> None:
    with engine.begin() as conn:
        conn.execute(insert(Organization).values(id=SETUP_ORG, name="setup", created_at=BASE))
        for sid in SEQUENCE_IDS:
            conn.execute(
                insert(Sequence).values(
                    id=sid,
                    org_id=SETUP_ORG,
                    name="s",
                    is_continuous=True,
                    status="active",
                    created_at=BASE,
                    updated_at=BASE,
                )
            )
        conn.execute(
            insert(Run).values(
                id=RUN_ID,
                org_id=SETUP_ORG,
                sequence_id=SEQUENCE_IDS[0],
                kind="start",
                total=0,
                counts={},
                created_at=BASE,
            )
        )


def test_sql_and_memory_agree(database_url: str) -> None:
    engine = create_engine(sync_url(database_url))
    try:
        _setup(engine)
        _property(engine)
    finally:
        engine.dispose()


def _property(engine: Any) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(rows=contacts_strategy, data=st.data())
    def check(rows: list[tuple[str | None, datetime, set[uuid.UUID]]], data: st.DataObject) -> None:
        org_id = uuid.uuid4()
        facts = [
            ContactFacts(uuid.uuid4(), email, created, frozenset(seqs))
            for email, created, seqs in rows
        ]
        raws = data.draw(
            st.lists(
                composite([f.id for f in facts], [f.created_at for f in facts]),
                min_size=1,
                max_size=6,
            )
        )
        filters = [parse_filter(raw) for raw in raws] + [None]
        with engine.begin() as conn:
            conn.execute(insert(Organization).values(id=org_id, name=str(org_id), created_at=BASE))
            if facts:
                conn.execute(
                    insert(Contact),
                    [
                        {
                            "id": f.id,
                            "org_id": org_id,
                            "email": f.email,
                            "custom_data": {},
                            "created_at": f.created_at,
                            "updated_at": f.created_at,
                        }
                        for f in facts
                    ],
                )
            enrolled = [
                {
                    "id": uuid.uuid4(),
                    "org_id": SETUP_ORG,
                    "sequence_id": sid,
                    "contact_id": f.id,
                    "run_id": RUN_ID,
                    "status": "canceled",
                    "current_step": 0,
                    "attempts": 0,
                    "created_at": BASE,
                    "updated_at": BASE,
                }
                for f in facts
                for sid in f.enrolled_sequence_ids
            ]
            if enrolled:
                conn.execute(insert(Enrollment), enrolled)
            columns = [
                compile_filter(f, Contact, Enrollment).label(f"f{i}") for i, f in enumerate(filters)
            ]
            result = conn.execute(select(Contact.id, *columns).where(Contact.org_id == org_id))
            in_sql = {
                row[0]: [bool(v) if v is not None else None for v in row[1:]] for row in result
            }
        assert set(in_sql) == {f.id for f in facts}
        for fact in facts:
            for i, f in enumerate(filters):
                expected = matches(f, fact)
                assert in_sql[fact.id][i] is expected, [*raws, None][i]
                assert (explain(f, fact) is None) is expected

    check()


def test_where_clause_form_selects_the_same_rows(database_url: str) -> None:
    """The filter used as WHERE (how start enrolls) picks the rows ``matches`` accepts."""
    engine = create_engine(sync_url(database_url))
    try:
        _setup(engine)
        org_id = uuid.uuid4()
        facts = [
            ContactFacts(uuid.uuid4(), "a@Example.com", BASE, frozenset()),
            ContactFacts(uuid.uuid4(), None, BASE + timedelta(microseconds=1), frozenset()),
            ContactFacts(
                uuid.uuid4(), "b@other.org", BASE - timedelta(microseconds=1), frozenset()
            ),
        ]
        raw = {
            "or": [
                {
                    "and": [
                        {"type": "contacts_email_domain_name_in", "domain_name_in": ["example.COM"]}
                    ]
                },
                {
                    "and": [
                        {
                            "type": "contacts_created_at_between",
                            "after": BASE.isoformat(),
                            "before": None,
                        }
                    ]
                },
            ]
        }
        f = parse_filter(raw)
        with engine.begin() as conn:
            conn.execute(insert(Organization).values(id=org_id, name="w", created_at=BASE))
            conn.execute(
                insert(Contact),
                [
                    {
                        "id": c.id,
                        "org_id": org_id,
                        "email": c.email,
                        "custom_data": {},
                        "created_at": c.created_at,
                        "updated_at": c.created_at,
                    }
                    for c in facts
                ],
            )
            got = set(
                conn.scalars(
                    select(Contact.id).where(
                        Contact.org_id == org_id, compile_filter(f, Contact, Enrollment)
                    )
                )
            )
        assert got == {facts[0].id, facts[1].id} == {c.id for c in facts if matches(f, c)}
    finally:
        engine.dispose()
