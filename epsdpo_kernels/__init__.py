"""Fused Triton kernels for ε-DPO preference training."""

from .adaptive_beta import AdaptiveBeta
from .diagnostics import ches_scores
from .hugging_face import causal_lm_hidden_and_head
from .linear_loss import LinearEpsilonDPOHead, linear_epsilon_dpo_loss
from .loss import epsilon_dpo_loss
from .loss_types import preference_losses
from .output import EpsilonDPOOutput

__version__ = "0.1.0"

__all__ = [
    "AdaptiveBeta",
    "EpsilonDPOOutput",
    "LinearEpsilonDPOHead",
    "causal_lm_hidden_and_head",
    "ches_scores",
    "epsilon_dpo_loss",
    "linear_epsilon_dpo_loss",
    "preference_losses",
    "__version__",
]
