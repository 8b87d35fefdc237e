"""Autograd Function for ε-DPO on materialised logits."""

from __future__ import annotations

import torch

from .dispatch import pair_head, token_backward, token_forward
from .output import split_pair
from .pair_head import row_coefficients
from .validation import LossParams


def logits_forward(policy_logits, ref_logits, labels, params: LossParams):
    """Token pass + pair head: (token stats, pair buffer). No autograd involved."""
    stats = token_forward(policy_logits, ref_logits, labels, params)
    return stats, pair_head(stats, labels, params)


class EpsilonDPOLogitsFunction(torch.autograd.Function):
    """(policy_logits, ref_logits, labels, params) → (losses, chosen_logps, rejected_logps, pair).

    Saves the policy logits (by reference, no copy), the labels, the token stats (6 floats per
    token) and the pair buffer. Only ``policy_logits`` gets a gradient.
    """

    @staticmethod
    def evaluate(policy_logits, ref_logits, labels, params: LossParams):
        """The forward alone: the ``(PAIR_FIELDS, B)`` pair buffer (see layout.py)."""
        return logits_forward(policy_logits, ref_logits, labels, params)[1]

    @staticmethod
    def forward(ctx, policy_logits, ref_logits, labels, params: LossParams):
        stats, pair = logits_forward(policy_logits, ref_logits, labels, params)
        ctx.params = params
        ctx.save_for_backward(policy_logits, labels, stats, pair)
        ctx.mark_non_differentiable(pair)
        return (*split_pair(pair), pair)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses, grad_chosen_logps, grad_rejected_logps, _grad_pair):
        params: LossParams = ctx.params
        policy_logits, labels, stats, pair = ctx.saved_tensors
        row_coef = row_coefficients(
            pair, grad_losses, grad_chosen_logps, grad_rejected_logps,
            average_log_prob=params.average_log_prob,
        )  # fmt: skip
        grad = token_backward(
            policy_logits, labels, stats, row_coef, params, inplace=params.inplace_backward
        )
        return grad, None, None, None
