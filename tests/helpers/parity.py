"""Comparison of an EpsilonDPOOutput with the float64 reference, shared by the parity tests.

Tolerances follow the fp32 error model of each quantity: differences of per-sequence sums
(log-ratios, rewards) cancel, so their error scales with the operands, not the result.
"""

from __future__ import annotations

import math

import torch

from tests.helpers.compare import VALUE_TOL, assert_close

# fp32's unit roundoff, and the confidence factor of the probabilistic rounding-error bound
# (Higham & Mary, "A new approach to probabilistic rounding error analysis", SIAM J. Sci.
# Comput. 2019): a sum of n fp32 terms, computed in any order, is within λ·√n·u·Σ|terms| of the
# exact sum with probability at least 1 − 2·exp(−λ²/2); λ = 5 leaves a failure chance of 7e-6
# per sum. The worst-case bound, n·u·Σ|terms|, is never approached by real reductions.
FP32_UNIT_ROUNDOFF = 2.0**-24
ROUNDING_LAMBDA = 5.0


def fp32_sum_rel_error(n: int) -> float:
    """γ(n) = λ·√n·u: the relative error (to Σ|terms|) of an n-term fp32 sum in any order."""
    return ROUNDING_LAMBDA * math.sqrt(max(n, 1)) * FP32_UNIT_ROUNDOFF


def sequence_logp_disagreement(logps, counts, vocab: int):
    """How far two fp32 implementations' sequence log-probs A_n = Σ_t a_t can differ.

    Each a_t = h_y − logsumexp(h) reduces V entries, and A_n reduces the row's n_n tokens; two
    implementations do both in different orders (and tile the lm_head matmul differently). Since
    every a_t ≤ 0, Σ_t |a_t| = |A_n|, so each implementation is within (γ(V) + γ(n_n))·|A_n| of
    the exact value, and the two within twice that.
    """
    rel = torch.tensor(
        [fp32_sum_rel_error(vocab) + fp32_sum_rel_error(int(n)) for n in counts],
        dtype=torch.float64,
    )
    return 2 * rel * logps.detach().double().abs().cpu()


def loss_disagreement(out, counts, vocab: int) -> float:
    """Bound on |ΔL| between two fp32 implementations of the batch loss, from the disagreement
    of its sequence log-probs (``sequence_logp_disagreement``): L_i depends on them only through
    z_i = β̃·(ℓ_i − ℓ_ref,i) with |∂L_i/∂z_i| = σ(−z_i) for the sigmoid loss, and the batch loss
    is the mean over pairs. ``counts``: scored tokens per row, (2B,) in the loss's row order."""
    b = len(out.losses)
    d_policy = sequence_logp_disagreement(
        torch.cat([out.chosen_logps, out.rejected_logps]), counts, vocab
    )
    d_ref = sequence_logp_disagreement(
        torch.cat([out.ref_chosen_logps, out.ref_rejected_logps]), counts, vocab
    )
    d_margin = (d_policy + d_ref).view(2, b).sum(0)  # Δ(ℓ − ℓ_ref) per pair
    beta_used = out.beta_used.detach().double().cpu()
    z = beta_used * (out.logratios - out.ref_logratios).detach().double().cpu()
    return float((beta_used * torch.sigmoid(-z) * d_margin).mean())


STEP_FREE_FIELDS = [
    "chosen_logps",
    "rejected_logps",
    "ref_chosen_logps",
    "ref_rejected_logps",
    "logratios",
    "ref_logratios",
    "p_epsilon_logratios",
    "n_epsilon_logratios",
]
STEP_DEPENDENT_FIELDS = ["losses", "beta_used", "chosen_rewards", "rejected_rewards"]


