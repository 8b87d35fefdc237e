"""``EpsilonDPOConfig`` and the TRL options the fused ε-DPO loss refuses, with the reason and
what to use instead (``refused_options``), checked when the config or the trainer is built."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig

from ...loss_types import LOSS_TYPES, check_loss_type
from ...params import check_beta, check_epsilon, check_label_smoothing


@dataclass
class EpsilonDPOConfig(DPOConfig):
    """TRL's ``DPOConfig`` plus ``epsilon``, ε-DPO's step size for the per-pair KL coefficient.

    ``beta`` is the initial β; it then moves by β ← β / (1 + ε·mean(s)) after every optimizer
    step. Every TRL 1.16 ``loss_type`` (and lists of them with ``loss_weights``) and
    ``f_divergence_type`` is TRL's formula with each pair's β̃ = β/(1+ε·s) for β
    (``epsdpo_kernels.preference_losses``); at ε = 0 each is TRL's. ``label_smoothing`` is
    conservative DPO (cDPO) on the sigmoid losses, as in the ε-DPO authors' trainer (TRL 1.x's
    own ``sigmoid`` ignores it), and TRL's meaning for ``robust``, ``exo_pair`` and ``aot*``.
    ``loss_type=["sigmoid", "sft"]`` with ``loss_weights=[1.0, α]`` adds α times the chosen
    responses' NLL (RPO), as in TRL. ``use_weighting=True`` weights every term by WPO's
    per-pair weights, computed in the loss's one vocabulary pass (``wpo_weights=True``).
    ``padding_free=True`` trains packed rows (``DataCollatorForPackedPreference``), which TRL
    1.16's own ``DPOTrainer`` switches off.
    """

    epsilon: float = field(
        default=0.01,
        metadata={
            "help": "ε-DPO's step size: each pair's KL coefficient is β/(1+ε·s) with s ∈ {-1, 0, "
            "+1}, and β ← β/(1+ε·mean(s)) after every optimizer step. 0 gives plain DPO."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        check_options(self)


def refused_options(args: DPOConfig) -> list[str]:
    """Why each set option cannot be honoured by the fused ε-DPO loss (empty when all can)."""
    problems = []
    if args.precompute_ref_log_probs and getattr(args, "epsilon", 0.0) > 0:
        problems.append(
            "precompute_ref_log_probs=True with epsilon > 0: ε-DPO needs the reference's whole "
            "next-token distribution at every scored token (its perturbed policies mix the two "
            "models' logits), not its sequence log-probs; keep precompute_ref_log_probs=False "
            "(the reference forward costs no logits memory here), or epsilon=0 (plain DPO)"
        )
    loss_types = list(args.loss_type)
    unknown = [t for t in loss_types if t not in LOSS_TYPES and t != "sft"]
    if unknown:
        problems.append(
            f"loss_type={loss_types}: {unknown} not among TRL 1.16's loss types "
            f"{[*LOSS_TYPES, 'sft']}"
        )
    for loss_type in (t for t in loss_types if t in LOSS_TYPES):
        try:
            check_loss_type(
                loss_type,
                f_divergence_type=args.f_divergence_type,
                f_alpha_divergence_coef=args.f_alpha_divergence_coef,
                label_smoothing=args.label_smoothing,
                discopop_tau=args.discopop_tau,
            )
        except (TypeError, ValueError) as e:
            problems.append(str(e))
    if args.ld_alpha is not None and "sft" in loss_types:
        problems.append(
            f"ld_alpha={args.ld_alpha} with loss_type 'sft': the fused loss returns the "
            "length-desensitised (weighted) sums only, and TRL's SFT term is the unweighted "
            "NLL; use one of them"
        )
    problem = parallelism_problem(getattr(args, "parallelism_config", None))
    if problem:
        problems.append(problem)
    # The loss's own checks, so that the config says what the loss would say.
    for check, value in (
        (check_beta, args.beta),
        (check_epsilon, getattr(args, "epsilon", 0.0)),
        (check_label_smoothing, args.label_smoothing),
    ):
        try:
            check(value)
        except (TypeError, ValueError) as e:
            problems.append(str(e))
    return list(dict.fromkeys(problems))  # one loss type's checks repeat the scalar ones


def parallelism_problem(parallelism) -> str | None:
    """Why an accelerate ``ParallelismConfig`` with tensor, context or sequence parallelism is
    refused (None for data parallelism alone, or none)."""
    split = {
        name: size
        for name in ("tp_size", "cp_size", "sp_size")
        if (size := getattr(parallelism, name, 1) or 1) > 1
    }
    if not split:
        return None
    sizes = ", ".join(f"{name}={size}" for name, size in split.items())
    return (
        f"parallelism_config with {sizes}: tensor parallelism splits the lm_head over the "
        "vocabulary and context/sequence parallelism splits every sequence over ranks, and "
        "this trainer would sum each rank's part as if it were the whole sequence; use data "
        "parallelism only (dp_replicate_size, dp_shard_size). accelerate runs these meshes "
        "only on GPUs (it refuses a ParallelismConfig on CPU processes), so this path has "
        "no test yet; outside the trainer, linear_epsilon_dpo_loss takes a vocabulary-"
        "sharded lm_head (DTensor Shard(0)) and sequence_group= (tested on CPU)"
    )


def check_options(args: DPOConfig) -> None:
    problems = refused_options(args)
    if problems:
        raise ValueError("EpsilonDPOConfig: " + "; ".join(problems))
