"""The steps of docs/SPEC.md both paths share, each run by the call's backend, the collectives
called by name.

Per scored token, the stats (four log-sum-exps; on a vocabulary shard, the shard's partials
merged over its ranks, then finished); per sequence, their sums (completed over a sequence
group); per pair, the head; then, backward, each sequence's coefficient c_n handed to its tokens
and the per-token gradient. The Triton and torch backends export the same six functions with the
same arguments and buffers (layout.py), so a step picks one from ``BACKENDS`` by the call's
``params.backend`` and never looks further. The Triton backend is imported only when used: CPU
users need no working Triton install. The logits path is ``token_stats`` + ``pair_buffer``; the
linear path (linear_chunks.py) runs ``token_stats`` on each chunk of logits it forms.
"""

from __future__ import annotations

import torch

from . import layout as L
from .distributed.sequence_group import complete_sums
from .distributed.vocab_shard import merge_partials


def _triton():
    from . import triton_backend

    return triton_backend


def _torch():
    from . import torch_backend

    return torch_backend


# params.backend → (a loader of) the package implementing every step: token_forward,
# token_partials, stats_from_partials, token_backward, sequence_sums, pair_head.
BACKENDS = {"triton": _triton, "torch": _torch}


def backend(params):
    """The package of ``params.backend``'s steps."""
    load = BACKENDS[params.backend]
    return load()


def token_stats(policy_logits, ref_logits, labels, call) -> torch.Tensor:
    """``(TOKEN_FIELDS, N·T)`` stats of ``(N, T, V_r)`` logits (zeros at ignored tokens): the
    per-token pass, or this rank's shard partials merged over the shard's group and finished.
    The linear path calls it on each ``(C, 1, V_r)`` chunk of scored tokens' logits."""
    steps = backend(call.params)
    if call.shard is None:
        return steps.token_forward(policy_logits, ref_logits, labels, call.params)
    shard = call.shard
    maxes, sums = steps.token_partials(
        policy_logits, ref_logits, labels, call.params, shard.offset, shard.rows
    )
    merge_partials(maxes, sums, shard)
    return steps.stats_from_partials(maxes, sums, labels, call.params)


# The token fields that ``token_weights`` scale: the four log-probability streams (their sums
# are the weighted sequence log-probs), not the logit sums of the metrics.
_WEIGHTED_FIELDS = [L.TOK_LOGP, L.TOK_REF_LOGP, L.TOK_P_EPS_DELTA, L.TOK_N_EPS_DELTA]


def pair_buffer(stats: torch.Tensor, labels: torch.Tensor, call) -> torch.Tensor:
    """The ``(PAIR_FIELDS, B)`` pair buffer from token stats: per-sequence sums (over every rank
    of the sequence group), then the pair head. With ``token_weights`` the sums are of weighted
    streams, taken from a copy: the stats saved for the backward stay unweighted."""
    if call.token_weights is not None:
        stats = stats.clone()
        stats[_WEIGHTED_FIELDS] *= call.token_weights
    steps = backend(call.params)
    sums = steps.sequence_sums(stats, labels, call.sequences, call.params)
    complete_sums(sums, call.sequence_group)
    return steps.pair_head(sums, call.params)


def split_pair(pair: torch.Tensor):
    """The differentiable outputs (losses, chosen_logps, rejected_logps), as tensors of their
    own rather than views of the pair buffer."""
    return (
        pair[L.PAIR_LOSS].clone(),
        pair[L.PAIR_CHOSEN_LOGPS].clone(),
        pair[L.PAIR_REJECTED_LOGPS].clone(),
    )


def row_coefficients(
    pair: torch.Tensor,
    grad_losses: torch.Tensor | None,
    grad_chosen_logps: torch.Tensor | None,
    grad_rejected_logps: torch.Tensor | None,
    *,
    average_log_prob: bool,
) -> torch.Tensor:
    """c_n = ∂(upstream)/∂A_n for the 2B sequences, from the head's ∂L_i/∂ℓ_i.

    ℓ_i = A_chosen − A_rejected, so the chosen row gets +g·∂L/∂ℓ and the rejected row −g·∂L/∂ℓ;
    gradients that reach chosen_logps/rejected_logps directly (an NLL term, say) add on top.
    With averaging, A_n is a mean, so every token of sequence n carries c_n / count_n.
    """
    dloss = pair[L.PAIR_DLOSS_DLOGRATIO]
    through_loss = dloss * grad_losses if grad_losses is not None else torch.zeros_like(dloss)
    chosen = through_loss.clone()
    rejected = -through_loss
    if grad_chosen_logps is not None:
        chosen = chosen + grad_chosen_logps.float()
    if grad_rejected_logps is not None:
        rejected = rejected + grad_rejected_logps.float()
    coef = torch.cat([chosen, rejected])
    if average_log_prob:
        counts = torch.cat([pair[L.PAIR_CHOSEN_COUNT], pair[L.PAIR_REJECTED_COUNT]])
        coef = coef / counts.clamp(min=1)
    return coef


def token_coefficients(call, pair: torch.Tensor, grads) -> torch.Tensor:
    """Each token row's c_n (docs/SPEC.md, Gradients) from the upstream gradients of (losses,
    chosen_logps, rejected_logps)."""
    row_coef = row_coefficients(pair, *grads, average_log_prob=call.params.average_log_prob)
    coef = call.sequences.token_coefficients(row_coef)
    # ∂A_n/∂h_t = w_t·(onehot − p) under token_weights: the weight rides on the coefficient.
    return coef if call.token_weights is None else coef * call.token_weights


def token_backward(
    policy_logits, labels, stats, token_coef, params, *, inplace: bool, vocab_offset: int = 0
) -> torch.Tensor:
    """∂L/∂policy_logits from each token row's c_n (``token_coefficients``); ``inplace`` writes
    over the logits; column j of the logits is vocabulary entry ``vocab_offset + j``."""
    return backend(params).token_backward(
        policy_logits, labels, stats, token_coef, params, inplace=inplace, vocab_offset=vocab_offset
    )
