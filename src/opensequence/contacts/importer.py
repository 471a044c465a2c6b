"""CSV import (SPEC §7 ``opensequence contacts import``): parse and validate rows, then land
them in batches through :func:`resolve_contacts`, optionally enrolling them into a continuous
sequence as one run of kind ``import``.

Each batch is its own transaction so SQLite's single writer lock is held for one batch at a
time (the API keeps answering during a long import) and a crash loses at most one batch;
re-running the import is harmless because resolve finds the contacts that already landed and
the enrollment insert skips contacts already in the sequence.
"""

from __future__ import annotations

import csv
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from opensequence.contacts import repository
from opensequence.contacts.schemas import ContactInput
from opensequence.contacts.service import IdentifierInput, resolve_contacts
from opensequence.errors import Conflict, Invalid
from opensequence.models.run import OUTCOMES
from opensequence.sequences.lookup import get_sequence

BATCH_SIZE = 2000
_EMAIL = ("email",)
_PHONE = ("phone", "phone_number")
_NAME = ("name",)


@dataclass(frozen=True)
class CsvRow:
    """A row that passed validation. ``cells`` are its non-empty cells, as written."""

    line: int
    contact: ContactInput
    cells: dict[str, str]


@dataclass(frozen=True)
class BadRow:
    line: int
    message: str


@dataclass
class ImportRun:
    """Where imported contacts are enrolled, and the run's running totals."""

    sequence_id: uuid.UUID
    run_id: uuid.UUID
    first_delay_minutes: float
    total: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))


@dataclass
class ImportTotals:
    landed: int = 0
    created: int = 0
    skipped: int = 0
    seen: set[uuid.UUID] = field(default_factory=set)


def _column(header: Sequence[str], names: tuple[str, ...]) -> str | None:
    for column in header:
        if column.strip().lower() in names:
            return column
    return None


