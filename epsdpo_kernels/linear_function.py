"""Chunked ε-DPO from hidden states: the autograd Function and its chunk driver.

Only scored rows (label ≠ ignore_index) are gathered, and their logits exist one chunk of rows
at a time: per chunk, two cuBLAS matmuls in the input dtype (fp32 accumulation) form the policy
and reference logits, the per-token kernel of the logits path reads them, and they are freed.
The per-pair head then runs once on the full per-token stats, exactly as for materialised logits.

Backward recomputes each chunk's policy logits (Cut Cross-Entropy's choice) instead of keeping
them: ε-DPO's gradient scale c_n is known only after the head has seen every chunk, so a
Liger-style gradient-in-forward would need the logits of all chunks at once. Matmul FLOPs,
with S scored tokens: forward 2·(2·S·H·V) (policy, reference), backward 3·(2·S·H·V) (recompute,
∂hidden, ∂weight) = 5 units against the floor of 4 (1.25×), for memory that no longer grows with
S·V. The weight and bias gradients accumulate in fp32 across chunks, in place, cast once.
"""

from __future__ import annotations

import torch

from . import layout as L
from .dispatch import pair_head, token_backward, token_forward
from .output import split_pair
from .pair_head import row_coefficients
from .validation import LossParams

# Default budget for one chunk's temporaries. On CUDA, 256 MiB holds ~512 rows of bf16 logits
# at V = 128k, enough for the GEMMs to run near peak. On CPU a smaller chunk costs no matmul
# efficiency and keeps the working set closer to the caches.
DEFAULT_CHUNK_BYTES = {"cuda": 256 * 2**20, "cpu": 32 * 2**20}
# fp32 temporaries per logit of the torch backend's token pass (see token_torch.py).
_TORCH_TEMPORARY_BYTES = 3 * 4


