"""Contacts (SPEC §2)."""
