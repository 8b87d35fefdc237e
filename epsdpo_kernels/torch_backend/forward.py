"""The per-token forward in plain torch (the backend CPU users get): the same fields as the
Triton forward (triton_backend/forward.py), from the same formulas. The four log-sum-exps come
from ``torch.log_softmax`` (one fused, vectorised kernel per row) rather than composed ops, on
sub-chunks of the scored rows (rows.py). Nothing here builds an autograd graph over V-sized
tensors (the autograd Functions call it under no_grad).
"""

from __future__ import annotations

import torch

from .. import layout as L
from .rows import ScoredRows, logit_transform, nonpositive


@torch.no_grad()
def token_forward(
    policy_logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, params
) -> torch.Tensor:
    """The same fields as the Triton forward (layout.py), from the same formulas: mixes
    h ± ε(h − g) with NaN (from infinities) read as −inf; u − a as the difference of the two
    label log-probabilities of one row, never of per-sequence sums."""
    epsilon, ignore_index = params.epsilon, params.ignore_index
    n, t, v = policy_logits.shape
    stats = torch.zeros((L.TOKEN_FIELDS, n * t), dtype=torch.float32, device=policy_logits.device)
    rows = ScoredRows(labels, ignore_index, v, policy_logits, ref_logits)
    for sel, r, c in rows.chunks():
        h = rows.take(policy_logits, sel, r, c).float()
        g = rows.take(ref_logits, sel, r, c).float()
        if params.transformed:  # a copy first: .float() of fp32 views is the input itself
            h, g = logit_transform(h.clone(), params), logit_transform(g.clone(), params)
        y = rows.take(labels.unsqueeze(-1), sel, r, c).long()
        out = stats[:, sel]
        log_p = torch.log_softmax(h, -1)
        a = nonpositive(log_p.gather(1, y).squeeze(1))
        # lse = max(h) − max(log_softmax(h)): max + log Σexp(h − max) with one rounding. (Taken
        # at the label instead, h_y − a, it would round at |a|, 1e-3 for logits of 1e4.)
        out[L.TOK_LSE] = h.amax(-1) - log_p.amax(-1)
        if params.wpo_weights:
            # log Σ p² = logsumexp(2·log p): ≤ 0, the max term exactly 2·max(log p).
            out[L.TOK_WPO_LOGP] = a - torch.logsumexp(2 * log_p, -1)
        del log_p
        out[L.TOK_LOGP] = a
        out[L.TOK_REF_LOGP] = nonpositive(torch.log_softmax(g, -1).gather(1, y).squeeze(1))
        out[L.TOK_LOGIT_SUM] = h.sum(-1)
        diff = torch.sub(h, g)
        for field, sign in ((L.TOK_P_EPS_DELTA, 1.0), (L.TOK_N_EPS_DELTA, -1.0)):
            mix = torch.add(h, diff, alpha=sign * epsilon).nan_to_num_(
                nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf
            )
            delta = torch.log_softmax(mix, -1).gather(1, y).squeeze(1) - a
            out[field] = torch.where(delta > -a, -a, delta)  # u = a + (u − a) ≤ 0
        if r is not None:
            stats[:, sel] = out  # advanced indexing returned a copy
    return stats
