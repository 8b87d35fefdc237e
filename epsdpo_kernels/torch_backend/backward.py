"""The per-token backward in plain torch: each scored row's logits gradient c·(onehot − p), as
the Triton backward (triton_backend/backward.py), on sub-chunks of the scored rows (rows.py).
"""

from __future__ import annotations

import torch

from .. import layout as L
from .rows import ScoredRows, logit_transform, logit_transform_slope


@torch.no_grad()
def token_backward(
    policy_logits: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    token_coef: torch.Tensor,
    params,
    *,
    inplace: bool,
    vocab_offset: int = 0,
) -> torch.Tensor:
    """``token_coef`` (N·T,) is each token row's c_n. Column j of the logits is vocabulary
    entry ``vocab_offset + j`` (a slice of V in the linear path); labels are full-vocabulary
    indices."""
    ignore_index = params.ignore_index
    n, t, v = policy_logits.shape
    grad = policy_logits if inplace else torch.zeros_like(policy_logits)
    rows = ScoredRows(labels, ignore_index, v, policy_logits, grad)
    coef = token_coef.float()
    # Scored rows first: in place, each sub-chunk reads its own logits before overwriting them.
    for sel, r, c in rows.chunks():
        h = rows.take(policy_logits, sel, r, c)
        y = rows.take(labels.unsqueeze(-1), sel, r, c).long()
        logits = logit_transform(h.float().clone(), params) if params.transformed else h.float()
        # c·(onehot − p), with p = exp(h − lse) from the forward's lse: one exp per element.
        g = torch.sub(logits, stats[L.TOK_LSE, sel].unsqueeze(1)).exp_()
        local = y - vocab_offset  # the label's column, if it falls in this slice
        inside = (local >= 0) & (local < v)
        g.scatter_add_(1, local.clamp(0, v - 1), -inside.float())
        g.mul_(-coef[sel].unsqueeze(1))
        if params.transformed:  # through the model's transform: ∂logits/∂z per element
            g.mul_(logit_transform_slope(logits, params))
        if r is None:
            grad.reshape(-1, v)[sel] = g
        else:
            grad[r, c] = g.to(grad.dtype)
    if inplace and not rows.all_scored:
        ignored = (labels == ignore_index).flatten().nonzero().squeeze(1)
        for start in range(0, ignored.numel(), rows.step):
            idx = ignored[start : start + rows.step]
            grad[idx // t, idx % t] = 0
    return grad
