"""The two autograd Functions, one per input kind, and what they share.

``EpsilonDPOLogitsFunction`` (materialised logits) and ``LinearEpsilonDPOFunction`` (hidden states
and lm_head weights) both return ``(losses, chosen_logps, rejected_logps, pair)``: the first three
differentiable, the pair buffer (layout.py) not. Each takes its tensors and the call's
``LossCall`` (call.py). Their backward passes both start from each token's coefficient c_n =
∂(upstream)/∂A_n of its sequence (``steps.token_coefficients``, docs/SPEC.md, Gradients), then go
to the per-token backward directly (logits) or through the vocabulary slices (linear).
"""

from __future__ import annotations

import torch

from . import steps
from .linear_chunks import linear_backward, linear_forward
from .plans import LinearInputs


class EpsilonDPOLogitsFunction(torch.autograd.Function):
    """(policy_logits, ref_logits, labels, call) → (losses, chosen_logps, rejected_logps, pair).

    Saves the policy logits (by reference, no copy), the labels, the token stats (6 floats per
    token) and the pair buffer. Only ``policy_logits`` gets a gradient; ``call.plan.inplace``
    writes it over the logits' storage.
    """

    policy_inputs = 1  # the leading inputs that may get gradients

    @staticmethod
    def evaluate(policy_logits, ref_logits, labels, call):
        """The forward alone: the ``(PAIR_FIELDS, B)`` pair buffer (see layout.py)."""
        stats = steps.token_stats(policy_logits, ref_logits, labels, call)
        return steps.pair_buffer(stats, labels, call)

    @staticmethod
    def forward(ctx, policy_logits, ref_logits, labels, call):
        stats = steps.token_stats(policy_logits, ref_logits, labels, call)
        pair = steps.pair_buffer(stats, labels, call)
        ctx.call = call
        ctx.save_for_backward(policy_logits, labels, stats, pair)
        ctx.mark_non_differentiable(pair)
        return (*steps.split_pair(pair), pair)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses, grad_chosen_logps, grad_rejected_logps, _grad_pair):
        policy_logits, labels, stats, pair = ctx.saved_tensors
        call = ctx.call
        token_coef = steps.token_coefficients(
            ctx.call, pair, (grad_losses, grad_chosen_logps, grad_rejected_logps)
        )
        if policy_logits.shape[-1] == 0:  # a vocabulary shard with no entries
            return torch.zeros_like(policy_logits), None, None, None
        grad = steps.token_backward(
            policy_logits,
            labels,
            stats,
            token_coef,
            call.params,
            inplace=call.plan.inplace,
            vocab_offset=call.shard.offset if call.shard is not None else 0,
        )
        if call.plan.inplace:
            # A kernel's write is invisible to autograd: bump the logits' version as an in-place
            # torch op would, so that another consumer that saved them, or a second backward
            # through this graph, raises "modified by an inplace operation" instead of reading
            # the gradient as logits.
            torch.autograd.graph.increment_version(policy_logits)
        return grad, None, None, None


class LinearEpsilonDPOFunction(torch.autograd.Function):
    """(the six ``LinearInputs``, labels, call) → (losses, chosen_logps, rejected_logps, pair).

    Saves the policy hidden states, weight and bias (references, no copies), the labels, the
    scored indices, the token stats (6 floats per token) and the pair buffer; nothing V-sized.
    """

    policy_inputs = 3

    @staticmethod
    def evaluate(*args):
        """The forward alone: the ``(PAIR_FIELDS, B)`` pair buffer (see layout.py)."""
        *tensors, labels, call = args
        return linear_forward(LinearInputs(*tensors), labels, call)[1]

    @staticmethod
    def forward(ctx, *args):
        *tensors, labels, call = args
        inputs = LinearInputs(*tensors)
        stats, pair, scored = linear_forward(inputs, labels, call)
        ctx.call = call
        ctx.has_bias = inputs.policy_bias is not None
        ctx.save_for_backward(
            inputs.policy_hidden,
            inputs.policy_weight,
            inputs.policy_bias,
            labels,
            stats,
            scored,
            pair,
        )
        ctx.mark_non_differentiable(pair)
        return (*steps.split_pair(pair), pair)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses, grad_chosen_logps, grad_rejected_logps, _grad_pair):
        policy_hidden, policy_weight, policy_bias, labels, stats, scored, pair = ctx.saved_tensors
        token_coef = steps.token_coefficients(
            ctx.call, pair, (grad_losses, grad_chosen_logps, grad_rejected_logps)
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
            token_coef,
            ctx.call,
            needs,
        )
        return (*grads, None, None, None, None, None)


def run(function, *tensors, call):
    """``function`` on ``tensors`` (its policy inputs first, then the rest, the labels last) and
    ``call``: (losses, chosen_logps, rejected_logps, pair). With no policy input requiring a
    gradient (evaluation, under ``torch.no_grad()``), the forward runs without building a
    Function, so nothing is saved for a backward that will not come."""
    policy = tensors[: function.policy_inputs]
    rest = tuple(None if x is None else x.detach() for x in tensors[function.policy_inputs :])
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in policy):
        return function.apply(*policy, *rest, call)
    detached = tuple(None if x is None else x.detach() for x in policy)
    pair = function.evaluate(*detached, *rest, call)
    return (*steps.split_pair(pair), pair)
