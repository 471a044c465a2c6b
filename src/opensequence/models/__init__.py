"""Every table, one module each. Importing this package registers them all on ``Base.metadata``."""

from opensequence.models.api_key import ApiKey
from opensequence.models.base import Base
from opensequence.models.organization import Organization
from opensequence.models.system_setting import SystemSetting

__all__ = ["ApiKey", "Base", "Organization", "SystemSetting"]
