"""Wire models of the delivery history (SPEC §6)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

EnrollmentStatus = Literal["active", "completed", "canceled", "failed"]
WaitingReason = Literal["retrying", "throttled", "outside_window"]
MessageStatus = Literal["sending", "sent", "failed", "skipped"]


class EnrollmentOut(BaseModel):
    id: str
    sequence_id: str
    contact_id: str
    run_id: str
    status: EnrollmentStatus
    current_step: int
    next_step_at: str | None
    waiting_reason: WaitingReason | None
    created_at: str
    updated_at: str


class MessageOut(BaseModel):
    id: str
    enrollment_id: str
    sequence_id: str
    step_index: int
    to_email: str | None
    status: MessageStatus
    reason: str | None
    message_id: str
    attempts: int
    created_at: str
    sent_at: str | None
