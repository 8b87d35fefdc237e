"""The one dispatch point: every per-token and per-pair step, Triton or torch by ``params.backend``.

Both implementations of each step take the same arguments and return the same buffers (see
layout.py), so the autograd Functions and the chunked linear driver never look at the backend.
The Triton modules are imported only when used: CPU users need no working Triton install.
"""

from __future__ import annotations

import torch

from .params import LossParams
from .sequence_group import complete_sums
from .sequences import Sequences


def token_forward(policy_logits, ref_logits, labels, params: LossParams) -> torch.Tensor:
    """``(TOKEN_FIELDS, N·T)`` fp32 stats of ``(N, T, V)`` logits (docs/SPEC.md, Per scored
    token)."""
    if params.backend == "triton":
        from .token_triton import token_forward as impl
    else:
        from .token_torch import token_forward as impl
    return impl(policy_logits, ref_logits, labels, params)


def token_backward(
    policy_logits,
    labels,
    stats,
    token_coef,
    params: LossParams,
    *,
    inplace: bool,
    vocab_offset: int = 0,
) -> torch.Tensor:
    """∂L/∂policy_logits from each token row's c_n (``Sequences.token_coefficients``);
    ``inplace`` writes over the logits; column j of the logits is vocabulary entry
    ``vocab_offset + j``."""
    if params.backend == "triton":
        from .token_triton import token_backward as impl
    else:
        from .token_torch import token_backward as impl
    return impl(
        policy_logits, labels, stats, token_coef, params, inplace=inplace, vocab_offset=vocab_offset
    )


def sequence_sums(
    stats: torch.Tensor, labels: torch.Tensor, sequences: Sequences, params: LossParams
) -> torch.Tensor:
    """``(SEQUENCE_FIELDS, 2B)`` sums of the token stats per sequence (docs/SPEC.md, Per
    sequence), for padded rows or a packed stream alike; over every rank of the sequence group
    when there is one."""
    if params.backend == "triton":
        from .sequence_sums_triton import sequence_sums as impl
    else:
        from .sequence_sums_torch import sequence_sums as impl
    return complete_sums(impl(stats, labels, sequences, params), sequences.group)


def pair_head(sequence_sums: torch.Tensor, params: LossParams) -> torch.Tensor:
    """``(PAIR_FIELDS, B)`` per-pair buffer from the sequence sums (docs/SPEC.md, Per pair)."""
    if params.backend == "triton":
        from .pair_head_triton import pair_head as impl
    else:
        from .pair_head_torch import pair_head as impl
    return impl(sequence_sums, params)
