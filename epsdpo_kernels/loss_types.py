"""TRL's preference losses on the fused loss's per-sequence sums, each with ε-DPO's β̃ per pair.

ε-DPO's step decision (``out.steps``) and coefficient β̃ = β/(1+ε·s) (``out.beta_used``) come from
the perturbed policies alone, whatever preference loss is then fitted: the mixes estimate where the
KL-regularised optimum moves if β changes, not the loss's shape. So every loss TRL's DPOTrainer
offers takes β̃ per pair wherever TRL's formula has β (docs/SPEC.md, "Other preference losses").
This is an extension of the paper, which defines ε-DPO for the sigmoid loss.

The losses are formed here in PyTorch from the (B,) sums, which are differentiable: their
gradient reaches the logits through the same single backward pass over the vocabulary as the
fused sigmoid loss (the autograd function takes gradients on ``chosen_logps`` and
``rejected_logps``), so no loss type costs a vocabulary pass more than another.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .output import EpsilonDPOOutput
from .params import check_label_smoothing

# TRL 1.16's loss types that compare a pair ("sft", the chosen NLL, is a batch term that
# the trainer adds).
LOSS_TYPES = (
    "sigmoid",
    "sigmoid_norm",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
)
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The losses whose f-DPO generalisation is defined (TRL's list: the f-DPO reparameterisation
# leaves a β·log Z(x) term that cancels only in the chosen − rejected score difference).
F_DIVERGENCE_LOSS_TYPES = (
    "sigmoid",
    "sigmoid_norm",
    "hinge",
    "ipo",
    "exo_pair",
    "robust",
    "discopop",
)
# Losses that read a response's length (they compare per-token averages of the scores).
LENGTH_NORMALISED = ("sigmoid_norm", "ipo")


def check_loss_type(
    loss_type,
    *,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=1.0,
    label_smoothing=0.0,
    discopop_tau=0.05,
) -> None:
    """The options of one ``preference_losses`` call, each named in its own error."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(
            f"f_divergence_type must be one of {F_DIVERGENCE_TYPES}, got {f_divergence_type!r}"
        )
    if f_divergence_type != "reverse_kl" and loss_type not in F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} is defined for the loss types "
            f"{F_DIVERGENCE_LOSS_TYPES} only, got loss_type={loss_type!r}"
        )
    if isinstance(f_alpha_divergence_coef, bool) or not isinstance(
        f_alpha_divergence_coef, (int, float)
    ):
        raise TypeError(
            "f_alpha_divergence_coef must be a number, got "
            f"{type(f_alpha_divergence_coef).__name__}"
        )
    check_label_smoothing(label_smoothing)
    if loss_type == "exo_pair" and label_smoothing == 0:
        raise ValueError(
            "label_smoothing must be > 0 for loss_type='exo_pair' (EXO's target puts "
            "label_smoothing on the rejected response; its paper recommends 1e-3)"
        )
    if isinstance(discopop_tau, bool) or not isinstance(discopop_tau, (int, float)):
        raise TypeError(f"discopop_tau must be a number, got {type(discopop_tau).__name__}")
    if not (math.isfinite(discopop_tau) and discopop_tau > 0):
        raise ValueError(f"discopop_tau must be a finite number > 0, got {discopop_tau!r}")


def f_divergence_scores(logratios: torch.Tensor, f_divergence_type: str, alpha: float):
    """f'(π/π_ref) of each response from its log-ratio log(π/π_ref), as TRL's f-DPO: the
    reverse KL's f'(t) = log t is the log-ratio itself."""
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":  # f'(t) = 1 − 1/t
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":  # f'(t) = log(2t / (t + 1))
        return math.log(2) + F.logsigmoid(logratios)
    # α-divergence: f'(t) = (t^(α−1) − 1) / (α − 1), log t in the limit α → 1.
    if abs(alpha - 1.0) < 1e-6:
        return logratios
    # exp(80) is finite in fp32; TRL's clamp for fp32 and bf16 scores.
    t = torch.clamp((alpha - 1.0) * logratios, max=80.0)
    return (torch.exp(t) - 1.0) / (alpha - 1.0)


