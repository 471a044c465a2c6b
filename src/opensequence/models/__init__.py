"""Every table, one module each. Importing this package registers them all on ``Base.metadata``."""

from opensequence.models.api_key import ApiKey
from opensequence.models.base import Base
from opensequence.models.contact import Contact
from opensequence.models.enrollment import Enrollment
from opensequence.models.idempotency_key import IdempotencyKey
from opensequence.models.message import Message
from opensequence.models.organization import Organization
from opensequence.models.run import Run, RunItemPage
from opensequence.models.sender_limit import SenderLimit
from opensequence.models.sequence import Sequence, SequenceStep
from opensequence.models.suppression import Suppression
from opensequence.models.system_setting import SystemSetting

__all__ = [
    "ApiKey",
    "Base",
    "Contact",
    "Enrollment",
    "IdempotencyKey",
    "Message",
    "Organization",
    "Run",
    "RunItemPage",
    "SenderLimit",
    "Sequence",
    "SequenceStep",
    "Suppression",
    "SystemSetting",
]
