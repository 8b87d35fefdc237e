"""The one dispatch seam: every per-token and per-pair step, Triton or torch by
``params.backend``, and a vocabulary shard's partials.

Both implementations of each step take the same arguments and return the same buffers (see
layout.py), so the drivers (drivers.py, linear_chunks.py) never look at the backend. Nothing
here communicates: the drivers call the collectives by name (distributed/). The Triton modules
are imported only when used: CPU users need no working Triton install.
"""

from __future__ import annotations

import torch

from .params import LossParams
from .sequences import Sequences


def token_forward(policy_logits, ref_logits, labels, params: LossParams) -> torch.Tensor:
    """``(TOKEN_FIELDS, N·T)`` fp32 stats of ``(N, T, V)`` logits (docs/SPEC.md, Per scored
    token)."""
    if params.backend == "triton":
        from .triton_backend.token import token_forward as impl
    else:
        from .torch_backend.token import token_forward as impl
    return impl(policy_logits, ref_logits, labels, params)


def token_partials(policy_logits, ref_logits, labels, params: LossParams, offset: int, rows: int):
    """(maxes, sums) (layout.py, ``SHARD_*``) of ``(N, T, rows)`` logits of the vocabulary
    shard starting at ``offset``, for ``distributed.vocab_shards.merge_partials``."""
    if params.backend == "triton":
        from .triton_backend.vocab_shard import token_partials as impl
    else:
        from .torch_backend.vocab_partials import token_partials as impl
    return impl(policy_logits, ref_logits, labels, params, offset, rows)


def stats_from_partials(maxes, sums, labels, params: LossParams) -> torch.Tensor:
    """The ``(TOKEN_FIELDS, N·T)`` token stats from partials merged over every shard."""
    if params.backend == "triton":
        from .triton_backend.vocab_shard import stats_from_partials as impl
    else:
        from .torch_backend.vocab_partials import stats_from_partials as impl
    return impl(maxes, sums, labels, params)


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
        from .triton_backend.token import token_backward as impl
    else:
        from .torch_backend.token import token_backward as impl
    return impl(
        policy_logits, labels, stats, token_coef, params, inplace=inplace, vocab_offset=vocab_offset
    )


def sequence_sums(
    stats: torch.Tensor, labels: torch.Tensor, sequences: Sequences, params: LossParams
) -> torch.Tensor:
    """``(SEQUENCE_FIELDS, 2B)`` sums of this process's token stats per sequence (docs/SPEC.md,
    Per sequence), for padded rows or a packed stream alike."""
    if params.backend == "triton":
        from .triton_backend.sequence_sums import sequence_sums as impl
    else:
        from .torch_backend.sequence_sums import sequence_sums as impl
    return impl(stats, labels, sequences, params)


def pair_head(sequence_sums: torch.Tensor, params: LossParams) -> torch.Tensor:
    """``(PAIR_FIELDS, B)`` per-pair buffer from the sequence sums (docs/SPEC.md, Per pair)."""
    if params.backend == "triton":
        from .triton_backend.pair_head import pair_head as impl
    else:
        from .torch_backend.pair_head import pair_head as impl
    return impl(sequence_sums, params)
