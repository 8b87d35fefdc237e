"""``epsdpo_kernels.trl``: ε-DPO in TRL (``EpsilonDPOConfig``, ``EpsilonDPOTrainer``), the public
name of ``epsdpo_kernels/integrations/trl/``."""

from .integrations.trl import *  # noqa: F403
from .integrations.trl import __all__  # noqa: F401
