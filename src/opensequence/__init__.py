"""OpenSequence: a self-hostable outbound sequencing engine with an OpenCX-compatible API."""

__version__ = "0.1.0"
