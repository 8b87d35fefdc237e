"""Backend dispatch for the per-token passes (Triton kernels or chunked torch)."""

from __future__ import annotations

import torch


def token_forward(policy_logits, ref_logits, labels, *, epsilon, ignore_index, backend):
    """(TOKEN_FIELDS, N·T) fp32 stats for ``(N, T, V)`` logits; see layout.py."""
    if backend == "triton":
        from .token_kernels import token_forward as impl
    else:
        from .token_torch import token_forward_torch as impl
    return impl(policy_logits, ref_logits, labels, epsilon=epsilon, ignore_index=ignore_index)


def token_backward(
    policy_logits, labels, stats, row_coef, *, ignore_index, inplace, backend
) -> torch.Tensor:
    """∂/∂policy_logits, given c_n per sequence row; ``inplace`` reuses the logits' storage."""
    if backend == "triton":
        from .token_kernels import token_backward as impl
    else:
        from .token_torch import token_backward_torch as impl
    return impl(policy_logits, labels, stats, row_coef, ignore_index=ignore_index, inplace=inplace)
