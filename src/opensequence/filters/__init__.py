"""Contact filters (SPEC §3.1): a typed schema, compiled to SQL or evaluated in memory.

Pure: no session and no FastAPI. The SQL form and the in-memory form are two renderings of one
definition and are property-tested against each other on both databases.
"""

from opensequence.filters.evaluate import (
    ContactFacts,
    PreparedFilter,
    explain,
    matches,
    prepare,
    referenced_sequence_ids,
)
from opensequence.filters.schema import (
    ALL_CONTACTS_OUTPUT,
    AllContacts,
    AndGroup,
    CompositeFilter,
    ContactFilter,
    ContactIdIn,
    ContactsAffectedBySequence,
    ContactsCreatedAtBetween,
    ContactsEmailDomainNameIn,
    all_contacts_output,
    parse_filter,
    stored_filter,
)
from opensequence.filters.sql import compile_filter

__all__ = [
    "ALL_CONTACTS_OUTPUT",
    "AllContacts",
    "AndGroup",
    "CompositeFilter",
    "ContactFacts",
    "ContactFilter",
    "ContactIdIn",
    "ContactsAffectedBySequence",
    "ContactsCreatedAtBetween",
    "ContactsEmailDomainNameIn",
    "PreparedFilter",
    "all_contacts_output",
    "compile_filter",
    "explain",
    "matches",
    "parse_filter",
    "prepare",
    "referenced_sequence_ids",
    "stored_filter",
]