def objective(out, weights):
    """A scalar whose gradient exercises every differentiable output with upstream ≠ 1."""
    w_loss, w_losses, w_chosen, w_rejected = weights
    get = (lambda k: out[k]) if isinstance(out, dict) else (lambda k: getattr(out, k))
    return (
        w_loss * get("loss")
        + (w_losses * get("losses")).sum()
        + (w_chosen * get("chosen_logps")).sum()
        + (w_rejected * get("rejected_logps")).sum()
    )


def grad_coef_atol(e, weights, labels, kw):
    """Per-row absolute tolerance of the gradient from the fp32 error of c_n (docs/SPEC.md:
    ∂L/∂h = c_n·(onehot − p), |onehot − p| ≤ 1).

    c_n = w_i·∂L_i/∂ℓ_i ± (direct weight on the row's logps). Its terms can cancel, so its error
    scales with their magnitudes; and ∂L/∂ℓ inherits the error of ℓ through
    |∂²L/∂ℓ²| ≤ β̃²/4, where ℓ's error scales with the log-prob sums it is a difference of.
    """
    w_loss, w_losses, w_chosen, w_rejected = weights
    b = len(e["losses"])
    ls = kw.get("label_smoothing", 0.0)
    beta_used = e["beta_used"]
    z = beta_used * (e["logratios"] - e["ref_logratios"])
    dloss = -beta_used * ((1 - ls) * torch.sigmoid(-z) - ls * torch.sigmoid(z))
    w_total = (w_loss / b + w_losses).abs()
    mags = sum(
        e[k].abs()
        for k in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    )
    through_loss = w_total * (dloss.abs() + 0.25 * beta_used**2 * VALUE_TOL["rtol"] * mags)
    coef_scale = torch.cat([through_loss + w_chosen.abs(), through_loss + w_rejected.abs()])
    if kw.get("average_log_prob", False):
        coef_scale = coef_scale / (labels != kw.get("ignore_index", -100)).sum(-1).clamp(min=1)
    return VALUE_TOL["rtol"] * coef_scale + 1e-30


def upstream_weights(b: int):
    """Random weights for loss, losses, chosen_logps, rejected_logps (upstream gradient ≠ 1)."""
    gen = torch.Generator().manual_seed(1234)
    return (
        float(torch.rand((), generator=gen)) + 0.5,
        torch.rand(b, generator=gen, dtype=torch.float64),
        0.1 * torch.randn(b, generator=gen, dtype=torch.float64),
        0.1 * torch.randn(b, generator=gen, dtype=torch.float64),
    )


def on_device(weights, device):
    return tuple(w.to(device).float() if torch.is_tensor(w) else w for w in weights)


