"""Entry point for ``uvicorn --factory`` (``opensequence api --workers N`` spawns processes that
each build their own app from the environment)."""

from __future__ import annotations

import logging
import sys

from fastapi import FastAPI

from opensequence.api.app import create_app
from opensequence.config import Settings
from opensequence.heap import settle

log = logging.getLogger(__name__)


def app() -> FastAPI:
    """The app, or exit 3 (uvicorn's code for a process that failed to start) when it cannot be
    built: uvicorn's supervisor stops every process on that code, and restarts one that ends
    any other way, which for an app that cannot be built is forever (a restart every ~0.3 s)."""
    from uvicorn.main import STARTUP_FAILURE

    try:
        application = create_app(Settings())
    except Exception:
        log.exception("the app could not be built")
        sys.exit(STARTUP_FAILURE)
    settle()
    return application
