"""``epsdpo_kernels.trl``, the documented import path of the TRL integration, which lives in
``epsdpo_kernels/integrations/trl.py``."""

from .integrations.trl import *  # noqa: F403
from .integrations.trl import __all__  # noqa: F401
