"""``epsdpo_kernels.trl``, the documented import path of the TRL integration, which lives in
``epsdpo_kernels/integrations/trl.py``."""

from .integrations.trl import (
    BETA_STATE_FILE,
    TOKENIZED_COLUMNS,
    EpsilonDPOConfig,
    EpsilonDPOTrainer,
    refused_options,
)

__all__ = [
    "EpsilonDPOConfig",
    "EpsilonDPOTrainer",
    "refused_options",
    "BETA_STATE_FILE",
    "TOKENIZED_COLUMNS",
]
