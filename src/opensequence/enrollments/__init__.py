"""Delivery history: a sequence's enrollments and a contact's messages (SPEC §6)."""
