"""The per-token Triton backward: each token row's logits gradient in one pass over V.

With p = softmax(h) and A_n = Σ_t log p[y_t], ∂A_n/∂h_t = onehot(y_t) − p_t, and the loss
reaches A_n only through one scalar per sequence row, c_n = ∂L/∂A_n (docs/SPEC.md,
Gradients). So each token row needs h, its saved lse and c_n: p = exp(h − lse) costs one exp
per element and no second reduction.

The kernel sees its input as launch.py and forward.py describe (rows of any strides, unit stride
over V, int64 offsets); with ``inplace`` the gradient is written over the logits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fields import TOK_LSE
from .launch import (
    BWD_LANES_PER_THREAD,
    BWD_WARPS,
    Launch,
    align_rows,
    backward_register_cap,
    fast_math,
    first_aligned_column,
    launch,
    plan_splits,
    transform_constexprs,
    unit_stride_v,
    vec_of,
)
from .lse import LOG2E, exp2, model_logits, model_logits_slope


@triton.jit
def token_backward_kernel(
    # data ptrs
    policy_ptr,  # (N, T, V) policy logits h
    labels_ptr,  # (N, T)
    stats_ptr,  # (TOKEN_FIELDS, N·T) fp32 from the forward; only the lse field is read
    coef_ptr,  # (N·T,) fp32, c_n of each token row's sequence (upstream gradient, averaging)
    grad_ptr,  # (N, T, V) out, policy dtype; may alias policy_ptr (in-place backward)
    # shapes
    T,
    V,
    n_rows,
    cols_per_split,  # a multiple of LANES·VEC; ≥ V when not split
    vocab_offset,  # the vocabulary index of column 0 (a slice of V in the linear path)
    # strides
    stride_pn,
    stride_pt,
    stride_ln,
    stride_lt,
    stride_gn,
    stride_gt,
    # runtime constants
    ignore_index,
    LANES: tl.constexpr,
    VEC: tl.constexpr,
    FAST_MATH: tl.constexpr,
    ALIGN_ROWS: tl.constexpr,  # rows may start mid-vector: align each before its main loop
    LOGIT_SCALE: tl.constexpr = 1.0,  # the model's logits from z, as in the forward
    SOFTCAP: tl.constexpr = 0.0,
):
    """Program (row, split) writes the gradient of one token row's columns [split·cols_per_split,
    …): zeros for an ignored row (without reading its logits), c·(onehot(y) − exp(h − lse))
    otherwise. Column j is vocabulary entry vocab_offset + j."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n = row // T
    t = row % T
    label = tl.load(labels_ptr + n * stride_ln + t * stride_lt).to(tl.int64)
    policy_offset = n * stride_pn + t * stride_pt
    grad_offset = n * stride_gn + t * stride_gt
    col_start = split * cols_per_split
    col_end = tl.minimum(V, col_start + cols_per_split)
    if label == ignore_index:
        _gradient_row(
            policy_ptr,
            grad_ptr,
            policy_offset,
            grad_offset,
            col_start,
            col_end,
            0,
            0.0,
            0.0,
            LANES,
            VEC,
            FAST_MATH,
            ALIGN_ROWS,
            LOGIT_SCALE,
            SOFTCAP,
            ZEROS=True,
        )
    else:
        shift = tl.load(stats_ptr + TOK_LSE * n_rows + row) * LOG2E
        coef = tl.load(coef_ptr + row)
        _gradient_row(
            policy_ptr,
            grad_ptr,
            policy_offset,
            grad_offset,
            col_start,
            col_end,
            (label - vocab_offset).to(tl.int32),
            shift,
            coef,
            LANES,
            VEC,
            FAST_MATH,
            ALIGN_ROWS,
            LOGIT_SCALE,
            SOFTCAP,
            ZEROS=False,
        )


@triton.jit
def _gradient_row(
    policy_ptr,
    grad_ptr,
    policy_offset,
    grad_offset,
    col_start,
    col_end,
    label_col,
    shift,
    coef,
    LANES: tl.constexpr,
    VEC: tl.constexpr,
    FAST_MATH: tl.constexpr,
    ALIGN_ROWS: tl.constexpr,
    LOGIT_SCALE: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ZEROS: tl.constexpr,
):
    """Columns [col_start, col_end) of one row's gradient: a masked head block up to a 16-byte
    boundary (``ALIGN_ROWS``, as in the forward), whole blocks at offsets the compiler sees as
    block multiples (vector loads and stores), a masked tail. ``ZEROS``: an ignored row, whose
    logits are not read."""
    tile = tl.arange(0, LANES)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    first = col_start
    if ALIGN_ROWS:
        first = first_aligned_column(grad_offset, col_start, col_end, VEC)
        if first > col_start:
            cols = col_start + tile
            _gradient_block(
                policy_ptr + policy_offset,
                grad_ptr + grad_offset,
                cols,
                cols < first,
                cols,
                label_col,
                shift,
                coef,
                FAST_MATH,
                LOGIT_SCALE,
                SOFTCAP,
                ZEROS,
                MASKED=True,
            )
        policy_block = policy_ptr + tl.multiple_of(policy_offset + first, VEC)
        grad_block = grad_ptr + tl.multiple_of(grad_offset + first, VEC)
    else:
        policy_block = policy_ptr + policy_offset + first
        grad_block = grad_ptr + grad_offset + first
    full_blocks = (col_end - first) // (LANES * VEC)
    # The label's column counted from `first`, in 32 bits (|label − offset − first| < V ≤ 2^31),
    # compared with the blocks' own 32-bit columns: a 64-bit row column per element costs
    # registers enough to halve the programs per SM (docs/PERFORMANCE.md, "Registers").
    label_from_first = (label_col - first).to(tl.int32)
    for k in range(0, full_blocks):
        cols = k * (LANES * VEC) + tile
        _gradient_block(
            policy_block,
            grad_block,
            cols,
            cols,
            cols,
            label_from_first,
            shift,
            coef,
            FAST_MATH,
            LOGIT_SCALE,
            SOFTCAP,
            ZEROS,
            MASKED=False,
        )
    rest = col_end - first - full_blocks * (LANES * VEC)
    if rest > 0:
        cols = full_blocks * (LANES * VEC) + tile
        _gradient_block(
            policy_block,
            grad_block,
            cols,
            tile < rest,
            cols,
            label_from_first,
            shift,
            coef,
            FAST_MATH,
            LOGIT_SCALE,
            SOFTCAP,
            ZEROS,
            MASKED=True,
        )


