"""The two autograd Functions, one per input kind, and what they share.

``EpsilonDPOLogitsFunction`` (materialised logits) and ``LinearEpsilonDPOFunction`` (hidden states
and lm_head weights) both return ``(losses, chosen_logps, rejected_logps, pair)``: the first three
differentiable, the pair buffer (layout.py) not. Their backward passes both start from the same
per-sequence coefficient c_n = ∂(upstream)/∂A_n (``row_coefficients``, docs/SPEC.md, Gradients),
handed to each token of sequence n (``Sequences.token_coefficients``), then go to the per-token
backward directly (logits) or through the vocabulary-sliced driver (linear).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import layout as L
from .dispatch import pair_head, sequence_sums, token_backward, token_forward
from .linear_chunks import LinearChunks, linear_backward, linear_forward
from .params import LossParams
from .sequences import Sequences
from .vocab_parallel import VocabShard, shard_logits_forward


def split_pair(pair: torch.Tensor):
    """The differentiable outputs (losses, chosen_logps, rejected_logps), as tensors of their
    own rather than views of the pair buffer."""
    return (
        pair[L.PAIR_LOSS].clone(),
        pair[L.PAIR_CHOSEN_LOGPS].clone(),
        pair[L.PAIR_REJECTED_LOGPS].clone(),
    )


def row_coefficients(
    pair: torch.Tensor,
    grad_losses: torch.Tensor | None,
    grad_chosen_logps: torch.Tensor | None,
    grad_rejected_logps: torch.Tensor | None,
    *,
    average_log_prob: bool,
) -> torch.Tensor:
    """c_n = ∂(upstream)/∂A_n for the 2B sequences, from the head's ∂L_i/∂ℓ_i.

    ℓ_i = A_chosen − A_rejected, so the chosen row gets +g·∂L/∂ℓ and the rejected row −g·∂L/∂ℓ;
    gradients that reach chosen_logps/rejected_logps directly (an NLL term, say) add on top.
    With averaging, A_n is a mean, so every token of sequence n carries c_n / count_n.
    """
    dloss = pair[L.PAIR_DLOSS_DLOGRATIO]
    through_loss = dloss * grad_losses if grad_losses is not None else torch.zeros_like(dloss)
    chosen = through_loss.clone()
    rejected = -through_loss
    if grad_chosen_logps is not None:
        chosen = chosen + grad_chosen_logps.float()
    if grad_rejected_logps is not None:
        rejected = rejected + grad_rejected_logps.float()
    coef = torch.cat([chosen, rejected])
    if average_log_prob:
        counts = torch.cat([pair[L.PAIR_CHOSEN_COUNT], pair[L.PAIR_REJECTED_COUNT]])
        coef = coef / counts.clamp(min=1)
    return coef


@dataclass(frozen=True)
class LogitsPlan:
    """How the logits path runs: the backward in place or not, and this rank's vocabulary
    shard when the logits are vocabulary-sharded (vocab_parallel.py)."""

    inplace: bool = False
    shard: VocabShard | None = None


def logits_forward(
    policy_logits, ref_logits, labels, params: LossParams, sequences: Sequences, plan: LogitsPlan
):
    """Token pass, sums per sequence, pair head: (token stats, pair buffer). No autograd."""
    if plan.shard is None:
        stats = token_forward(policy_logits, ref_logits, labels, params)
    else:
        stats = shard_logits_forward(policy_logits, ref_logits, labels, params, plan.shard)
    return stats, pair_head(sequence_sums(stats, labels, sequences, params), params)


class EpsilonDPOLogitsFunction(torch.autograd.Function):
    """(policy_logits, ref_logits, labels, params, sequences, plan) → (losses, chosen_logps,
    rejected_logps, pair).

    Saves the policy logits (by reference, no copy), the labels, the token stats (6 floats per
    token) and the pair buffer. Only ``policy_logits`` gets a gradient; ``plan.inplace`` writes
    it over the logits' storage.
    """

    @staticmethod
    def evaluate(policy_logits, ref_logits, labels, params: LossParams, sequences: Sequences, plan):
        """The forward alone: the ``(PAIR_FIELDS, B)`` pair buffer (see layout.py)."""
        return logits_forward(policy_logits, ref_logits, labels, params, sequences, plan)[1]

    @staticmethod
    def forward(
        ctx,
        policy_logits,
        ref_logits,
        labels,
        params: LossParams,
        sequences: Sequences,
        plan: LogitsPlan,
    ):
        stats, pair = logits_forward(policy_logits, ref_logits, labels, params, sequences, plan)
        ctx.params, ctx.sequences, ctx.plan = params, sequences, plan
        ctx.save_for_backward(policy_logits, labels, stats, pair)
        ctx.mark_non_differentiable(pair)
        return (*split_pair(pair), pair)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses, grad_chosen_logps, grad_rejected_logps, _grad_pair):
        params: LossParams = ctx.params
        policy_logits, labels, stats, pair = ctx.saved_tensors
        row_coef = row_coefficients(
            pair,
            grad_losses,
            grad_chosen_logps,
            grad_rejected_logps,
            average_log_prob=params.average_log_prob,
        )
        token_coef = ctx.sequences.token_coefficients(row_coef)
        plan: LogitsPlan = ctx.plan
        if policy_logits.shape[-1] == 0:  # a vocabulary shard with no entries
            return torch.zeros_like(policy_logits), None, None, None, None, None
        grad = token_backward(
            policy_logits,
            labels,
            stats,
            token_coef,
            params,
            inplace=plan.inplace,
            vocab_offset=plan.shard.offset if plan.shard is not None else 0,
        )
        return grad, None, None, None, None, None


class LinearEpsilonDPOFunction(torch.autograd.Function):
    """(policy_hidden, policy_weight, policy_bias, ref_hidden, ref_weight, ref_bias, labels,
    params, sequences, chunks) → (losses, chosen_logps, rejected_logps, pair).

    Saves the policy hidden states, weight and bias (references, no copies), the labels, the
    scored indices, the token stats (6 floats per token) and the pair buffer; nothing V-sized.
    """

    @staticmethod
    def evaluate(
        policy_hidden,
        policy_weight,
        policy_bias,
        ref_hidden,
        ref_weight,
        ref_bias,
        labels,
        params: LossParams,
        sequences: Sequences,
        chunks: LinearChunks,
    ):
        """The forward alone: the ``(PAIR_FIELDS, B)`` pair buffer (see layout.py)."""
        return linear_forward(
            policy_hidden,
            policy_weight,
            policy_bias,
            ref_hidden,
            ref_weight,
            ref_bias,
            labels,
            params,
            sequences,
            chunks,
        )[1]

    @staticmethod
    def forward(
        ctx,
        policy_hidden,
        policy_weight,
        policy_bias,
        ref_hidden,
        ref_weight,
        ref_bias,
        labels,
        params: LossParams,
        sequences: Sequences,
        chunks: LinearChunks,
    ):
        stats, pair, scored = linear_forward(
            policy_hidden,
            policy_weight,
            policy_bias,
            ref_hidden,
            ref_weight,
            ref_bias,
            labels,
            params,
            sequences,
            chunks,
        )
        ctx.params, ctx.sequences, ctx.chunks = params, sequences, chunks
        ctx.has_bias = policy_bias is not None
        ctx.save_for_backward(
            policy_hidden, policy_weight, policy_bias, labels, stats, scored, pair
        )
        ctx.mark_non_differentiable(pair)
        return (*split_pair(pair), pair)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses, grad_chosen_logps, grad_rejected_logps, _grad_pair):
        policy_hidden, policy_weight, policy_bias, labels, stats, scored, pair = ctx.saved_tensors
        params: LossParams = ctx.params
        row_coef = row_coefficients(
            pair,
            grad_losses,
            grad_chosen_logps,
            grad_rejected_logps,
            average_log_prob=params.average_log_prob,
        )
        needs = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            ctx.has_bias and ctx.needs_input_grad[2],
        )
        grads = linear_backward(
            policy_hidden,
            policy_weight,
            policy_bias,
            labels,
            stats,
            scored,
            ctx.sequences.token_coefficients(row_coef),
            params,
            ctx.chunks,
            needs,
        )
        return (*grads, None, None, None, None, None, None, None)
