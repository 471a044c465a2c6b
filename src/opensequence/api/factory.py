"""Entry point for ``uvicorn --factory`` (``opensequence api --workers N`` spawns processes that
each build their own app from the environment)."""

from __future__ import annotations

from fastapi import FastAPI

from opensequence.api.app import create_app
from opensequence.config import Settings
from opensequence.heap import settle


def app() -> FastAPI:
    application = create_app(Settings())
    settle()
    return application
