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
from .sequences import scored_rows, spread_scored

# Logits elements of the scored rows gathered at a time by the sharded logits path (16M: 32 MiB
# bf16).
_GATHER_ELEMENTS = 2**24


def chunk_stats(policy_logits, ref_logits, labels, call) -> torch.Tensor:
    """``(TOKEN_FIELDS, C)`` stats of a ``(C, 1, V_r)`` chunk of scored tokens' logits: the
    per-token pass, or this rank's shard partials merged over the shard's group."""
    if call.shard is None:
        return dispatch.token_forward(policy_logits, ref_logits, labels, call.params)
    shard = call.shard
    maxes, sums = dispatch.token_partials(
        policy_logits, ref_logits, labels, call.params, shard.offset, shard.rows
    )
    merge_partials(maxes, sums, shard)
    return dispatch.stats_from_partials(maxes, sums, call.params)


def logits_stats(policy_logits, ref_logits, labels, call) -> torch.Tensor:
    """``(TOKEN_FIELDS, N·T)`` stats of ``(N, T, V_r)`` logits (zeros at ignored tokens). A
    shard's scored rows go through ``chunk_stats`` a bounded number at a time."""
    if call.shard is None:
        return dispatch.token_forward(policy_logits, ref_logits, labels, call.params)
    params = call.params
    flat_labels = labels.reshape(-1)
    scored = scored_rows(labels, params.ignore_index, params.scored_count)
    scored_stats = torch.empty(
        (L.TOKEN_FIELDS, scored.numel()), dtype=torch.float32, device=labels.device
    )
    policy = policy_logits.flatten(0, 1)
    ref = ref_logits.flatten(0, 1)
    step = max(1, _GATHER_ELEMENTS // max(1, call.shard.rows))
    for start in range(0, scored.numel(), step):
        idx = scored[start : start + step]
        scored_stats[:, start : start + step] = chunk_stats(
            policy[idx].unsqueeze(1), ref[idx].unsqueeze(1), flat_labels[idx].unsqueeze(1), call
        )
    return spread_scored(scored_stats, labels, params.ignore_index, dim=1)


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
    stats = logits_stats(policy_logits, ref_logits, labels, call)
    return stats, pair_buffer(stats, labels, call)