def check_outputs(out, expected, row_logp_atol=None) -> torch.Tensor:
    """Assert every field of ``out`` matches ``expected``; return the (B,) mask of pairs whose
    steps agree (they may differ only within rounding of a tie).

    ``row_logp_atol`` (2B,): extra absolute error allowed in each row's log-prob sums, for
    inputs that differ from the reference's by rounding (the linear path's chunked matmuls).
    """
    b = len(expected["losses"])
    extra = torch.zeros(2 * b, dtype=torch.float64) if row_logp_atol is None else row_logp_atol
    extra_c, extra_j = extra[:b], extra[b:]
    # Steps must agree except within rounding of a tie between the three log-ratios.
    lr = expected["logratios"]
    gap = torch.minimum(
        (expected["p_epsilon_logratios"] - lr).abs(), (lr - expected["n_epsilon_logratios"]).abs()
    )
    scale = 1 + expected["chosen_logps"].abs() + expected["rejected_logps"].abs()
    near_tie = gap <= 1e-5 * scale.detach() + 2 * (extra_c + extra_j)
    agree = out.steps.cpu() == expected["steps"]
    assert (agree | near_tie).all(), f"steps {out.steps.tolist()} != {expected['steps'].tolist()}"
    assert out.steps.dtype == torch.int64 and set(out.steps.unique().tolist()) <= {-1, 0, 1}

    # Differences of per-sequence sums cancel: their fp32 error scales with the operands, not
    # with the (possibly tiny) result. Each field's tolerance is rtol × the magnitude it came from.
    e = {k: v.detach() for k, v in expected.items()}
    beta_used = e["beta_used"]
    mag_a = e["chosen_logps"].abs() + e["rejected_logps"].abs()
    mag_r = e["ref_chosen_logps"].abs() + e["ref_rejected_logps"].abs()
    rtol = VALUE_TOL["rtol"]
    extra_atol = {
        "chosen_logps": extra_c,
        "rejected_logps": extra_j,
        "ref_chosen_logps": extra_c,
        "ref_rejected_logps": extra_j,
        "chosen_rewards": beta_used * 2 * extra_c,
        "rejected_rewards": beta_used * 2 * extra_j,
        "losses": beta_used * 2 * (extra_c + extra_j),
        **{
            k: extra_c + extra_j
            for k in ("logratios", "ref_logratios", "p_epsilon_logratios", "n_epsilon_logratios")
        },
    }
    operand_scale = {
        "logratios": mag_a,
        "p_epsilon_logratios": mag_a,
        "n_epsilon_logratios": mag_a,
        "ref_logratios": mag_r,
        "chosen_rewards": e["beta_used"] * (e["chosen_logps"].abs() + e["ref_chosen_logps"].abs()),
        "rejected_rewards": e["beta_used"]
        * (e["rejected_logps"].abs() + e["ref_rejected_logps"].abs()),
        "losses": e["beta_used"] * (mag_a + mag_r),
    }
    for name in STEP_FREE_FIELDS + STEP_DEPENDENT_FIELDS:
        atol = VALUE_TOL["atol"] + rtol * operand_scale.get(name, 0.0) + extra_atol.get(name, 0.0)
        mask = agree if name in STEP_DEPENDENT_FIELDS else None
        assert_close(getattr(out, name), e[name], name=name, mask=mask, rtol=rtol, atol=atol)
    for name in ("mean_chosen_logits", "mean_rejected_logits"):
        assert_close(getattr(out, name), e[name], name=name, **VALUE_TOL)
    for name in ("chosen_tokens", "rejected_tokens"):  # counts: exact
        assert torch.equal(getattr(out, name).cpu().double(), e[name].cpu().double()), name
    if agree.all():
        loss_scale = rtol * operand_scale["losses"] + extra_atol["losses"]
        atol = VALUE_TOL["atol"] + loss_scale.mean()
        assert_close(out.loss, e["loss"], name="loss", rtol=rtol, atol=atol)
    for name in ["loss", "losses", "chosen_logps", "rejected_logps"]:
        assert torch.isfinite(getattr(out, name)).all(), name
    if "wpo_weights" in e:
        check_wpo_weights(out, e, extra_c, extra_j)
    else:
        assert out.wpo_weights is None

    return agree


def check_wpo_weights(out, e, extra_c=0.0, extra_j=0.0) -> None:
    """WPO's weights w = exp(M_c + M_j), M a row's mean of a − log Σp²: each mean is within
    rtol × its terms' mean magnitude of the exact one (plus, for the linear path, the rounding
    of its inputs per token), so w within the sum of the two, relatively."""
    assert out.wpo_weights is not None and out.wpo_weights.dtype == torch.float32
    n_c = e["chosen_tokens"].double().clamp(min=1)
    n_j = e["rejected_tokens"].double().clamp(min=1)
    rtol = VALUE_TOL["rtol"]
    mean_error = (
        rtol * (e["chosen_wpo_magnitudes"] + e["rejected_wpo_magnitudes"])
        + 2 * extra_c / n_c
        + 2 * extra_j / n_j
    )
    w = e["wpo_weights"]
    assert_close(
        out.wpo_weights, w, name="wpo_weights", rtol=0, atol=w * mean_error.expm1() + 1e-30
    )
