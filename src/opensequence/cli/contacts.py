"""``opensequence contacts import FILE.csv --org NAME [--sequence ID]`` — composition only: the
rules live in :mod:`opensequence.contacts.importer`."""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy.exc import DBAPIError

from opensequence.auth import service as auth
from opensequence.cli.common import (
    error_detail,
    fail,
    flag_errors,
    load_settings,
    migrate,
    run_with_db,
)
from opensequence.clock import SystemClock
from opensequence.contacts import importer
from opensequence.db import Database
from opensequence.errors import AppError, Invalid
from opensequence.runs.service import RunProgress, open_run

contacts_app = typer.Typer(help="Contacts.", no_args_is_help=True)


def _batches(
    rows: Iterator[importer.CsvRow | importer.BadRow], size: int
) -> Iterator[list[importer.CsvRow | importer.BadRow]]:
    while batch := list(islice(rows, size)):
        yield batch


@contacts_app.command("import")
def import_contacts(
    file: Annotated[
        Path, typer.Argument(help="CSV file; line 1 is the header (email, phone, name, …).")
    ],
    org: Annotated[str, typer.Option("--org", help="Organization name.")],
    sequence: Annotated[
        str | None,
        typer.Option("--sequence", help="Enroll the imported contacts (id or custom_id)."),
    ] = None,
) -> None:
    """Bulk import contacts; other columns become custom_data. Bad rows are reported on
    stderr with their line numbers and skipped. Exit 0 if every row landed, 1 if some were
    skipped."""
    settings = load_settings()
    if not file.is_file():
        fail(f"FILE: {file} is not a readable file")
    try:
        expected = importer.count_records(file)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        fail(f"FILE: {file}: {exc}")
    except Invalid as exc:
        fail(f"FILE: {file}: {exc.message}")
    migrate(settings.database_url)
    err = Console(stderr=True)
    clock = SystemClock()

    async def work(
        db: Database,
    ) -> tuple[importer.ImportTotals, RunProgress | None, tuple[int, str] | None]:
        async with db.transaction() as session:
            with flag_errors("--org"):
                organization = await auth.find_org(session, org)
            run = None
            if sequence is not None:
                with flag_errors("--sequence"):
                    run = await open_run(
                        session, organization.id, sequence, kind="import", now=clock.now()
                    )
        totals = importer.ImportTotals()
        with (
            file.open(newline="", encoding="utf-8-sig") as handle,
            Progress(
                TextColumn("importing"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=err,
                transient=False,
            ) as progress,
        ):
            task = progress.add_task("rows", total=expected)
            for batch in _batches(importer.read_rows(handle), importer.BATCH_SIZE):
                good = [row for row in batch if isinstance(row, importer.CsvRow)]
                for row in batch:
                    if isinstance(row, importer.BadRow):
                        totals.skipped += 1
                        progress.console.print(
                            f"line {row.line}: {row.message}",
                            markup=False,
                            highlight=False,
                            soft_wrap=True,
                        )
                if good:
                    # What landed before this batch, should it fail (its transaction then lands
                    # none of it, whatever it counted).
                    landed = (
                        dataclasses.replace(totals),
                        None if run is None else dict(run.counts),
                    )
                    try:
                        async with db.transaction() as session:
                            await importer.import_batch(
                                session,
                                organization.id,
                                good,
                                totals=totals,
                                run=run,
                                now=clock.now(),
                            )
                    except (DBAPIError, OSError, AppError) as exc:
                        totals, counts = landed
                        if run is not None and counts is not None:
                            run.counts = counts
                        reason = exc.message if isinstance(exc, AppError) else error_detail(exc)
                        return totals, run, (batch[0].line, reason)
                progress.advance(task, len(batch))
        return totals, run, None

    try:
        totals, run, stopped = run_with_db(settings, work)
    except UnicodeDecodeError as exc:
        fail(f"FILE: {file}: not UTF-8 ({exc})")
    summary = (
        f"imported {totals.landed} rows ({totals.created} new contacts), skipped {totals.skipped}"
    )
    if run is not None:
        counts = ", ".join(f"{key} {value}" for key, value in run.counts.items())
        summary += f"; run {run.run_id}: {counts}"
    typer.echo(summary)
    if stopped is not None:
        line, reason = stopped
        typer.echo(
            f"error: stopped at line {line}: {reason}. The rows before line {line} landed; "
            "importing the same file again is safe (contacts that landed are found, not "
            "created twice, and a sequence skips contacts it already has).",
            err=True,
        )
        raise typer.Exit(1)
    if totals.skipped:
        raise typer.Exit(1)
