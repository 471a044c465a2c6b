"""Entry point for ``uvicorn --factory`` (``opensequence api --workers N`` spawns processes that
each build their own app from the environment)."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)


def app() -> FastAPI:
    """The app, or exit 3 (uvicorn's code for a process that failed to start) when it cannot be
    imported or built: uvicorn's supervisor stops every process on that code, and restarts one
    that ends any other way, which for an app that cannot be built is forever (a restart every
    ~0.3 s). The imports are in here for that: this module itself only needs the standard
    library, so the package replaced on disk under a running `api` fails here, not at import."""
    from uvicorn.main import STARTUP_FAILURE

    try:
        from opensequence.api.app import create_app
        from opensequence.config import Settings
        from opensequence.heap import settle

        application = create_app(Settings())
    except Exception:
        log.exception("the app could not be built")
        sys.exit(STARTUP_FAILURE)
    settle()
    return application