def count_records(path: Path) -> int:
    """Data records in the file (for the progress bar's total); checks the header first, so a
    file that cannot be imported at all fails (Invalid) before anything is written."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        next(read_rows(handle), None)
        handle.seek(0)
        return max(0, sum(1 for _ in csv.reader(handle)) - 1)


def read_rows(handle: TextIO) -> Iterator[CsvRow | BadRow]:
    """Rows of a CSV whose first line is the header. ``email``, ``phone`` (or
    ``phone_number``) and ``name`` columns (any case) map to the contact's fields; every other
    named column goes into ``custom_data`` as text. Empty cells are absent values. A row is
    bad when it fails the API's validation (same limits and patterns) or has neither an email
    nor a phone to identify it; it is reported with the line it starts on."""
    reader = csv.reader(handle)
    try:
        header = next(reader)
    except StopIteration:
        raise Invalid("FILE: empty file (line 1 must be the header)") from None
    except csv.Error as exc:
        raise Invalid(f"line 1: {exc}") from exc
    email_col = _column(header, _EMAIL)
    phone_col = _column(header, _PHONE)
    name_col = _column(header, _NAME)
    if email_col is None and phone_col is None:
        raise Invalid("line 1: the header needs an 'email' or 'phone' column")
    known = {email_col, phone_col, name_col}
    line = reader.line_num + 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield BadRow(line, str(exc))
            line = reader.line_num + 1
            continue
        start, line = line, reader.line_num + 1
        if not record:
            continue
        if len(record) > len(header):
            yield BadRow(start, f"{len(record)} fields but the header has {len(header)}")
            continue
        cells = {
            column: value
            for column, value in zip(header, record, strict=False)
            if column.strip() and value != ""
        }
        yield _validate(start, cells, email_col, phone_col, name_col, known)


def _validate(
    line: int,
    cells: dict[str, str],
    email_col: str | None,
    phone_col: str | None,
    name_col: str | None,
    known: set[str | None],
) -> CsvRow | BadRow:
    data: dict[str, Any] = {}
    if email_col in cells:
        data["email"] = cells[email_col]
    if phone_col in cells:
        data["phone"] = cells[phone_col]
    if name_col in cells:
        data["name"] = cells[name_col]
    custom = {key: value for key, value in cells.items() if key not in known}
    if custom:
        data["custom_data"] = custom
    try:
        contact = ContactInput.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "row"
        message = str(first["msg"]).removeprefix("Value error, ")
        if first["type"] == "string_pattern_mismatch":
            message = "does not match pattern"
        return BadRow(line, f"{where}: {message}")
    if contact.email is None and (contact.phone is None or not contact.phone.strip()):
        return BadRow(line, "neither an email nor a phone to identify the contact")
    return CsvRow(line, contact, cells)


def _matches_everyone(filter_: dict[str, Any] | None) -> bool:
    if filter_ is None:
        return True
    groups = filter_.get("or") or []
    return any(
        all(item.get("type") == "all_contacts" for item in group.get("and") or [])
        for group in groups
    )


async def start_import_run(
    session: AsyncSession, org_id: uuid.UUID, sequence_ref: str, *, now: datetime
) -> ImportRun:
    """Check the sequence can take contacts and create the ``import`` run.

    Only continuous, active sequences whose filter admits every contact are accepted here:
    evaluating other filters is the add-contacts service's job, and enrolling a contact the
    filter would reject must not happen, so such sequences are refused (Conflict) for now.
    """
    sequence = await get_sequence(session, org_id, sequence_ref)
    if not sequence.is_continuous or sequence.status != "active":
        raise Conflict(
            f"sequence {sequence_ref!r} is not an active continuous sequence "
            f"(status {sequence.status})"
        )
    if not _matches_everyone(sequence.filter):
        raise Conflict(
            f"sequence {sequence_ref!r} has a contact filter; import into it is not supported yet"
        )
    delay = await repository.first_step_delay(session, sequence.id)
    if delay is None:
        raise Conflict(f"sequence {sequence_ref!r} has no steps")
    run_id = await repository.insert_run(
        session, org_id=org_id, sequence_id=sequence.id, kind="import", now=now
    )
    return ImportRun(sequence.id, run_id, delay)


async def import_batch(
    session: AsyncSession,
    org_id: uuid.UUID,
    rows: Sequence[CsvRow],
    *,
    totals: ImportTotals,
    run: ImportRun | None,
    now: datetime,
) -> None:
    """Land one batch of valid rows: resolve (create the missing contacts), then — with a run
    — enroll the distinct contacts not yet seen in this import, record one run item per row
    and update the run's totals. A handful of statements per batch."""
    resolved = await resolve_contacts(
        session,
        org_id,
        [
            IdentifierInput(
                email=row.contact.email,
                phone_number=row.contact.given_phone(),
                name=row.contact.name,
                custom_data=row.contact.custom_data,
            )
            for row in rows
        ],
        now=now,
    )
    totals.landed += len(rows)
    totals.created += sum(r.created for r in resolved)
    if run is None:
        return
    fresh: list[uuid.UUID] = []
    for result in resolved:
        if result.contact_id is not None and result.contact_id not in totals.seen:
            totals.seen.add(result.contact_id)
            fresh.append(result.contact_id)
    enrolled = await repository.enroll_ignoring_existing(
        session,
        org_id=org_id,
        sequence_id=run.sequence_id,
        run_id=run.run_id,
        contact_ids=fresh,
        next_step_at=now + timedelta(minutes=run.first_delay_minutes),
        now=now,
    )
    fresh_set = set(fresh)
    items: list[dict[str, Any]] = []
    for row, result in zip(rows, resolved, strict=True):
        contact_id = result.contact_id
        if contact_id is None:
            outcome = "not_found"
        elif contact_id not in fresh_set:
            outcome = "duplicate_in_request"
        elif contact_id not in enrolled:
            outcome = "already_enrolled"
        else:
            outcome = "created_and_added" if result.created else "added"
        if contact_id is not None:
            fresh_set.discard(contact_id)
        run.counts[outcome] += 1
        items.append(
            {
                "run_id": run.run_id,
                "item_index": run.total,
                "input": {"line": row.line, **row.cells},
                "contact_id": contact_id,
                "outcome": outcome,
                "reason": None,
            }
        )
        run.total += 1
    await repository.insert_run_items(session, items)
    await repository.set_run_totals(session, run.run_id, total=run.total, counts=run.counts)
