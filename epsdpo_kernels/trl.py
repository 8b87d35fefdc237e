"""``epsdpo_kernels.trl``: ε-DPO in TRL (``EpsilonDPOConfig``, ``EpsilonDPOTrainer``), the public
name of ``epsdpo_kernels/integrations/trl/``."""

from .integrations.trl import (
    BETA_STATE_FILE,
    TOKENIZED_COLUMNS,
    DataCollatorForPackedPreference,
    EpsilonDPOConfig,
    EpsilonDPOTrainer,
    refused_options,
)

__all__ = [
    "EpsilonDPOConfig",
    "EpsilonDPOTrainer",
    "DataCollatorForPackedPreference",
    "refused_options",
    "BETA_STATE_FILE",
    "TOKENIZED_COLUMNS",
]
