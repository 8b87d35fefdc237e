"""Per-token partials of one vocabulary shard, in plain torch: the part of the forward that a
rank holding rows ``[offset, offset + rows)`` of the vocabulary computes alone.

For each of the four distributions of docs/SPEC.md (policy h, reference g, the two mixes
h ± ε(h − g)), the shard's log-sum-exp as (max, Σ exp(z − max)), the label's logit where the
label falls in the shard (0 elsewhere), and Σ_v h. Merged over the ranks of the shard's group
(distributed/vocab_shards.py: a MAX and a SUM all-reduce), they give the token fields of
layout.py exactly (``stats_from_partials``); everything after is the single-process path.
"""

from __future__ import annotations

import torch

from .. import layout as L
from .token import _chunk_rows, _nonpositive, logit_transform

MAX_FIELDS = 4  # the four streams' maxes
# Their four Σexp, their four label logits, Σh, and the policy's Σ exp(2(h − max h)) (WPO's
# Σp², scaled; 0 unless the call asks for it).
SUM_FIELDS = 10
SQUARES = 9


def _partials(z: torch.Tensor, column: torch.Tensor, owned: torch.Tensor):
    """(max, Σ exp(z − max), z at the label or 0) per row of one distribution's shard logits.
    NaN (from infinities in the mixes) reads as −inf, as in the single-process kernels."""
    z = z.nan_to_num(nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)
    if z.shape[1] == 0:
        m = z.new_full((z.shape[0],), -torch.inf)
        return m, torch.zeros_like(m), torch.zeros_like(m)
    m = z.amax(1)
    safe = torch.where(torch.isfinite(m), m, 0.0)
    total = (z - safe.unsqueeze(1)).exp_().sum(1)
    label = z.gather(1, column.unsqueeze(1)).squeeze(1)
    return m, total, torch.where(owned, label, 0.0)


@torch.no_grad()
def token_partials(policy_logits, ref_logits, labels, params, offset: int, rows: int):
    """``(MAX_FIELDS, C)`` maxes and ``(SUM_FIELDS, C)`` sums of ``(C, 1, rows)`` shard logits
    of C scored tokens with full-vocabulary ``labels`` (C, 1)."""
    count = policy_logits.shape[0]
    device = policy_logits.device
    maxes = torch.empty((MAX_FIELDS, count), dtype=torch.float32, device=device)
    sums = torch.empty((SUM_FIELDS, count), dtype=torch.float32, device=device)
    column = (labels.reshape(-1) - offset).long()
    owned = (column >= 0) & (column < rows)
    column = column.clamp(0, max(0, rows - 1))
    step = _chunk_rows(max(1, rows), device)
    for start in range(0, count, step):
        sl = slice(start, min(count, start + step))
        h = policy_logits[sl, 0].float()
        g = ref_logits[sl, 0].float()
        if params.transformed:
            h, g = logit_transform(h.clone(), params), logit_transform(g.clone(), params)
        diff = h - g
        streams = (h, g, h + params.epsilon * diff, h - params.epsilon * diff)
        for k, z in enumerate(streams):
            maxes[k, sl], sums[k, sl], sums[4 + k, sl] = _partials(z, column[sl], owned[sl])
        sums[8, sl] = h.sum(1)
        sums[SQUARES, sl] = _squares(h, maxes[0, sl]) if params.wpo_weights else 0.0
    return maxes, sums


def _squares(h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Σ exp(2(h − m)) per row: Σp² of the shard up to the factor exp(2(m − lse))."""
    if h.shape[1] == 0:
        return torch.zeros_like(m)
    safe = torch.where(torch.isfinite(m), m, 0.0)
    return (h - safe.unsqueeze(1)).mul_(2).exp_().sum(1)


@torch.no_grad()
def stats_from_partials(maxes: torch.Tensor, sums: torch.Tensor, params) -> torch.Tensor:
    """The ``(TOKEN_FIELDS, C)`` token stats from partials merged over every shard."""
    lse = maxes + sums[:4].log()
    logp = sums[4:8] - lse  # a, r, u, d
    stats = torch.empty((L.TOKEN_FIELDS, maxes.shape[1]), dtype=torch.float32, device=maxes.device)
    a = _nonpositive(logp[0])
    stats[L.TOK_LOGP] = a
    stats[L.TOK_REF_LOGP] = _nonpositive(logp[1])
    for field, k in ((L.TOK_P_EPS_DELTA, 2), (L.TOK_N_EPS_DELTA, 3)):
        delta = logp[k] - a
        stats[field] = torch.where(delta > -a, -a, delta)
    stats[L.TOK_LSE] = lse[0]
    stats[L.TOK_LOGIT_SUM] = sums[8]
    if params.wpo_weights:
        # log Σp² = log Σ exp(2(h − m)) − 2·log Σ exp(h − m), both at the merged max m.
        stats[L.TOK_WPO_LOGP] = a - (sums[SQUARES].log() - 2 * sums[0].log())
    else:
        stats[L.TOK_WPO_LOGP] = 0.0
    return stats
