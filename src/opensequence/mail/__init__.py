"""Outgoing mail: Liquid templates and rendering, MIME building and transports behind one small
protocol."""
