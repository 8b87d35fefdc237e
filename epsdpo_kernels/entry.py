"""The path both public entry points share once they have checked their own arguments.

``epsilon_dpo_loss`` (logits) and ``linear_epsilon_dpo_loss`` (hidden states) differ only in their
inputs and their autograd Function; from checked inputs to ``EpsilonDPOOutput`` they go through
``compute_loss``.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from . import validation as V
from .autograd import split_pair
from .output import EpsilonDPOOutput, build_output
from .params import loss_params
from .sequence_group import check_group_agrees, resolve_group


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
    sequence_ids: torch.Tensor | None = None,
    num_pairs: int | None = None,
    sequence_group=None,
) -> EpsilonDPOOutput:
    """Run ``function`` (an autograd Function with an ``evaluate`` twin, autograd.py) on
    ``inputs`` with the call's ``LossParams`` and token-to-sequence map (``Sequences``), built
    here once the labels are counted, and the Function's own ``path_option`` (the logits path's
    in-place flag, the linear path's chunks). ``sequence_ids`` and ``num_pairs`` describe a
    packed stream (inputs of one row of N tokens); without them the rows are the 2B sequences.
    ``sequence_group`` (sequence_group.py): the ranks holding the other tokens of the same
    sequences; the per-sequence sums are completed over it.

    The first ``n_policy`` inputs are the policy's (they may receive gradients); the rest are
    detached. Checking the labels syncs the host once; nothing else in a call does (on the
    Triton backend). With no policy input requiring a gradient (evaluation, under
    ``torch.no_grad()``), the forward runs without building a Function, so nothing is saved for
    a backward that will not come.
    """
    group = resolve_group(sequence_group)
    count, sequences = V.scan_labels(
        labels,
        vocab=vocab,
        ignore_index=options["ignore_index"],
        sequence_ids=sequence_ids,
        num_sequences=2 * num_pairs if num_pairs else labels.shape[0],
    )
    params = loss_params(options, backend, count)
    if group is not None:
        check_group_agrees(group, labels.device, sequences.count, options)
        sequences = replace(sequences, group=group)
    policy = inputs[:n_policy]
    rest = tuple(None if x is None else x.detach() for x in inputs[n_policy:])
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in policy):
        losses, chosen, rejected, pair = function.apply(
            *policy, *rest, params, sequences, path_option
        )
    else:
        detached = tuple(None if x is None else x.detach() for x in policy)
        pair = function.evaluate(*detached, *rest, params, sequences, path_option)
        losses, chosen, rejected = split_pair(pair)
    return build_output(losses, chosen, rejected, pair, beta=params.beta, vocab=vocab)
