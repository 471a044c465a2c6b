"""Wire models for contacts: OpenCX's ``ContactInput`` / ``Contact`` plus our extensions."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from opensequence.validation import CustomData, Email, Name, Phone


class ContactInput(BaseModel):
    """OpenCX names the phone ``phone`` on input; ``phone_number`` is accepted too (SPEC §2).
    Giving both with different values is ambiguous → 400."""

    model_config = ConfigDict(regex_engine="python-re")

    email: Email | None = None
    phone: Phone | None = None
    phone_number: Phone | None = None
    name: Name | None = None
    custom_data: CustomData | None = Field(
        default=None,
        description="Flat object; values string, number, boolean or null. On update a null "
        "value removes that key.",
    )

    @model_validator(mode="after")
    def _one_phone(self) -> ContactInput:
        if (
            self.phone is not None
            and self.phone_number is not None
            and self.phone != self.phone_number
        ):
            raise ValueError("phone and phone_number given with different values")
        return self

    def given_phone(self) -> str | None:
        return self.phone_number if self.phone_number is not None else self.phone

    def phone_was_given(self) -> bool:
        return bool({"phone", "phone_number"} & self.model_fields_set)


class SaveContactInput(BaseModel):
    contact: ContactInput


class UpdateContactInput(BaseModel):
    contact: ContactInput


class SaveContactOutput(BaseModel):
    id: str = Field(description="The ID of the created (201) or matched and updated (200) contact.")


class ContactOut(BaseModel):
    id: str
    email: str | None
    phone_number: str | None
    name: str | None
    custom_data: dict[str, str | int | float | bool | None]
    created_at: str
    updated_at: str


class DeleteContactOutput(BaseModel):
    id: str
