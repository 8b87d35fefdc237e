"""Per-token partials of one vocabulary shard, in plain torch: the part of the forward that a
rank holding rows ``[offset, offset + rows)`` of the vocabulary computes alone, and the token
stats from the partials once they are merged over the shard's ranks.

For each of the four distributions of docs/SPEC.md (policy h, reference g, the two mixes h ± ε(h −
g)), the shard's log-sum-exp as (max, Σ exp(x − max)); the lm_head outputs at the label where the
label falls in the shard (0 elsewhere); Σ_v h; and, for WPO, the policy's Σ exp(2(h − max))
(layout.py, ``SHARD_*``). Merged over the ranks of the shard's group (distributed/vocab_shard.py: a
MAX all-reduce, then the sums gathered and added in rank order), they give the token fields of
layout.py, with u − a in SPEC's small-number form; everything after is the single-process path. This
is the reference path; triton_backend/vocab_shard.py computes the same on the Triton token kernel.
"""

from __future__ import annotations

import torch

from .. import layout as L
from .rows import ScoredRows, logit_transform, nonpositive


def _partials(z: torch.Tensor):
    """(max, Σ exp(z − max)) per row of one distribution's shard logits. NaN (from infinities in
    the mixes) reads as −inf, as in the single-process kernels."""
    z = z.nan_to_num(nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)
    m = z.amax(1)
    safe = torch.where(torch.isfinite(m), m, 0.0)
    return m, (z - safe.unsqueeze(1)).exp_().sum(1)


def _squares(h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Σ exp(2(h − m)) per row: Σp² of the shard up to the factor exp(2(m − lse))."""
    safe = torch.where(torch.isfinite(m), m, 0.0)
    return (h - safe.unsqueeze(1)).mul_(2).exp_().sum(1)


def _label_outputs(z: torch.Tensor, column: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    at_label = z.gather(1, column.clamp(0, z.shape[1] - 1).unsqueeze(1)).squeeze(1)
    return torch.where(owned, at_label, 0.0)


@torch.no_grad()
def token_partials(policy_logits, ref_logits, labels, params, offset: int, rows: int):
    """``(SHARD_MAXES, N·T)`` maxes and ``(SHARD_SUMS, N·T)`` sums of ``(N, T, rows)`` shard
    lm_head outputs with full-vocabulary ``labels`` ``(N, T)``; unscored rows read nothing
    (maxes −inf, sums 0). Scored rows a few at a time, as views where possible (the token
    pass's sub-chunks): no copy of the shard's logits."""
    n, t, _ = policy_logits.shape
    device = policy_logits.device
    maxes = torch.full((L.SHARD_MAXES, n * t), -torch.inf, device=device)
    sums = torch.zeros((L.SHARD_SUMS, n * t), device=device)
    if rows == 0:  # a rank whose shard holds no vocabulary entries
        return maxes, sums
    scored = ScoredRows(labels, params.ignore_index, rows, policy_logits, ref_logits)
    for sel, r, c in scored.chunks():
        z_h = scored.take(policy_logits, sel, r, c).float()
        z_g = scored.take(ref_logits, sel, r, c).float()
        column = scored.take(labels.unsqueeze(-1), sel, r, c).reshape(-1).long() - offset
        owned = (column >= 0) & (column < rows)
        sums[L.SHARD_LABEL_H, sel] = _label_outputs(z_h, column, owned)
        sums[L.SHARD_LABEL_G, sel] = _label_outputs(z_g, column, owned)
        h, g = z_h, z_g
        if params.transformed:  # a copy first: .float() of fp32 views is the input itself
            h, g = logit_transform(z_h.clone(), params), logit_transform(z_g.clone(), params)
        diff = h - g
        streams = (h, g, h + params.epsilon * diff, h - params.epsilon * diff)
        for k, z in enumerate(streams):
            maxes[k, sel], sums[L.SHARD_EXP_SUMS + k, sel] = _partials(z)
        sums[L.SHARD_LOGIT_SUM, sel] = h.sum(1)
        if params.wpo_weights:
            sums[L.SHARD_SQUARES, sel] = _squares(h, maxes[0, sel])
    return maxes, sums


@torch.no_grad()
def stats_from_partials(maxes: torch.Tensor, sums: torch.Tensor, labels, params) -> torch.Tensor:
    """The ``(TOKEN_FIELDS, N·T)`` token stats from partials merged over every shard (zeros at
    unscored rows). u − a = ε·(h_y − g_y) − ((m_p − m_h) + ln(s_p / s_h)), as the Triton kernels
    form it (docs/SPEC.md, Numerics): exactly 0 where the streams are equal."""
    s_h, s_g, s_p, s_n = (sums[L.SHARD_EXP_SUMS + k] for k in range(4))
    m_h, m_g, m_p, m_n = maxes
    lse_h, lse_g = m_h + s_h.log(), m_g + s_g.log()
    label_h = sums[L.SHARD_LABEL_H].clone()
    label_g = sums[L.SHARD_LABEL_G].clone()
    h_y = logit_transform(label_h, params) if params.transformed else label_h
    g_y = logit_transform(label_g, params) if params.transformed else label_g
    stats = torch.empty((L.TOKEN_FIELDS, maxes.shape[1]), dtype=torch.float32, device=maxes.device)
    a = nonpositive(h_y - lse_h)
    stats[L.TOK_LOGP] = a
    stats[L.TOK_REF_LOGP] = nonpositive(g_y - lse_g)
    label_diff = params.epsilon * (h_y - g_y)
    for field, sign, m, s in ((L.TOK_P_EPS_DELTA, 1, m_p, s_p), (L.TOK_N_EPS_DELTA, -1, m_n, s_n)):
        ratio = s / s_h
        log_ratio = torch.where(ratio == 1, 0.0, ratio.log())
        delta = sign * label_diff - ((m - m_h) + log_ratio)
        stats[field] = torch.where(delta > -a, -a, delta)  # u = a + (u − a) ≤ 0
    stats[L.TOK_LSE] = lse_h
    stats[L.TOK_LOGIT_SUM] = sums[L.SHARD_LOGIT_SUM]
    if params.wpo_weights:
        # log Σp² = log Σ exp(2(h − m)) − 2·log Σ exp(h − m), both at the merged max m.
        stats[L.TOK_WPO_LOGP] = a - (sums[L.SHARD_SQUARES].log() - 2 * s_h.log())
    else:
        stats[L.TOK_WPO_LOGP] = 0.0
    scored = (labels.reshape(-1) != params.ignore_index).unsqueeze(0)
    return torch.where(scored, stats, 0.0)  # a select: no host sync for a mask's size
