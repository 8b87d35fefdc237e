"""A vocabulary shard's partials on the Triton token kernel, and the stats from merged ones
(torch_backend/vocab_shard.py: the contract and the reference).

The partials are the token forward's split mode run over the shard's columns: one launch for
the whole ``(N, T, V_r)`` shard (or linear-path chunk), each row's (max, Σexp) of the four
streams, Σh and the policy's Σ exp(2(h − max)) written as a V-split's partial state would be;
unscored rows read nothing. The label's lm_head outputs are gathered where the label falls in the
shard (N·T elements, no copy of the logits). After the ranks' all-reduces
(distributed/vocab_shard.py), ``token_finish_kernel`` writes the token stats with u − a in
SPEC's small-number form, as the unsharded kernels do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import layout as L
from .fields import SHARD_EXP_SUMS, SHARD_LABEL_G, SHARD_LABEL_H, SHARD_LOGIT_SUM, SHARD_SQUARES
from .forward import forward_launches
from .launch import Launch, fast_math, launch, transform_constexprs, unit_stride_v
from .lse import finish_row, model_logits, stack, zero_row

_PARTIAL_MAXES = slice(L.PART_MAXES, L.PART_MAXES + 4)
_PARTIAL_EXP_SUMS = slice(L.PART_EXP_SUMS, L.PART_EXP_SUMS + 4)


def _label_outputs(logits: torch.Tensor, labels: torch.Tensor, offset: int, scored: torch.Tensor):
    """(N·T,) fp32: ``logits[n, t, labels[n, t] − offset]`` where that column is in the shard and
    the row is scored, 0 elsewhere (a gather of N·T elements)."""
    n, t, v = logits.shape
    column = labels.reshape(-1).long() - offset
    owned = scored & (column >= 0) & (column < v)
    rows = torch.arange(n * t, device=logits.device)
    at = logits[rows // t, rows % t, column.clamp(0, max(0, v - 1))].float()
    return torch.where(owned, at, 0.0)


@torch.no_grad()
def token_partials(policy_logits, ref_logits, labels, params, offset: int, rows: int):
    """``(SHARD_MAXES, N·T)`` maxes and ``(SHARD_SUMS, N·T)`` sums of ``(N, T, rows)`` shard
    lm_head outputs with full-vocabulary ``labels`` ``(N, T)`` (layout.py, ``SHARD_*``)."""
    n, t, v = policy_logits.shape
    device = policy_logits.device
    maxes = torch.full((L.SHARD_MAXES, n * t), -torch.inf, device=device)
    sums = torch.zeros((L.SHARD_SUMS, n * t), device=device)
    if v == 0:  # a rank whose shard holds no vocabulary entries
        return maxes, sums
    policy_logits = unit_stride_v(policy_logits)
    ref_logits = unit_stride_v(ref_logits)
    # Unscored rows return before writing: their partial state stays −inf / 0.
    partial = torch.zeros((1, L.PARTIAL_FIELDS, n * t), device=device)
    partial[0, _PARTIAL_MAXES] = -torch.inf
    (spec,) = forward_launches(
        policy_logits,
        ref_logits,
        labels,
        None,
        partial,
        params.epsilon,
        params.ignore_index,
        1,
        params.logit_scale,
        params.logit_softcap,
        params.wpo_weights,
        partial_only=True,
    )
    launch(spec, device)
    maxes.copy_(partial[0, _PARTIAL_MAXES])
    sums[L.SHARD_EXP_SUMS : L.SHARD_EXP_SUMS + 4] = partial[0, _PARTIAL_EXP_SUMS]
    sums[L.SHARD_LOGIT_SUM] = partial[0, L.PART_LOGIT_SUM]
    if params.wpo_weights:
        sums[L.SHARD_SQUARES] = partial[0, L.PART_SQUARES]
    scored = labels.reshape(-1) != params.ignore_index
    sums[L.SHARD_LABEL_H] = _label_outputs(policy_logits, labels, offset, scored)
    sums[L.SHARD_LABEL_G] = _label_outputs(ref_logits, labels, offset, scored)
    return maxes, sums


@triton.jit
def token_finish_kernel(
    labels_ptr,  # (N, T) integer labels
    maxes_ptr,  # (SHARD_MAXES, N·T) fp32 partials merged over a vocabulary shard's ranks
    sums_ptr,  # (SHARD_SUMS, N·T) fp32, the same (layout.py, SHARD_*)
    stats_ptr,  # (TOKEN_FIELDS, N·T) fp32 out
    T,
    n_rows,
    stride_ln,
    stride_lt,
    epsilon,
    ignore_index,
    FAST_MATH: tl.constexpr,
    LOGIT_SCALE: tl.constexpr = 1.0,
    SOFTCAP: tl.constexpr = 0.0,
    SUM_SQUARES: tl.constexpr = False,
):
    """One program per token row: its stats from the whole vocabulary's merged states and the
    label's lm_head outputs, transformed here as the forward transforms every logit, so a
    shard's h_y is bitwise the unsharded kernels'. Zeros at an ignored row."""
    row = tl.program_id(0).to(tl.int64)
    n = row // T
    t = row % T
    label = tl.load(labels_ptr + n * stride_ln + t * stride_lt).to(tl.int64)
    if label == ignore_index:
        zero_row(stats_ptr, row, n_rows)
        return
    row_max = stack(
        tl.load(maxes_ptr + 0 * n_rows + row),
        tl.load(maxes_ptr + 1 * n_rows + row),
        tl.load(maxes_ptr + 2 * n_rows + row),
        tl.load(maxes_ptr + 3 * n_rows + row),
    )
    row_sum = stack(
        tl.load(sums_ptr + (SHARD_EXP_SUMS + 0) * n_rows + row),
        tl.load(sums_ptr + (SHARD_EXP_SUMS + 1) * n_rows + row),
        tl.load(sums_ptr + (SHARD_EXP_SUMS + 2) * n_rows + row),
        tl.load(sums_ptr + (SHARD_EXP_SUMS + 3) * n_rows + row),
    )
    h_y = model_logits(
        tl.load(sums_ptr + SHARD_LABEL_H * n_rows + row), LOGIT_SCALE, SOFTCAP, FAST_MATH
    )
    g_y = model_logits(
        tl.load(sums_ptr + SHARD_LABEL_G * n_rows + row), LOGIT_SCALE, SOFTCAP, FAST_MATH
    )
    logit_sum = tl.load(sums_ptr + SHARD_LOGIT_SUM * n_rows + row)
    squares = 0.0
    if SUM_SQUARES:
        squares = tl.load(sums_ptr + SHARD_SQUARES * n_rows + row)
    finish_row(
        stats_ptr, row, n_rows, h_y, g_y, epsilon, row_max, row_sum, logit_sum, squares, SUM_SQUARES
    )


def finish_launch(maxes, sums, labels, stats, params):
    """The finish's ``Launch``, shared by the launch and the compile check."""
    n, t = labels.shape
    constexprs = dict(
        FAST_MATH=fast_math(), **transform_constexprs(params.logit_scale, params.logit_softcap)
    )
    if params.wpo_weights:
        constexprs["SUM_SQUARES"] = True
    return Launch(
        token_finish_kernel,
        (n * t,),
        (
            labels,
            maxes,
            sums,
            stats,
            t,
            n * t,
            labels.stride(0),
            labels.stride(1),
            params.epsilon,
            params.ignore_index,
        ),
        constexprs,
        1,
    )


@torch.no_grad()
def stats_from_partials(maxes: torch.Tensor, sums: torch.Tensor, labels, params) -> torch.Tensor:
    """The ``(TOKEN_FIELDS, N·T)`` token stats from partials merged over every shard (zeros at
    unscored rows)."""
    stats = torch.empty((L.TOKEN_FIELDS, maxes.shape[1]), dtype=torch.float32, device=maxes.device)
    launch(finish_launch(maxes, sums, labels, stats, params), maxes.device)
    return stats
