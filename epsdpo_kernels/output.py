"""``EpsilonDPOOutput``: what both loss functions return."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.utils._pytree as pytree

from . import layout as L


@dataclass(frozen=True)
class EpsilonDPOOutput:
    """Loss, per-pair values and the metrics TRL's ε-DPO trainer logs, for one batch of B pairs.

    ``loss``, ``losses``, ``chosen_logps`` and ``rejected_logps`` are differentiable w.r.t. the
    policy inputs; everything else is detached. All per-pair tensors are fp32 of shape ``(B,)``,
    except ``steps`` (int64, values in {-1, 0, +1}).
    """

    loss: torch.Tensor  # scalar: mean of losses
    losses: torch.Tensor  # (B,) L_i
    steps: torch.Tensor  # (B,) s_i: +1 weaker KL preferred, -1 stronger, 0 neither
    beta_used: torch.Tensor  # (B,) β/(1+ε·s_i)
    chosen_logps: torch.Tensor  # (B,) A_c (summed or averaged log-probs of the chosen row)
    rejected_logps: torch.Tensor  # (B,) A_j
    ref_chosen_logps: torch.Tensor  # (B,) R_c
    ref_rejected_logps: torch.Tensor  # (B,) R_j
    chosen_rewards: torch.Tensor  # (B,) β̃·(A_c − R_c)
    rejected_rewards: torch.Tensor  # (B,) β̃·(A_j − R_j)
    logratios: torch.Tensor  # (B,) ℓ = A_c − A_j
    ref_logratios: torch.Tensor  # (B,) ℓ_ref
    p_epsilon_logratios: torch.Tensor  # (B,) ℓ⁺ under the (1+ε)·h − ε·g mix
    n_epsilon_logratios: torch.Tensor  # (B,) ℓ⁻ under the (1−ε)·h + ε·g mix
    mean_chosen_logits: torch.Tensor  # scalar: mean raw policy logit over chosen scored tokens × V
    mean_rejected_logits: torch.Tensor  # scalar
    # (B,) scored tokens of each row (the whole group's, under sequence_group=)
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    beta: float  # the β this call was given
    # (B,) WPO's weight of each pair (Zhou et al., 2024, eq. 2; TRL's use_weighting): w_c·w_j,
    # w = exp(mean over the row's scored tokens of log p(y_t) − log Σ_v p(v)²), detached; None
    # unless the call was given wpo_weights=True.
    wpo_weights: torch.Tensor | None = None

    @property
    def finite_pairs(self) -> torch.Tensor:
        """(B,) bool, on the device (no sync): the pairs whose loss and log-ratios are finite.
        NaN or inf logits at a scored position make a pair's values non-finite, and its step
        0 (no comparison holds); ``AdaptiveBeta.observe(out.steps, out.finite_pairs)`` leaves
        such pairs out of β's update instead of counting them as "no step"."""
        values = (
            self.losses,
            self.logratios,
            self.ref_logratios,
            self.p_epsilon_logratios,
            self.n_epsilon_logratios,
        )
        finite = torch.isfinite(values[0].detach())
        for v in values[1:]:
            finite = finite & torch.isfinite(v.detach())
        return finite

    def pair_metrics(self) -> dict[str, torch.Tensor]:
        """Per-pair values, shape (B,), of the metrics TRL logs as batch means (detached).
        Training loops that average over micro-batches and ranks sum these."""
        steps = self.steps.float()
        return {
            "loss": self.losses.detach(),
            "rewards/chosen": self.chosen_rewards,
            "rewards/rejected": self.rejected_rewards,
            "rewards/accuracies": (self.chosen_rewards > self.rejected_rewards).float(),
            "rewards/margins": self.chosen_rewards - self.rejected_rewards,
            "logps/chosen": self.chosen_logps.detach(),
            "logps/rejected": self.rejected_logps.detach(),
            "kl/p_epsilon_steps": (steps > 0).float(),
            "kl/n_epsilon_steps": (steps < 0).float(),
            "kl/avg_steps": steps,
            # Likelihood displacement: the chosen response losing probability under training
            # (docs/TRAINING.md, "Likelihood displacement").
            "displacement/chosen_below_ref": (self.chosen_logps < self.ref_chosen_logps).float(),
            "displacement/chosen_logratio": (self.chosen_logps - self.ref_chosen_logps).detach(),
        }

    def pair_metric_sums(self, weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``pair_metrics`` summed over the pairs (each pair times ``weight``, shape (B,), when
        given), as float64 0-dim tensors on the device: what a training loop adds up over
        micro-batches and ranks before dividing by the pairs (no sync)."""
        return {
            k: (v.double() if weight is None else v.double() * weight).sum()
            for k, v in self.pair_metrics().items()
        }

    def metrics(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The batch means TRL logs, under TRL's names (detached 0-dim tensors, no sync)."""
        values = {k: v.mean() for k, v in self.pair_metrics().items()}
        values.update(
            {
                "logits/chosen": self.mean_chosen_logits,
                "logits/rejected": self.mean_rejected_logits,
                # A fill on the device, not torch.tensor (a blocking host-to-device copy).
                "kl/beta": torch.full((), self.beta, device=self.losses.device),
            }
        )
        return {prefix + k: v for k, v in values.items()}


# A pytree node, so that code walking a module's outputs for tensors sees inside it: FSDP2
# registers its pre-backward unshard on the tensors it finds there (through pytree flattening
# on torch 2.4, through dataclass fields later), and torch.compile and torch.utils._pytree
# users treat it like a tuple of its tensors. The context is ``beta`` (a float) and the names of
# the fields that hold tensors (``wpo_weights`` is None unless asked for, and None would be a
# leaf of its own).
_TENSOR_FIELDS = tuple(f.name for f in fields(EpsilonDPOOutput) if f.name != "beta")


def _flatten(out: EpsilonDPOOutput):
    names = tuple(name for name in _TENSOR_FIELDS if getattr(out, name) is not None)
    return [getattr(out, name) for name in names], (out.beta, names)


def _unflatten(values, context) -> EpsilonDPOOutput:
    beta, names = context
    return EpsilonDPOOutput(**dict(zip(names, values)), beta=beta)


pytree.register_pytree_node(
    EpsilonDPOOutput, _flatten, _unflatten, serialized_type_name="epsdpo_kernels.EpsilonDPOOutput"
)


def build_output(
    losses: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    pair: torch.Tensor,
    *,
    beta: float,
    vocab: int,
    wpo_weights: bool = False,
) -> EpsilonDPOOutput:
    """Assemble the output from the differentiable tensors and the head's pair buffer."""
    pair = pair.detach()
    chosen_tokens = pair[L.PAIR_CHOSEN_COUNT].sum().clamp(min=1)
    rejected_tokens = pair[L.PAIR_REJECTED_COUNT].sum().clamp(min=1)
    weights = None
    if wpo_weights:
        # TRL's order: each row's weight (its mean over max(1, scored tokens)), then the product.
        chosen = (pair[L.PAIR_CHOSEN_WPO_LOGP] / pair[L.PAIR_CHOSEN_COUNT].clamp(min=1)).exp()
        rejected = (pair[L.PAIR_REJECTED_WPO_LOGP] / pair[L.PAIR_REJECTED_COUNT].clamp(min=1)).exp()
        weights = chosen * rejected
    return EpsilonDPOOutput(
        loss=losses.mean(),
        losses=losses,
        steps=pair[L.PAIR_STEP].long(),
        beta_used=pair[L.PAIR_BETA_USED],
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=pair[L.PAIR_REF_CHOSEN_LOGPS],
        ref_rejected_logps=pair[L.PAIR_REF_REJECTED_LOGPS],
        chosen_rewards=pair[L.PAIR_CHOSEN_REWARD],
        rejected_rewards=pair[L.PAIR_REJECTED_REWARD],
        logratios=pair[L.PAIR_LOGRATIO],
        ref_logratios=pair[L.PAIR_REF_LOGRATIO],
        p_epsilon_logratios=pair[L.PAIR_P_EPS_LOGRATIO],
        n_epsilon_logratios=pair[L.PAIR_N_EPS_LOGRATIO],
        mean_chosen_logits=pair[L.PAIR_CHOSEN_LOGIT_SUM].sum() / (chosen_tokens * vocab),
        mean_rejected_logits=pair[L.PAIR_REJECTED_LOGIT_SUM].sum() / (rejected_tokens * vocab),
        chosen_tokens=pair[L.PAIR_CHOSEN_COUNT],
        rejected_tokens=pair[L.PAIR_REJECTED_COUNT],
        beta=beta,
        wpo_weights=weights,
    )
