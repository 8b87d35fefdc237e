"""Per-token Triton kernels: the forward log-probabilities and the backward logits gradient.

Both kernels see their input as ``rows = N·T`` token rows of a ``(N, T, V)`` tensor with arbitrary
strides on the first two dimensions and unit stride over V, so ``logits[:, :-1]`` slices and the
linear path's compact ``(C, 1, V)`` chunks go through without a copy. Offsets are computed in
int64: 2B·T·V passes 2^31 at realistic sizes (8 × 2048 × 128256 ≈ 2.1e9).

Design (the forward must be bound by memory, not by instruction issue; ``python
benchmarks/kernel_report.py`` shows the SASS count per element):

- A block is a ``[LANES, VEC]`` tile: each thread owns ``VEC`` consecutive columns (one 16-byte
  load per tensor) of each of its lanes. The four streams keep a running (max, sum) *per lane*;
  reducing over ``VEC`` stays inside a thread, so the steady-state loop has no shuffles, barriers
  or shared memory, and one rescale exp per lane per block (1/VEC of an exp per element). Lanes
  are combined once per row, after the loop.
- Full blocks run unmasked; one masked tail block follows.
- exp2 on inputs pre-scaled by log2(e) in one FMA; on the GPU the flush-to-zero ``ex2.approx``
  (inline PTX: ``tl.exp2`` lowers to the non-ftz form with denormal fix-ups). Under the CPU
  interpreter the portable ``tl.exp2`` runs instead (``FAST_MATH`` is a constexpr).
- The mixes are ``h ± ε·(h − g)``: exactly ``h`` when policy == reference, so the four
  log-probabilities are then bitwise equal and every step is 0.
- With few rows (an eval batch, the last chunk of the linear path) the grid would leave SMs idle:
  the launcher then splits V across programs, which write partial (max, sum) states that a small
  merge kernel combines (``split_count``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import layout as L
from .launch import launch

# Field indices (layout.py) as compile-time constants the kernels can use.
TOK_LOGP = tl.constexpr(L.TOK_LOGP)
TOK_REF_LOGP = tl.constexpr(L.TOK_REF_LOGP)
TOK_P_EPS_DELTA = tl.constexpr(L.TOK_P_EPS_DELTA)
TOK_N_EPS_DELTA = tl.constexpr(L.TOK_N_EPS_DELTA)
TOK_LSE = tl.constexpr(L.TOK_LSE)
TOK_LOGIT_SUM = tl.constexpr(L.TOK_LOGIT_SUM)
TOKEN_FIELDS = tl.constexpr(L.TOKEN_FIELDS)
# A partial state of one V-split of one row: (max, sum) of the four streams and the logit sum.
N_PARTIAL = 9
PARTIAL_FIELDS = tl.constexpr(N_PARTIAL)

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Launch shape: warps per program and lanes per thread per block (tuned from ptxas's register
# counts for sm_90 with zero spills; see kernel_report.py). VEC = 16 bytes / element size.
FWD_WARPS, FWD_LANES_PER_THREAD = 8, 1
BWD_WARPS, BWD_LANES_PER_THREAD = 8, 2
# Programs an SM holds at once, for the split heuristic: register-limited, 256 threads of up to
# 85 registers fit three times in 64K (ptxas gives the forward 76 under Triton 3.6 and 64 under
# 3.9, where four would fit; benchmarks/kernel_report.py).
PROGRAMS_PER_SM = 3
# A V-split spans at least this many blocks, so that its loop, not its merge, dominates.
MIN_BLOCKS_PER_SPLIT = 4


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _exp2(x, FAST_MATH: tl.constexpr):
    if FAST_MATH:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.exp2(x)


@triton.jit
def _fold_block(h, g, h_to_sum, state, epsilon, FAST_MATH: tl.constexpr):
    """Fold one [LANES, VEC] block of h and g into the per-lane states.

    The four streams (policy, reference and the two mixes) are stacked on two trailing axes of
    size 2, so one (max, Σexp) update serves all four: [LANES, VEC, 2, 2] → [LANES, 2, 2].
    Stacking is free (each thread's values stay in its registers) and the VEC reduction stays
    in-thread. The shift is 0 where a running max is still −inf (every entry so far absent), so
    no exp argument is NaN; a NaN in h or g makes its lanes' sums NaN on every target.
    ``h_to_sum`` is h with the tail's masked columns zeroed, added into the logit-sum tile."""
    run_max, run_sum, logit_sum = state
    diff = h - g
    mix_p = h + epsilon * diff
    mix_n = h - epsilon * diff
    # A mix entry that is NaN because of infinities (h = g = −inf: an absent vocabulary entry,
    # where h ± ε(h − g) is −inf + NaN) is −inf, its mathematical value. On the GPU max.f32
    # returns the non-NaN operand, one instruction; the interpreter's maximum propagates NaN, so
    # it selects instead. Both map NaN → −inf and leave every number unchanged.
    if FAST_MATH:
        mix_p = tl.maximum(mix_p, -float("inf"))
        mix_n = tl.maximum(mix_n, -float("inf"))
    else:
        mix_p = tl.where(mix_p == mix_p, mix_p, -float("inf"))
        mix_n = tl.where(mix_n == mix_n, mix_n, -float("inf"))
    x = _stack(h, g, mix_p, mix_n)
    new_max = tl.maximum(run_max, tl.max(x, axis=1))
    shift = tl.where(new_max == -float("inf"), 0.0, new_max) * LOG2E
    rescale = _exp2(run_max * LOG2E - shift, FAST_MATH)
    run_sum = run_sum * rescale + tl.sum(_exp2(x * LOG2E - shift[:, None, :, :], FAST_MATH),
                                         axis=1)  # fmt: skip
    return new_max, run_sum, logit_sum + h_to_sum


@triton.jit
def _unstack(x):
    """(h, g, mix_p, mix_n) values of a [2, 2] stacked state (see _fold_block)."""
    hg, mixes = tl.split(x)
    h, g = tl.split(hg)
    mix_p, mix_n = tl.split(mixes)
    return h, g, mix_p, mix_n


@triton.jit
def _stack(h, g, mix_p, mix_n):
    return tl.join(tl.join(h, g), tl.join(mix_p, mix_n))


@triton.jit
def _merge_lanes(run_max, run_sum, FAST_MATH: tl.constexpr):
    """Combine per-lane (or per-split) states along axis 0 into one (max, sum) each."""
    row_max = tl.max(run_max, axis=0)
    shift = tl.where(row_max == -float("inf"), 0.0, row_max) * LOG2E
    return row_max, tl.sum(run_sum * _exp2(run_max * LOG2E - shift, FAST_MATH), axis=0)


@triton.jit
def _log_ratio(s, s_ref):
    """ln(s / s_ref), correctly rounded division, exactly 0 where s == s_ref (see _finish)."""
    ratio = tl.math.div_rn(s, s_ref)
    return tl.where(ratio == 1.0, 0.0, tl.log2(ratio) * LN2)


@triton.jit
def _finish(stats_ptr, row, n_rows, h_y, g_y, epsilon,
            m_h, s_h, m_g, s_g, m_p, s_p, m_n, s_n, logit_sum):  # fmt: skip
    """Write one token row's stats from its four (max, sum) states and the label's logits.

    u − a = ε·(h_y − g_y) − (lse_p − lse_h), with lse_p − lse_h = (m_p − m_h) + ln(s_p / s_h):
    a small number computed from small numbers, never the difference of two rounded ~log V
    log-sum-exps. A log-probability is ≤ 0: rounding must not make a, r, u or d positive (the
    clamps are selects, so a NaN stays NaN).

    At policy == reference every mix is bitwise h, so s_p == s_h and u − a must be exactly 0:
    the ratio is divided with round-to-nearest (``/`` compiles to ``div.full.f32``, an
    approximate reciprocal times s_p, for which x / x need not be 1), and a ratio of exactly 1
    gives exactly 0 without relying on the approximate ``lg2`` at 1."""
    lse_h = m_h + tl.log2(s_h) * LN2
    lse_g = m_g + tl.log2(s_g) * LN2
    a = h_y - lse_h
    a = tl.where(a > 0.0, 0.0, a)
    r = g_y - lse_g
    r = tl.where(r > 0.0, 0.0, r)
    label_diff = epsilon * (h_y - g_y)
    du = label_diff - ((m_p - m_h) + _log_ratio(s_p, s_h))
    dd = -label_diff - ((m_n - m_h) + _log_ratio(s_n, s_h))
    du = tl.where(du > -a, -a, du)
    dd = tl.where(dd > -a, -a, dd)
    tl.store(stats_ptr + TOK_LOGP * n_rows + row, a)
    tl.store(stats_ptr + TOK_REF_LOGP * n_rows + row, r)
    tl.store(stats_ptr + TOK_P_EPS_DELTA * n_rows + row, du)
    tl.store(stats_ptr + TOK_N_EPS_DELTA * n_rows + row, dd)
    tl.store(stats_ptr + TOK_LSE * n_rows + row, lse_h)
    tl.store(stats_ptr + TOK_LOGIT_SUM * n_rows + row, logit_sum)


# ----------------------------------------------------------------------------- forward
@triton.jit
def token_forward_kernel(
    # data ptrs
    policy_ptr,  # (N, T, V) policy logits h, any float dtype, read once
    ref_ptr,  # (N, T, V) reference logits g, read once
    labels_ptr,  # (N, T) integer labels
    out_ptr,  # (TOKEN_FIELDS, N·T) fp32 stats, or (splits, PARTIAL_FIELDS, N·T) partial states
    # shapes
    T,
    V,
    n_rows,  # N·T, the stride between fields of out
    cols_per_split,  # a multiple of LANES·VEC; ≥ V when not split
    # strides (elements; V has unit stride)
    stride_pn,
    stride_pt,
    stride_rn,
    stride_rt,
    stride_ln,
    stride_lt,
    # runtime constants (not constexpr: a new ε must not recompile)
    epsilon,
    ignore_index,
    # compile-time
    LANES: tl.constexpr,  # lanes per block (threads × lanes per thread)
    VEC: tl.constexpr,  # consecutive columns per lane: 16 bytes of the input dtype
    SPLIT: tl.constexpr,  # write partial states for token_merge_kernel instead of stats
    FAST_MATH: tl.constexpr,  # GPU: ftz ex2 and max-based NaN removal (False: interpreter)
):
    """Program (row, split) owns columns [split·cols_per_split, …) of one token row: it streams h
    and g once and folds the policy, the reference and the two ε-mixes into running
    (max, sum) states, plus Σh for the logits metrics. Unsplit, it writes the row's stats
    (layout.py); split, its partial state. A row whose label is ignore_index reads no logits."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n = row // T
    t = row % T
    label = tl.load(labels_ptr + n * stride_ln + t * stride_lt).to(tl.int64)
    if label == ignore_index:
        if not SPLIT:  # the merge kernel writes an ignored row's zeros when split
            for field in tl.static_range(TOKEN_FIELDS):
                tl.store(out_ptr + field * n_rows + row, 0.0)
        return

    policy_row = policy_ptr + n * stride_pn + t * stride_pt
    ref_row = ref_ptr + n * stride_rn + t * stride_rt
    col_start = split * cols_per_split
    col_end = tl.minimum(V, col_start + cols_per_split)
    # Column (lane, k) of a block sits at lane·VEC + k: each thread's VEC columns are adjacent
    # (one vector load) and lanes are adjacent across threads (coalesced).
    tile = tl.arange(0, LANES)[:, None] * VEC + tl.arange(0, VEC)[None, :]

    # Per-lane (max, sum) of the four streams, [LANES, 2, 2] (see _fold_block), fp32 whatever
    # the load dtype: the sums run over 1e5+ terms. Loop-carried values must enter the loop as
    # fp32 tensors of their final shape.
    zeros = tl.zeros([LANES, 2, 2], dtype=tl.float32)
    state = (zeros - float("inf"), zeros, tl.zeros([LANES, VEC], dtype=tl.float32))
    full_end = col_start + (col_end - col_start) // (LANES * VEC) * (LANES * VEC)
    for start in range(col_start, full_end, LANES * VEC):
        h = tl.load(policy_row + start + tile).to(tl.float32)
        g = tl.load(ref_row + start + tile).to(tl.float32)
        state = _fold_block(h, g, h, state, epsilon, FAST_MATH)
    if full_end < col_end:
        cols = full_end + tile
        valid = cols < col_end
        # Masked columns are −inf in both: an absent entry, which contributes nothing.
        h = tl.load(policy_row + cols, mask=valid, other=-float("inf")).to(tl.float32)
        g = tl.load(ref_row + cols, mask=valid, other=-float("inf")).to(tl.float32)
        state = _fold_block(h, g, tl.where(valid, h, 0.0), state, epsilon, FAST_MATH)

    run_max, run_sum, logit_sum = state
    row_max, row_sum = _merge_lanes(run_max, run_sum, FAST_MATH)  # [2, 2] each
    m_h, m_g, m_p, m_n = _unstack(row_max)
    s_h, s_g, s_p, s_n = _unstack(row_sum)
    logit_sum = tl.sum(tl.sum(logit_sum, axis=1), axis=0)
    if SPLIT:
        part = out_ptr + split.to(tl.int64) * PARTIAL_FIELDS * n_rows + row
        tl.store(part + 0 * n_rows, m_h)
        tl.store(part + 1 * n_rows, s_h)
        tl.store(part + 2 * n_rows, m_g)
        tl.store(part + 3 * n_rows, s_g)
        tl.store(part + 4 * n_rows, m_p)
        tl.store(part + 5 * n_rows, s_p)
        tl.store(part + 6 * n_rows, m_n)
        tl.store(part + 7 * n_rows, s_n)
        tl.store(part + 8 * n_rows, logit_sum)
    else:
        h_y = tl.load(policy_row + label).to(tl.float32)
        g_y = tl.load(ref_row + label).to(tl.float32)
        _finish(out_ptr, row, n_rows, h_y, g_y, epsilon,
                m_h, s_h, m_g, s_g, m_p, s_p, m_n, s_n, logit_sum)  # fmt: skip


@triton.jit
def token_merge_kernel(
    policy_ptr, ref_ptr, labels_ptr,  # as token_forward_kernel
    partial_ptr,  # (splits, PARTIAL_FIELDS, N·T) fp32 from token_forward_kernel
    stats_ptr,  # (TOKEN_FIELDS, N·T) fp32 out
    T, n_rows, n_splits,
    stride_pn, stride_pt, stride_rn, stride_rt, stride_ln, stride_lt,
    epsilon, ignore_index,
    BLOCK_S: tl.constexpr,
    FAST_MATH: tl.constexpr,
):  # fmt: skip
    """One program owns one token row: it combines the row's per-split states exactly as the
    unsplit kernel combines its lanes, then writes the row's stats."""
    row = tl.program_id(0).to(tl.int64)
    n = row // T
    t = row % T
    label = tl.load(labels_ptr + n * stride_ln + t * stride_lt).to(tl.int64)
    if label == ignore_index:
        for field in tl.static_range(TOKEN_FIELDS):
            tl.store(stats_ptr + field * n_rows + row, 0.0)
        return
    splits = tl.arange(0, BLOCK_S)
    valid = splits < n_splits
    base = partial_ptr + splits.to(tl.int64) * PARTIAL_FIELDS * n_rows + row
    neg_inf = -float("inf")
    split_max = _stack(tl.load(base + 0 * n_rows, mask=valid, other=neg_inf),
                       tl.load(base + 2 * n_rows, mask=valid, other=neg_inf),
                       tl.load(base + 4 * n_rows, mask=valid, other=neg_inf),
                       tl.load(base + 6 * n_rows, mask=valid, other=neg_inf))  # fmt: skip
    split_sum = _stack(tl.load(base + 1 * n_rows, mask=valid, other=0.0),
                       tl.load(base + 3 * n_rows, mask=valid, other=0.0),
                       tl.load(base + 5 * n_rows, mask=valid, other=0.0),
                       tl.load(base + 7 * n_rows, mask=valid, other=0.0))  # fmt: skip
    row_max, row_sum = _merge_lanes(split_max, split_sum, FAST_MATH)
    m_h, m_g, m_p, m_n = _unstack(row_max)
    s_h, s_g, s_p, s_n = _unstack(row_sum)
    logit_sum = tl.sum(tl.load(base + 8 * n_rows, mask=valid, other=0.0), axis=0)
    h_y = tl.load(policy_ptr + n * stride_pn + t * stride_pt + label).to(tl.float32)
    g_y = tl.load(ref_ptr + n * stride_rn + t * stride_rt + label).to(tl.float32)
    _finish(stats_ptr, row, n_rows, h_y, g_y, epsilon,
            m_h, s_h, m_g, s_g, m_p, s_p, m_n, s_n, logit_sum)  # fmt: skip


# ----------------------------------------------------------------------------- backward
# With p = softmax(h) and A_n = Σ_t log p[y_t], ∂A_n/∂h_t = onehot(y_t) − p_t, and the loss
# reaches A_n only through one scalar per sequence row, c_n = ∂L/∂A_n (docs/SPEC.md,
# Gradients). So each token row needs h, its saved lse and c_n: p = exp(h − lse) costs one exp
# per element and no second reduction.
@triton.jit
def token_backward_kernel(
    # data ptrs
    policy_ptr,  # (N, T, V) policy logits h
    labels_ptr,  # (N, T)
    stats_ptr,  # (TOKEN_FIELDS, N·T) fp32 from the forward; only the lse field is read
    row_coef_ptr,  # (N,) fp32, c_n per sequence row (upstream gradient and averaging folded in)
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
):
    """Program (row, split) writes the gradient of one token row's columns [split·cols_per_split,
    …): zeros for an ignored row (without reading its logits), c·(onehot(y) − exp(h − lse))
    otherwise. Column j is vocabulary entry vocab_offset + j."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n = row // T
    t = row % T
    label = tl.load(labels_ptr + n * stride_ln + t * stride_lt).to(tl.int64)
    grad_row = grad_ptr + n * stride_gn + t * stride_gt
    col_start = split * cols_per_split
    col_end = tl.minimum(V, col_start + cols_per_split)
    tile = tl.arange(0, LANES)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    out_ty = grad_ptr.dtype.element_ty
    if label == ignore_index:
        for start in range(col_start, col_end, LANES * VEC):
            cols = start + tile
            tl.store(grad_row + cols, tl.zeros([LANES, VEC], dtype=out_ty), mask=cols < col_end)
        return

    policy_row = policy_ptr + n * stride_pn + t * stride_pt
    shift = tl.load(stats_ptr + TOK_LSE * n_rows + row) * LOG2E
    coef = tl.load(row_coef_ptr + n)
    label_col = label - vocab_offset
    full_end = col_start + (col_end - col_start) // (LANES * VEC) * (LANES * VEC)
    for start in range(col_start, full_end, LANES * VEC):
        cols = start + tile
        h = tl.load(policy_row + cols).to(tl.float32)
        grad = -coef * _exp2(h * LOG2E - shift, FAST_MATH)
        grad = tl.where(cols == label_col, grad + coef, grad)
        tl.store(grad_row + cols, grad.to(out_ty))
    if full_end < col_end:
        cols = full_end + tile
        valid = cols < col_end
        h = tl.load(policy_row + cols, mask=valid, other=-float("inf")).to(tl.float32)
        grad = -coef * _exp2(h * LOG2E - shift, FAST_MATH)
        grad = tl.where(cols == label_col, grad + coef, grad)
        tl.store(grad_row + cols, grad.to(out_ty), mask=valid)


# ----------------------------------------------------------------------------- launchers
def vec_of(dtype: torch.dtype) -> int:
    """Columns per 16-byte vector load."""
    return 16 // torch.empty((), dtype=dtype).element_size()


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_count(rows: int, vocab: int, block: int, sm_count: int) -> int:
    """V-splits per row so that the grid fills the GPU once: 1 when the rows alone give every
    SM its ``PROGRAMS_PER_SM`` programs; otherwise enough splits to do so, each at least
    ``MIN_BLOCKS_PER_SPLIT`` blocks wide."""
    slots = sm_count * PROGRAMS_PER_SM
    if rows >= slots:
        return 1
    max_splits = max(1, vocab // (MIN_BLOCKS_PER_SPLIT * block))
    return max(1, min(max_splits, -(-slots // max(rows, 1))))


def _fast_math() -> bool:
    from .validation import triton_interpreter_active

    return not triton_interpreter_active()


def _device_sm_count(x: torch.Tensor) -> int:
    # The interpreter runs one program at a time: nothing to fill, no split unless asked for.
    return _sm_count(x.device.index or 0) if x.device.type == "cuda" else 1


def _split_plan(x: torch.Tensor, block: int, splits: int | None) -> tuple[int, int]:
    """(splits, columns per split, a multiple of ``block``) for an ``(N, T, V)`` input."""
    n, t, v = x.shape
    if splits is None:
        splits = split_count(n * t, v, block, _device_sm_count(x))
    per_split = -(-v // splits)
    return splits, -(-per_split // block) * block


def forward_launches(policy_logits, ref_logits, labels, stats, partial, epsilon, ignore_index,
                     splits: int):  # fmt: skip
    """[(kernel, grid, args, constexprs, num_warps)] of the forward: one launch, or the split
    forward into ``partial`` and the merge. The real launch and the compile check
    (benchmarks/kernel_report.py) both build their arguments here."""
    n, t, v = policy_logits.shape
    rows = n * t
    lanes = 32 * FWD_WARPS * FWD_LANES_PER_THREAD
    vec = vec_of(policy_logits.dtype)
    splits, cols_per_split = _split_plan(policy_logits, lanes * vec, splits)
    fast = _fast_math()
    strides = (policy_logits.stride(0), policy_logits.stride(1), ref_logits.stride(0),
               ref_logits.stride(1), labels.stride(0), labels.stride(1))  # fmt: skip
    forward = (token_forward_kernel, (rows, splits),
               (policy_logits, ref_logits, labels, stats if splits == 1 else partial,
                t, v, rows, cols_per_split, *strides, epsilon, ignore_index),
               dict(LANES=lanes, VEC=vec, SPLIT=splits > 1, FAST_MATH=fast), FWD_WARPS)  # fmt: skip
    if splits == 1:
        return [forward]
    merge = (token_merge_kernel, (rows,),
             (policy_logits, ref_logits, labels, partial, stats, t, rows, splits, *strides,
              epsilon, ignore_index),
             dict(BLOCK_S=triton.next_power_of_2(splits), FAST_MATH=fast), 1)  # fmt: skip
    return [forward, merge]


def forward_splits(policy_logits: torch.Tensor) -> int:
    """The V-splits the forward uses for this input (1: one program per row)."""
    lanes = 32 * FWD_WARPS * FWD_LANES_PER_THREAD
    return _split_plan(policy_logits, lanes * vec_of(policy_logits.dtype), None)[0]


def token_forward(
    policy_logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, params,
    *, splits: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Launch the forward over all N·T token rows; returns the ``(TOKEN_FIELDS, N·T)`` stats.
    ``splits`` overrides the V-split heuristic (tests)."""
    policy_logits = _unit_stride_v(policy_logits)
    ref_logits = _unit_stride_v(ref_logits)
    n, t, _ = policy_logits.shape
    device = policy_logits.device
    stats = torch.empty((L.TOKEN_FIELDS, n * t), dtype=torch.float32, device=device)
    splits = splits or forward_splits(policy_logits)
    partial = None
    if splits > 1:
        partial = torch.empty((splits, N_PARTIAL, n * t), dtype=torch.float32, device=device)
    for spec in forward_launches(
        policy_logits, ref_logits, labels, stats, partial, params.epsilon, params.ignore_index,
        splits,
    ):  # fmt: skip
        launch(spec, device)
    return stats


def backward_launch(policy_logits, labels, stats, row_coef, grad, ignore_index, *,
                    vocab_offset: int = 0, splits: int | None = None):  # fmt: skip
    """(kernel, grid, args, constexprs, num_warps) of the backward."""
    n, t, v = policy_logits.shape
    lanes = 32 * BWD_WARPS * BWD_LANES_PER_THREAD
    vec = vec_of(policy_logits.dtype)
    splits, cols_per_split = _split_plan(policy_logits, lanes * vec, splits)
    return (token_backward_kernel, (n * t, splits),
            (policy_logits, labels, stats, row_coef, grad, t, v, n * t, cols_per_split,
             vocab_offset, policy_logits.stride(0), policy_logits.stride(1), labels.stride(0),
             labels.stride(1), grad.stride(0), grad.stride(1), ignore_index),
            dict(LANES=lanes, VEC=vec, FAST_MATH=_fast_math()), BWD_WARPS)  # fmt: skip


def token_backward(
    policy_logits: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    row_coef: torch.Tensor,
    params,
    *,
    inplace: bool,
    vocab_offset: int = 0,
    splits: int | None = None,
) -> torch.Tensor:
    """Gradient of the loss w.r.t. the ``(N, T, V)`` policy logits, in their dtype; column j is
    vocabulary entry ``vocab_offset + j`` (labels are full-vocabulary indices)."""
    policy_logits = _unit_stride_v(policy_logits)
    grad = policy_logits if inplace else torch.empty_like(policy_logits)
    spec = backward_launch(
        policy_logits, labels, stats, row_coef.float().contiguous(), grad, params.ignore_index,
        vocab_offset=vocab_offset, splits=splits,
    )  # fmt: skip
    launch(spec, policy_logits.device)
    return grad


def _unit_stride_v(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
