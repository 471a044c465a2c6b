"""``opensequence contacts import`` as an operator runs it: a real subprocess on both
databases, with the results read back from the database."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from opensequence.auth import service as auth
from opensequence.db import Database
from opensequence.db.migrate import upgrade
from opensequence.models import Contact, Enrollment, Run, RunItemPage, Sequence, SequenceStep
from opensequence.runs.pages import StoredItem, unpack

OPENSEQUENCE = [sys.executable, "-m", "opensequence"]

CSV = (
    "email,Phone,name,plan,city\n"
    "ann@example.com,+1 415 555 0100,Ann,pro,NYC\n"
    "not-an-email,,Bad,,\n"
    ",,,,\n"
    'bob@example.com,,"Bob, Jr.",free,\n'
    '"two\nlines@example.com",,,,\n'
    "ANN@example.com,,Ann again,,\n"
    ",0612345678,,,\n"
    "carol@example.com,,Carol,,,extra\n"
    "dave@example.com,,D\x07ve,,\n"
)


@pytest.fixture
def env(database_url: str, tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENSEQUENCE_")}
    return {**clean, "OPENSEQUENCE_DATABASE_URL": database_url, "COLUMNS": "200"}


def run_import(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*OPENSEQUENCE, "contacts", "import", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def setup_org(database_url: str, *, sequence: dict[str, Any] | None = None) -> Any:
    """An organization named acme (and optionally a sequence with one step)."""
    upgrade(database_url)

    async def work() -> tuple[uuid.UUID, uuid.UUID | None]:
        db = Database(database_url, pool_size=1)
        try:
            async with db.transaction() as session:
                org = await auth.get_or_create_org(session, "acme")
                if sequence is None:
                    return org.id, None
                row = Sequence(org_id=org.id, **sequence)
                session.add(row)
                await session.flush()
                session.add(
                    SequenceStep(
                        sequence_id=row.id,
                        step_index=0,
                        action={"type": "send_emails", "data": {}},
                        delay_in_minutes=90,
                    )
                )
                return org.id, row.id
        finally:
            await db.dispose()

    return asyncio.run(work())


def welcome_sequence() -> dict[str, Any]:
    """A continuous sequence, active since now, that contacts can be imported into."""
    return {
        "name": "Welcome",
        "custom_id": "welcome",
        "is_continuous": True,
        "status": "active",
        "started_at": datetime.now(UTC),
    }


def read_all(database_url: str, model: Any) -> list[Any]:
    async def work() -> list[Any]:
        db = Database(database_url, pool_size=1)
        try:
            async with db.transaction() as session:
                return list(await session.scalars(select(model)))
        finally:
            await db.dispose()

    return asyncio.run(work())


def read_items(database_url: str, run_id: Any = None) -> list[StoredItem]:
    """Every stored run item (of ``run_id`` when given), in index order."""
    pages = [p for p in read_all(database_url, RunItemPage) if run_id in (None, p.run_id)]
    return sorted((item for p in pages for item in unpack(p.items)), key=lambda i: i.index)


def reported_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The ``line N: …`` reports of bad rows on stderr."""
    return [line for line in result.stderr.splitlines() if line.startswith("line ")]


