"""The path both public entry points share once they have checked their own arguments.

``epsilon_dpo_loss`` (logits) and ``linear_epsilon_dpo_loss`` (hidden states) differ only in their
inputs and their autograd Function; from checked inputs to ``EpsilonDPOOutput`` they go through
``compute_loss``.
"""

from __future__ import annotations

import torch

from . import validation as V
from .autograd import split_pair
from .output import EpsilonDPOOutput, build_output
from .params import loss_params


def compute_loss(
    function,
    inputs: tuple,
    *,
    n_policy: int,
    labels: torch.Tensor,
    vocab: int,
    options: dict,
    backend: str,
    path_option,
) -> EpsilonDPOOutput:
    """Run ``function`` (an autograd Function with an ``evaluate`` twin, autograd.py) on
    ``inputs`` with the call's ``LossParams``, built here once the labels are counted, and the
    Function's own ``path_option`` (the logits path's in-place flag, the linear path's chunks).

    The first ``n_policy`` inputs are the policy's (they may receive gradients); the rest are
    detached. Checking the labels syncs the host once; nothing else in a call does (on the
    Triton backend). With no policy input requiring a gradient (evaluation, under
    ``torch.no_grad()``), the forward runs without building a Function, so nothing is saved for
    a backward that will not come.
    """
    count = V.count_scored_labels(labels, vocab=vocab, ignore_index=options["ignore_index"])
    params = loss_params(options, backend, count)
    policy = inputs[:n_policy]
    rest = tuple(None if x is None else x.detach() for x in inputs[n_policy:])
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in policy):
        losses, chosen, rejected, pair = function.apply(*policy, *rest, params, path_option)
    else:
        detached = tuple(None if x is None else x.detach() for x in policy)
        pair = function.evaluate(*detached, *rest, params, path_option)
        losses, chosen, rejected = split_pair(pair)
    return build_output(losses, chosen, rejected, pair, beta=params.beta, vocab=vocab)
