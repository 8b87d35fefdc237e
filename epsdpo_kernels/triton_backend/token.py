"""Per-token Triton kernels: the forward log-probabilities and the backward logits gradient.

Both kernels see their input as ``rows = N·T`` token rows of a ``(N, T, V)`` tensor with arbitrary
strides on the first two dimensions and unit stride over V, so ``logits[:, :-1]`` slices and the
linear path's compact ``(C, 1, V)`` chunks go through without a copy. Offsets are computed in
int64: 2B·T·V passes 2^31 at realistic sizes (8 × 2048 × 128256 ≈ 2.1e9).

Design (the forward must be bound by memory, not by instruction issue; ``python
benchmarks/kernel_report.py`` shows the SASS count per element):

- A block is a ``[LANES, VEC]`` tile: each thread owns ``VEC`` consecutive columns (one 16-byte
  load per tensor) of each of its lanes. The four streams keep a running (max, k, sum) *per
  lane*; reducing over ``VEC`` stays inside a thread, so the steady-state loop has no shuffles,
  barriers or shared memory. Lanes are combined once per row, after the loop.
- Full blocks run unmasked; one masked tail block follows.
- A lane's sums are relative to 2^k, k = round(max·log2e) an integer (vocab_merge.SHIFT_MAGIC),
  not to its running max: a block that raises the max rescales them by 2^(k_old − k_new), an
  exact power of two from integer ops, so the loop's only SFU work is one exp per element and
  stream (4 per (h, g) pair; an exp-based rescale per lane and block cost 4/VEC more, and the
  H200's exps are what bounds this kernel, docs/PERFORMANCE.md). After the loop each lane's sums
  are brought to its max (one exp per lane), so the merges see (max, sum) states.
- exp2 on inputs pre-scaled by log2(e) in one FMA; on the GPU the flush-to-zero ``ex2.approx``
  (inline PTX: ``tl.exp2`` lowers to the non-ftz form with denormal fix-ups). Under the CPU
  interpreter the portable ``tl.exp2`` runs instead (``FAST_MATH`` is a constexpr).
- The mixes are ``h ± ε·(h − g)``: exactly ``h`` when policy == reference, so the four
  log-probabilities are then bitwise equal and every step is 0.
- With few rows (an eval batch, the last chunk of the linear path) the grid would leave SMs idle:
  the launcher then splits V across programs, which write partial (max, sum) states that the
  merge kernel of vocab_merge.py combines (``split_count``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import layout as L
from ..params import triton_interpreter_active
from .fields import TOK_LSE, TOKEN_FIELDS
from .launch import launch
from .vocab_merge import (
    LOG2E,
    MAX_FLOOR,
    N_PARTIAL,
    PARTIAL_FIELDS,
    SHIFT_CEILING,
    SHIFT_FLOOR,
    SHIFT_MAGIC,
    _exp2,
    _finish,
    _merge_lanes,
    _merge_squares,
    _model_logits,
    _model_logits_slope,
    _pow2,
    _shift_bits,
    _stack,
    _unstack,
    token_merge_kernel,
)

# Launch shape: warps per program and lanes per thread per block (tuned from ptxas's register
# counts for sm_90 with zero spills; see kernel_report.py). VEC = 16 bytes / element size.
FWD_WARPS, FWD_LANES_PER_THREAD = 8, 1
BWD_WARPS, BWD_LANES_PER_THREAD = 8, 2
# ptxas's cap on registers (a launch option, not a constexpr): 64 lets four 256-thread programs
# share an SM, 4 × 256 × 32 bytes = 32 KB of loads in flight, what an H200's 4.3 TB/s needs at
# ~1 µs latency. Left alone, the backward's allocation varies with Triton's code (3.6: 40-80 with
# rows not 16-byte aligned in bf16), and so does the half-precision forward's with WPO's sums
# (Triton 3.9: 80 at V = 50257); with the cap neither spills (tests/kernels/test_compile.py). See
# ``_backward_register_cap`` and ``forward_launches``.
MAX_REGISTERS = 64
# Programs an SM holds at once, for the split heuristic: register-limited, 256 threads of up to
# 64 registers fit four times in 64K, and ptxas gives the bf16 forward 57-64 under Triton 3.6 and
# 3.9 (fp32: 40; benchmarks/kernel_report.py). Counting 4 where 5 fit splits a little less.
PROGRAMS_PER_SM = 4
# A V-split spans at least this many blocks, so that its loop, not its merge, dominates.
MIN_BLOCKS_PER_SPLIT = 4


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _fold_block(
    h, g, h_to_sum, state, epsilon, FAST_MATH: tl.constexpr, SUM_SQUARES: tl.constexpr = False
):
    """Fold one [LANES, VEC] block of h and g into the per-lane states.

    The four streams (policy, reference and the two mixes) are stacked on two trailing axes of
    size 2, so one (max, shift, Σexp) update serves all four: [LANES, VEC, 2, 2] → [LANES, 2, 2].
    Stacking is free (each thread's values stay in its registers) and the VEC reduction stays
    in-thread. The sums are Σ 2^(x·log2e − k) with k = round(max·log2e), kept as the shift
    k + SHIFT_MAGIC (vocab_merge.SHIFT_MAGIC): one FFMA rounds, and the rescale 2^(k_old − k_new)
    is exact and costs no exp; ``_lane_states`` brings the sums to the max after the loop. A NaN
    in h or g makes its lanes' sums NaN on every target.
    ``h_to_sum`` is h with the tail's masked columns zeroed, added into the logit-sum tile.
    With ``SUM_SQUARES`` the policy's Σ 2^(2(h·log2e − k)) (WPO's Σp², scaled) rides along: the
    square of the exponential already computed and of the rescale, no further exp."""
    run_max, run_shift, run_sum, logit_sum = state[0], state[1], state[2], state[3]
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
    # k = round(max·log2e) in one FFMA (SHIFT_MAGIC), monotone in the max; the running max
    # starts at MAX_FLOOR, so k ≥ −2^21·log2e, and the ceiling keeps k < 2^22.
    new_shift = tl.minimum(new_max * LOG2E + SHIFT_MAGIC, SHIFT_CEILING)
    rescale = _pow2(_shift_bits(run_shift) - _shift_bits(new_shift))
    minus_k = SHIFT_MAGIC - new_shift  # exact: both integers in [2^23, 2^24)
    e = _exp2(x * LOG2E + minus_k[:, None, :, :], FAST_MATH)
    run_sum = run_sum * rescale + tl.sum(e, axis=1)
    # The state is a 4-tuple, or a 5-tuple with the squares: a plain launch carries nothing
    # for them through its loop, so its code is the one it was without WPO.
    if SUM_SQUARES:
        e_h = _unstack_policy(e)  # [LANES, VEC]
        rescale_h = _unstack_policy(rescale)  # [LANES]
        run_squares = state[4] * (rescale_h * rescale_h) + tl.sum(e_h * e_h, axis=1)
        state = (new_max, new_shift, run_sum, logit_sum + h_to_sum, run_squares)
    else:
        state = (new_max, new_shift, run_sum, logit_sum + h_to_sum)
    return state


@triton.jit
def _unstack_policy(x):
    """The policy stream of a stacked [..., 2, 2] tensor (see _stack)."""
    hg, _ = tl.split(x)
    h, _ = tl.split(hg)
    return h


@triton.jit
def _lane_states(state, FAST_MATH: tl.constexpr, SUM_SQUARES: tl.constexpr):
    """Each lane's (max, Σexp(x − max)) from its loop state, whose sums are relative to 2^k
    (see _fold_block): one exp per lane and stream, once per row. With ``SUM_SQUARES``, also
    the policy's Σ exp(2(h − max)); 0.0 otherwise."""
    lane_max, lane_shift, lane_sum = state[0], state[1], state[2]
    # 2^(k − max·log2e), |exponent| ≤ 1/2 up to rounding: the sums stay as accurate as the
    # loop's, and downstream (the lane, split and shard merges, lse) sees max-relative sums.
    to_max = _exp2((lane_shift - SHIFT_MAGIC) - lane_max * LOG2E, FAST_MATH)
    squares = 0.0
    if SUM_SQUARES:
        to_max_h = _unstack_policy(to_max)
        squares = state[4] * (to_max_h * to_max_h)
    return lane_max, lane_sum * to_max, squares