def test_import_lands_good_rows_and_reports_bad_lines(
    database_url: str, env: dict[str, str], tmp_path: Path
) -> None:
    setup_org(database_url)
    (tmp_path / "people.csv").write_text(CSV, encoding="utf-8")
    result = run_import(["people.csv", "--org", "acme"], env, tmp_path)
    assert result.returncode == 1, result.stderr
    errors = reported_lines(result)
    assert errors == [
        "line 3: email: does not match pattern",
        "line 4: neither an email nor a phone to identify the contact",
        "line 6: email: does not match pattern",
        "line 10: 6 fields but the header has 5",
        "line 11: name: must not contain control characters",
    ]
    assert "imported 4 rows (3 new contacts), skipped 5" in result.stdout
    contacts = {c.email_normalized or c.phone_number: c for c in read_all(database_url, Contact)}
    assert set(contacts) == {"ann@example.com", "bob@example.com", "0612345678"}
    ann = contacts["ann@example.com"]
    assert ann.phone_number == "+14155550100" and ann.name == "Ann"
    assert ann.custom_data == {"plan": "pro", "city": "NYC"}
    assert contacts["bob@example.com"].name == "Bob, Jr."

    clean = tmp_path / "clean.csv"
    clean.write_text("email\nann@example.com\nerin@example.com\n", encoding="utf-8")
    again = run_import([str(clean), "--org", "acme"], env, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "imported 2 rows (1 new contacts), skipped 0" in again.stdout
    assert len(read_all(database_url, Contact)) == 4


def test_import_reports_stray_and_unclosed_quotes(
    database_url: str, env: dict[str, str], tmp_path: Path
) -> None:
    """Read leniently, ``"O"Brien`` lost its quotes silently and an unclosed quote swallowed
    every later line into one field: rows lost, exit 0."""
    setup_org(database_url)
    (tmp_path / "quotes.csv").write_text(
        'email,name\nq1@example.com,ok\nq2@example.com,"O"Brien\n'
        'q3@example.com,"unclosed\nq4@example.com,n4\nq5@example.com,n5\n',
        encoding="utf-8",
    )
    result = run_import(["quotes.csv", "--org", "acme"], env, tmp_path)
    assert result.returncode == 1, result.stderr
    errors = reported_lines(result)
    assert errors == [
        "line 3: ',' expected after '\"'",
        "line 4: a quoted field is never closed: every line after this one is in it",
    ]
    assert "imported 1 rows (1 new contacts), skipped 2" in result.stdout
    assert [c.email for c in read_all(database_url, Contact)] == ["q1@example.com"]


def test_import_usage_errors(database_url: str, env: dict[str, str], tmp_path: Path) -> None:
    setup_org(database_url)
    (tmp_path / "no-id.csv").write_text("first,last\na,b\n", encoding="utf-8")
    header = run_import(["no-id.csv", "--org", "acme"], env, tmp_path)
    assert header.returncode == 2 and "header" in header.stderr
    missing = run_import(["absent.csv", "--org", "acme"], env, tmp_path)
    assert missing.returncode == 2 and "FILE" in missing.stderr
    (tmp_path / "ok.csv").write_text("email\na@example.com\n", encoding="utf-8")
    # An unknown --org or --sequence exited 1, the code of an import that skipped rows.
    unknown_id = str(uuid.uuid4())
    for args, line in (
        (["--org", "nobody"], "--org: organization 'nobody' does not exist"),
        (["--org", "acme", "--sequence", "nope"], "--sequence: sequence 'nope' not found"),
        (
            ["--org", "acme", "--sequence", unknown_id],
            f"--sequence: sequence {unknown_id!r} not found",
        ),
    ):
        refused = run_import(["ok.csv", *args], env, tmp_path)
        assert (refused.returncode, refused.stderr) == (2, f"error: {line}\n"), args
    assert read_all(database_url, Contact) == []


def test_import_refuses_a_header_that_repeats_a_column(
    database_url: str, env: dict[str, str], tmp_path: Path
) -> None:
    """With `email,name,email` the last email column won without a word (and `Email,email`
    put the second address into custom_data)."""
    setup_org(database_url)
    for header, problem in (
        ("email,name,email", "column 'email' is repeated"),
        ("email,plan,plan", "column 'plan' is repeated"),
        ("email,a,a", "column 'a' is repeated"),
        ("Email,name,email", "column 'email' repeats 'Email' (both are the contact's email)"),
        (
            "phone,name,phone_number",
            "column 'phone_number' repeats 'phone' (both are the contact's phone)",
        ),
    ):
        (tmp_path / "repeated.csv").write_text(
            f"{header}\na@example.com,A,b@example.com\n", encoding="utf-8"
        )
        refused = run_import(["repeated.csv", "--org", "acme"], env, tmp_path)
        assert (refused.returncode, refused.stderr) == (
            2,
            f"error: FILE: repeated.csv: line 1: {problem}\n",
        ), header
    assert read_all(database_url, Contact) == []
    (tmp_path / "blanks.csv").write_text("email,,\na@example.com,x,y\n", encoding="utf-8")
    assert run_import(["blanks.csv", "--org", "acme"], env, tmp_path).returncode == 0


def test_import_into_a_continuous_sequence_makes_one_run(
    database_url: str, env: dict[str, str], tmp_path: Path
) -> None:
    _, sequence_id = setup_org(database_url, sequence=welcome_sequence())
    (tmp_path / "first.csv").write_text("email\nold@example.com\n", encoding="utf-8")
    assert (
        run_import(
            ["first.csv", "--org", "acme", "--sequence", "welcome"], env, tmp_path
        ).returncode
        == 0
    )
    (tmp_path / "people.csv").write_text(CSV, encoding="utf-8")
    (tmp_path / "people.csv").write_text(CSV + "old@example.com,,,,\n", encoding="utf-8")
    result = run_import(
        ["people.csv", "--org", "acme", "--sequence", str(sequence_id)], env, tmp_path
    )
    assert result.returncode == 1, result.stderr

    runs = sorted(read_all(database_url, Run), key=lambda r: r.created_at)
    assert [r.kind for r in runs] == ["import", "import"]
    run = runs[1]
    assert run.sequence_id == sequence_id and run.total == 5
    assert run.counts == {
        "added": 0,
        "created_and_added": 3,
        "filtered_out": 0,
        "already_enrolled": 1,
        "duplicate_in_request": 1,
        "not_found": 0,
    }
    items = read_items(database_url, run.id)
    assert [i.outcome for i in items] == [
        "created_and_added",
        "created_and_added",
        "duplicate_in_request",
        "created_and_added",
        "already_enrolled",
    ]
    assert items[0].input["line"] == 2 and items[0].input["email"] == "ann@example.com"
    enrollments = read_all(database_url, Enrollment)
    assert len(enrollments) == 4
    assert len({e.contact_id for e in enrollments}) == 4
    mine = [e for e in enrollments if e.run_id == run.id]
    assert len(mine) == 3
    for enrollment in mine:
        assert (enrollment.status, enrollment.current_step) == ("active", 0)
        assert enrollment.next_step_at is not None
        assert enrollment.next_step_at - enrollment.created_at == timedelta(minutes=90)


def test_import_refuses_sequences_it_cannot_enroll_into(
    database_url: str, env: dict[str, str], tmp_path: Path
) -> None:
    _, one_off = setup_org(
        database_url,
        sequence={"name": "Once", "is_continuous": False, "status": "pending"},
    )
    (tmp_path / "ok.csv").write_text("email\na@example.com\n", encoding="utf-8")
    refused = run_import(["ok.csv", "--org", "acme", "--sequence", str(one_off)], env, tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith(
        "error: --sequence: contacts can only be added to a continuous"
    )
    assert refused.stderr.count("\n") == 1
    assert read_all(database_url, Run) == [] and read_all(database_url, Contact) == []


def test_import_applies_the_sequence_filter_like_add_contacts(
    database_url: str, env: dict[str, str], tmp_path: Path
) -> None:
    _, filtered = setup_org(
        database_url,
        sequence={
            "name": "Filtered",
            "is_continuous": True,
            "status": "active",
            "filter": {
                "or": [
                    {"and": [{"type": "contacts_email_domain_name_in", "domain_name_in": ["x.io"]}]}
                ]
            },
        },
    )
    (tmp_path / "mixed.csv").write_text(
        "email,name\na@example.com,A\nb@x.io,B\nB@X.IO,again\n", encoding="utf-8"
    )
    done = run_import(["mixed.csv", "--org", "acme", "--sequence", str(filtered)], env, tmp_path)
    assert done.returncode == 0, done.stderr
    (run,) = read_all(database_url, Run)
    assert run.kind == "import" and run.total == 3
    assert {k: v for k, v in run.counts.items() if v} == {
        "filtered_out": 1,
        "created_and_added": 1,
        "duplicate_in_request": 1,
    }
    items = read_items(database_url)
    assert [item.outcome for item in items] == [
        "filtered_out",
        "created_and_added",
        "duplicate_in_request",
    ]
    assert items[0].reason == "or[0]: contacts_email_domain_name_in"
    assert items[0].input == {"line": 2, "email": "a@example.com", "name": "A"}
    assert len(read_all(database_url, Contact)) == 2
    assert len(read_all(database_url, Enrollment)) == 1


def _on_contact(database_url: str, email: str | None, *, statement: str = "") -> None:
    """A database trigger on the insert of the contact with ``email`` (None: dropped): it runs
    ``statement`` if given, else fails the insert. A real database event in the middle of an
    import."""
    from sqlalchemy import create_engine, text

    from opensequence.db.engine import sync_url

    engine = create_engine(sync_url(database_url))
    postgresql = engine.dialect.name == "postgresql"
    with engine.begin() as connection:
        if email is None:
            on = " ON contacts" if postgresql else ""
            connection.execute(text(f"DROP TRIGGER on_contact{on}"))
        elif postgresql:
            action = f"{statement};" if statement else "RAISE EXCEPTION 'disk full, say';"
            connection.execute(
                text(
                    "CREATE FUNCTION on_contact() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                    f"IF NEW.email = '{email}' THEN {action} END IF; RETURN NEW; END $$"
                )
            )
            connection.execute(
                text(
                    "CREATE TRIGGER on_contact AFTER INSERT ON contacts "
                    "FOR EACH ROW EXECUTE FUNCTION on_contact()"
                )
            )
        else:
            action = statement or "SELECT RAISE(ABORT, 'disk full, say')"
            connection.execute(
                text(
                    "CREATE TRIGGER on_contact AFTER INSERT ON contacts "
                    f"WHEN NEW.email = '{email}' BEGIN {action}; END"
                )
            )
    engine.dispose()


def test_an_import_stopped_by_the_database_says_where_and_can_be_run_again(
    database_url: str, env: dict[str, str], tmp_path: Path
) -> None:
    """The second batch (rows from line 2,002 on) fails in the database: the summary counts the
    first batch, stderr names the line the failed batch starts at and the database's reason
    (not a traceback, nor the batch's parameters), exit 1. Run again, the import lands the rest
    and finds the first batch's contacts rather than creating them twice."""
    setup_org(database_url)
    rows = "".join(f"person{n}@example.com,Person {n}\n" for n in range(3000))
    (tmp_path / "people.csv").write_text("email,name\n" + rows)
    _on_contact(database_url, "person2500@example.com")
    result = run_import(["people.csv", "--org", "acme"], env, tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stdout.strip() == "imported 2000 rows (2000 new contacts), skipped 0"
    assert "error: stopped at line 2002: " in result.stderr
    assert "disk full, say" in result.stderr
    assert "Traceback" not in result.stderr and "person1999@" not in result.stderr
    assert len(read_all(database_url, Contact)) == 2000

    _on_contact(database_url, None)
    again = run_import(["people.csv", "--org", "acme"], env, tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "imported 3000 rows (1000 new contacts), skipped 0"
    assert len(read_all(database_url, Contact)) == 3000


def test_an_import_whose_sequence_is_canceled_midway_stops_with_a_summary(
    database_url: str, env: dict[str, str], tmp_path: Path
) -> None:
    """The sequence is canceled while the second batch lands (a trigger cancels it in that
    batch's transaction): the third batch is refused, and the import stops there with the
    summary of the two before it and the refusal's reason, exit 1."""
    _, sequence_id = setup_org(database_url, sequence=welcome_sequence())
    rows = "".join(f"person{n}@example.com\n" for n in range(5000))
    (tmp_path / "people.csv").write_text("email\n" + rows)
    _on_contact(
        database_url,
        "person2500@example.com",
        statement=f"UPDATE sequences SET status = 'canceled' WHERE id = '{sequence_id.hex}'"
        if database_url.startswith("sqlite")
        else f"UPDATE sequences SET status = 'canceled' WHERE id = '{sequence_id}'",
    )
    result = run_import(["people.csv", "--org", "acme", "--sequence", "welcome"], env, tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stdout.startswith("imported 4000 rows (4000 new contacts), skipped 0; run ")
    assert "created_and_added 4000" in result.stdout
    assert "error: stopped at line 4002: sequence is canceled" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(read_all(database_url, Contact)) == 4000
    assert len(read_all(database_url, Enrollment)) == 4000
