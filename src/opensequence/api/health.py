"""Liveness, readiness and Prometheus metrics: no auth, no rate limit."""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, Response

from opensequence.db.health import ping

router = APIRouter(tags=["Operations"])


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness (checks the database)",
    responses={503: {"description": "The database is unreachable"}},
)
async def readyz(request: Request) -> Response:
    try:
        await ping(request.app.state.db)
    except Exception as exc:  # any driver failure means "not ready"
        return JSONResponse(
            {
                "statusCode": 503,
                "message": f"database unreachable: {type(exc).__name__}",
                "error": "Service Unavailable",
            },
            status_code=503,
        )
    return JSONResponse({"status": "ok", "database": "ok"})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
