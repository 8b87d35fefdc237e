"""The forward steps both paths share, with their collectives called by name.

A call's token stats come from the per-token pass on whole rows, or, for a vocabulary shard,
from the shard's partials merged over its ranks (distributed/vocab_shards.py); its pair buffer
from the per-sequence sums, completed over the sequence group when there is one
(distributed/sequence_group.py), then the pair head. The logits path is these two steps; the
linear path (linear_chunks.py) runs the first on each chunk of logits it forms.
"""

from __future__ import annotations

import torch

from . import dispatch
from . import layout as L
from .distributed.sequence_group import complete_sums
from .distributed.vocab_shards import merge_partials


def token_stats(policy_logits, ref_logits, labels, call) -> torch.Tensor:
    """``(TOKEN_FIELDS, N·T)`` stats of ``(N, T, V_r)`` logits (zeros at ignored tokens): the
    per-token pass, or this rank's shard partials merged over the shard's group and finished.
    The linear path calls it on each ``(C, 1, V_r)`` chunk of scored tokens' logits."""
    if call.shard is None:
        return dispatch.token_forward(policy_logits, ref_logits, labels, call.params)
    shard = call.shard
    maxes, sums = dispatch.token_partials(
        policy_logits, ref_logits, labels, call.params, shard.offset, shard.rows
    )
    merge_partials(maxes, sums, shard)
    return dispatch.stats_from_partials(maxes, sums, labels, call.params)


# The token fields that ``token_weights`` scale: the four log-probability streams (their sums
# are the weighted sequence log-probs), not the logit sums of the metrics.
_WEIGHTED_FIELDS = [L.TOK_LOGP, L.TOK_REF_LOGP, L.TOK_P_EPS_DELTA, L.TOK_N_EPS_DELTA]


def pair_buffer(stats: torch.Tensor, labels: torch.Tensor, call) -> torch.Tensor:
    """The ``(PAIR_FIELDS, B)`` pair buffer from token stats: per-sequence sums (over every rank
    of the sequence group), then the pair head. With ``token_weights`` the sums are of weighted
    streams, taken from a copy: the stats saved for the backward stay unweighted."""
    if call.token_weights is not None:
        stats = stats.clone()
        stats[_WEIGHTED_FIELDS] *= call.token_weights
    sums = dispatch.sequence_sums(stats, labels, call.sequences, call.params)
    complete_sums(sums, call.sequence_group)
    return dispatch.pair_head(sums, call.params)


@torch.no_grad()
def logits_forward(policy_logits, ref_logits, labels, call):
    """The logits path's forward: (token stats, pair buffer)."""
    stats = token_stats(policy_logits, ref_logits, labels, call)
    return stats, pair_buffer(stats, labels, call)
