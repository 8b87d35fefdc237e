"""Public entry point: ε-DPO from policy and reference logits."""

from __future__ import annotations

import torch

from .autograd import EpsilonDPOLogitsFunction, run
from .call import prepare_logits
from .output import EpsilonDPOOutput, build_output
from .params import LossOptions


@torch.compiler.disable
def epsilon_dpo_loss(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float,
    epsilon: float = 0.01,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    average_log_prob: bool = False,
    backend: str = "auto",
    inplace_backward: bool = False,
    sequence_ids: torch.Tensor | None = None,
    num_pairs: int | None = None,
    sequence_group=None,
    token_weights: torch.Tensor | None = None,
    wpo_weights: bool = False,
) -> EpsilonDPOOutput:
    """ε-DPO loss (Lee et al., 2025, arXiv 2502.13177) on concatenated chosen/rejected logits.

    One pass over the vocabulary per scored token computes the label's log-probability under the
    policy, the reference and the two perturbed policies ``softmax((1±ε)·h ∓ ε·g)``; a per-pair
    head decides each pair's step ``s ∈ {-1, 0, +1}`` and ``β̃ = β/(1+ε·s)`` and returns the DPO
    sigmoid loss at β̃. Backward is one more pass over V per scored token. No ``(2B, T, V)``
    temporary is allocated besides the gradient itself.

    Args:
        policy_logits: ``(2B, T, V)`` float32/bfloat16/float16; rows ``[0, B)`` are the chosen
            responses, ``[B, 2B)`` the rejected ones (pair i = rows i and B+i). Or a DTensor
            sharded over the vocabulary (``Shard(-1)`` on one mesh dimension: a ColwiseParallel
            lm_head with ``use_local_output=False``), whose ranks hold the same tokens; its
            gradient comes back with its placement (distributed/vocab_shard.py).
        ref_logits: ``(2B, T, V)`` reference-model logits; never receives a gradient.
        labels: ``(2B, T)`` integer, already shifted (``policy_logits[:, t]`` scores
            ``labels[:, t]``); ``ignore_index`` marks prompt and padding positions.
        beta: current KL coefficient β > 0 (``AdaptiveBeta.beta`` carries it across steps).
        epsilon: perturbation size ε in [0, 1); 0 gives plain DPO.
        label_smoothing: conservative-DPO smoothing in [0, 0.5).
        ignore_index: label value of unscored positions.
        average_log_prob: average instead of sum the per-token log-probs of each sequence.
        backend: ``"auto"`` (Triton for CUDA tensors, torch otherwise), ``"triton"`` or ``"torch"``.
        inplace_backward: write the gradient into ``policy_logits``' storage instead of a new
            ``(2B, T, V)`` buffer. Safe when nothing reads those logits after this loss's backward
            and no other autograd node saved them: e.g. logits from ``hidden @ W.T`` (matmul saves
            its inputs, not its output) used only by this loss. Not safe if you also feed the same
            logits tensor to another loss, or inspect it after ``backward()``.
        sequence_ids, num_pairs: give both for a packed (padding-free) stream: ``policy_logits``
            and ``ref_logits`` are then ``(N, V)`` (or ``(1, N, V)``), ``labels`` and
            ``sequence_ids`` ``(N,)`` (or ``(1, N)``). The scored tokens whose id is j make up
            sequence j: the chosen response of pair j for ``j < num_pairs``, the rejected
            response of pair ``j − num_pairs`` otherwise, in any order in the stream. Tokens
            whose label is ``ignore_index`` are not scored, whatever their id.
        sequence_group: sequence (context) parallelism: a ProcessGroup, or a 1-D DeviceMesh
            such as ``mesh["cp"]``, whose ranks each hold some tokens of every sequence (any
            split; padded rows or packed streams). Every rank passes its own tokens, the same
            number of sequences and the same options; the per-sequence sums are all-reduced
            (6·2B floats), so every rank gets the whole loss and every per-pair field, and its
            backward gives its own tokens' share of the single-process gradient.
        token_weights: optional float weights of the labels' shape: each scored token's
            log-probabilities enter its sequence's sums (A, R and the perturbed U, D alike)
            times its weight, and so does its gradient; finite and ≥ 0 where scored. TRL's
            ``ld_alpha`` (LD-DPO: α on the tokens past the shorter response's length) and
            SparsePO-style token masks are such weights. ``average_log_prob`` still divides by
            the scored-token count.
        wpo_weights: also return ``.wpo_weights``, WPO's per-pair weights (TRL's
            ``use_weighting``): the product over the pair's two rows of exp(mean over the
            row's scored tokens of log p(y_t) − log Σ_v p(v)²) under the policy, detached.
            One more running sum in the same pass over V (no extra exponential); multiply
            ``.losses`` by them for WPO's loss.

    Returns:
        ``EpsilonDPOOutput``; ``.loss`` is the mean over pairs. ``.metrics()`` gives TRL's names.

    Example:
        >>> B, T, V = 2, 8, 507
        >>> policy_logits = torch.randn(2 * B, T, V, requires_grad=True)
        >>> ref_logits = torch.randn(2 * B, T, V)
        >>> labels = torch.randint(0, V, (2 * B, T))
        >>> labels[:, :3] = -100  # prompt
        >>> out = epsilon_dpo_loss(policy_logits, ref_logits, labels, beta=0.1, epsilon=0.01)
        >>> out.loss.backward()
        >>> out.steps.shape, policy_logits.grad.shape
        (torch.Size([2]), torch.Size([4, 8, 507]))
    """
    options = LossOptions(
        beta=beta,
        epsilon=epsilon,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        average_log_prob=average_log_prob,
        backend=backend,
        wpo_weights=wpo_weights,
    )
    tensors, call = prepare_logits(
        policy_logits,
        ref_logits,
        labels,
        options=options,
        inplace_backward=inplace_backward,
        sequence_ids=sequence_ids,
        num_pairs=num_pairs,
        sequence_group=sequence_group,
        token_weights=token_weights,
    )
    losses, chosen, rejected, pair = run(EpsilonDPOLogitsFunction, *tensors, call=call)
    return build_output(
        losses,
        chosen,
        rejected,
        pair,
        beta=call.params.beta,
        vocab=call.vocab,
        wpo_weights=call.params.wpo_weights,
    )