@triton.jit
def _masked_model_logits(
    h, g, valid, LOGIT_SCALE: tl.constexpr, SOFTCAP: tl.constexpr, FAST_MATH: tl.constexpr
):
    """The model's logits of a masked block: the cap would turn the masked columns' −inf into
    −cap, an entry that counts; they stay −inf (absent)."""
    h = _model_logits(h, LOGIT_SCALE, SOFTCAP, FAST_MATH)
    g = _model_logits(g, LOGIT_SCALE, SOFTCAP, FAST_MATH)
    if SOFTCAP > 0.0:
        h = tl.where(valid, h, -float("inf"))
        g = tl.where(valid, g, -float("inf"))
    return h, g


@triton.jit
def _first_aligned_column(row_offset, col_start, col_end, VEC: tl.constexpr):
    """The first column ≥ col_start (at most col_end) whose element sits on a 16-byte boundary,
    for a row starting ``row_offset`` elements after a 16-byte-aligned base. A row whose stride
    is not a multiple of VEC (V = 50257, 32001, 128257) starts mid-vector; the columns before
    this one are a masked head block, and whole vector-aligned blocks follow."""
    head = (VEC - (row_offset + col_start) % VEC) % VEC
    return tl.minimum(col_start + head, col_end)


# ----------------------------------------------------------------------------- forward
@triton.jit
def _load_block(block, LANES: tl.constexpr, VEC: tl.constexpr, WORDS: tl.constexpr):
    """A whole [LANES, VEC] block of logits as fp32. bf16 is the top half of an fp32, so with
    ``WORDS`` (bf16 whose blocks start on 16-byte boundaries: word_loads) each 32-bit word of
    two logits gives both by integer ops, a shift for the lower and a mask for the upper
    (`.to(float32)` compiles the upper to two instructions: ~1 more per (h, g) pair, 29.75
    against 28.5). Exact either way."""
    if WORDS and block.dtype.element_ty == tl.bfloat16:
        words = tl.load(
            block.to(tl.pointer_type(tl.uint32))
            + tl.arange(0, LANES)[:, None] * (VEC // 2)
            + tl.arange(0, VEC // 2)[None, :]
        )
        low = (words << 16).to(tl.float32, bitcast=True)
        high = (words & 0xFFFF0000).to(tl.float32, bitcast=True)
        return tl.reshape(tl.join(low, high), [LANES, VEC])
    else:
        tile = tl.arange(0, LANES)[:, None] * VEC + tl.arange(0, VEC)[None, :]
        return tl.load(block + tile).to(tl.float32)


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
    ALIGN_ROWS: tl.constexpr,  # rows may start mid-vector: align each before its main loop
    WORDS: tl.constexpr = False,  # bf16 whole blocks read as 32-bit words (word_loads)
    LOGIT_SCALE: tl.constexpr = 1.0,  # the model's logits from z (vocab_merge._model_logits)
    SOFTCAP: tl.constexpr = 0.0,  # 0: no cap
    SUM_SQUARES: tl.constexpr = False,  # also the policy's Σp² (WPO's TOK_WPO_LOGP)
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

    policy_offset = n * stride_pn + t * stride_pt
    ref_offset = n * stride_rn + t * stride_rt
    policy_row = policy_ptr + policy_offset
    ref_row = ref_ptr + ref_offset
    col_start = split * cols_per_split
    col_end = tl.minimum(V, col_start + cols_per_split)
    # Column (lane, k) of a block sits at lane·VEC + k: each thread's VEC columns are adjacent
    # (one vector load) and lanes are adjacent across threads (coalesced).
    tile = tl.arange(0, LANES)[:, None] * VEC + tl.arange(0, VEC)[None, :]

    # Per-lane (max, shift, sum) of the four streams, [LANES, 2, 2] (see _fold_block), fp32
    # whatever the load dtype: the sums run over 1e5+ terms. Loop-carried values must enter the
    # loop as fp32 tensors of their final shape.
    zeros = tl.zeros([LANES, 2, 2], dtype=tl.float32)
    if SUM_SQUARES:  # and Σ 2^(2(h·log2e − k)) per lane
        state = (
            zeros + MAX_FLOOR,
            zeros + SHIFT_FLOOR,
            zeros,
            tl.zeros([LANES, VEC], dtype=tl.float32),
            tl.zeros([LANES], dtype=tl.float32),
        )
    else:
        state = (
            zeros + MAX_FLOOR,
            zeros + SHIFT_FLOOR,
            zeros,
            tl.zeros([LANES, VEC], dtype=tl.float32),
        )
    first = col_start
    if ALIGN_ROWS:
        # h and g rows start equally far from a 16-byte boundary (the launcher checked): a
        # masked head block up to the boundary, then the vector loop from there on.
        first = _first_aligned_column(policy_offset, col_start, col_end, VEC)
        if first > col_start:
            cols = col_start + tile
            valid = cols < first
            # Masked columns are −inf in both: an absent entry, which contributes nothing.
            h = tl.load(policy_row + cols, mask=valid, other=-float("inf")).to(tl.float32)
            g = tl.load(ref_row + cols, mask=valid, other=-float("inf")).to(tl.float32)
            h, g = _masked_model_logits(h, g, valid, LOGIT_SCALE, SOFTCAP, FAST_MATH)
            state = _fold_block(
                h, g, tl.where(valid, h, 0.0), state, epsilon, FAST_MATH, SUM_SQUARES
            )
        policy_block = policy_ptr + tl.multiple_of(policy_offset + first, VEC)
        ref_block = ref_ptr + tl.multiple_of(ref_offset + first, VEC)
    else:
        policy_block = policy_row + first
        ref_block = ref_row + first
    # Whole blocks from `first` on, unmasked, at offsets the compiler sees as multiples of the
    # block (so the loads are 16-byte vectors); then one masked tail block.
    full_blocks = (col_end - first) // (LANES * VEC)
    for k in range(0, full_blocks):
        h = _load_block(policy_block + k * (LANES * VEC), LANES, VEC, WORDS)
        g = _load_block(ref_block + k * (LANES * VEC), LANES, VEC, WORDS)
        h = _model_logits(h, LOGIT_SCALE, SOFTCAP, FAST_MATH)
        g = _model_logits(g, LOGIT_SCALE, SOFTCAP, FAST_MATH)
        state = _fold_block(h, g, h, state, epsilon, FAST_MATH, SUM_SQUARES)
    rest = col_end - first - full_blocks * (LANES * VEC)
    if rest > 0:
        cols = full_blocks * (LANES * VEC) + tile
        valid = tile < rest
        h = tl.load(policy_block + cols, mask=valid, other=-float("inf")).to(tl.float32)
        g = tl.load(ref_block + cols, mask=valid, other=-float("inf")).to(tl.float32)
        h, g = _masked_model_logits(h, g, valid, LOGIT_SCALE, SOFTCAP, FAST_MATH)
        state = _fold_block(h, g, tl.where(valid, h, 0.0), state, epsilon, FAST_MATH, SUM_SQUARES)

    lane_max, lane_sum, squares = _lane_states(state, FAST_MATH, SUM_SQUARES)
    row_max, row_sum = _merge_lanes(lane_max, lane_sum, FAST_MATH)  # [2, 2] each
    m_h, m_g, m_p, m_n = _unstack(row_max)
    s_h, s_g, s_p, s_n = _unstack(row_sum)
    logit_sum = tl.sum(tl.sum(state[3], axis=1), axis=0)
    if SUM_SQUARES:
        squares = _merge_squares(_unstack_policy(lane_max), squares, m_h, FAST_MATH)
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
        if SUM_SQUARES:
            tl.store(part + 9 * n_rows, squares)
    else:
        h_y = tl.load(policy_row + label).to(tl.float32)
        g_y = tl.load(ref_row + label).to(tl.float32)
        h_y = _model_logits(h_y, LOGIT_SCALE, SOFTCAP, FAST_MATH)
        g_y = _model_logits(g_y, LOGIT_SCALE, SOFTCAP, FAST_MATH)
        _finish(
            out_ptr,
            row,
            n_rows,
            h_y,
            g_y,
            epsilon,
            m_h,
            s_h,
            m_g,
            s_g,
            m_p,
            s_p,
            m_n,
            s_n,
            logit_sum,
            squares,
            SUM_SQUARES,
        )


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
        first = _first_aligned_column(grad_offset, col_start, col_end, VEC)
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
    # compared with the blocks' own 32-bit columns: a 64-bit row column per element took Triton
    # 3.9's bf16 backward to 93 registers at V = 50257 (2 programs per SM).
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
        h = _model_logits(h, LOGIT_SCALE, SOFTCAP, FAST_MATH)
        grad = -coef * _exp2(h * LOG2E - shift, FAST_MATH)
        grad = tl.where(row_cols == label_col, grad + coef, grad)
        if LOGIT_SCALE != 1.0 or SOFTCAP > 0.0:
            # Through the model's transform to its lm_head outputs z (masked columns are not
            # stored, so their −cap does no harm here).
            grad = grad * _model_logits_slope(h, LOGIT_SCALE, SOFTCAP)
    out = grad.to(grad_base.dtype.element_ty)
    if MASKED:
        tl.store(grad_base + cols, out, mask=valid)
    else:
        tl.store(grad_base + cols, out)


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
    ``MIN_BLOCKS_PER_SPLIT`` blocks wide, and none empty (``split_plan``)."""
    slots = sm_count * PROGRAMS_PER_SM
    if rows >= slots:
        return 1
    max_splits = max(1, vocab // (MIN_BLOCKS_PER_SPLIT * block))
    return split_plan(vocab, block, min(max_splits, -(-slots // max(rows, 1))))[0]


def split_plan(vocab: int, block: int, splits: int) -> tuple[int, int]:
    """(splits, columns per split) for at most ``splits`` splits of ``vocab`` columns: each a
    whole number of blocks (its loop then runs unmasked up to the row's end), and as many
    splits as that width needs, so that none is empty (rounding the width up to blocks would
    otherwise leave trailing splits with no columns: V = 256000 in bf16 on one row asks for 31,
    whose 10240-column width fills 25)."""
    per_split = -(-vocab // max(splits, 1))
    per_split = max(block, -(-per_split // block) * block)
    return -(-vocab // per_split), per_split


def _fast_math() -> bool:
    return not triton_interpreter_active()


def _device_sm_count(x: torch.Tensor) -> int:
    # The interpreter runs one program at a time: nothing to fill, no split unless asked for.
    return _sm_count(x.device.index or 0) if x.device.type == "cuda" else 1


def _split_plan(x: torch.Tensor, block: int, splits: int | None) -> tuple[int, int]:
    """(splits, columns per split, a multiple of ``block``) for an ``(N, T, V)`` input."""
    n, t, v = x.shape
    if splits is None:
        splits = split_count(n * t, v, block, _device_sm_count(x))
    return split_plan(v, block, splits)


def align_rows(vec: int, *tensors: torch.Tensor) -> bool:
    """Whether the kernels take the ``ALIGN_ROWS`` path for these ``(N, T, V)`` tensors.

    Triton vectorises the loads of a row only if it can prove the row starts on a 16-byte
    boundary: from its specialisation, that holds when both row strides are multiples of 16
    elements (V = 128256) and nothing more is needed. Otherwise (V = 50257, 32001, 128257, or
    50264 in bf16) the kernels align each row themselves: a masked head block up to the
    boundary, then the vector loop. One head serves all the tensors only if every row starts
    equally far from a boundary in each (16-byte-aligned bases, equal strides modulo VEC;
    size-1 dimensions do not count); tensors misaligned differently take the plain loop,
    correct without vector loads."""
    if any(x.data_ptr() % 16 for x in tensors) or _rows_on_boundaries(*tensors):
        return False
    residues = {tuple(x.stride(d) % vec if x.shape[d] > 1 else 0 for d in (0, 1)) for x in tensors}
    return len(residues) == 1


def _rows_on_boundaries(*tensors: torch.Tensor) -> bool:
    """Every row of these ``(N, T, V)`` tensors starts on a 16-byte boundary as laid out."""
    return all(
        x.data_ptr() % 16 == 0 and x.stride(0) % 16 == 0 and x.stride(1) % 16 == 0 for x in tensors
    )


def word_loads(vec: int, *tensors: torch.Tensor) -> bool:
    """Whether the forward reads the whole blocks of these bf16 tensors as 32-bit words
    (``WORDS``, _load_block): only where every block starts on a 16-byte boundary, rows that
    start on one or are aligned by ``ALIGN_ROWS``. A 4-byte load from a 2-byte-aligned address
    faults on a GPU (the interpreter would read it)."""
    if any(x.dtype != torch.bfloat16 for x in tensors):
        return False
    return _rows_on_boundaries(*tensors) or align_rows(vec, *tensors)


def _transform_constexprs(logit_scale: float, logit_softcap: float | None) -> dict:
    """The model's logit transform as compile-time constants: none (the default, the plain
    kernels), a scale, a cap (a model has one value: one specialisation)."""
    return dict(
        LOGIT_SCALE=float(logit_scale),
        SOFTCAP=0.0 if logit_softcap is None else float(logit_softcap),
    )


def forward_launches(
    policy_logits,
    ref_logits,
    labels,
    stats,
    partial,
    epsilon,
    ignore_index,
    splits: int,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    wpo_weights: bool = False,
    partial_only: bool = False,
):
    """[(kernel, grid, args, constexprs, num_warps)] of the forward: one launch, or the split
    forward into ``partial`` and the merge. ``partial_only``: the forward writes each row's
    partial states into ``partial`` even unsplit, and no merge follows (a vocabulary shard's
    partials, merged over ranks first: vocab_shard.py). The real launch and the compile check
    (benchmarks/kernel_report.py) both build their arguments here."""
    n, t, v = policy_logits.shape
    rows = n * t
    lanes = 32 * FWD_WARPS * FWD_LANES_PER_THREAD
    vec = vec_of(policy_logits.dtype)
    splits, cols_per_split = _split_plan(policy_logits, lanes * vec, splits)
    fast = _fast_math()
    transform = _transform_constexprs(logit_scale, logit_softcap)
    if wpo_weights:  # a specialisation of its own: the plain kernels stay as they are
        transform["SUM_SQUARES"] = True
    register_cap = {}
    transformed = logit_softcap is not None or float(logit_scale) != 1.0
    if policy_logits.element_size() == 2 and (wpo_weights or not transformed):
        # Half precision: rows not 16-byte aligned took the plain forward to 73 registers
        # (3 programs, 24 KB in flight), WPO's to 80 under Triton 3.9. The soft-capped forward
        # spills under the cap (8-16 bytes at V = 50257 under Triton 3.6 and 3.9) and keeps its
        # own allocation. fp32 keeps 40-48 uncapped (5-6 programs); capped, ptxas takes 53-56.
        register_cap = dict(maxnreg=MAX_REGISTERS)
    strides = (
        policy_logits.stride(0),
        policy_logits.stride(1),
        ref_logits.stride(0),
        ref_logits.stride(1),
        labels.stride(0),
        labels.stride(1),
    )
    forward = (
        token_forward_kernel,
        (rows, splits),
        (
            policy_logits,
            ref_logits,
            labels,
            stats if splits == 1 and not partial_only else partial,
            t,
            v,
            rows,
            cols_per_split,
            *strides,
            epsilon,
            ignore_index,
        ),
        dict(
            LANES=lanes,
            VEC=vec,
            SPLIT=splits > 1 or partial_only,
            FAST_MATH=fast,
            ALIGN_ROWS=align_rows(vec, policy_logits, ref_logits),
            # The soft-capped forward, SFU-bound, keeps `.to`: ptxas spills its word form.
            WORDS=logit_softcap is None and word_loads(vec, policy_logits, ref_logits),
            **transform,
            **register_cap,
        ),
        FWD_WARPS,
    )
    if splits == 1 or partial_only:
        return [forward]
    merge = (
        token_merge_kernel,
        (rows,),
        (
            policy_logits,
            ref_logits,
            labels,
            partial,
            stats,
            t,
            rows,
            splits,
            *strides,
            epsilon,
            ignore_index,
        ),
        dict(BLOCK_S=triton.next_power_of_2(splits), FAST_MATH=fast, **transform),
        1,
    )
    return [forward, merge]


def forward_splits(policy_logits: torch.Tensor) -> int:
    """The V-splits the forward uses for this input (1: one program per row)."""
    lanes = 32 * FWD_WARPS * FWD_LANES_PER_THREAD
    return _split_plan(policy_logits, lanes * vec_of(policy_logits.dtype), None)[0]


def token_forward(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    labels: torch.Tensor,
    params,
    *,
    splits: int | None = None,
) -> torch.Tensor:
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
        policy_logits,
        ref_logits,
        labels,
        stats,
        partial,
        params.epsilon,
        params.ignore_index,
        splits,
        params.logit_scale,
        params.logit_softcap,
        params.wpo_weights,
    ):
        launch(spec, device)
    return stats


def _backward_register_cap(logit_scale: float, logit_softcap: float | None) -> dict:
    """The backward's register cap. The soft-capped (or scaled) backward keeps more live values
    (the slope 1 − tanh²): uncapped it takes 80 registers in half precision at rows that are
    not 16-byte aligned (3 programs, 24 KB in flight), and under the cap Triton 3.6's code spills
    (8 bytes on sm_90, 24 on sm_80) where Triton 3.9's does not. So it is capped from 3.9 on,
    the newest release compiled here (tests/kernels/test_compile.py runs 3.6 and 3.9)."""
    if logit_softcap is None and float(logit_scale) == 1.0:
        return dict(maxnreg=MAX_REGISTERS)
    if _triton_version() >= (3, 9):
        return dict(maxnreg=MAX_REGISTERS)
    return {}


def _triton_version() -> tuple[int, int]:
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


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
    """(kernel, grid, args, constexprs, num_warps) of the backward."""
    n, t, v = policy_logits.shape
    lanes = 32 * BWD_WARPS * BWD_LANES_PER_THREAD
    vec = vec_of(policy_logits.dtype)
    splits, cols_per_split = _split_plan(policy_logits, lanes * vec, splits)
    return (
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
            FAST_MATH=_fast_math(),
            ALIGN_ROWS=align_rows(vec, policy_logits, grad),
            **_transform_constexprs(logit_scale, logit_softcap),
            **_backward_register_cap(logit_scale, logit_softcap),
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
    policy_logits = _unit_stride_v(policy_logits)
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


def _unit_stride_v(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
