"""Wire models for sequences: OpenCX's CreateSequenceInput / UpdateSequenceInput /
GetSequenceOutput, plus the additive ``send_window`` (SPEC §5) and the list page."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from opensequence.clock import MAX_DELAY_MINUTES
from opensequence.filters import CompositeFilter
from opensequence.validation import (
    MAX_STEPS,
    MAX_TEMPLATE_BYTES,
    MAX_ZONE_NAME,
    Email,
    Name,
    reject_control_chars,
    zone_named,
)

MAX_CUSTOM_ID = 50
DEFAULT_NAME = "New Sequence"
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def check_template(value: str) -> str:
    """≤ 256 KiB counted in UTF-8 bytes; no C0 controls; valid Unicode (no lone surrogates,
    which neither UTF-8 nor PostgreSQL can store). Liquid syntax is checked by the service so
    that the error can name the line."""
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid Unicode text") from exc
    if size > MAX_TEMPLATE_BYTES:
        raise ValueError(f"template is {size} bytes in UTF-8; at most {MAX_TEMPLATE_BYTES}")
    return reject_control_chars(value)


Template = Annotated[str, AfterValidator(check_template)]
CustomId = Annotated[
    str, Field(min_length=1, max_length=MAX_CUSTOM_ID), AfterValidator(reject_control_chars)
]


class SendEmailsData(BaseModel):
    model_config = ConfigDict(regex_engine="python-re")

    from_email: Email
    email_subject: Template
    email_body: Template
    email_sender_name: Name
    email_is_transactional: bool


class SendEmailsAction(BaseModel):
    model_config = ConfigDict(regex_engine="python-re")

    type: Literal["send_emails"]
    data: SendEmailsData


class MakePhoneCallsData(BaseModel):
    """Empty in OpenCX's schema; anything else sent inside is ignored."""


class MakePhoneCallsAction(BaseModel):
    type: Literal["make_phone_calls"]
    data: MakePhoneCallsData


Action = Annotated[SendEmailsAction | MakePhoneCallsAction, Field(discriminator="type")]


class SequenceStepInput(BaseModel):
    model_config = ConfigDict(regex_engine="python-re")

    action: Action
    delay_in_minutes: float = Field(default=0, ge=0, le=MAX_DELAY_MINUTES)

    @field_validator("delay_in_minutes")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


_HHMM = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")


class SendWindow(BaseModel):
    """When sends may go out, in the contact's time zone (``custom_data.timezone``) or else
    ``timezone``. ``start`` inclusive, ``end`` exclusive; ``start`` > ``end`` crosses midnight."""

    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = Field(
        min_length=1, max_length=7
    )
    start: str = Field(description="HH:MM, inclusive", examples=["09:00"])
    end: str = Field(description="HH:MM, exclusive", examples=["17:00"])
    timezone: str = Field(description="IANA time zone name", examples=["Europe/Amsterdam"])

    @field_validator("days")
    @classmethod
    def _unique_days(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("days must not repeat")
        return sorted(value, key=WEEKDAYS.index)

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, value: str) -> str:
        if not _HHMM.match(value):
            raise ValueError("must be a time of day as HH:MM (00:00-23:59)")
        return value

    @field_validator("timezone")
    @classmethod
    def _iana(cls, value: str) -> str:
        if zone_named(value) is None:
            raise ValueError(f"unknown IANA time zone {value[:MAX_ZONE_NAME]!r}")
        return value

    @model_validator(mode="after")
    def _opens(self) -> SendWindow:
        if self.start == self.end:
            raise ValueError("start and end must differ (the window would never open)")
        return self


Steps = Annotated[list[SequenceStepInput], Field(min_length=1, max_length=MAX_STEPS)]


class CreateSequenceInput(BaseModel):
    model_config = ConfigDict(regex_engine="python-re")

    name: Name = DEFAULT_NAME
    custom_id: CustomId | None = None
    is_continuous: bool = True
    filter: CompositeFilter | None = Field(
        default=None, description="Who may enter; null or absent = all contacts."
    )
    steps: Steps
    send_window: SendWindow | None = Field(
        default=None, description="Extension: only send inside this weekly window."
    )


class UpdateSequenceInput(BaseModel):
    """Partial: only the fields present change; no defaults are applied."""

    model_config = ConfigDict(regex_engine="python-re")

    name: Name | None = None
    custom_id: CustomId | None = None
    is_continuous: bool | None = None
    filter: CompositeFilter | None = None
    steps: Steps | None = None
    send_window: SendWindow | None = None


class CreateSequenceOutput(BaseModel):
    id: str


class StartSequenceOutput(BaseModel):
    run_id: str


class CancelSequenceOutput(BaseModel):
    """Extension body (OpenCX documents none): what was canceled and since when."""

    id: str
    kind: Literal["sequence", "run"]
    canceled_at: str


class SequenceStepOutput(BaseModel):
    action: dict[str, Any]
    delay_in_minutes: float
    started_at: str | None = Field(default=None, description="Omitted until the step first ran")
    ended_at: str | None = Field(default=None, description="Omitted until no contact can reach it")


class SequenceOutput(BaseModel):
    """GetSequenceOutput plus ``id``, ``org_id``, ``status`` and ``send_window``."""

    id: str
    org_id: str
    name: str
    custom_id: str | None
    status: Literal["pending", "active", "complete", "canceled"]
    filter: dict[str, Any]
    steps: list[SequenceStepOutput]
    is_continuous: bool
    send_window: dict[str, Any] | None
    started_at: str | None
    canceled_at: str | None
    ended_at: str | None
    created_at: str
    updated_at: str


class SequencePage(BaseModel):
    items: list[SequenceOutput]
    next: str | None
