"""Outgoing mail: Liquid rendering, MIME building and transports behind one small protocol."""
