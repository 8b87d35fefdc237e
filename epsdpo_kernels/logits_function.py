"""Autograd Function for ε-DPO on materialised logits."""

from __future__ import annotations

import torch

from . import layout as L
from .pair_head import pair_head, row_coefficients
from .token_ops import token_backward, token_forward
from .validation import LossParams


def logits_forward(policy_logits, ref_logits, labels, params: LossParams):
    """Token pass + pair head; returns (token stats, pair buffer). No autograd involved."""
    stats = token_forward(
        policy_logits, ref_logits, labels,
        epsilon=params.epsilon, ignore_index=params.ignore_index, backend=params.backend,
    )  # fmt: skip
    pair = pair_head(stats, labels, params)
    return stats, pair


def split_pair(pair: torch.Tensor):
    """The differentiable outputs, as tensors of their own (not views of the pair buffer)."""
    return (
        pair[L.PAIR_LOSS].clone(),
        pair[L.PAIR_CHOSEN_LOGPS].clone(),
        pair[L.PAIR_REJECTED_LOGPS].clone(),
    )


class EpsilonDPOLogitsFunction(torch.autograd.Function):
    """(policy_logits, ref_logits, labels, params) → (losses, chosen_logps, rejected_logps, pair).

    Saves the policy logits (by reference, no copy), the labels, the token stats (6 floats per
    token) and the pair buffer. Only ``policy_logits`` gets a gradient.
    """

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
            policy_logits, labels, stats, row_coef,
            ignore_index=params.ignore_index, inplace=params.inplace_backward,
            backend=params.backend,
        )  # fmt: skip
        return grad, None, None, None
