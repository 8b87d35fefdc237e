"""ε-DPO in TRL: ``EpsilonDPOConfig`` and ``EpsilonDPOTrainer``, on the fused linear loss.

A drop-in for TRL's ``DPOConfig``/``DPOTrainer`` (tested with the TRL versions the ``trl`` extra
pins). Everything TRL does around the loss (dataset preparation, collation, the reference model
or PEFT adapter switching, distributed wrapping, logging, checkpointing) is TRL's own; this package
replaces the loss with ``linear_epsilon_dpo_loss`` on the last hidden states and lm_head weights,
so no ``tokens × vocab`` tensor exists in a step, and carries β across optimizer steps.

Options the fused ε-DPO loss cannot honour are refused when the config or the trainer is built,
with the reason and what to use instead; see ``refused_options``.
"""

from .collator import TOKENIZED_COLUMNS, DataCollatorForPackedPreference
from .config import EpsilonDPOConfig, refused_options
from .trainer import BETA_STATE_FILE, EpsilonDPOTrainer

__all__ = [
    "EpsilonDPOConfig",
    "EpsilonDPOTrainer",
    "DataCollatorForPackedPreference",
    "refused_options",
    "BETA_STATE_FILE",
    "TOKENIZED_COLUMNS",
]
