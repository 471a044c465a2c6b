from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from opensequence.validation import Email

Reason = Literal["unsubscribed", "bounced", "complained", "manual"]
Limit = Annotated[int, Field(ge=1, le=1_000_000_000)]


class SuppressionIn(BaseModel):
    model_config = ConfigDict(regex_engine="python-re", extra="forbid")
    email: Email
    reason: Reason = "manual"


class SuppressionOut(BaseModel):
    email: str
    reason: Reason
    created_at: str


class SuppressionPage(BaseModel):
    items: list[SuppressionOut]
    next: str | None


class SenderLimitIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    per_second: Limit | None = None
    per_minute: Limit | None = None
    per_day: Limit | None = None


class SenderLimitOut(BaseModel):
    sender: str
    per_second: int | None
    per_minute: int | None
    per_day: int | None


class SenderLimitPage(BaseModel):
    items: list[SenderLimitOut]
    next: str | None
