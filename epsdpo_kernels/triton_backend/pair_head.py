"""The per-pair head in Triton (torch_backend/pair_head.py says what it computes and why)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import layout as L
from .fields import (
    PAIR_BETA_USED,
    PAIR_CHOSEN_COUNT,
    PAIR_CHOSEN_LOGIT_SUM,
    PAIR_CHOSEN_LOGPS,
    PAIR_CHOSEN_REWARD,
    PAIR_CHOSEN_WPO_LOGP,
    PAIR_DLOSS_DLOGRATIO,
    PAIR_LOGRATIO,
    PAIR_LOSS,
    PAIR_N_EPS_LOGRATIO,
    PAIR_P_EPS_LOGRATIO,
    PAIR_REF_CHOSEN_LOGPS,
    PAIR_REF_LOGRATIO,
    PAIR_REF_REJECTED_LOGPS,
    PAIR_REJECTED_COUNT,
    PAIR_REJECTED_LOGIT_SUM,
    PAIR_REJECTED_LOGPS,
    PAIR_REJECTED_REWARD,
    PAIR_REJECTED_WPO_LOGP,
    PAIR_STEP,
    SEQ_COUNT,
    SEQ_LOGIT_SUM,
    SEQ_LOGP,
    SEQ_N_EPS_DELTA,
    SEQ_P_EPS_DELTA,
    SEQ_REF_LOGP,
    SEQ_WPO_LOGP,
)
from .launch import Launch, launch


@triton.jit
def _log_sigmoid(x):
    # log σ(x) = min(x, 0) − log1p(exp(−|x|)); log1p via the (w−1) correction trick, since
    # log(1 + e) rounds to 0 for e < 2^-24 and the loss of a well-separated pair is that small.
    e = tl.exp(-tl.abs(x))
    w = 1.0 + e
    exact = w == 1.0
    log1p_e = tl.where(exact, e, tl.log(w) * e / tl.where(exact, 1.0, w - 1.0))  # no 0/0
    return tl.minimum(x, 0.0) - log1p_e


@triton.jit
def _sigmoid(x):
    # Through exp(−|x|) ≤ 1: no overflow for extreme margins (|x| ~ 1e4·β).
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _sequence(seq_ptr, n, S):
    """The six sums and the count of sequence n from the ``(SEQUENCE_FIELDS, S)`` buffer."""
    return (
        tl.load(seq_ptr + SEQ_LOGP * S + n),
        tl.load(seq_ptr + SEQ_REF_LOGP * S + n),
        tl.load(seq_ptr + SEQ_P_EPS_DELTA * S + n),
        tl.load(seq_ptr + SEQ_N_EPS_DELTA * S + n),
        tl.load(seq_ptr + SEQ_LOGIT_SUM * S + n),
        tl.load(seq_ptr + SEQ_WPO_LOGP * S + n),
        tl.load(seq_ptr + SEQ_COUNT * S + n),
    )


@triton.jit
def pair_head_kernel(
    seq_ptr,  # (SEQUENCE_FIELDS, 2B) fp32 sequence sums
    out_ptr,  # (PAIR_FIELDS, B) fp32 out, see layout.py
    B,
    beta,
    epsilon,
    label_smoothing,
    AVERAGE_LOG_PROB: tl.constexpr,
):
    """One program owns one pair i: from the sums of sequences i (chosen) and B+i (rejected) it
    decides the step from the three log-ratios and writes the loss, β̃, rewards, logps and
    ∂L_i/∂ℓ_i."""
    i = tl.program_id(0)
    a_c, r_c, u_c, d_c, lsum_c, wpo_c, n_c = _sequence(seq_ptr, i, 2 * B)
    a_j, r_j, u_j, d_j, lsum_j, wpo_j, n_j = _sequence(seq_ptr, i + B, 2 * B)
    if AVERAGE_LOG_PROB:
        inv_c = 1.0 / tl.maximum(n_c, 1.0)
        inv_j = 1.0 / tl.maximum(n_j, 1.0)
        a_c, r_c, u_c, d_c = a_c * inv_c, r_c * inv_c, u_c * inv_c, d_c * inv_c
        a_j, r_j, u_j, d_j = a_j * inv_j, r_j * inv_j, u_j * inv_j, d_j * inv_j

    logratio = a_c - a_j
    ref_logratio = r_c - r_j
    # ℓ⁺ − ℓ and ℓ⁻ − ℓ as sums of the per-token differences: exact where ℓ⁺ and ℓ, differences
    # of two ~−2400 sums, would not be (layout.py). s = +1 iff ℓ⁺ > ℓ > ℓ⁻.
    p_gap = u_c - u_j
    n_gap = d_c - d_j
    up = (p_gap > 0.0) & (n_gap < 0.0)
    down = (n_gap > 0.0) & (p_gap < 0.0)
    step = tl.where(up, 1.0, 0.0) - tl.where(down, 1.0, 0.0)
    step = tl.where(epsilon > 0, step, 0.0)
    beta_used = beta / (1.0 + epsilon * step)
    z = beta_used * (logratio - ref_logratio)
    loss = -(1.0 - label_smoothing) * _log_sigmoid(z) - label_smoothing * _log_sigmoid(-z)
    sig_z = _sigmoid(z)
    sig_neg_z = _sigmoid(-z)
    dloss = -beta_used * ((1.0 - label_smoothing) * sig_neg_z - label_smoothing * sig_z)

    tl.store(out_ptr + PAIR_LOSS * B + i, loss)
    tl.store(out_ptr + PAIR_STEP * B + i, step)
    tl.store(out_ptr + PAIR_BETA_USED * B + i, beta_used)
    tl.store(out_ptr + PAIR_CHOSEN_LOGPS * B + i, a_c)
    tl.store(out_ptr + PAIR_REJECTED_LOGPS * B + i, a_j)
    tl.store(out_ptr + PAIR_REF_CHOSEN_LOGPS * B + i, r_c)
    tl.store(out_ptr + PAIR_REF_REJECTED_LOGPS * B + i, r_j)
    tl.store(out_ptr + PAIR_CHOSEN_REWARD * B + i, beta_used * (a_c - r_c))
    tl.store(out_ptr + PAIR_REJECTED_REWARD * B + i, beta_used * (a_j - r_j))
    tl.store(out_ptr + PAIR_DLOSS_DLOGRATIO * B + i, dloss)
    tl.store(out_ptr + PAIR_CHOSEN_COUNT * B + i, n_c)
    tl.store(out_ptr + PAIR_REJECTED_COUNT * B + i, n_j)
    tl.store(out_ptr + PAIR_CHOSEN_LOGIT_SUM * B + i, lsum_c)
    tl.store(out_ptr + PAIR_REJECTED_LOGIT_SUM * B + i, lsum_j)
    tl.store(out_ptr + PAIR_LOGRATIO * B + i, logratio)
    tl.store(out_ptr + PAIR_REF_LOGRATIO * B + i, ref_logratio)
    tl.store(out_ptr + PAIR_P_EPS_LOGRATIO * B + i, logratio + p_gap)
    tl.store(out_ptr + PAIR_N_EPS_LOGRATIO * B + i, logratio + n_gap)
    tl.store(out_ptr + PAIR_CHOSEN_WPO_LOGP * B + i, wpo_c)
    tl.store(out_ptr + PAIR_REJECTED_WPO_LOGP * B + i, wpo_j)


def pair_head_launch(sequence_sums, out, beta, epsilon, label_smoothing, average_log_prob):
    """The ``Launch``, shared by the launch and the compile check."""
    b = sequence_sums.shape[1] // 2
    return Launch(
        pair_head_kernel,
        (b,),
        (sequence_sums, out, b, beta, epsilon, label_smoothing),
        dict(AVERAGE_LOG_PROB=average_log_prob),
        1,
    )


def pair_head(sequence_sums: torch.Tensor, params) -> torch.Tensor:
    b = sequence_sums.shape[1] // 2
    out = torch.empty((L.PAIR_FIELDS, b), dtype=torch.float32, device=sequence_sums.device)
    spec = pair_head_launch(
        sequence_sums,
        out,
        params.beta,
        params.epsilon,
        params.label_smoothing,
        params.average_log_prob,
    )
    launch(spec, sequence_sums.device)
    return out
