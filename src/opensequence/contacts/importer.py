"""CSV import (SPEC §7 ``opensequence contacts import``): parse and validate rows, then land
them in batches through :func:`resolve_contacts`, optionally enrolling them into a continuous
sequence as one run of kind ``import`` through the same path as ``POST /sequences/{id}/contacts``.

Each batch is its own transaction so SQLite's single writer lock is held for one batch at a
time (the API keeps answering during a long import) and a crash loses at most one batch;
re-running the import is harmless because resolve finds the contacts that already landed and
the enrollment insert skips contacts already in the sequence.
"""

from __future__ import annotations

import csv
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from opensequence.contacts.schemas import ContactInput
from opensequence.contacts.service import IdentifierInput, resolve_contacts
from opensequence.errors import Invalid
from opensequence.runs.intake import Item
from opensequence.runs.service import RunProgress, process_items

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
class ImportTotals:
    landed: int = 0
    created: int = 0
    skipped: int = 0


_FIELDS = {name: names[0] for names in (_EMAIL, _PHONE, _NAME) for name in names}


def _column(header: Sequence[str], names: tuple[str, ...]) -> str | None:
    for column in header:
        if column.strip().lower() in names:
            return column
    return None


def _repeated_column(header: Sequence[str]) -> str | None:
    """What is wrong with a header in which two columns fill one value: a column named twice
    (the last cell of a row won without a word), or two that name the same contact field
    (``Email`` and ``email``, ``phone`` and ``phone_number``: the first won, and the other
    went into custom_data). Columns without a name are ignored, however many."""
    seen: dict[tuple[str, str], str] = {}
    for column in header:
        if not column.strip():
            continue
        field = _FIELDS.get(column.strip().lower())
        key = ("field", field) if field else ("custom", column)
        first = seen.get(key)
        if first is None:
            seen[key] = column
            continue
        if first == column:
            return f"column {column!r} is repeated"
        return f"column {column!r} repeats {first!r} (both are the contact's {field})"
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
    nor a phone to identify it; it is reported with the line it starts on.

    Quotes are read strictly: a stray quote inside a field (``"O"Brien``) or a quoted field
    never closed is a bad row. Read leniently, the first lost its quotes without a word, and
    the second swallowed every line after it into one field: the rows in them were lost and
    the import said nothing and exited 0."""
    reader = csv.reader(handle, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise Invalid("FILE: empty file (line 1 must be the header)") from None
    except csv.Error as exc:
        raise Invalid(f"line 1: {exc}") from exc
    repeated = _repeated_column(header)
    if repeated is not None:
        raise Invalid(f"line 1: {repeated}")
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
            message = str(exc)
            if message == "unexpected end of data":
                message = "a quoted field is never closed: every line after this one is in it"
            yield BadRow(line, message)
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


async def import_batch(
    session: AsyncSession,
    org_id: uuid.UUID,
    rows: Sequence[CsvRow],
    *,
    totals: ImportTotals,
    run: RunProgress | None,
    now: datetime,
) -> None:
    """Land one batch of valid rows. Without a run: resolve them (creating the missing
    contacts). With a run: the add-contacts path (resolve, filter, enroll, one run item per
    row with input ``{"line": N, ...cells}``), so an import enrolls exactly like the API."""
    if run is None:
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
        totals.created += sum(r.created for r in resolved)
    else:
        before = run.counts["created_and_added"]
        items = [
            Item(
                index=run.total + offset,
                raw={"line": row.line, **row.cells},
                kind="email" if row.contact.email is not None else "phone_number",
                id=None,
                email=row.contact.email,
                phone_number=row.contact.given_phone(),
                name=row.contact.name,
                custom_data=row.contact.custom_data,
            )
            for offset, row in enumerate(rows)
        ]
        await process_items(session, org_id, run, items, now=now)
        totals.created += run.counts["created_and_added"] - before
    totals.landed += len(rows)
