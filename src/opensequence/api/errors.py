"""Every non-2xx body is an ``ErrorDto``. One set of handlers renders all of them."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.routing import Match

from opensequence.errors import AppError

log = logging.getLogger("opensequence.api")


class ErrorDto(BaseModel):
    statusCode: int
    message: str
    error: str


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"statusCode": status, "message": message, "error": reason(status)},
        status_code=status,
        headers=headers,
    )


def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """``("body", "contacts", 3, "email")`` → ``contacts[3].email``."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_union_tag(part):
            out += ("." if out else "") + str(part)
    return out or "body"


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the union member (e.g. "function-after[...]" or a model name) into loc paths.
    text = str(part)
    return ("[" in text and "]" in text) or text.startswith("function-")


def validation_message(errors: list[dict[str, Any]] | Any) -> str:
    messages: list[str] = []
    for err in list(errors)[:5]:
        kind = err.get("type", "")
        if kind == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            messages.append(f"body: malformed JSON{f' ({detail})' if detail else ''}")
            continue
        msg = str(err.get("msg", "invalid"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        messages.append(f"{field_path(err.get('loc', ()))}: {msg}")
    # Keep messages small even when a hostile body produces thousands of errors.
    text = "; ".join(dict.fromkeys(messages))
    return text[:2000]


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> list[str]:
    """Every method of every route matching the path (RFC 9110 §15.5.6). Starlette's 405 names
    only the first route that matched the path: ``GET, POST /sequences`` answered a ``DELETE``
    with ``Allow: POST``. Each method is tried against the routes (the public ``matches``;
    included routers nest theirs)."""
    routes = request.app.router.routes
    return [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    ]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def app_error(_: Request, exc: AppError) -> JSONResponse:
        return error_response(exc.status_code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, validation_message(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 404:
            message = f"Cannot {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
            # Outside the API's routes (the docs assets' mount) Starlette's own answer stands.
            headers["Allow"] = ", ".join(_allowed_methods(request)) or headers.get("Allow", "")
        else:
            message = str(exc.detail) if exc.detail else reason(exc.status_code)
        return error_response(exc.status_code, message, headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "Internal server error")
