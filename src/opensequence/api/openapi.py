"""OpenAPI shaping: ErrorDto for every error status, no FastAPI 422 leftovers."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from opensequence.api.errors import ErrorDto

_ERROR_DESCRIPTIONS = {
    "400": "Invalid request (the message names the field)",
    "401": "Missing, unknown or revoked API key",
    "403": "The API key lacks the required scope",
    "404": "Not found (also for another organization's ids)",
    "409": "Conflict with the current state",
    "413": "Request body or item count over the limit",
    "415": "The body is not JSON (Content-Type must be application/json)",
    "429": "Rate limited (see Retry-After)",
    "500": "Internal Server Error",
}

ERROR_REF = {"$ref": "#/components/schemas/ErrorDto"}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries documenting ErrorDto bodies for the given statuses."""
    return {
        status: {"model": ErrorDto, "description": _ERROR_DESCRIPTIONS.get(str(status), "Error")}
        for status in statuses
    }


def install_openapi(app: FastAPI) -> None:
    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        schemas["ErrorDto"] = {
            "type": "object",
            "properties": {
                "statusCode": {"type": "integer"},
                "message": {"type": "string"},
                "error": {"type": "string"},
            },
            "required": ["statusCode", "message", "error"],
        }
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                if not isinstance(operation, dict) or "responses" not in operation:
                    continue
                responses = operation["responses"]
                if "422" in responses:
                    del responses["422"]
                    responses.setdefault("400", _error_entry("400"))
                responses.setdefault("500", _error_entry("500"))
                if "requestBody" in operation:
                    responses.setdefault("400", _error_entry("400"))
                    responses.setdefault("413", _error_entry("413"))
                    responses.setdefault("415", _error_entry("415"))
                if operation.get("security"):
                    for status in ("401", "429"):
                        responses.setdefault(status, _error_entry(status))
        app.openapi_schema = schema
        return schema

    app.openapi = build  # type: ignore[method-assign]


def _error_entry(status: str) -> dict[str, Any]:
    return {
        "description": _ERROR_DESCRIPTIONS[status],
        "content": {"application/json": {"schema": ERROR_REF}},
    }
