"""Migration 0007 packs existing run items into pages and unpacks them again on downgrade."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

from alembic import command
from sqlalchemy import create_engine, text

from opensequence.db.engine import sync_url
from opensequence.db.migrate import alembic_config, upgrade
from opensequence.runs.pages import OUTCOME_BITS, PAGE_SIZE, unpack


def test_run_items_survive_the_move_to_pages_and_back(empty_url: str, backend: str) -> None:
    upgrade(empty_url, "0006")
    engine = create_engine(sync_url(empty_url))
    sqlite = backend == "sqlite"

    def ident(value: uuid.UUID) -> object:
        return value.hex if sqlite else value

    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    org, sequence = uuid.uuid4(), uuid.uuid4()
    runs = {uuid.uuid4(): 2 * PAGE_SIZE + 5, uuid.uuid4(): 3}
    contact = uuid.uuid4()
    expected: dict[uuid.UUID, list[tuple[int, dict[str, object], object, str, object]]] = {}
    with engine.begin() as conn:
        stamp = now.replace(tzinfo=None) if sqlite else now
        conn.execute(
            text("INSERT INTO organizations (id, name, created_at) VALUES (:id, 'o', :t)"),
            {"id": ident(org), "t": stamp},
        )
        conn.execute(
            text(
                "INSERT INTO sequences (id, org_id, name, is_continuous, status, created_at,"
                " updated_at) VALUES (:id, :org, 's', true, 'active', :t, :t)"
            ),
            {"id": ident(sequence), "org": ident(org), "t": stamp},
        )
        for run_id, size in runs.items():
            conn.execute(
                text(
                    "INSERT INTO runs (id, org_id, sequence_id, kind, total, counts, created_at)"
                    " VALUES (:id, :org, :seq, 'add_contacts', :n, '{}', :t)"
                ),
                {
                    "id": ident(run_id),
                    "org": ident(org),
                    "seq": ident(sequence),
                    "n": size,
                    "t": stamp,
                },
            )
            rows = [
                (
                    i,
                    {"email": f"p{i}@example.com", "name": "Ünï"},
                    contact if i % 2 else None,
                    "added" if i % 2 else "not_found",
                    None if i % 3 else f"reason {i}",
                )
                for i in range(size)
            ]
            expected[run_id] = rows
            conn.execute(
                text(
                    "INSERT INTO run_items (run_id, item_index, input, contact_id, outcome, reason)"
                    " VALUES (:run, :i, :input, :contact, :outcome, :reason)"
                ),
                [
                    {
                        "run": ident(run_id),
                        "i": i,
                        "input": json.dumps(given),
                        "contact": None if cid is None else ident(cid),
                        "outcome": outcome,
                        "reason": reason,
                    }
                    for i, given, cid, outcome, reason in rows
                ],
            )

    upgrade(empty_url, "0007")
    with engine.connect() as conn:
        pages = conn.execute(
            text(
                "SELECT run_id, first_index, last_index, outcomes, items FROM run_item_pages"
                " ORDER BY first_index"
            )
        ).all()
    by_run: dict[uuid.UUID, list[tuple[int, int, int, str]]] = {}
    for run_id, first, last, outcomes, items in pages:
        key = uuid.UUID(str(run_id))
        by_run.setdefault(key, []).append((first, last, outcomes, items))
    assert sorted(len(p) for p in by_run.values()) == [1, 3]
    for run_id, rows in expected.items():
        stored = [item for *_, items in by_run[run_id] for item in unpack(items)]
        assert [(s.index, s.input, s.contact_id, s.outcome, s.reason) for s in stored] == rows
        first, last, outcomes, _ = by_run[run_id][0]
        assert (first, last) == (0, min(PAGE_SIZE, len(rows)) - 1)
        assert outcomes == OUTCOME_BITS["added"] | OUTCOME_BITS["not_found"]

    command.downgrade(alembic_config(empty_url), "0006")
    with engine.connect() as conn:
        back = conn.execute(
            text(
                "SELECT run_id, item_index, input, contact_id, outcome, reason FROM run_items"
                " ORDER BY item_index"
            )
        ).all()
    engine.dispose()
    for run_id, rows in expected.items():
        mine = [r for r in back if uuid.UUID(str(r[0])) == run_id]
        restored = [
            (
                index,
                json.loads(given) if isinstance(given, str) else given,
                None if cid is None else uuid.UUID(str(cid)),
                outcome,
                reason,
            )
            for _, index, given, cid, outcome, reason in mine
        ]
        assert restored == rows
