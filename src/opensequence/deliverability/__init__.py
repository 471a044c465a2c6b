"""Deliverability: the suppression list and per-sender throttles (SPEC §5, §6)."""
