"""Sequences: a contact filter plus timed steps (SPEC §3)."""
