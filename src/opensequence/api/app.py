"""``create_app(settings)``: the whole HTTP service, built on demand (nothing at import time)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry
from starlette.responses import HTMLResponse

from opensequence import __version__
from opensequence.api import health
from opensequence.api.errors import install_error_handlers
from opensequence.api.idempotency import IdempotencyMiddleware
from opensequence.api.middleware import HttpMetrics, RequestContextMiddleware
from opensequence.api.openapi import install_openapi
from opensequence.api.ratelimit import RateLimiter
from opensequence.clock import Clock, SystemClock
from opensequence.config import Settings
from opensequence.db import Database

DOCS_ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"

DESCRIPTION = """
OpenSequence is a self-hostable outbound sequencing engine. Its API is a drop-in replacement for
OpenCX's *AI Outbound Sequencing* and *Contacts* APIs.

Authenticate with `Authorization: Bearer <API key>`. Errors are `ErrorDto` bodies.
"""

BackgroundFactory = Callable[[FastAPI], Coroutine[Any, Any, None]]


def create_app(
    settings: Settings,
    *,
    background: list[BackgroundFactory] | None = None,
    clock: Clock | None = None,
) -> FastAPI:
    """Build the app. ``background`` coroutines (e.g. the delivery worker under ``serve``) run
    for the lifetime of the app and are cancelled on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.db = Database(settings.database_url)
        app.state.rate_limiter = RateLimiter(settings.rate_limit, settings.redis_url)
        tasks = [asyncio.create_task(factory(app)) for factory in background or []]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with suppress(asyncio.CancelledError):
                    await task
            await app.state.rate_limiter.aclose()
            await app.state.db.dispose()

    app = FastAPI(
        title="OpenSequence API",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.clock = clock or SystemClock()
    app.state.registry = CollectorRegistry()
    install_error_handlers(app)
    install_openapi(app)

    app.mount("/docs-assets", StaticFiles(directory=DOCS_ASSETS), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="OpenSequence API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon.png",
        )

    app.include_router(health.router)
    for router in _domain_routers():
        app.include_router(router)

    app.add_middleware(IdempotencyMiddleware)
    app.add_middleware(RequestContextMiddleware, metrics=HttpMetrics(app.state.registry))
    return app


def _domain_routers() -> list[Any]:
    """Every domain router, in the order they appear in the docs."""
    from opensequence.auth.router import router as auth_router
    from opensequence.contacts.router import router as contacts_router
    from opensequence.deliverability.router import router as deliverability_router
    from opensequence.deliverability.unsubscribe_router import router as unsubscribe_router
    from opensequence.enrollments.router import router as enrollments_router
    from opensequence.runs.router import router as runs_router
    from opensequence.sequences.router import router as sequences_router

    return [
        auth_router,
        contacts_router,
        sequences_router,
        runs_router,
        enrollments_router,
        deliverability_router,
        unsubscribe_router,
    ]
