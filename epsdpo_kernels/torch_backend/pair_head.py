"""The per-pair head: from per-sequence sums to the ε-DPO step, loss and gradient scale.

Two implementations of the same few lines of docs/SPEC.md (Per pair): a Triton kernel with one
program per pair, so a step launches one kernel whatever B is, and plain torch for the torch
backend. Both read the ``(SEQUENCE_FIELDS, 2B)`` sequence sums and write ``(PAIR_FIELDS, B)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import layout as L


def pair_head(sequence_sums: torch.Tensor, params) -> torch.Tensor:
    beta, epsilon, label_smoothing = params.beta, params.epsilon, params.label_smoothing
    counts = sequence_sums[L.SEQ_COUNT]
    b = counts.shape[0] // 2
    A, R, dU, dD = (
        sequence_sums[f] for f in (L.SEQ_LOGP, L.SEQ_REF_LOGP, L.SEQ_P_EPS_DELTA, L.SEQ_N_EPS_DELTA)
    )
    if params.average_log_prob:
        # Only the log-probabilities are averaged; the logit sum feeds a token-weighted metric.
        denom = counts.clamp(min=1)
        A, R, dU, dD = A / denom, R / denom, dU / denom, dD / denom

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

    out = torch.empty((L.PAIR_FIELDS, b), dtype=torch.float32, device=sequence_sums.device)
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
    out[L.PAIR_CHOSEN_LOGIT_SUM] = sequence_sums[L.SEQ_LOGIT_SUM, :b]
    out[L.PAIR_REJECTED_LOGIT_SUM] = sequence_sums[L.SEQ_LOGIT_SUM, b:]
    out[L.PAIR_LOGRATIO] = logratio
    out[L.PAIR_REF_LOGRATIO] = ref_logratio
    out[L.PAIR_P_EPS_LOGRATIO] = logratio + p_gap
    out[L.PAIR_N_EPS_LOGRATIO] = logratio + n_gap
    out[L.PAIR_CHOSEN_WPO_LOGP] = sequence_sums[L.SEQ_WPO_LOGP, :b]
    out[L.PAIR_REJECTED_WPO_LOGP] = sequence_sums[L.SEQ_WPO_LOGP, b:]
    return out