def _smoothed_sigmoid(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def preference_losses(
    out: EpsilonDPOOutput,
    loss_type: str = "sigmoid",
    *,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 1.0,
    discopop_tau: float = 0.05,
) -> torch.Tensor:
    """Per-pair losses (B,) of TRL 1.16's ``loss_type`` on one call's output, β̃ per pair.

    ``out`` is what ``epsilon_dpo_loss``/``linear_epsilon_dpo_loss`` returned; the losses are
    differentiable through its ``chosen_logps`` and ``rejected_logps``. The formulas are TRL's
    ``DPOTrainer``'s with ``out.beta_used`` (β/(1+ε·s)) for β, so at ε = 0 they are TRL's:

    - ``sigmoid`` is ``out.losses``: the fused loss, cDPO with ``label_smoothing`` — pass the
      value the loss was called with (TRL 1.x's own ``sigmoid`` ignores label smoothing) —
      unless an f-divergence is asked for, which forms it here from the scores; ``sigmoid_norm``
      is cDPO on the length-normalised scores likewise;
    - ``robust``, ``exo_pair``, ``aot`` and ``aot_unpaired`` read ``label_smoothing`` as TRL does
      (the assumed flip rate; EXO's target mass on the rejected response, > 0);
    - ``ipo`` and ``sigmoid_norm`` compare per-token averages of the scores: ``chosen_lengths``,
      ``rejected_lengths`` (B,) are each response's tokens (TRL counts its completion mask),
      by default the scored counts of the call;
    - ``aot`` and ``aot_unpaired`` sort over the batch, as TRL does: pair identity is lost, and
      each sorted position takes the β̃ of the pair whose policy log-ratio (``aot``) or chosen
      log-ratio (``aot_unpaired``) sorted there.

    ``f_divergence_type`` (TRL's f-DPO) replaces each response's log-ratio by f'(π/π_ref) in the
    losses of ``F_DIVERGENCE_LOSS_TYPES``; the step decision stays the reverse-KL comparison of
    docs/SPEC.md (the perturbed policies are derived for the reverse KL).
    """
    check_loss_type(
        loss_type,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        label_smoothing=label_smoothing,
        discopop_tau=discopop_tau,
    )
    if not isinstance(out, EpsilonDPOOutput):
        raise TypeError(f"out must be an EpsilonDPOOutput, got {type(out).__name__}")
    if loss_type == "sigmoid" and f_divergence_type == "reverse_kl":
        return out.losses
    beta = out.beta_used
    chosen_logratios = out.chosen_logps - out.ref_chosen_logps
    rejected_logratios = out.rejected_logps - out.ref_rejected_logps
    alpha = float(f_alpha_divergence_coef)
    chosen_scores = f_divergence_scores(chosen_logratios, f_divergence_type, alpha)
    rejected_scores = f_divergence_scores(rejected_logratios, f_divergence_type, alpha)
    ls = float(label_smoothing)

    if loss_type in LENGTH_NORMALISED:
        lengths = []
        for name, given, counts in (
            ("chosen_lengths", chosen_lengths, out.chosen_tokens),
            ("rejected_lengths", rejected_lengths, out.rejected_tokens),
        ):
            if given is None:
                given = counts
            elif not torch.is_tensor(given) or given.shape != beta.shape:
                raise ValueError(f"{name} must be a tensor of shape {tuple(beta.shape)}")
            lengths.append(given.to(beta.device, beta.dtype).clamp(min=1.0))
        delta = chosen_scores / lengths[0] - rejected_scores / lengths[1]
        if loss_type == "ipo":
            # IPO's τ is β here; its target margin 1/(2τ) moves with β̃.
            return (delta - 1 / (2 * beta)) ** 2
        return _smoothed_sigmoid(beta * delta, ls)

    delta_score = chosen_scores - rejected_scores
    if loss_type == "sigmoid":
        return _smoothed_sigmoid(beta * delta_score, ls)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta_score)
    if loss_type == "exo_pair":
        z = beta * delta_score
        return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-ls)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(ls)
        )
    if loss_type == "nca_pair":
        chosen, rejected = beta * chosen_logratios, beta * rejected_logratios
        return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
    if loss_type == "robust":
        z = beta * delta_score
        return (-(1 - ls) * F.logsigmoid(z) + ls * F.logsigmoid(-z)) / (1 - 2 * ls)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    if loss_type == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type == "aot":
        logratios_sorted, order = torch.sort(out.chosen_logps - out.rejected_logps, dim=0)
        ref_sorted, _ = torch.sort(out.ref_chosen_logps - out.ref_rejected_logps, dim=0)
        return _smoothed_sigmoid(beta[order] * (logratios_sorted - ref_sorted), ls)
    if loss_type == "aot_unpaired":
        chosen_sorted, order = torch.sort(chosen_logratios, dim=0)
        rejected_sorted, _ = torch.sort(rejected_logratios, dim=0)
        return _smoothed_sigmoid(beta[order] * (chosen_sorted - rejected_sorted), ls)
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
    if loss_type == "apo_down":
        return (
            torch.sigmoid(beta * chosen_logratios)
            + 1
            - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
        )
    # discopop: a blend of the logistic and exponential losses, modulated by the margin.
    z = beta * delta_score
    modulation = torch.sigmoid(z / discopop_tau)
    return -F.logsigmoid(z) * (1 - modulation) + torch.exp(-z) * modulation


