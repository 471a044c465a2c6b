"""The filter's wire schema: ``{"or": [{"and": [F, ...]}, ...]}`` with five filter types.

Normalisation happens here, once, so that SQL and memory evaluate the same values:
date-times become aware UTC (a naive value is read as UTC), contact ids become ``UUID``,
domains keep their text (comparison lower-cases ASCII letters only, see ``evaluate``).
"""

from __future__ import annotations

import copy
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from opensequence.errors import Conflict, Invalid
from opensequence.validation import CleanText, utc_moment


class AllContacts(BaseModel):
    type: Literal["all_contacts"]


class ContactIdIn(BaseModel):
    type: Literal["contact_id_in"]
    contact_ids: list[uuid.UUID]


class ContactsCreatedAtBetween(BaseModel):
    type: Literal["contacts_created_at_between"]
    after: datetime | None = Field(description="ISO 8601 date-time; null = open bound")
    before: datetime | None = Field(description="ISO 8601 date-time; null = open bound")

    @field_validator("after", "before")
    @classmethod
    def _to_utc(cls, value: datetime | None) -> datetime | None:
        return None if value is None else utc_moment(value)

    @field_serializer("after", "before")
    def _iso(self, value: datetime | None) -> str | None:
        if value is None:
            return None
        spec = "milliseconds" if value.microsecond % 1000 == 0 else "microseconds"
        return value.astimezone(UTC).isoformat(timespec=spec).replace("+00:00", "Z")


class ContactsEmailDomainNameIn(BaseModel):
    type: Literal["contacts_email_domain_name_in"]
    domain_name_in: list[CleanText]


class ContactsAffectedBySequence(BaseModel):
    type: Literal["contacts_affected_by_sequence"]
    sequence_id: CleanText


ContactFilter = Annotated[
    AllContacts
    | ContactIdIn
    | ContactsCreatedAtBetween
    | ContactsEmailDomainNameIn
    | ContactsAffectedBySequence,
    Field(discriminator="type"),
]


# A filter becomes one SQL condition when a sequence starts: its groups and filters nest in the
# statement, and its lists become bound parameters. SQLite refuses an expression nested more
# than 1,000 deep (1,000 "or" groups were accepted, then failed the start with a 500) and
# PostgreSQL more than 65,535 parameters in a statement.
MAX_GROUPS = 100
MAX_GROUP_FILTERS = 100
# Filters in all groups together. Each ``contacts_affected_by_sequence`` is a subquery: 100
# groups of 100 took PostgreSQL 82 s and ~3 GB per connection to plan (kept by the pooled
# connection afterwards); 200 take ~0.1 s. Add-contacts evaluates the filter for each of up
# to 10,000 contacts, on the API's event loop.
MAX_FILTERS = 200
MAX_LISTED = 10_000  # contact ids and domain names in all of a filter's lists together


def _list_length(item: BaseModel) -> int:
    if isinstance(item, ContactIdIn):
        return len(item.contact_ids)
    if isinstance(item, ContactsEmailDomainNameIn):
        return len(item.domain_name_in)
    return 0


class AndGroup(BaseModel):
    """Every filter must match. An empty group matches every contact (vacuous truth, the same
    reading as ``all()`` of nothing); OpenCX's schema allows it, so we accept and document it."""

    model_config = ConfigDict(populate_by_name=True)

    and_: list[ContactFilter] = Field(alias="and", max_length=MAX_GROUP_FILTERS)


class CompositeFilter(BaseModel):
    """A contact matches when every filter of at least one ``and`` group matches."""

    model_config = ConfigDict(populate_by_name=True, title="ContactsCompositeFilter")

    or_: list[AndGroup] = Field(alias="or", min_length=1, max_length=MAX_GROUPS)

    @model_validator(mode="after")
    def _listed(self) -> CompositeFilter:
        filters = sum(len(group.and_) for group in self.or_)
        if filters > MAX_FILTERS:
            raise ValueError(f"{filters:,} filters in all groups; at most {MAX_FILTERS:,}")
        listed = sum(_list_length(item) for group in self.or_ for item in group.and_)
        if listed > MAX_LISTED:
            raise ValueError(
                f"{listed:,} contact ids and domain names in all; at most {MAX_LISTED:,}"
            )
        return self

    def to_wire(self) -> dict[str, Any]:
        """The JSON form (aliases, lower-case UUIDs, ``Z`` date-times) stored and returned."""
        return self.model_dump(mode="json", by_alias=True)


ALL_CONTACTS_OUTPUT: dict[str, Any] = {"or": [{"and": [{"type": "all_contacts"}]}]}


def all_contacts_output() -> dict[str, Any]:
    """A fresh copy of :data:`ALL_CONTACTS_OUTPUT` (safe to mutate)."""
    return copy.deepcopy(ALL_CONTACTS_OUTPUT)


def parse_filter(raw: dict[str, Any] | None) -> CompositeFilter | None:
    """A stored or received filter; ``None`` means all contacts. Raises ``ValidationError``
    for a malformed object and ``Invalid`` for something that is not an object at all."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise Invalid("filter: must be an object or null")
    return CompositeFilter.model_validate(raw)


def stored_filter(raw: dict[str, Any] | None) -> CompositeFilter | None:
    """A sequence's filter as stored. One saved before the limits above (more groups, filters
    or listed values than they allow) is a 409 asking for a smaller one, rather than a 500."""
    try:
        return parse_filter(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise Conflict(
            f"the sequence's filter is over the limits ({where}: {first['msg']}); "
            "PATCH it to a smaller one"
        ) from exc