def default_chunk_rows(vocab: int, element_size: int, device_type: str, backend: str) -> int:
    """Rows per chunk so that the chunk's policy and reference logits, plus the torch backend's
    temporaries, fit the device's budget (at least 1 row)."""
    budget = DEFAULT_CHUNK_BYTES.get(device_type, DEFAULT_CHUNK_BYTES["cuda"])
    per_row = vocab * (2 * element_size + (_TORCH_TEMPORARY_BYTES if backend == "torch" else 0))
    return max(1, budget // per_row)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # Exactly what nn.Linear computes (a fused addmm with a bias), so a chunk's logits are the
    # model's own logits, not a differently rounded version of them.
    return torch.nn.functional.linear(hidden, weight, bias)


_ADDMM_FP32_OUT: dict[str, bool] = {}


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc fp32 and a, b in the input dtype, without a V×H temporary.

    On CUDA, ``torch.addmm(..., out_dtype=float32, out=acc)`` runs the bf16/fp16 GEMM with its
    fp32 epilogue accumulating straight into acc. Where that overload is missing (CPU, older
    torch), the operands are upcast instead (a C×V fp32 copy, the price of exact accumulation).
    """
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    key = a.device.type
    if key not in _ADDMM_FP32_OUT:
        try:
            probe = torch.zeros(1, 1, device=a.device)
            one = torch.ones(1, 1, device=a.device, dtype=a.dtype)
            torch.addmm(probe, one, one, out_dtype=torch.float32, out=probe)
            _ADDMM_FP32_OUT[key] = bool(probe.item() == 1.0)
        except (RuntimeError, TypeError, NotImplementedError):
            _ADDMM_FP32_OUT[key] = False
    if _ADDMM_FP32_OUT[key]:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@torch.no_grad()
def linear_forward(
    policy_hidden, policy_weight, policy_bias, ref_hidden, ref_weight, ref_bias, labels,
    params: LossParams,
):  # fmt: skip
    """Returns (stats, pair, scored): token stats in the (TOKEN_FIELDS, 2B·T) layout of the
    logits path (zeros at ignored rows), the head's pair buffer, and the flat scored indices."""
    two_b, t, _ = policy_hidden.shape
    scored = (labels != params.ignore_index).flatten().nonzero().squeeze(1)
    stats = torch.zeros((L.TOKEN_FIELDS, two_b * t), dtype=torch.float32, device=labels.device)
    flat_policy = policy_hidden.reshape(two_b * t, -1)
    flat_ref = ref_hidden.reshape(two_b * t, -1)
    flat_labels = labels.reshape(two_b * t)
    for sl in _chunks(scored.numel(), params.chunk_rows):
        idx = scored[sl]
        policy_logits = _logits(flat_policy[idx], policy_weight, policy_bias)
        ref_logits = _logits(flat_ref[idx], ref_weight, ref_bias)
        # A chunk is a (C, 1, V) batch of C sequences of one token: the kernels need no change.
        stats[:, idx] = token_forward(
            policy_logits.unsqueeze(1),
            ref_logits.unsqueeze(1),
            flat_labels[idx].unsqueeze(1),
            params,
        )
        del policy_logits, ref_logits
    pair = pair_head(stats, labels, params)
    return stats, pair, scored


@torch.no_grad()
def linear_backward(
    policy_hidden, policy_weight, policy_bias, labels, stats, scored, row_coef,
    params: LossParams, needs: tuple[bool, bool, bool],
):  # fmt: skip
    """Gradients w.r.t. (policy_hidden, policy_weight, policy_bias), each None if not needed."""
    two_b, t, h = policy_hidden.shape
    need_hidden, need_weight, need_bias = needs
    flat_policy = policy_hidden.reshape(two_b * t, h)
    flat_labels = labels.reshape(two_b * t)
    grad_hidden = torch.zeros_like(flat_policy) if need_hidden else None
    grad_weight = None
    if need_weight:
        # fp32 accumulation across chunks: bf16 accumulation drifts (seen diverging elsewhere).
        if policy_weight.dtype == torch.float32:
            grad_weight = torch.zeros_like(policy_weight)
        else:
            grad_weight = torch.zeros(policy_weight.shape, dtype=torch.float32,
                                      device=policy_weight.device)  # fmt: skip
    grad_bias = (
        torch.zeros(policy_bias.shape, dtype=torch.float32, device=policy_bias.device)
        if need_bias
        else None
    )
    seq_of_row = scored // t
    for sl in _chunks(scored.numel(), params.chunk_rows):
        idx = scored[sl]
        hidden = flat_policy[idx]
        logits = _logits(hidden, policy_weight, policy_bias).unsqueeze(1)
        # In place: the recomputed logits chunk becomes its own gradient.
        grad_logits = token_backward(
            logits, flat_labels[idx].unsqueeze(1), stats[:, idx].contiguous(),
            row_coef[seq_of_row[sl]], params, inplace=True,
        ).squeeze(1)  # fmt: skip
        if need_hidden:
            grad_hidden[idx] = grad_logits @ policy_weight
        if need_weight:
            _accumulate_fp32(grad_weight, grad_logits.t(), hidden)
        if need_bias:
            grad_bias += grad_logits.sum(0, dtype=torch.float32)
        del logits, grad_logits
    if grad_hidden is not None:
        grad_hidden = grad_hidden.view_as(policy_hidden)
    if grad_weight is not None:
        grad_weight = grad_weight.to(policy_weight.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(policy_bias.dtype)
    return grad_hidden, grad_weight, grad_bias


class LinearEpsilonDPOFunction(torch.autograd.Function):
    """(policy_hidden, policy_weight, policy_bias, ref_hidden, ref_weight, ref_bias, labels,
    params) → (losses, chosen_logps, rejected_logps, pair).

    Saves the policy hidden states, weight and bias (references, no copies), the labels, the
    scored indices, the token stats (6 floats per token) and the pair buffer; nothing V-sized.
    """

    @staticmethod
    def evaluate(policy_hidden, policy_weight, policy_bias, ref_hidden, ref_weight, ref_bias,
                 labels, params: LossParams):  # fmt: skip
        """The forward alone: the ``(PAIR_FIELDS, B)`` pair buffer (see layout.py)."""
        return linear_forward(policy_hidden, policy_weight, policy_bias, ref_hidden, ref_weight,
                              ref_bias, labels, params)[1]  # fmt: skip

    @staticmethod
    def forward(ctx, policy_hidden, policy_weight, policy_bias, ref_hidden, ref_weight, ref_bias,
                labels, params: LossParams):  # fmt: skip
        stats, pair, scored = linear_forward(
            policy_hidden, policy_weight, policy_bias, ref_hidden, ref_weight, ref_bias, labels,
            params,
        )  # fmt: skip
        ctx.params = params
        ctx.has_bias = policy_bias is not None
        ctx.save_for_backward(
            policy_hidden, policy_weight, policy_bias, labels, stats, scored, pair
        )
        ctx.mark_non_differentiable(pair)
        return (*split_pair(pair), pair)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses, grad_chosen_logps, grad_rejected_logps, _grad_pair):
        policy_hidden, policy_weight, policy_bias, labels, stats, scored, pair = ctx.saved_tensors
        params: LossParams = ctx.params
        row_coef = row_coefficients(
            pair, grad_losses, grad_chosen_logps, grad_rejected_logps,
            average_log_prob=params.average_log_prob,
        )  # fmt: skip
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                 ctx.has_bias and ctx.needs_input_grad[2])  # fmt: skip
        grads = linear_backward(
            policy_hidden, policy_weight, policy_bias, labels, stats, scored, row_coef,
            params, needs,
        )  # fmt: skip
        return (*grads, None, None, None, None, None)
