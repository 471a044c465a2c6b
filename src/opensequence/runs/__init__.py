"""Runs: batches of enrollments (add-contacts, start, import) with per-item outcomes (SPEC §4)."""
