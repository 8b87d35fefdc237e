"""Comparison of an EpsilonDPOOutput with the float64 reference, shared by the parity tests.

Tolerances follow the fp32 error model of each quantity: differences of per-sequence sums
(log-ratios, rewards) cancel, so their error scales with the operands, not the result.
"""

from __future__ import annotations

import torch

from tests.utils import VALUE_TOL, assert_close

STEP_FREE_FIELDS = [
    "chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "logratios",
    "ref_logratios", "p_epsilon_logratios", "n_epsilon_logratios",
]  # fmt: skip
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
    mags = sum(e[k].abs() for k in ("chosen_logps", "rejected_logps", "ref_chosen_logps",
                                    "ref_rejected_logps"))  # fmt: skip
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
        **{k: extra_c + extra_j for k in ("logratios", "ref_logratios", "p_epsilon_logratios",
                                          "n_epsilon_logratios")},
    }  # fmt: skip
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
        assert_close(getattr(out, name), e[name], name=name, mask=mask,
                     rtol=rtol, atol=atol)  # fmt: skip
    for name in ("mean_chosen_logits", "mean_rejected_logits"):
        assert_close(getattr(out, name), e[name], name=name, **VALUE_TOL)
    if agree.all():
        loss_scale = rtol * operand_scale["losses"] + extra_atol["losses"]
        atol = VALUE_TOL["atol"] + loss_scale.mean()
        assert_close(out.loss, e["loss"], name="loss", rtol=rtol, atol=atol)
    for name in ["loss", "losses", "chosen_logps", "rejected_logps"]:
        assert torch.isfinite(getattr(out, name)).all(), name

    return agree
