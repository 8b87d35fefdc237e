"""The per-token Triton forward: each token row's four log-sum-exps in one pass over V.

The kernels see their input as ``rows = N·T`` token rows of a ``(N, T, V)`` tensor with arbitrary
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
- A lane's sums are relative to 2^k, k = round(max·log2e) an integer (lse.SHIFT_MAGIC),
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
  ``token_merge_kernel`` combines (launch.split_count).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import layout as L
from .fields import PART_EXP_SUMS, PART_LOGIT_SUM, PART_MAXES, PART_SQUARES, PARTIAL_FIELDS
from .launch import (
    FWD_LANES_PER_THREAD,
    FWD_WARPS,
    Launch,
    align_rows,
    fast_math,
    first_aligned_column,
    forward_register_cap,
    launch,
    plan_splits,
    transform_constexprs,
    unit_stride_v,
    vec_of,
    word_loads,
)
from .lse import (
    LOG2E,
    MAX_FLOOR,
    SHIFT_CEILING,
    SHIFT_FLOOR,
    SHIFT_MAGIC,
    exp2,
    finish_row,
    merge_lanes,
    merge_squares,
    model_logits,
    pow2,
    shift_bits,
    stack,
    unstack,
    zero_row,
)


@triton.jit
def _fold_block(
    h, g, h_to_sum, state, epsilon, FAST_MATH: tl.constexpr, SUM_SQUARES: tl.constexpr = False
):
    """Fold one [LANES, VEC] block of h and g into the per-lane states.

    The four streams (policy, reference and the two mixes) are stacked on two trailing axes of
    size 2, so one (max, shift, Σexp) update serves all four: [LANES, VEC, 2, 2] → [LANES, 2, 2].
    Stacking is free (each thread's values stay in its registers) and the VEC reduction stays
    in-thread. The sums are Σ 2^(x·log2e − k) with k = round(max·log2e), kept as the shift
    k + SHIFT_MAGIC (lse.SHIFT_MAGIC): one FFMA rounds, and the rescale 2^(k_old − k_new)
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
    x = stack(h, g, mix_p, mix_n)
    new_max = tl.maximum(run_max, tl.max(x, axis=1))
    # k = round(max·log2e) in one FFMA (SHIFT_MAGIC), monotone in the max; the running max
    # starts at MAX_FLOOR, so k ≥ −2^21·log2e, and the ceiling keeps k < 2^22.
    new_shift = tl.minimum(new_max * LOG2E + SHIFT_MAGIC, SHIFT_CEILING)
    rescale = pow2(shift_bits(run_shift) - shift_bits(new_shift))
    minus_k = SHIFT_MAGIC - new_shift  # exact: both integers in [2^23, 2^24)
    e = exp2(x * LOG2E + minus_k[:, None, :, :], FAST_MATH)
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
    """The policy stream of a stacked [..., 2, 2] tensor (see stack)."""
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
    to_max = exp2((lane_shift - SHIFT_MAGIC) - lane_max * LOG2E, FAST_MATH)
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
    h = model_logits(h, LOGIT_SCALE, SOFTCAP, FAST_MATH)
    g = model_logits(g, LOGIT_SCALE, SOFTCAP, FAST_MATH)
    if SOFTCAP > 0.0:
        h = tl.where(valid, h, -float("inf"))
        g = tl.where(valid, g, -float("inf"))
    return h, g


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
    LOGIT_SCALE: tl.constexpr = 1.0,  # the model's logits from z (lse.model_logits)
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
            zero_row(out_ptr, row, n_rows)
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
        first = first_aligned_column(policy_offset, col_start, col_end, VEC)
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
        h = model_logits(h, LOGIT_SCALE, SOFTCAP, FAST_MATH)
        g = model_logits(g, LOGIT_SCALE, SOFTCAP, FAST_MATH)
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
    row_max, row_sum = merge_lanes(lane_max, lane_sum, FAST_MATH)  # [2, 2] each
    m_h, m_g, m_p, m_n = unstack(row_max)
    s_h, s_g, s_p, s_n = unstack(row_sum)
    logit_sum = tl.sum(tl.sum(state[3], axis=1), axis=0)
    if SUM_SQUARES:
        squares = merge_squares(_unstack_policy(lane_max), squares, m_h, FAST_MATH)
    if SPLIT:
        part = out_ptr + split.to(tl.int64) * PARTIAL_FIELDS * n_rows + row
        tl.store(part + (PART_MAXES + 0) * n_rows, m_h)
        tl.store(part + (PART_MAXES + 1) * n_rows, m_g)
        tl.store(part + (PART_MAXES + 2) * n_rows, m_p)
        tl.store(part + (PART_MAXES + 3) * n_rows, m_n)
        tl.store(part + (PART_EXP_SUMS + 0) * n_rows, s_h)
        tl.store(part + (PART_EXP_SUMS + 1) * n_rows, s_g)
        tl.store(part + (PART_EXP_SUMS + 2) * n_rows, s_p)
        tl.store(part + (PART_EXP_SUMS + 3) * n_rows, s_n)
        tl.store(part + PART_LOGIT_SUM * n_rows, logit_sum)
        if SUM_SQUARES:
            tl.store(part + PART_SQUARES * n_rows, squares)
    else:
        h_y = tl.load(policy_row + label).to(tl.float32)
        g_y = tl.load(ref_row + label).to(tl.float32)
        h_y = model_logits(h_y, LOGIT_SCALE, SOFTCAP, FAST_MATH)
        g_y = model_logits(g_y, LOGIT_SCALE, SOFTCAP, FAST_MATH)
        finish_row(
            out_ptr,
            row,
            n_rows,
            h_y,
            g_y,
            epsilon,
            row_max,
            row_sum,
            logit_sum,
            squares,
            SUM_SQUARES,
        )


@triton.jit
def token_merge_kernel(
    policy_ptr,
    ref_ptr,
    labels_ptr,  # as token_forward_kernel
    partial_ptr,  # (splits, PARTIAL_FIELDS, N·T) fp32 from token_forward_kernel
    stats_ptr,  # (TOKEN_FIELDS, N·T) fp32 out
    T,
    n_rows,
    n_splits,
    stride_pn,
    stride_pt,
    stride_rn,
    stride_rt,
    stride_ln,
    stride_lt,
    epsilon,
    ignore_index,
    BLOCK_S: tl.constexpr,
    FAST_MATH: tl.constexpr,
    LOGIT_SCALE: tl.constexpr = 1.0,
    SOFTCAP: tl.constexpr = 0.0,
    SUM_SQUARES: tl.constexpr = False,
):
    """One program owns one token row: it combines the row's per-split states exactly as the
    unsplit kernel combines its lanes, then writes the row's stats."""
    row = tl.program_id(0).to(tl.int64)
    n = row // T
    t = row % T
    label = tl.load(labels_ptr + n * stride_ln + t * stride_lt).to(tl.int64)
    if label == ignore_index:
        zero_row(stats_ptr, row, n_rows)
        return
    splits = tl.arange(0, BLOCK_S)
    valid = splits < n_splits
    base = partial_ptr + splits.to(tl.int64) * PARTIAL_FIELDS * n_rows + row
    neg_inf = -float("inf")
    split_max = stack(
        tl.load(base + (PART_MAXES + 0) * n_rows, mask=valid, other=neg_inf),
        tl.load(base + (PART_MAXES + 1) * n_rows, mask=valid, other=neg_inf),
        tl.load(base + (PART_MAXES + 2) * n_rows, mask=valid, other=neg_inf),
        tl.load(base + (PART_MAXES + 3) * n_rows, mask=valid, other=neg_inf),
    )
    split_sum = stack(
        tl.load(base + (PART_EXP_SUMS + 0) * n_rows, mask=valid, other=0.0),
        tl.load(base + (PART_EXP_SUMS + 1) * n_rows, mask=valid, other=0.0),
        tl.load(base + (PART_EXP_SUMS + 2) * n_rows, mask=valid, other=0.0),
        tl.load(base + (PART_EXP_SUMS + 3) * n_rows, mask=valid, other=0.0),
    )
    row_max, row_sum = merge_lanes(split_max, split_sum, FAST_MATH)
    m_h = unstack(row_max)[0]
    logit_sum = tl.sum(tl.load(base + PART_LOGIT_SUM * n_rows, mask=valid, other=0.0), axis=0)
    squares = 0.0
    if SUM_SQUARES:
        split_max_h = tl.load(base + (PART_MAXES + 0) * n_rows, mask=valid, other=neg_inf)
        split_squares = tl.load(base + PART_SQUARES * n_rows, mask=valid, other=0.0)
        squares = merge_squares(split_max_h, split_squares, m_h, FAST_MATH)
    h_y = tl.load(policy_ptr + n * stride_pn + t * stride_pt + label).to(tl.float32)
    g_y = tl.load(ref_ptr + n * stride_rn + t * stride_rt + label).to(tl.float32)
    h_y = model_logits(h_y, LOGIT_SCALE, SOFTCAP, FAST_MATH)
    g_y = model_logits(g_y, LOGIT_SCALE, SOFTCAP, FAST_MATH)
    finish_row(
        stats_ptr, row, n_rows, h_y, g_y, epsilon, row_max, row_sum, logit_sum, squares, SUM_SQUARES
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
    """The forward's ``Launch`` list: one launch, or the split
    forward into ``partial`` and the merge. ``partial_only``: the forward writes each row's
    partial states into ``partial`` even unsplit, and no merge follows (a vocabulary shard's
    partials, merged over ranks first: vocab_shard.py). The real launch and the compile check
    (benchmarks/kernel_report.py) both build their arguments here."""
    n, t, v = policy_logits.shape
    rows = n * t
    lanes = 32 * FWD_WARPS * FWD_LANES_PER_THREAD
    vec = vec_of(policy_logits.dtype)
    splits, cols_per_split = plan_splits(policy_logits, lanes * vec, splits)
    fast = fast_math()
    transform = transform_constexprs(logit_scale, logit_softcap)
    transformed = logit_softcap is not None or float(logit_scale) != 1.0
    if wpo_weights:  # a specialisation of its own: the plain kernels stay as they are
        transform["SUM_SQUARES"] = True
    strides = (
        policy_logits.stride(0),
        policy_logits.stride(1),
        ref_logits.stride(0),
        ref_logits.stride(1),
        labels.stride(0),
        labels.stride(1),
    )
    forward = Launch(
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
            **forward_register_cap(policy_logits.element_size(), transformed, wpo_weights),
        ),
        FWD_WARPS,
    )
    if splits == 1 or partial_only:
        return [forward]
    merge = Launch(
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
    return plan_splits(policy_logits, lanes * vec_of(policy_logits.dtype), None)[0]


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
    policy_logits = unit_stride_v(policy_logits)
    ref_logits = unit_stride_v(ref_logits)
    n, t, _ = policy_logits.shape
    device = policy_logits.device
    stats = torch.empty((L.TOKEN_FIELDS, n * t), dtype=torch.float32, device=device)
    splits = splits or forward_splits(policy_logits)
    partial = None
    if splits > 1:
        partial = torch.empty((splits, L.PARTIAL_FIELDS, n * t), dtype=torch.float32, device=device)
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
