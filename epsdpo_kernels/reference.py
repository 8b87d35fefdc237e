"""Readable eager ε-DPO, line by line as ``docs/SPEC.md`` states it.

This is the ground truth the kernels are tested against (in float64) and the shape of the
computation the benchmarks call ``eager`` (the authors' TRL trainer does the same: four full
log-softmaxes). It materialises several ``(2B, T, V)`` tensors and is not meant to be fast.

Gradients flow only through the policy log-probabilities ``a``: the mixed streams use a
detached copy of the policy logits, and the step ``s`` comes from comparisons, so autograd on
``reference_epsilon_dpo`` gives exactly the gradient docs/SPEC.md derives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _label_logps(logits: torch.Tensor, labels: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[label] per position, 0 where the position is not scored."""
    safe_labels = torch.where(scored, labels, torch.zeros_like(labels))
    logps = F.log_softmax(logits, dim=-1).gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return torch.where(scored, logps, torch.zeros_like(logps))


def _mix(h: torch.Tensor, g: torch.Tensor, weight: float) -> torch.Tensor:
    """h + weight·(h − g): (1 ± ε)·h ∓ ε·g, exactly h where h == g. An entry that is −inf in
    both (absent from the vocabulary) comes out NaN from −inf + NaN; its value is −inf."""
    mix = h + weight * (h - g)
    return torch.where(torch.isnan(mix), -torch.inf, mix)


def model_logits(
    z: torch.Tensor, logit_softcap: float | None = None, logit_scale: float = 1.0
) -> torch.Tensor:
    """A model's logits from its lm_head outputs, as transformers forms them:
    cap·tanh(scale·z/cap), or scale·z (``hugging_face.logit_transform`` gives the arguments)."""
    z = z * logit_scale if logit_scale != 1.0 else z
    return z if logit_softcap is None else logit_softcap * torch.tanh(z / logit_softcap)


