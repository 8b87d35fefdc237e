"""Fused Triton kernels for ε-DPO preference training."""

from .adaptive_beta import AdaptiveBeta
from .loss import epsilon_dpo_loss
from .output import EpsilonDPOOutput

__version__ = "0.1.0"

__all__ = ["AdaptiveBeta", "EpsilonDPOOutput", "epsilon_dpo_loss", "__version__"]
