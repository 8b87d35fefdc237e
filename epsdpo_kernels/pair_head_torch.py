"""The per-pair head: from per-token log-probabilities to the ε-DPO step, loss and gradient scale.

Two implementations of the same few lines of docs/SPEC.md (Per sequence, Per pair): a Triton kernel
with one program per pair, so a step launches one kernel whatever B is, and plain torch for the
torch backend. Both read the ``(TOKEN_FIELDS, 2B·T)`` token stats and write ``(PAIR_FIELDS, B)``;
the sums run in a fixed order (no atomics), so results are bitwise reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import layout as L


def _sequence_sums(stats: torch.Tensor, scored: torch.Tensor, average: bool):
    """(TOKEN_FIELDS, 2B) row sums of the token stats, and the (2B,) scored-token counts."""
    two_b, t = scored.shape
    sums = stats.view(L.TOKEN_FIELDS, two_b, t).sum(-1)
    counts = scored.sum(-1).to(torch.float32)
    if average:
        # Only the log-probabilities are averaged; the logit sum feeds a token-weighted metric.
        sums[list(L.TOK_AVERAGED)] /= counts.clamp(min=1)
    return sums, counts


def pair_head(stats: torch.Tensor, labels: torch.Tensor, params) -> torch.Tensor:
    beta, epsilon, label_smoothing = params.beta, params.epsilon, params.label_smoothing
    scored = labels != params.ignore_index
    sums, counts = _sequence_sums(stats, scored, params.average_log_prob)
    b = scored.shape[0] // 2
    A, R, dU, dD = (
        sums[f] for f in (L.TOK_LOGP, L.TOK_REF_LOGP, L.TOK_P_EPS_DELTA, L.TOK_N_EPS_DELTA)
    )

    logratio = A[:b] - A[b:]
    ref_logratio = R[:b] - R[b:]
    # ℓ⁺ − ℓ and ℓ⁻ − ℓ summed from per-token differences (layout.py); s = +1 iff ℓ⁺ > ℓ > ℓ⁻.
    p_gap = dU[:b] - dU[b:]
    n_gap = dD[:b] - dD[b:]
    up = (p_gap > 0) & (n_gap < 0)
    down = (n_gap > 0) & (p_gap < 0)
    step = (up.float() - down.float()) * float(epsilon > 0)
    beta_used = beta / (1.0 + epsilon * step)
    z = beta_used * (logratio - ref_logratio)
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    dloss = -beta_used * (
        (1 - label_smoothing) * torch.sigmoid(-z) - label_smoothing * torch.sigmoid(z)
    )

    out = torch.empty((L.PAIR_FIELDS, b), dtype=torch.float32, device=stats.device)
    out[L.PAIR_LOSS] = loss
    out[L.PAIR_STEP] = step
    out[L.PAIR_BETA_USED] = beta_used
    out[L.PAIR_CHOSEN_LOGPS] = A[:b]
    out[L.PAIR_REJECTED_LOGPS] = A[b:]
    out[L.PAIR_REF_CHOSEN_LOGPS] = R[:b]
    out[L.PAIR_REF_REJECTED_LOGPS] = R[b:]
    out[L.PAIR_CHOSEN_REWARD] = beta_used * (A[:b] - R[:b])
    out[L.PAIR_REJECTED_REWARD] = beta_used * (A[b:] - R[b:])
    out[L.PAIR_DLOSS_DLOGRATIO] = dloss
    out[L.PAIR_CHOSEN_COUNT] = counts[:b]
    out[L.PAIR_REJECTED_COUNT] = counts[b:]
    out[L.PAIR_CHOSEN_LOGIT_SUM] = sums[L.TOK_LOGIT_SUM, :b]
    out[L.PAIR_REJECTED_LOGIT_SUM] = sums[L.TOK_LOGIT_SUM, b:]
    out[L.PAIR_LOGRATIO] = logratio
    out[L.PAIR_REF_LOGRATIO] = ref_logratio
    out[L.PAIR_P_EPS_LOGRATIO] = logratio + p_gap
    out[L.PAIR_N_EPS_LOGRATIO] = logratio + n_gap
    return out