def reference_epsilon_dpo(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float,
    epsilon: float = 0.01,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    average_log_prob: bool = False,
    sequence_ids: torch.Tensor | None = None,
    num_pairs: int | None = None,
    dtype: torch.dtype = torch.float64,
    logit_softcap: float | None = None,
    logit_scale: float = 1.0,
    token_weights: torch.Tensor | None = None,
    wpo_weights: bool = False,
) -> dict[str, torch.Tensor]:
    """ε-DPO on materialised logits; every field of ``EpsilonDPOOutput`` as a dict.

    ``policy_logits``/``ref_logits``: ``(2B, T, V)``, rows ``[0, B)`` chosen, ``[B, 2B)`` rejected.
    ``labels``: ``(2B, T)``, already shifted. Or a packed stream: logits ``(N, V)``, labels and
    ``sequence_ids`` ``(N,)``, and ``num_pairs`` = B (sequence j < B is the chosen response of
    pair j, sequence B + j its rejected response). Arithmetic is done in ``dtype`` (float64 in
    tests). ``token_weights`` (the labels' shape) multiply each token's four log-probabilities
    before the sequence sums. ``wpo_weights`` adds WPO's per-pair weights (``"wpo_weights"``) and
    each row's mean of log p(y_t) − log Σ_v p(v)² over its scored tokens
    (``"chosen_wpo_means"``, ``"rejected_wpo_means"``; ``"…_wpo_magnitudes"``: the means of
    the terms' magnitudes), from the unweighted log-probabilities.
    """
    h = model_logits(policy_logits.to(dtype), logit_softcap, logit_scale)
    g = model_logits(ref_logits.to(dtype).detach(), logit_softcap, logit_scale)
    scored = labels != ignore_index
    b = h.shape[0] // 2 if num_pairs is None else num_pairs

    # Per token: the four log-probabilities of the label.
    a = _label_logps(h, labels, scored)
    r = _label_logps(g, labels, scored)
    u = _label_logps(_mix(h.detach(), g, epsilon), labels, scored)
    d = _label_logps(_mix(h.detach(), g, -epsilon), labels, scored)
    if wpo_weights:
        # WPO (Zhou et al., 2024, eq. 2): log p(y_t) against log Σ_v p(v)², the policy's
        # expected probability of its own samples; no gradient, as TRL computes it.
        log_p = F.log_softmax(h.detach(), dim=-1)
        log_sum_sq = torch.logsumexp(2 * log_p, dim=-1)
        wpo_terms = torch.where(scored, a.detach() - log_sum_sq, 0.0)
        wpo_magnitudes = torch.where(scored, a.detach().abs() + log_sum_sq.abs(), 0.0)
    if token_weights is not None:
        w = torch.where(scored, token_weights.to(h.device, dtype), 0.0)
        a, r, u, d = a * w, r * w, u * w, d * w

    # Per sequence: sums over scored tokens (optionally averaged).
    logit_sums = h.detach().sum(-1) * scored
    if sequence_ids is None:
        per_sequence = lambda x: x.sum(-1)  # noqa: E731
    else:
        owner = sequence_ids[scored]
        per_sequence = lambda x: x.new_zeros(2 * b).index_add(0, owner, x[scored])  # noqa: E731
    counts = per_sequence(scored.to(dtype))
    A, R, U, D = (per_sequence(x) for x in (a, r, u, d))
    logit_sums = per_sequence(logit_sums)
    if average_log_prob:
        denom = counts.clamp(min=1)
        A, R, U, D = A / denom, R / denom, U / denom, D / denom

    # Per pair.
    logratios = A[:b] - A[b:]
    p_epsilon_logratios = U[:b] - U[b:]
    n_epsilon_logratios = D[:b] - D[b:]
    ref_logratios = R[:b] - R[b:]

    up = (p_epsilon_logratios > logratios) & (logratios > n_epsilon_logratios)
    down = (n_epsilon_logratios > logratios) & (logratios > p_epsilon_logratios)
    steps = up.long() - down.long()
    if epsilon == 0:
        steps = torch.zeros_like(steps)
    beta_used = beta / (1 + epsilon * steps.to(dtype))

    z = logratios - ref_logratios
    losses = -(1 - label_smoothing) * F.logsigmoid(beta_used * z) - label_smoothing * F.logsigmoid(
        -beta_used * z
    )

    # Metrics: mean raw logit over scored tokens and the whole vocabulary.
    vocab = h.shape[-1]
    chosen_tokens = counts[:b].sum().clamp(min=1)
    rejected_tokens = counts[b:].sum().clamp(min=1)

    extra = {}
    if wpo_weights:
        means = per_sequence(wpo_terms) / counts.clamp(min=1)
        # The scale of a mean's rounding in an fp32 implementation: its terms' magnitudes.
        magnitudes = per_sequence(wpo_magnitudes) / counts.clamp(min=1)
        extra = {
            "wpo_weights": means[:b].exp() * means[b:].exp(),
            "chosen_wpo_means": means[:b],
            "rejected_wpo_means": means[b:],
            "chosen_wpo_magnitudes": magnitudes[:b],
            "rejected_wpo_magnitudes": magnitudes[b:],
        }
    return {
        **extra,
        "loss": losses.mean(),
        "losses": losses,
        "steps": steps,
        "beta_used": beta_used,
        "chosen_logps": A[:b],
        "rejected_logps": A[b:],
        "ref_chosen_logps": R[:b],
        "ref_rejected_logps": R[b:],
        "chosen_rewards": (beta_used * (A[:b] - R[:b])).detach(),
        "rejected_rewards": (beta_used * (A[b:] - R[b:])).detach(),
        "logratios": logratios.detach(),
        "ref_logratios": ref_logratios,
        "p_epsilon_logratios": p_epsilon_logratios,
        "n_epsilon_logratios": n_epsilon_logratios,
        "mean_chosen_logits": logit_sums[:b].sum() / (chosen_tokens * vocab),
        "mean_rejected_logits": logit_sums[b:].sum() / (rejected_tokens * vocab),
        "chosen_tokens": counts[:b],
        "rejected_tokens": counts[b:],
    }


def reference_ches_scores(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    length_normalized: bool = False,
    ignore_index: int = -100,
) -> torch.Tensor:
    """CHES per pair in float64, one pair at a time straight from the definition:
    ``⟨Σ h⁺, Σ h⁻⟩ − ‖Σ h⁺‖²`` over the response positions (means when length-normalised)."""
    pairs = hidden.shape[0] // 2
    scores = []
    for i in range(pairs):
        summed = []
        for row in (i, pairs + i):
            positions = (labels[row] != ignore_index).nonzero().flatten().tolist()
            total = torch.zeros(hidden.shape[-1], dtype=torch.float64)
            for t in positions:
                total = total + hidden[row, t].double().cpu()
            summed.append(total / len(positions) if length_normalized else total)
        chosen, rejected = summed
        scores.append(torch.dot(chosen, rejected) - torch.dot(chosen, chosen))
    return torch.stack(scores)