@triton.jit
def _gradient_block(
    policy_base,
    grad_base,
    cols,
    valid,
    row_cols,
    label_col,
    shift,
    coef,
    FAST_MATH: tl.constexpr,
    LOGIT_SCALE: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ZEROS: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One block at ``cols`` from the bases, masked by ``valid`` when ``MASKED``:
    c·(onehot(y) − exp(h − lse)), or zeros. ``row_cols``: the same columns counted from the
    row's start, where the label's column is."""
    if ZEROS:
        grad = tl.zeros(cols.shape, dtype=tl.float32)
    else:
        if MASKED:
            h = tl.load(policy_base + cols, mask=valid, other=-float("inf")).to(tl.float32)
        else:
            h = tl.load(policy_base + cols).to(tl.float32)
        h = model_logits(h, LOGIT_SCALE, SOFTCAP, FAST_MATH)
        grad = -coef * exp2(h * LOG2E - shift, FAST_MATH)
        grad = tl.where(row_cols == label_col, grad + coef, grad)
        if LOGIT_SCALE != 1.0 or SOFTCAP > 0.0:
            # Through the model's transform to its lm_head outputs z (masked columns are not
            # stored, so their −cap does no harm here).
            grad = grad * model_logits_slope(h, LOGIT_SCALE, SOFTCAP)
    out = grad.to(grad_base.dtype.element_ty)
    if MASKED:
        tl.store(grad_base + cols, out, mask=valid)
    else:
        tl.store(grad_base + cols, out)


def backward_launch(
    policy_logits,
    labels,
    stats,
    token_coef,
    grad,
    ignore_index,
    *,
    vocab_offset: int = 0,
    splits: int | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
):
    """The backward's ``Launch``."""
    n, t, v = policy_logits.shape
    lanes = 32 * BWD_WARPS * BWD_LANES_PER_THREAD
    vec = vec_of(policy_logits.dtype)
    splits, cols_per_split = plan_splits(policy_logits, lanes * vec, splits)
    return Launch(
        token_backward_kernel,
        (n * t, splits),
        (
            policy_logits,
            labels,
            stats,
            token_coef,
            grad,
            t,
            v,
            n * t,
            cols_per_split,
            vocab_offset,
            policy_logits.stride(0),
            policy_logits.stride(1),
            labels.stride(0),
            labels.stride(1),
            grad.stride(0),
            grad.stride(1),
            ignore_index,
        ),
        dict(
            LANES=lanes,
            VEC=vec,
            FAST_MATH=fast_math(),
            ALIGN_ROWS=align_rows(vec, policy_logits, grad),
            **transform_constexprs(logit_scale, logit_softcap),
            **backward_register_cap(logit_scale, logit_softcap),
        ),
        BWD_WARPS,
    )


def token_backward(
    policy_logits: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    token_coef: torch.Tensor,
    params,
    *,
    inplace: bool,
    vocab_offset: int = 0,
    splits: int | None = None,
) -> torch.Tensor:
    """Gradient of the loss w.r.t. the ``(N, T, V)`` policy logits, in their dtype, from each
    token row's coefficient ``token_coef`` (N·T,); column j is vocabulary entry
    ``vocab_offset + j`` (labels are full-vocabulary indices)."""
    policy_logits = unit_stride_v(policy_logits)
    grad = policy_logits if inplace else _gradient_like(policy_logits)
    spec = backward_launch(
        policy_logits,
        labels,
        stats,
        token_coef.float().contiguous(),
        grad,
        params.ignore_index,
        vocab_offset=vocab_offset,
        splits=splits,
        logit_scale=params.logit_scale,
        logit_softcap=params.logit_softcap,
    )
    launch(spec, policy_logits.device)
    return grad


def _gradient_like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor like ``x`` with ``x``'s strides where its rows do not overlap
    (a ``logits[:, :-1]`` slice keeps its row layout, so rows of both start equally far from a
    16-byte boundary and the backward's aligned loop serves them; it costs the one unused row
    per sequence that the slice skipped); ``empty_like`` otherwise."""
    n, t, v = x.shape
    if x.stride(1) >= v and x.stride(0) >= t * x.stride(1):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    return torch.empty_like(x)