def with_reference_logps(
    out: EpsilonDPOOutput,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
) -> EpsilonDPOOutput:
    """``out`` of an ε = 0 call with the reference's sequence log-probs replaced by given ones
    (TRL's ``precompute_ref_log_probs``): the reference fields, the rewards and the sigmoid
    loss recomputed from them, still differentiable through ``chosen_logps``/``rejected_logps``.

    Only at ε = 0, where every step is 0 and the reference enters the loss through its sums
    alone; at ε > 0 the perturbed policies need its logits at every token. The caller ensures
    ε = 0 (an output does not carry ε, and checking its steps would synchronise the device).
    """
    if not isinstance(out, EpsilonDPOOutput):
        raise TypeError(f"out must be an EpsilonDPOOutput, got {type(out).__name__}")
    check_label_smoothing(label_smoothing)
    shape = tuple(out.losses.shape)
    given = {}
    for name, value in (
        ("ref_chosen_logps", ref_chosen_logps),
        ("ref_rejected_logps", ref_rejected_logps),
    ):
        if not torch.is_tensor(value) or tuple(value.shape) != shape:
            raise ValueError(f"{name} must be a tensor of shape {shape}")
        given[name] = value.detach().to(out.losses.device, torch.float32)
    ref_chosen, ref_rejected = given["ref_chosen_logps"], given["ref_rejected_logps"]
    beta = out.beta_used
    ref_logratios = ref_chosen - ref_rejected
    losses = _smoothed_sigmoid(
        beta * (out.chosen_logps - out.rejected_logps - ref_logratios), label_smoothing
    )
    return dataclasses.replace(
        out,
        loss=losses.mean(),
        losses=losses,
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
        ref_logratios=ref_logratios,
        chosen_rewards=(beta * (out.chosen_logps - ref_chosen)).detach(),
        rejected_rewards=(beta * (out.rejected_logps - ref_rejected)).detach(),
    )


__all__ = [
    "LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "F_DIVERGENCE_LOSS_TYPES",
    "check_loss_type",
    "f_divergence_scores",
    "preference_losses",
    "with_reference_logps",
]
