"""Wire models of add-contacts and runs. The add-contacts schemas are the seed document's,
verbatim (patterns included), and are what ``/openapi.json`` publishes for the operation."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from opensequence.validation import SEED_EMAIL_PATTERN, SEED_ID_PATTERN

Outcome = Literal[
    "added",
    "created_and_added",
    "filtered_out",
    "already_enrolled",
    "duplicate_in_request",
    "not_found",
]

ADD_CONTACTS_INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "contacts": {
            "type": "array",
            "items": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {
                            "id": {"type": "string", "format": "uuid", "pattern": SEED_ID_PATTERN}
                        },
                        "required": ["id"],
                    },
                    {
                        "type": "object",
                        "properties": {
                            "email": {
                                "type": "string",
                                "format": "email",
                                "pattern": SEED_EMAIL_PATTERN,
                            }
                        },
                        "required": ["email"],
                    },
                    {
                        "type": "object",
                        "properties": {"phone_number": {"type": "string"}},
                        "required": ["phone_number"],
                    },
                ]
            },
        }
    },
    "required": ["contacts"],
}

ADD_CONTACTS_OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"run_id": {"type": "string"}},
    "required": ["run_id"],
    "additionalProperties": False,
}


class AddContactsOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run_id: str


class RunCounts(BaseModel):
    added: int
    created_and_added: int
    filtered_out: int
    already_enrolled: int
    duplicate_in_request: int
    not_found: int


class RunOut(BaseModel):
    id: str
    sequence_id: str
    kind: Literal["add_contacts", "start", "import"]
    created_at: str
    canceled_at: str | None
    total: int
    counts: RunCounts


class RunItemOut(BaseModel):
    index: int
    input: dict[str, Any]
    contact_id: str | None
    outcome: Outcome
    reason: str | None


class RunItemsPage(BaseModel):
    items: list[RunItemOut]
    next: str | None
